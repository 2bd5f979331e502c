"""`configs/vindr-mammoclip-b5.yaml` end to end on a scaled-down fake of the real layout.

The shipped config is copied unchanged except for the settings that make it CPU-sized (image
size, SAE size/epochs, bootstraps); its paths, model names, concepts and splits are the real ones,
so a path or key that would break a real user's first run breaks this test. The fake (real CSV
rows, tiny PNGs, the B2 reference fixture re-saved as the four downstream files) lives in
tests/fake_vindr.py. The run happens from the fake's root, where the config's relative paths point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import need_shared
from fake_vindr import build_fake_vindr

from mammo_sae.pipeline import (
    PACKAGE_CONFIGS,
    Pipeline,
    RunConfig,
    load_pipeline_config,
    run_pipeline,
)

CONFIG = PACKAGE_CONFIGS / "vindr-mammoclip-b5.yaml"
MODELS = (
    "Mass-pretrained",
    "Mass-finetuned",
    "Suspicious_Calcification-pretrained",
    "Suspicious_Calcification-finetuned",
)

# Only what makes the run CPU-sized; everything else comes from the shipped file.
SCALED_DOWN = {
    "device": "cpu",
    "data": {"image_size": [256, 160]},
    "models": {"eval": {"n_boot": 20}},
    "extract": {"options": {"workers": 0}},
    "sae": {
        "expansion": 1,
        "epochs": 3,
        "batch_size": 256,
        "resample_every": 0,
        "eval_patches": 512,
        "measure_matmul": False,
        "log_every": 1,
    },
    "analysis": {
        "intervene": {"n_boot": 20, "ks": [0, 1, 5, 10, 50, 100]},
        "fidelity": {"n_boot": 20},
        "localize": {"figure_images": 2},
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def scaled_down_config(root: Path) -> Path:
    shipped = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    path = root / "vindr-mammoclip-b5.yaml"  # beside the fake: relative paths agree either way
    path.write_text(yaml.safe_dump(_merge(shipped, SCALED_DOWN), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source_csv = need_shared("data", "vindr", "vindr_detection_v1_folds.csv")
    fixture = need_shared(
        "fixtures",
        "reference",
        "upmc_breast_clip_det_b2_period_n_ft_seed_10_fold0_best_aucroc_ver084.pth",
    )
    root = build_fake_vindr(tmp_path_factory.mktemp("paper_fake"), source_csv, fixture)
    config = scaled_down_config(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the config's paths are relative to the cwd
        return run_pipeline(RunConfig(config=config, out=root / "run", progress=False))


def test_shipped_config_is_the_paper_setup() -> None:
    cfg = load_pipeline_config(CONFIG)
    assert (cfg.data.kind, cfg.models.kind, cfg.data.level) == ("folds", "checkpoints", "image")
    assert cfg.extract.sae_source == "Suspicious_Calcification/finetuned"
    assert (cfg.extract.sae_split, cfg.extract.eval_split, cfg.extract.sae_subsample) == (
        "training",
        "test",
        0.25,
    )
    assert cfg.extract.options.get("augment") is False
    assert {
        k: cfg.sae[k]
        for k in (
            "architecture",
            "expansion",
            "l1_coeff",
            "l1_convention",
            "batch_size",
            "epochs",
            "lr",
        )
    } == {
        "architecture": "relu-l1",
        "expansion": 8,
        "l1_coeff": 3e-5,
        "l1_convention": "reference",
        "batch_size": 4096,
        "epochs": 200,
        "lr": 3e-4,
    }
    paths = [p for variants in cfg.models.checkpoints.values() for p in variants.values()]
    assert len(set(paths)) == 4 and all(
        p.startswith("checkpoints/Downstream_evalualtion_b5_fold0/") for p in paths
    )


@pytest.mark.slow
@pytest.mark.shared
def test_models_load_and_are_evaluated_on_test(paper_run: Path) -> None:
    models = json.loads((paper_run / "models" / "models.json").read_text())
    assert [m["name"] for m in models["models"]] == list(MODELS)
    for name in MODELS:
        metrics = models["test_metrics"][name]
        assert metrics["n"] == 16 and 0.0 <= metrics["auroc"]["value"] <= 1.0


@pytest.mark.slow
@pytest.mark.shared
def test_sae_trained_on_subsampled_calcification_features(paper_run: Path) -> None:
    stores = json.loads((paper_run / "stores" / "stores.json").read_text())["stores"]
    sae_store = next(s for s in stores if s["role"] == "sae")
    assert sae_store["encoder_key"] == "Suspicious_Calcification-finetuned"
    assert (sae_store["split"], sae_store["subsample"]) == ("training", 0.25)
    # Ranking stores keep 25 % of the patches as the reference's rankings; evaluation stores all.
    for s in stores:
        if s["role"] == "analysis":
            assert s["subsample"] == (0.25 if s["split"] == "training" else 1.0), s
    assert any((paper_run / "sae").iterdir())


@pytest.mark.slow
@pytest.mark.shared
def test_table1_fidelity_has_every_model(paper_run: Path) -> None:
    rows = _fidelity_rows(paper_run)
    assert sorted(rows) == sorted(MODELS)
    for row in rows.values():
        for key in ("auroc_original", "auroc_sae"):
            assert 0.0 <= row[key] <= 1.0, (key, row)


@pytest.mark.slow
@pytest.mark.shared
def test_interventions_rankings_localisation_and_report(paper_run: Path) -> None:
    analysis = paper_run / "analysis"
    for name in MODELS:
        assert list((analysis / "probe" / name).glob("ranking_class=1_*.json")), name
        assert list((analysis / "intervene" / name).glob("*.json")), name
        assert list((analysis / "localize" / name).glob("*.csv")), name
    for concept in ("Mass", "Suspicious_Calcification"):
        assert any((analysis / "separation" / concept).iterdir()), concept
    index = paper_run / "report" / "index.html"
    assert index.is_file() and "Suspicious_Calcification-finetuned" in index.read_text(
        encoding="utf-8"
    )


def _fidelity_rows(run: Path) -> dict[str, dict]:
    table = pd.read_csv(run / "analysis" / "fidelity" / "table1.csv")
    return {r["model"]: r for r in table.to_dict("records")}


@pytest.mark.slow
@pytest.mark.shared
def test_a_damaged_store_is_rebuilt_on_the_next_run(
    paper_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(Runs last: it changes the run.) A store shard cut short after the run: the next run sees
    the extract stage's output changed, finds the store's checksums broken, extracts it again and
    carries on; a plain rerun after that does nothing."""
    from mammo_sae.activations.store import ActivationStore

    root = paper_run.parent
    store_dir = paper_run / "stores" / "sae-train"
    victim = store_dir / ActivationStore(store_dir).manifest["shards"][0]["files"]["acts"]
    victim.write_bytes(victim.read_bytes()[:200])
    config = root / "vindr-mammoclip-b5.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        capsys.readouterr()
        run_pipeline(RunConfig(config=config, out=paper_run, progress=False))
        out = capsys.readouterr().out
        assert "output missing or changed in size since it ran: stores/sae-train/" in out
        assert "store sae-train is damaged" in out
        ActivationStore(store_dir).verify()
        run_pipeline(RunConfig(config=config, out=paper_run, progress=False))
        n_stages = len(Pipeline(load_pipeline_config(config), paper_run).runner.names())
        assert capsys.readouterr().out.count("up to date") == n_stages
