"""Where do latents localise, by layer? Issue 17: the box-rule study at earlier encoder layers.

For each layer (e.g. `final`, `blocks.6` at stride 16, `blocks.2` at stride 8 on the phantom
encoder), each model (the finetuned Mass and Suspicious_Calcification encoders by default) and
each SAE seed, through the CLI only: `mammo-sae extract --layer L` of the training and test
splits, `mammo-sae sae train` on that model's own training store at L, `mammo-sae probe`
(class-1 `centered` ranking); then `localization_study.study_stores` scores every box-rule family
exactly as the final-layer study: latent + parameter chosen on TRAINING, scored on TEST with a
bootstrap CI over test images. Also per cell: the pointing game on test of the training-chosen
latent, and two ceilings that look at the test boxes (never results): the best test AP of any
scored latent under any rule (the 20 candidates plus the `--extra` latents of best TEST pointing)
and the best test pointing of any latent.

Everything is cached under --work (stores, SAEs, rankings, per-cell rows), so a rerun only adds
what is missing. Run on a finished demo-size run (its models/ and data/):
    PYTHONPATH=src .venv/bin/python benchmarks/localization_layers.py \
        --run /tmp/demo-validation/t1-c0-s49 --work /tmp/layers-work
Writes benchmarks/results/cpu_localization_layers.txt (--out) and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from localization_study import FAMILIES, TOP, study_stores

from mammo_sae.activations.store import ActivationStore
from mammo_sae.analysis.localize import pointing_scores
from mammo_sae.sae.checkpoints import load_sae

L1 = 3e-5  # the demo config's SAE penalty


def cli(*args: str) -> None:
    """One `mammo-sae` command, single-threaded (the box is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mammo_sae", *args]
    print("+ mammo-sae", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def store_of(work: Path, run: Path, model: dict[str, Any], layer: str, split: str) -> Path:
    out = work / "stores" / f"{model['encoder_key']}-{layer}-{split}"
    if not (out / "manifest.json").exists() or not (out / "images.json").exists():
        cli(
            "extract", "--data", str(run / "data"), "--model", model["classifier"],
            "--layer", layer, "--split", split, "--dtype", "float32", "--workers", "0",
            "--batch-size", "16", "--device", "cpu", "--no-progress", "--out", str(out),
        )  # fmt: skip
    return out


def sae_of(work: Path, store: Path, name: str, seed: int, args: argparse.Namespace) -> Path:
    out = work / "sae" / f"{name}{_tag(args)}-s{seed}"
    if not (out / "sae.safetensors").exists():
        cli(
            "sae", "train", "--store", str(store), "--out", str(out), "--architecture", "relu-l1",
            "--expansion", str(args.expansion), "--l1-coeff", str(args.l1_coeff),
            "--batch-size", "1024",
            "--epochs", str(args.epochs), "--lr", "1e-3", "--resample-every", "5",
            "--seed", str(seed), "--eval-patches", "8192", "--device", "cpu", "--no-progress",
        )  # fmt: skip
    return out


def _tag(args: argparse.Namespace) -> str:
    """Cache-name suffix of non-default SAE settings."""
    return "" if args.l1_coeff == L1 else f"-l1{args.l1_coeff:g}"


def ranking_of(work: Path, store: Path, sae: Path, concept: str, name: str) -> Path:
    out = work / "probe" / name
    path = out / "ranking_class=1_centered.json"
    if not path.exists():
        cli(
            "probe", "--store", str(store), "--sae", str(sae), "--concept", concept,
            "--scores", "centered", "--out", str(out), "--no-progress",
        )  # fmt: skip
    return path


def study_cell(
    work: Path, run: Path, model: dict[str, Any], layer: str, seed: int, args: argparse.Namespace
) -> dict[str, Any] | None:
    """Rows (families x selections) and ceilings of one model x layer x seed, cached (None:
    not cached and --cached-only)."""
    # Stores and SAEs belong to the encoder (the two linear probes share one); rankings and
    # scores to the model (its concept).
    name = f"{model['encoder_key']}-{layer}"
    tag = f"{model['name']}-{layer}{_tag(args)}-s{seed}"
    cache = work / "study" / f"{tag}-iou{args.iou:g}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    if args.cached_only:
        return None
    train_dir = store_of(work, run, model, layer, "training")
    test_dir = store_of(work, run, model, layer, "test")
    sae_dir = sae_of(work, train_dir, name, seed, args)
    ranking = ranking_of(work, train_dir, sae_dir, model["concept"], tag)
    t0 = time.perf_counter()
    sae = load_sae(sae_dir).eval()
    train, test = ActivationStore(train_dir), ActivationStore(test_dir)
    concept = model["concept"]
    lat, score, n_test = pointing_scores(test, sae, concept, split="test", progress=False)
    best_test = [int(lat[k]) for k in np.lexsort((lat, -score))[: args.extra]]
    labels = {"model": model["name"], "layer": layer, "seed": seed}
    rows, oracle = study_stores(
        train, test, sae, concept, ranking, args.iou, args.n_boot, 0, labels, best_test
    )
    metrics = json.loads((sae_dir / "cfg.json").read_text()).get("final_metrics", {})
    cell = {
        **labels,
        "rows": rows,
        "oracle_ap": oracle,
        "oracle_pointing": {"test_pointing": float(score.max()), "latent": best_test[0]},
        "n_test_images": n_test,
        "d": int(sae.cfg.d),
        "sae": {k: metrics.get(k) for k in ("fvu", "l0", "dead_fraction_in_sample")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(cell, indent=1) + "\n")
    print(f"{name} seed {seed}: study {cell['seconds']:.0f} s", flush=True)
    return cell


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def format_table(cells: list[dict[str, Any]], layers: list[str], iou: float) -> str:
    out = []
    models = list(dict.fromkeys(c["model"] for c in cells))
    for model in models:
        for sel in ("ranking", "pointing"):
            out.append(f"\n{model}, latent selection: {sel} (top {TOP}; chosen on training)")
            out.append(f"{'family':<24}" + "".join(f"{layer:>34}" for layer in layers))
            for family in FAMILIES:
                line = f"{family:<24}"
                for layer in layers:
                    got = [
                        r
                        for c in cells
                        if c["model"] == model and c["layer"] == layer
                        for r in c["rows"]
                        if r["selection"] == sel and r["family"] == family
                    ]
                    if not got:
                        line += f"{'-':>34}"
                        continue
                    aps = [r["test_ap"] for r in got]
                    mid = got[int(np.argsort(aps)[len(aps) // 2])]  # the median seed's CI
                    line += f"{_spread(aps)} [{mid['ci_lo']:.2f},{mid['ci_hi']:.2f}]".rjust(34)
                out.append(line)
    out.append("\nper model x layer: SAE (mean over seeds), pointing and ceilings")
    out.append(
        f"{'model':<36}{'layer':>9}{'d':>5}{'n':>3}{'fvu':>7}{'l0':>8}"
        f"{'pt(train-ch.)':>19}{'pt ceiling':>19}{'AP ceiling':>19}  ceiling rule"
    )
    for model in models:
        for layer in layers:
            got = [c for c in cells if c["model"] == model and c["layer"] == layer]
            if not got:
                continue
            pts = [
                r["test_pointing"]
                for c in got
                for r in c["rows"]
                if r["selection"] == "pointing" and r["family"] == "fixed p99 (demo today)"
            ]
            best = max(got, key=lambda c: c["oracle_ap"]["test_ap"])["oracle_ap"]
            out.append(
                f"{model:<36}{layer:>9}{got[0]['d'] or 0:>5}{len(got):>3}"
                f"{np.mean([c['sae']['fvu'] or np.nan for c in got]):>7.3f}"
                f"{np.mean([c['sae']['l0'] or np.nan for c in got]):>8.1f}"
                f"{_spread(pts):>19}"
                f"{_spread([c['oracle_pointing']['test_pointing'] for c in got]):>19}"
                f"{_spread([c['oracle_ap']['test_ap'] for c in got]):>19}"
                f"  {best['family']} {best['param']}"
            )
    out.append(
        f"\ncells: test AP@IoU {iou:g} of the training-chosen latent + parameter, mean "
        "(min-max) over SAE seeds, [95% bootstrap CI over test images of the median seed]."
    )
    out.append(
        "pt(train-ch.): test pointing of the pointing-selected latent chosen at fixed p99. "
        "Ceilings look at the TEST boxes (best of any scored latent / rule): never results."
    )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("/tmp/demo-validation/t1-c0-s49"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/layers-work"))
    ap.add_argument("--layers", nargs="+", default=["final", "blocks.6", "blocks.2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["Mass-finetuned", "Suspicious_Calcification-finetuned"],
        help="model names in RUN/models/models.json",
    )
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--l1-coeff", type=float, default=L1, help="SAE L1 (demo: 3e-5)")
    ap.add_argument("--extra", type=int, default=10, help="best-test-pointing latents (ceiling)")
    ap.add_argument("--iou", type=float, default=0.25)
    ap.add_argument(
        "--cached-only", action="store_true", help="tabulate the cached cells, compute nothing"
    )
    ap.add_argument("--n-boot", type=int, default=300)
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "cpu_localization_layers.txt",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not (args.run / "models" / "models.json").exists():
        raise SystemExit(f"{args.run}: no models/models.json (not a finished demo run)")
    models = {
        m["name"]: m
        for m in json.loads((args.run / "models" / "models.json").read_text())["models"]
    }
    unknown = [m for m in args.models if m not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; the run has {sorted(models)}")
    t0 = time.perf_counter()
    cells = [
        cell
        for m in args.models
        for layer in args.layers
        for seed in args.seeds
        if (cell := study_cell(args.work, args.run, models[m], layer, seed, args)) is not None
    ]
    seeds = sorted({c["seed"] for c in cells})
    text = (
        f"localisation by layer: test AP@IoU {args.iou:g} (benchmarks/localization_layers.py on "
        f"{args.run}; SAEs relu-l1 x{args.expansion}, L1 {args.l1_coeff:g}, "
        f"{args.epochs} epochs, seeds {seeds} (n per cell below); "
        f"2-core CPU, {time.perf_counter() - t0:.0f} s this call)\n"
        + format_table(cells, args.layers, args.iou)
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(cells, indent=1) + "\n")


if __name__ == "__main__":
    main()
