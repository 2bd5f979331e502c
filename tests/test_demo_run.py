"""The demo, scored against the phantom's ground truth: `configs/phantom.yaml` end to end (about
3.5 min on 2 CPU cores), then what the planted findings say must hold. Figures in the comments
were measured on this project's 2-core machine (README, "Phantom results")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from mammo_sae.pipeline import RunConfig, run_pipeline

pytestmark = pytest.mark.slow
CONCEPTS = ("Mass", "Suspicious_Calcification")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    run_pipeline(RunConfig(config=Path("configs/phantom.yaml"), out=out, progress=False))
    return out


def _auroc(run: Path, name: str) -> float:
    return json.loads((run / "models" / "models.json").read_text())["test_metrics"][name]["auroc"]["value"]


def test_finetuning_makes_the_planted_concepts_readable(demo_run: Path) -> None:
    for concept in CONCEPTS:
        lp, ft = _auroc(demo_run, f"{concept}-pretrained"), _auroc(demo_run, f"{concept}-finetuned")
        # Measured 0.997 (Mass), 0.870 (calcification: the marker shortcut it learnt in training
        # costs it on the marker-independent test split); linear probes 0.571, 0.574.
        assert ft > 0.8, (concept, ft)
        assert ft > lp + 0.2, (concept, lp, ft)


def test_sae_keeps_the_classifier_it_was_trained_on(demo_run: Path) -> None:
    table = pd.read_csv(demo_run / "analysis" / "fidelity" / "table1.csv").set_index("model")
    own = table.loc["Suspicious_Calcification-finetuned"]
    assert own["fvu"] < 0.1 and own["recovered"] > 0.9, own.to_dict()   # 0.013, 1.00


def test_interventions_keep_all_equals_reconstruction_and_off_all_is_chance(demo_run: Path) -> None:
    fidelity = pd.read_csv(demo_run / "analysis" / "fidelity" / "table1.csv").set_index("model")
    for name in fidelity.index:
        sweep = pd.read_csv(demo_run / "analysis" / "intervene" / name / "intervene.csv")
        on, off = sweep[sweep["mode"] == "on"], sweep[sweep["mode"] == "off"]
        assert on["auroc"].iloc[-1] == pytest.approx(fidelity.loc[name, "auroc_sae"], abs=1e-9)
        assert off["auroc"].iloc[-1] == 0.5 and on["auroc"].iloc[0] == 0.5
    # The finetuned decision lives in the class latents: switching off the top-k of each class
    # takes the finetuned classifiers to chance (or past it) for some k ≤ 1000. The curve is not
    # monotone (the calcification decision partly rides on marker-associated latents outside its
    # class rankings), so the claim is about its minimum, not one k. Measured with four SAE seeds
    # (49 = the demo's, 1, 2, 3): minimum 0.48/0.39/0.46/0.47 (Mass), 0.34/0.50/0.52/0.60
    # (calcification); at k = 500 calcification gave 0.73–0.83, so a single-k bound is seed luck.
    for concept in CONCEPTS:
        sweep = pd.read_csv(demo_run / "analysis" / "intervene" / f"{concept}-finetuned" / "intervene.csv")
        off = sweep[(sweep["mode"] == "off") & (sweep["k"] > 0) & (sweep["k"] <= 1000)]["auroc"]
        assert off.min() < 0.65, (concept, off.tolist())


def test_finetuned_latent_space_separates_the_classes(demo_run: Path) -> None:
    for concept in CONCEPTS:
        models = json.loads((demo_run / "analysis" / "separation" / concept / "separation.json").read_text())["models"]
        ft, lp = models["finetuned"]["separation"], models["pretrained"]["separation"]
        assert ft > lp + 0.3, (concept, lp, ft)     # measured 0.836 vs 0.039, 0.908 vs 0.123 (seeds 1-3: ft ≥ 0.81, lp ≤ 0.11)


def test_rerun_skips_every_stage_and_report_is_complete(demo_run: Path) -> None:
    start = time.perf_counter()
    run_pipeline(RunConfig(config=Path("configs/phantom.yaml"), out=demo_run, progress=False))
    assert time.perf_counter() - start < 30          # nothing is recomputed
    index = (demo_run / "report" / "index.html").read_text(encoding="utf-8")
    for section in ("Table 1", "Figure 2", "Figure 3", "Table 2", "Figures 4/5"):
        assert section in index, section


def test_pointing_chosen_latents_localise_the_findings(demo_run: Path) -> None:
    """Latents chosen on the training split by the pointing game localise the planted findings on
    the test split better than the class-mean top-10. Best AP, finetuned, chosen vs ranked, with
    four SAE seeds (49 = the demo's, 1, 2, 3): Mass 0.24/0.12/0.13/0.19 vs 0.11/0.04/0.05/0.11,
    calcification 0.07/0.15/0.13/0.13 vs 0.02/0.04/0.01/0.03 (gain ≥ 0.055 per concept, ≥ 0.09 on
    average; the bounds below leave room for the seed-to-seed spread)."""
    best, gains = {}, []
    for concept in CONCEPTS:
        root = demo_run / "analysis" / "localize" / f"{concept}-finetuned"
        ranked = pd.read_csv(root / "localization.csv")["ap"].max()
        chosen = pd.read_csv(root / "pointing" / "localization.csv")["ap"].max()
        assert chosen > ranked + 0.03, (concept, ranked, chosen)
        best[concept] = chosen
        gains.append(chosen - ranked)
        selection = json.loads((root / "pointing" / "localization.json").read_text())["selection"]
        assert selection["split"] == "training"
    assert sum(gains) / len(gains) > 0.06, gains
    assert max(best.values()) > 0.12, best


def test_marker_shortcut_is_found_and_switching_its_latents_off_reduces_it(demo_run: Path) -> None:
    """The marker follows calcification in training only. Ground truth: the finetuned classifier
    took the shortcut (its scores of test negatives tell marked from unmarked images). The SAE
    finds it: most of the top-10 calcification latents are associated with the marker among
    negatives, none of the linear probe's are; switching every associated latent off lowers the
    shortcut and does not cost concept AUROC (measured with SAE seeds 49 = the demo's, 1, 2, 3:
    9/8/10/10 of 10; 174/242/209/174 latents; shortcut 0.902 -> 0.842/0.839/0.832/0.827; AUROC
    0.87 -> 0.908/0.908/0.911/0.917)."""
    frame = pd.read_csv(demo_run / "data" / "vindr_detection_v1_folds.csv")
    marked = frame.assign(image_id=frame["image_id"].astype(str).str.removesuffix(".png")) \
                  .groupby("image_id")["confounder"].max()
    scores = pd.read_csv(demo_run / "models" / "eval-Suspicious_Calcification-finetuned.csv")
    neg = scores[scores["label"] == 0]
    from mammo_sae.analysis.stats import auroc

    assert auroc(neg["image_id"].map(marked).to_numpy(), neg["score"].to_numpy()) > 0.8   # 0.90

    models = json.loads((demo_run / "analysis" / "separation" / "Suspicious_Calcification"
                         / "separation.json").read_text())["models"]
    assert models["finetuned"]["associated_in_top"] >= 6, models["finetuned"]["flagged"]
    assert models["pretrained"]["associated_in_top"] == 0
    edit = json.loads((demo_run / "analysis" / "separation" / "Suspicious_Calcification"
                       / "associated-off" / "finetuned" / "edit.json").read_text())
    shortcut = edit["shortcut"]["attribute_auroc_among_negatives"]
    assert shortcut["edited"] < shortcut["plain_sae"] - 0.04, shortcut
    assert edit["edited"]["auroc"] > edit["plain_sae"]["auroc"] - 0.02, (edit["plain_sae"], edit["edited"])
    index = (demo_run / "report" / "index.html").read_text(encoding="utf-8")
    assert "shortcut AUROC" in index
