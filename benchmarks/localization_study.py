"""Where do latents localise? Issue 17: layer x box rule x latent selection, scored on the
phantom's ground truth, with nothing about the test boxes entering any choice.

The study (`--run RUN`): for each layer (`final`, `blocks.6` at stride 16, `blocks.2` at stride 8
on the phantom encoder), each model of the run (finetuned and linear-probe "pretrained", Mass and
Suspicious_Calcification) and each SAE seed, through the CLI only: `mammo-sae extract --layer L`
of the training and test splits, `mammo-sae sae train` on that encoder's training store at L,
`mammo-sae probe` (class-1 `centered` ranking). Then `study_stores` scores every box-rule family
x latent selection (top 10 of the class-1 ranking; top 10 by the pointing game on training):
the family's parameter and one latent among the selection's 10 are chosen together on the
TRAINING split (the pair of highest training AP@IoU), and that latent is scored on the TEST
split with that parameter, with a bootstrap CI over test images. Two ceilings that look at the
test boxes are printed beside (never results). Finally the default is chosen on TRAINING AP
alone (layer x family, its most chosen parameter) and its test AP is reported.
Everything is cached under --work, so a rerun adds only what is missing. One command per result:
    PYTHONPATH=src .venv/bin/python benchmarks/localization_study.py \
        --run RUN --work WORK          # RUN: a phantom run with models (run --only models)
(the 512x320 run: `configs/phantom.yaml` with data.phantom height 512, width 320, name
phantom-512-cpu; README "Localisation"). Writes results/cpu_localization_study_<H>x<W>.txt/.json.

`--runs RUN [RUN ...]` instead scores each finished run's own final-layer SAE and rankings
(the first study: results/cpu_localization_study.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammo_sae.activations.store import ActivationStore
from mammo_sae.analysis.localize import (
    BoxRule,
    Detections,
    average_precision,
    image_detections,
    parse_threshold,
    pointing_scores,
    select_images,
    unique_boxes,
)
from mammo_sae.analysis.maps import heatmap_centres, iter_latent_maps
from mammo_sae.analysis.probe import read_ranking
from mammo_sae.layout import ModelEntry
from mammo_sae.sae.checkpoints import load_sae

CONCEPTS = ("Mass", "Suspicious_Calcification")
TOP = 10


def _rules(
    on: str, up: str, thresholds: list[str], masses: tuple[float, ...] = (0.0,)
) -> list[BoxRule]:
    return [
        BoxRule(parse_threshold(t), on, up, m)  # type: ignore[arg-type]
        for t in thresholds
        for m in masses
    ]


PCTS = ["p90", "p95", "p97", "p98", "p99", "p99.5"]
RELS = [f"relmax:{f}" for f in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
FAMILIES: dict[str, list[BoxRule]] = {
    "fixed p95 (paper)": _rules("frame", "bilinear", ["p95"]),
    "fixed p99 (demo today)": _rules("frame", "bilinear", ["p99"]),
    "percentile, bilinear": _rules("frame", "bilinear", PCTS),
    "percentile, nearest": _rules("frame", "nearest", PCTS),
    "relmax, bilinear": _rules("frame", "bilinear", RELS),
    "relmax, nearest": _rules("frame", "nearest", RELS),
    "relmax + min-mass": _rules("frame", "bilinear", RELS[::2], (0.2, 0.5)),
    "grid percentile": _rules("grid", "bilinear", ["p80", "p90", "p95", "p97.5"]),
    "grid relmax": _rules("grid", "bilinear", RELS),
    "grid relmax + min-mass": _rules("grid", "bilinear", RELS[::2], (0.2, 0.5)),
    # Diagnostic, not a localize option: each relmax box replaced by one of the training
    # split's median GT size, centred where the region's box was centred.
    "relmax, GT-size box*": _rules("frame", "bilinear", RELS),
}
RESIZED = "relmax, GT-size box*"
# The families the 512x320 study scores (scoring every family costs ~10 min per cell there):
# the fixed rules and the best five of the 256x160 study's training-AP ranking.
CORE_FAMILIES = [
    "fixed p95 (paper)",
    "fixed p99 (demo today)",
    "percentile, bilinear",
    "relmax, bilinear",
    "grid percentile",
    "grid relmax",
    "grid relmax + min-mass",
]


@dataclass
class Split:
    """Cached cell maps of the candidate latents on one split's positive images."""

    maps: list[np.ndarray]  # per image (n_cand, gh, gw)
    frames: list[tuple[int, int]]
    centres: list[Any]
    gts: list[np.ndarray]

    def detections(
        self, rule: BoxRule, size_hw: tuple[float, float] | None = None
    ) -> list[list[Detections]]:
        dets = [
            image_detections(m, f, c, g, rule)
            for m, f, c, g in zip(self.maps, self.frames, self.centres, self.gts, strict=True)
        ]
        if size_hw is not None:
            for per_image in dets:
                for d in per_image:
                    d.boxes = _resize(d.boxes, size_hw)
        return dets


