"""The demo's scientific claims across seeds and thread counts: which hold everywhere, with
what spread.

The demo (`configs/phantom.yaml`) is bit-identical run to run on one machine (docs/determinism.md),
but its figures move with the classifiers' and the SAE's seeds and, through float rounding, with
the thread count and the CPU's instruction set. So `tests/test_demo_run.py` asserts only what
holds by construction, and the claims the README makes about the planted findings are checked
here, over a grid:

    thread counts  x  classifier seeds (full pipeline each)  x  SAE seeds (SAE + analyses)

    python benchmarks/demo_validation.py [--threads 1,2] [--classifier-seeds 0,1]
        [--sae-seeds 49,1,2,3,4] [--work /tmp/demo-validation] [--save benchmarks/results]

Classifier seed 0 is the demo's recipe as it stands; seed s adds s to the pretext, linear-probe
and finetune seeds. SAE seed 49 is the demo's. The cell threads 2 / classifier 0 / SAE 49 is the
demo itself. About 3.5 min per full pipeline and 1.5 min per extra SAE seed on 2 CPU cores
(~40 min for the default 20 cells). Prints every figure per cell, then one row per figure with
its min and max and, for each claim, in how many cells it held; writes the same as
`cpu_demo_validation.txt` / `.json` under --save. Nothing is asserted: exit status 0 whatever
the claims do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

CONCEPTS = ("Mass", "Suspicious_Calcification")
SHORT = {"Mass": "Mass", "Suspicious_Calcification": "Calc"}
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "src" / "mammo_sae" / "configs" / "phantom.yaml"


# ----------------------------------------------------------------------------- figures


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def figures(run: Path) -> dict[str, float]:
    """Every figure a README claim rests on, from one finished run directory."""
    from mammo_sae.metrics import auroc

    out: dict[str, float] = {}
    metrics = _read_json(run / "models" / "models.json")["test_metrics"]
    table1 = pd.read_csv(run / "analysis" / "fidelity" / "table1.csv").set_index("model")
    for concept in CONCEPTS:
        s = SHORT[concept]
        out[f"{s} AUROC LP"] = metrics[f"{concept}-pretrained"]["auroc"]["value"]
        out[f"{s} AUROC FT"] = metrics[f"{concept}-finetuned"]["auroc"]["value"]
        sweep = pd.read_csv(
            run / "analysis" / "intervene" / f"{concept}-finetuned" / "intervene.csv"
        )
        off = sweep[(sweep["mode"] == "off") & (sweep["k"] > 0) & (sweep["k"] <= 1000)]
        out[f"{s} off-curve min (k<=1000)"] = float(off["auroc"].min())
        on = sweep[(sweep["mode"] == "on") & (sweep["k"] == 1)]
        out[f"{s} keep top-1 AUROC"] = float(on["auroc"].iloc[0]) if len(on) else float("nan")
        root = run / "analysis" / "localize" / f"{concept}-finetuned"
        ranked = float(pd.read_csv(root / "localization.csv")["ap"].max())
        chosen = float(pd.read_csv(root / "pointing" / "localization.csv")["ap"].max())
        out[f"{s} AP ranked top-10"] = ranked
        out[f"{s} AP pointing-chosen"] = chosen
        out[f"{s} pointing gain"] = chosen - ranked
        sep = _read_json(run / "analysis" / "separation" / concept / "separation.json")["models"]
        out[f"{s} separation FT"] = sep["finetuned"]["separation"]
        out[f"{s} separation LP"] = sep["pretrained"]["separation"]
    own = table1.loc["Suspicious_Calcification-finetuned"]
    out["own SAE FVU"] = float(own["fvu"])
    out["own SAE recovered"] = float(own["recovered"])

    frame = pd.read_csv(run / "data" / "vindr_detection_v1_folds.csv")
    marked = (
        frame.assign(image_id=frame["image_id"].astype(str).str.removesuffix(".png"))
        .groupby("image_id")["confounder"]
        .max()
    )
    scores = pd.read_csv(run / "models" / "eval-Suspicious_Calcification-finetuned.csv")
    neg = scores[scores["label"] == 0]
    out["classifier shortcut AUROC"] = auroc(
        neg["image_id"].map(marked).to_numpy(), neg["score"].to_numpy()
    )
    calc = run / "analysis" / "separation" / "Suspicious_Calcification"
    models = _read_json(calc / "separation.json")["models"]
    out["marker-assoc. in top-10 FT"] = models["finetuned"]["associated_in_top"]
    out["marker-assoc. in top-10 LP"] = models["pretrained"]["associated_in_top"]
    out["marker-assoc. latents FT"] = len(models["finetuned"]["associated"])
    edit = _read_json(calc / "associated-off" / "finetuned" / "edit.json")
    shortcut = edit["shortcut"]["attribute_auroc_among_negatives"]
    out["SAE shortcut AUROC"] = shortcut["plain_sae"]
    out["SAE shortcut, assoc. off"] = shortcut["edited"]
    out["Calc AUROC SAE"] = edit["plain_sae"]["auroc"]
    out["Calc AUROC, assoc. off"] = edit["edited"]["auroc"]
    return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- claims

Claim = tuple[str, Callable[[dict[str, float]], bool]]

CLAIMS: list[Claim] = [
    *[
        (f"{SHORT[c]}: finetuned AUROC > 0.8", lambda f, s=SHORT[c]: f[f"{s} AUROC FT"] > 0.8)
        for c in CONCEPTS
    ],
    *[
        (
            f"{SHORT[c]}: finetuned > linear probe + 0.2",
            lambda f, s=SHORT[c]: f[f"{s} AUROC FT"] > f[f"{s} AUROC LP"] + 0.2,
        )
        for c in CONCEPTS
    ],
    (
        "own SAE: FVU < 0.1 and recovered > 0.9",
        lambda f: f["own SAE FVU"] < 0.1 and f["own SAE recovered"] > 0.9,
    ),
    *[
        (
            f"{SHORT[c]}: switching top-k off reaches < 0.65 for some k <= 1000",
            lambda f, s=SHORT[c]: f[f"{s} off-curve min (k<=1000)"] < 0.65,
        )
        for c in CONCEPTS
    ],
    *[
        (
            f"{SHORT[c]}: separation FT > LP + 0.3",
            lambda f, s=SHORT[c]: f[f"{s} separation FT"] > f[f"{s} separation LP"] + 0.3,
        )
        for c in CONCEPTS
    ],
    *[
        (
            f"{SHORT[c]}: pointing-chosen AP > ranked top-10 AP + 0.03",
            lambda f, s=SHORT[c]: f[f"{s} pointing gain"] > 0.03,
        )
        for c in CONCEPTS
    ],
    (
        "mean pointing gain > 0.06",
        lambda f: (f["Mass pointing gain"] + f["Calc pointing gain"]) / 2 > 0.06,
    ),
    (
        "classifier took the marker shortcut (AUROC > 0.8)",
        lambda f: f["classifier shortcut AUROC"] > 0.8,
    ),
    (
        "marker-associated latents: >= 6 of the finetuned top-10",
        lambda f: f["marker-assoc. in top-10 FT"] >= 6,
    ),
    (
        "marker-associated latents: none of the linear probe's top-10",
        lambda f: f["marker-assoc. in top-10 LP"] == 0,
    ),
    (
        "switching them off lowers the shortcut by > 0.04",
        lambda f: f["SAE shortcut, assoc. off"] < f["SAE shortcut AUROC"] - 0.04,
    ),
    (
        "... and costs < 0.02 concept AUROC",
        lambda f: f["Calc AUROC, assoc. off"] > f["Calc AUROC SAE"] - 0.02,
    ),
]


# ----------------------------------------------------------------------------- the grid


def _classifier_seeds(offset: int) -> dict[str, dict[str, int]]:
    """models.{pretrain,linear_probe,finetune}.seed = the recipe's default + offset."""
    from mammo_sae.models.train import ClassifierTrainConfig, PretrainConfig

    def default(cls: type) -> int:
        return next(f.default for f in dataclasses.fields(cls) if f.name == "seed")

    return {
        "pretrain": {"seed": default(PretrainConfig) + offset},
        "linear_probe": {"seed": default(ClassifierTrainConfig) + offset},
        "finetune": {"seed": default(ClassifierTrainConfig) + offset},
    }


