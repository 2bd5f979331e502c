"""How much of the demo's findings depends on the SAE's seed: rerun the SAE and every analysis
of a finished demo with other SAE seeds (data, classifiers and stores reused) and print the
figures tests/test_demo_run.py makes claims about, one row per seed.

    python benchmarks/demo_sae_seeds.py [--run runs/demo] [--seeds 1,2,3] [--work /tmp/demo-seeds]

About 1.5 min per seed on 2 CPU cores. Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

CONCEPTS = ("Mass", "Suspicious_Calcification")


def f3(value: object) -> str:
    """Three decimals; JSON null (an undefined number) as a dash."""
    return "–" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]


def figures(run: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for concept in CONCEPTS:
        short = concept[:4]
        sweep = pd.read_csv(run / "analysis" / "intervene" / f"{concept}-finetuned" / "intervene.csv")
        off = sweep[(sweep["mode"] == "off") & (sweep["k"] > 0) & (sweep["k"] <= 1000)].set_index("k")["auroc"]
        root = run / "analysis" / "localize" / f"{concept}-finetuned"
        sep = json.loads((run / "analysis" / "separation" / concept / "separation.json").read_text())["models"]
        out[f"{short} off@500"] = round(float(off.get(500, float("nan"))), 3)
        out[f"{short} off min"] = round(float(off.min()), 3)
        out[f"{short} AP ranked"] = round(float(pd.read_csv(root / "localization.csv")["ap"].max()), 3)
        out[f"{short} AP pointing"] = round(float(pd.read_csv(root / "pointing" / "localization.csv")["ap"].max()), 3)
        out[f"{short} sep FT/LP"] = f"{f3(sep['finetuned']['separation'])}/{f3(sep['pretrained']['separation'])}"
    calc = run / "analysis" / "separation" / "Suspicious_Calcification"
    models = json.loads((calc / "separation.json").read_text())["models"]
    out["assoc top-10 FT/LP"] = f"{models['finetuned']['associated_in_top']}/{models['pretrained']['associated_in_top']}"
    out["assoc latents"] = len(models["finetuned"]["associated"])
    edit_path = calc / "associated-off" / "finetuned" / "edit.json"
    if edit_path.is_file():
        edit = json.loads(edit_path.read_text())
        sc = edit["shortcut"]["attribute_auroc_among_negatives"]
        out["shortcut off"] = f"{f3(sc['plain_sae'])}->{f3(sc['edited'])}"
        out["AUROC off"] = f"{f3(edit['plain_sae']['auroc'])}->{f3(edit['edited']['auroc'])}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run directory")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo-seeds"))
    args = ap.parse_args()
    if not (args.run / "stages" / "report.json").is_file():
        print(f"no finished demo run at {args.run}: run `make demo` first (or pass --run); skipped")
        return
    config = (args.run / "config.yaml").read_text()
    rows = {"demo": figures(args.run)}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = args.work / f"seed{seed}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        for part in ("data", "models", "stores", "stages", "config.yaml"):   # mtimes kept: reused
            src = args.run / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, run / part)
        cfg = run.parent / f"seed{seed}.yaml"
        cfg.write_text(re.sub(r"(?m)^sae:\n", f"sae:\n  seed: {seed}\n", config, count=1))
        subprocess.run([sys.executable, "-m", "mammo_sae", "run", str(cfg), "--out", str(run), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        rows[f"seed {seed}"] = figures(run)
    print(pd.DataFrame(rows).to_string())


if __name__ == "__main__":
    main()