def _resize(boxes: np.ndarray, size_hw: tuple[float, float]) -> np.ndarray:
    cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2
    h, w = size_hw
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def load_split(
    store: ActivationStore, sae: Any, concept: str, split: str, cand: list[int]
) -> Split:
    indices, records = select_images(store, concept, split, "positive")
    maps = list(iter_latent_maps(store, sae, cand, indices))
    return Split(
        maps,
        [r.frame_hw for r in records],
        [
            heatmap_centres(store, r.frame_hw, m.shape[-2:])
            for r, m in zip(records, maps, strict=True)
        ],
        [unique_boxes(r.boxes_of(concept)) for r in records],
    )


def ap_of(
    dets: list[list[Detections]],
    j: int,
    gts: list[np.ndarray],
    iou: float,
    images: np.ndarray | None = None,
) -> float:
    idx = range(len(dets)) if images is None else images
    return average_precision(
        [(dets[k][j].boxes, dets[k][j].scores) for k in idx], [gts[k] for k in idx], iou
    ).ap


def bootstrap(
    dets: list[list[Detections]],
    j: int,
    gts: list[np.ndarray],
    iou: float,
    n_boot: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    aps = [ap_of(dets, j, gts, iou, rng.integers(0, len(gts), len(gts))) for _ in range(n_boot)]
    lo, hi = np.percentile(aps, [2.5, 97.5])
    return float(lo), float(hi)


def study_model(
    run: Path, sae: Any, model: dict[str, Any], iou: float, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    key, name = model["encoder_key"], model["name"]
    return study_stores(
        ActivationStore(run / "stores" / f"{key}-training"),
        ActivationStore(run / "stores" / f"{key}-test"),
        sae,
        model["concept"],
        run / "analysis" / "probe" / name / "ranking_class=1_centered.json",
        iou,
        n_boot,
        seed,
        {"run": run.name, "model": name},
    )[0]


def study_stores(
    train: ActivationStore,
    test: ActivationStore,
    sae: Any,
    concept: str,
    ranking_path: Path,
    iou: float,
    n_boot: int,
    seed: int,
    labels: dict[str, Any],
    extra: list[int] | None = None,
    families: list[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every family x selection on one model's training/test stores (rows start with `labels`).
    `extra` latents are scored on test too but never chosen from: the second return value holds
    `oracle`, the best TEST AP of any scored latent under any rule (a ceiling, not a result)."""
    ranking = read_ranking(ranking_path, TOP)[0]
    lat, score, _ = pointing_scores(train, sae, concept, split="training", progress=False)
    pointing = [int(lat[k]) for k in np.lexsort((lat, -score))[:TOP]]
    cand = list(dict.fromkeys(ranking + pointing + list(extra or [])))
    oracle: dict[str, Any] = {"test_ap": -1.0, "n_latents": len(cand)}
    selections = {
        "ranking": [cand.index(j) for j in ranking],
        "pointing": [cand.index(j) for j in pointing],
    }
    tr = load_split(train, sae, concept, "training", cand)
    te = load_split(test, sae, concept, "test", cand)
    gt_train = np.concatenate(tr.gts)
    size_hw = (
        float(np.median(gt_train[:, 3] - gt_train[:, 1])),
        float(np.median(gt_train[:, 2] - gt_train[:, 0])),
    )
    rows = []
    for family, rules in FAMILIES.items():
        if families is not None and family not in families:
            continue
        size = size_hw if family == RESIZED else None
        train_ap = np.zeros((len(rules), len(cand)))
        test_dets = []
        for r, rule in enumerate(rules):
            dets = tr.detections(rule, size)
            train_ap[r] = [ap_of(dets, j, tr.gts, iou) for j in range(len(cand))]
            test_dets.append(te.detections(rule, size))
            if family != RESIZED:  # the diagnostic is not a box rule the command has
                for j in range(len(cand)):
                    a = ap_of(test_dets[r], j, te.gts, iou)
                    if a > oracle["test_ap"]:
                        oracle.update(test_ap=a, latent=cand[j], family=family, param=_param(rule))
        for sel, cols in selections.items():
            sub = train_ap[:, cols]
            r, c = np.unravel_index(int(np.argmax(sub)), sub.shape)  # first best: stable
            j = cols[c]
            rule = rules[r]
            test_ap = ap_of(test_dets[r], j, te.gts, iou)
            lo, hi = bootstrap(test_dets[r], j, te.gts, iou, n_boot, np.random.default_rng(seed))
            rows.append(
                {
                    **labels,
                    "selection": sel,
                    "family": family,
                    "param": _param(rule),
                    "latent": cand[j],
                    "train_ap": float(sub[r, c]),
                    "test_ap": test_ap,
                    "ci_lo": lo,
                    "ci_hi": hi,
                    "train_pointing": float(score[lat == cand[j]][0]),
                    "test_pointing": float(np.mean([d[j].pointing_hit for d in test_dets[r]])),
                    # Not held out: the best of the 10 on test at the chosen parameter.
                    "test_best_of_10": max(ap_of(test_dets[r], k, te.gts, iou) for k in cols),
                }
            )
    return rows, oracle


def _param(rule: BoxRule) -> str:
    return rule.threshold.spec + (f",mm{rule.min_mass:g}" if rule.min_mass else "")


def format_table(rows: list[dict[str, Any]], runs: list[str]) -> str:
    out = []
    for sel in ("ranking", "pointing"):
        out.append(f"\nlatent selection: {sel} (top {TOP}; latent + parameter chosen on training)")
        models = list(dict.fromkeys(r["model"] for r in rows))
        out.append(f"{'family':<24}" + "".join(f"{m[:33]:>35}" for m in models) + f"{'mean':>7}")
        for family in FAMILIES:
            cells, means = [], []
            for m in models:
                got = [
                    r
                    for r in rows
                    if r["selection"] == sel and r["family"] == family and r["model"] == m
                ]
                ap = float(np.mean([r["test_ap"] for r in got]))
                means.append(ap)
                if len(got) == 1:
                    g = got[0]
                    cells.append(f"{ap:.2f} [{g['ci_lo']:.2f},{g['ci_hi']:.2f}] {g['param']:>17}")
                else:  # several runs: mean and range over the seeds
                    aps = [r["test_ap"] for r in got]
                    cells.append(f"{ap:.2f} ({min(aps):.2f}-{max(aps):.2f}) n={len(got)}")
            out.append(
                f"{family:<24}" + "".join(f"{c:>35}" for c in cells) + f"{np.mean(means):>7.2f}"
            )
    out.append(
        "\npointing game (share of positive images whose strongest cell is on a GT box) "
        "of the latent chosen at fixed p99, training -> test:"
    )
    for r in rows:
        if r["family"] == "fixed p99 (demo today)":
            out.append(
                f"  {r['run']} {r['model']:<36} {r['selection']:<9} "
                f"latent {r['latent']:>5}: "
                f"{r['train_pointing']:.2f} -> {r['test_pointing']:.2f}"
            )
    out.append(
        f"\nruns: {', '.join(runs)}; cells: test AP@IoU of the training-chosen latent "
        "[95% bootstrap CI over test images] and the chosen parameter (mm = min mass);"
    )
    out.append("with several runs: mean (min-max) over runs. 'mean': over the four models.")
    out.append(
        f"* {RESIZED}: a diagnostic (not a localize option): every relmax box replaced by "
        "one of the training split's median GT size, same centre."
    )
    return "\n".join(out)


L1 = 3e-5  # the demo config's SAE penalty


def cli(*args: str) -> None:
    """One `mammo-sae` command, single-threaded (the box is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mammo_sae", *args]
    print("+ mammo-sae", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def store_of(work: Path, data: Path, model: ModelEntry, layer: str, split: str) -> Path:
    out = work / "stores" / f"{model.encoder_key}-{layer}-{split}"
    if not (out / "manifest.json").exists() or not (out / "images.json").exists():
        cli(
            "extract", "--data", str(data), "--model", model.classifier,
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
    work: Path, model: ModelEntry, layer: str, seed: int, args: argparse.Namespace
) -> dict[str, Any] | None:
    """Rows (families x selections) and ceilings of one model x layer x seed, cached (None:
    not cached and --cached-only)."""
    # Stores and SAEs belong to the encoder (the two linear probes share one); rankings and
    # scores to the model (its concept).
    name = f"{model.encoder_key}-{layer}"
    tag = f"{model.name}-{layer}{_tag(args)}-s{seed}"
    cache = work / "study" / f"{tag}-iou{args.iou:g}.json"
    if cache.exists():
        cell = json.loads(cache.read_text())
        if set(args.families) <= {r["family"] for r in cell["rows"]}:
            return cell
    if args.cached_only:
        return None
    train_dir = store_of(work, args.run / "data", model, layer, "training")
    test_dir = store_of(work, args.run / "data", model, layer, "test")
    sae_dir = sae_of(work, train_dir, name, seed, args)
    ranking = ranking_of(work, train_dir, sae_dir, model.concept, tag)
    t0 = time.perf_counter()
    sae = load_sae(sae_dir).eval()
    train, test = ActivationStore(train_dir), ActivationStore(test_dir)
    concept = model.concept
    lat, score, n_test = pointing_scores(test, sae, concept, split="test", progress=False)
    best_test = [int(lat[k]) for k in np.lexsort((lat, -score))[: args.extra]]
    labels = {"model": model.name, "layer": layer, "seed": seed}
    rows, oracle = study_stores(
        train, test, sae, concept, ranking, args.iou, args.n_boot, 0, labels, best_test,
        args.families,
    )  # fmt: skip
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


def format_layers_table(cells: list[dict[str, Any]], layers: list[str], iou: float) -> str:
    families = [f for f in FAMILIES if any(r["family"] == f for c in cells for r in c["rows"])]
    out = []
    models = list(dict.fromkeys(c["model"] for c in cells))
    for model in models:
        for sel in ("ranking", "pointing"):
            out.append(f"\n{model}, latent selection: {sel} (top {TOP}; chosen on training)")
            out.append(f"{'family':<24}" + "".join(f"{layer:>34}" for layer in layers))
            for family in families:
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


def held_out_choice(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The default box rule and layer, chosen on TRAINING AP alone: the (layer, family) of the
    highest mean training AP over every model, seed and selection, and that family's most often
    chosen parameter; its test AP (mean over the same cells) is reported, never used."""
    rows = [r for c in cells for r in c["rows"] if r["family"] != RESIZED]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["layer"], r["family"]), []).append(r)
    table = [
        {
            "layer": layer,
            "family": family,
            "train_ap": float(np.mean([r["train_ap"] for r in got])),
            "test_ap": float(np.mean([r["test_ap"] for r in got])),
            "param": Counter(r["param"] for r in got).most_common(1)[0][0],
            "n": len(got),
        }
        for (layer, family), got in groups.items()
    ]
    table.sort(key=lambda t: -t["train_ap"])
    best = table[0]
    by_model = {}
    for r in groups[(best["layer"], best["family"])]:
        by_model.setdefault((r["model"], r["selection"]), []).append(r["test_ap"])
    return {
        "chosen": best,
        "ranked": table,
        "test_by_model": {
            f"{m} / {sel}": float(np.mean(v)) for (m, sel), v in sorted(by_model.items())
        },
    }


def format_choice(choice: dict[str, Any], top: int = 8) -> str:
    out = ["\ndefault chosen on TRAINING AP (mean over models, seeds and both selections):"]
    out.append(f"{'layer':>9} {'family':<24}{'train AP':>9}{'test AP':>9}  most chosen parameter")
    for t in choice["ranked"][:top]:
        out.append(
            f"{t['layer']:>9} {t['family']:<24}{t['train_ap']:>9.2f}{t['test_ap']:>9.2f}  "
            f"{t['param']} (n={t['n']})"
        )
    c = choice["chosen"]
    out.append(f"chosen: {c['layer']}, {c['family']} {c['param']}; its test AP by model:")
    out += [f"  {k:<48}{v:.2f}" for k, v in choice["test_by_model"].items()]
    return "\n".join(out)


def run_layers(args: argparse.Namespace) -> None:
    """The study on one run: cells of model x layer x seed, the table and the held-out choice."""
    if not (args.run / "models" / "models.json").exists():
        raise SystemExit(
            f"{args.run}: no models/models.json (run `mammo-sae run CONFIG --only models`)"
        )
    records = json.loads((args.run / "models" / "models.json").read_text())["models"]
    models = {r["name"]: ModelEntry.from_record(r, args.run) for r in records}
    names = args.models or [m for m in models if models[m].concept in CONCEPTS]
    unknown = [m for m in names if m not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; the run has {sorted(models)}")
    if not (args.run / "data" / "phantom.json").is_file():
        raise SystemExit(f"{args.run}: no data/phantom.json (the study scores phantom runs)")
    phantom = json.loads((args.run / "data" / "phantom.json").read_text())
    size = f"{phantom['height']}x{phantom['width']}"
    out = args.out or Path(__file__).parent / "results" / f"cpu_localization_study_{size}.txt"
    t0 = time.perf_counter()
    cells = [
        cell
        for m in names
        for layer in args.layers
        for seed in args.seeds
        if (cell := study_cell(args.work, models[m], layer, seed, args)) is not None
    ]
    if not cells:
        raise SystemExit("no cell computed or cached")
    # Cells computed with more families than asked show only the asked ones (one set per table).
    cells = [{**c, "rows": [r for r in c["rows"] if r["family"] in args.families]} for c in cells]
    seeds = sorted({c["seed"] for c in cells})
    choice = held_out_choice(cells)
    text = (
        f"localisation study at {size}: test AP@IoU {args.iou:g} by layer (benchmarks/"
        f"localization_study.py --run {args.run}; SAEs relu-l1 x{args.expansion}, "
        f"L1 {args.l1_coeff:g}, {args.epochs} epochs, seeds {seeds} (n per cell below); "
        f"2-core CPU, {time.perf_counter() - t0:.0f} s this call)\n"
        + format_layers_table(cells, args.layers, args.iou)
        + "\n"
        + format_choice(choice)
    )
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"size": size, "cells": cells, "choice": choice}, indent=1) + "\n"
    )


def run_finished(args: argparse.Namespace) -> None:
    """The first study: each finished run's own final-layer SAE and rankings."""
    rows, used = [], []
    t0 = time.perf_counter()
    for run in args.runs:
        if not (
            (run / "sae" / "sae.safetensors").exists() and (run / "analysis" / "probe").is_dir()
        ):
            print(f"skip {run}: no SAE or probe rankings (unfinished run)")
            continue
        used.append(run.name)
        sae = load_sae(run / "sae").eval()
        models = json.loads((run / "models" / "models.json").read_text())["models"]
        for model in models:
            wanted = not args.models or model["name"] in args.models
            if model["concept"] not in CONCEPTS or not wanted:
                continue
            t1 = time.perf_counter()
            rows.extend(study_model(run, sae, model, args.iou, args.n_boot, args.seed))
            print(f"{run.name} {model['name']}: {time.perf_counter() - t1:.0f} s", flush=True)
    if not rows:
        raise SystemExit("no finished run among --runs")
    text = (
        f"localisation study: test AP@IoU {args.iou:g}, box rule x latent selection "
        f"(benchmarks/localization_study.py; 2-core CPU, {time.perf_counter() - t0:.0f} s)\n"
        + format_table(rows, used)
    )
    print(text)
    out = args.out or Path(__file__).parent / "results" / "cpu_localization_study.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", type=Path, help="the study: a run with models/ and data/")
    where.add_argument("--runs", nargs="+", type=Path, help="finished runs: their own SAEs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/localization-study"), help="cache")
    ap.add_argument("--layers", nargs="+", default=["final", "blocks.6", "blocks.2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=None, help="model names (default: all)")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--l1-coeff", type=float, default=L1, help="SAE L1 (demo: 3e-5)")
    ap.add_argument("--extra", type=int, default=10, help="best-test-pointing latents (ceiling)")
    ap.add_argument("--iou", type=float, default=0.25)
    ap.add_argument(
        "--families",
        choices=["all", "core"],
        default="all",
        help=f"box-rule families to score: all, or core ({'; '.join(CORE_FAMILIES)})",
    )
    ap.add_argument("--n-boot", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (--runs)")
    ap.add_argument(
        "--cached-only", action="store_true", help="tabulate the cached cells, compute nothing"
    )
    ap.add_argument("--out", type=Path, default=None, help="result .txt (a .json beside it)")
    args = ap.parse_args()
    args.families = list(FAMILIES) if args.families == "all" else CORE_FAMILIES
    torch.set_num_threads(1)
    run_layers(args) if args.run else run_finished(args)


if __name__ == "__main__":
    main()