def _config(work: Path, threads: int, offset: int, sae_seed: int) -> Path:
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["threads"] = threads
    if offset:
        for section, values in _classifier_seeds(offset).items():
            cfg["models"][section] = {**(cfg["models"].get(section) or {}), **values}
    cfg["sae"] = {**cfg["sae"], "seed": sae_seed}
    path = work / f"t{threads}-c{offset}-s{sae_seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(config: Path, out: Path, only: str | None = None) -> float:
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "mammo_sae", "run", str(config), "--out", str(out)]
    subprocess.run(
        [*argv, "--no-progress", *(["--only", only] if only else [])],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def _cell_name(run: Path) -> str:
    threads, offset, sae_seed = (part[1:] for part in run.name.split("-"))
    return f"threads {threads} / clf +{offset} / SAE {sae_seed}"


def _finished(run: Path) -> bool:
    """The cell's own report is written (the stage records of a cell copied from its base
    include the base's report record until the cell's run replaces it)."""
    return (run / "stages" / "report.json").is_file() and (run / "report" / "report.json").is_file()


def run_grid(args: argparse.Namespace) -> None:
    """Run every cell of the grid that is not finished in --work yet."""
    args.work.mkdir(parents=True, exist_ok=True)
    for threads in args.threads:
        for offset in args.classifier_seeds:
            base: Path | None = None
            for sae_seed in args.sae_seeds:
                run = args.work / f"t{threads}-c{offset}-s{sae_seed}"
                if args.refresh and _finished(run):
                    # A finished cell run again with this code: the runner redoes only the
                    # stages whose code-level settings changed (e.g. a new localisation rule).
                    config = _config(args.work, threads, offset, sae_seed)
                    seconds = _run(config, run, args.refresh_stage)
                    print(f"{_cell_name(run)}: refreshed in {seconds:.0f} s", flush=True)
                elif not _finished(run):
                    shutil.rmtree(run, ignore_errors=True)
                    if base is not None:  # reuse data, classifiers and stores: only the SAE differs
                        run.mkdir(parents=True)
                        for part in ("data", "models", "stores", "stages"):
                            shutil.copytree(base / part, run / part)
                    seconds = _run(_config(args.work, threads, offset, sae_seed), run)
                    print(f"{_cell_name(run)}: {seconds:.0f} s", flush=True)
                base = base or run


def finished_cells(work: Path) -> dict[str, dict[str, float]]:
    """Figures of every finished cell under `work` (also those of earlier invocations)."""
    runs = [r for r in work.glob("t*-c*-s*") if r.is_dir() and _finished(r)]
    key = [tuple(int(p[1:]) for p in r.name.split("-")) for r in runs]
    return {_cell_name(r): figures(r) for _, r in sorted(zip(key, runs))}


def summarize(cells: dict[str, dict[str, float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    per_cell = pd.DataFrame(cells)
    spread = pd.DataFrame({"min": per_cell.min(axis=1), "max": per_cell.max(axis=1)})
    claims = pd.DataFrame(
        [
            {"claim": text, "held": sum(bool(test(f)) for f in cells.values()), "of": len(cells)}
            for text, test in CLAIMS
        ]
    ).set_index("claim")
    return spread, claims


DEMO_CELL = "threads 2 / clf +0 / SAE 49"


def markdown(cells: dict[str, dict[str, float]], spread: pd.DataFrame, claims: pd.DataFrame) -> str:
    """The README's tables: each figure for the demo's own cell beside its min-max, and each
    claim with the cells where it held."""
    demo = cells.get(DEMO_CELL, {})
    lines = [f"| figure | demo ({DEMO_CELL}) | min | max |", "| --- | --- | --- | --- |"]
    for name, row in spread.iterrows():
        value = demo.get(str(name))
        shown = "–" if value is None else f"{value:.3f}"
        lines.append(f"| {name} | {shown} | {row['min']:.3f} | {row['max']:.3f} |")
    lines += ["", "| claim | held in |", "| --- | --- |"]
    lines += [f"| {claim} | {r['held']} of {r['of']} |" for claim, r in claims.iterrows()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def ints(text: str) -> list[int]:
        return [int(s) for s in text.split(",") if s.strip()]

    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--classifier-seeds", type=ints, default=[0, 1])
    ap.add_argument("--sae-seeds", type=ints, default=[49, 1, 2, 3, 4])
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/demo-validation"),
        help="where the runs go (finished cells are reused on a rerun)",
    )
    ap.add_argument(
        "--save",
        type=Path,
        default=None,
        help="folder for cpu_demo_validation.txt/.json (e.g. benchmarks/results)",
    )
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="also run finished cells again with this code (stages that are up to "
        "date are skipped)",
    )
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: summarise the finished cells under --work",
    )
    args = ap.parse_args()
    if not args.summary_only:
        run_grid(args)
    cells = finished_cells(args.work)
    spread, claims = summarize(cells)
    pd.set_option("display.width", 200)
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    header = (
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}; "
        f"{len(cells)} finished cells (threads / classifier seed offset / SAE seed)\n"
        f"# python benchmarks/demo_validation.py  (tests/test_demo_run.py asserts only "
        f"what holds by construction)"
    )
    text = "\n\n".join(
        [
            header,
            "## per cell",
            pd.DataFrame(cells).round(3).to_string(),
            "## spread over the cells",
            spread.round(3).to_string(),
            "## claims (cells where it held / cells)",
            claims.to_string(),
        ]
    )
    print(text)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "cpu_demo_validation.txt").write_text(text + "\n")
        (args.save / "cpu_demo_validation.md").write_text(
            header + "\n\n" + markdown(cells, spread, claims) + "\n"
        )
        (args.save / "cpu_demo_validation.json").write_text(
            json.dumps(
                {"cells": cells, "claims": claims.reset_index().to_dict(orient="records")}, indent=1
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
