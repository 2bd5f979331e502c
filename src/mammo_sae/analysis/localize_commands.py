"""`mammo-sae localize`: per-latent localisation AP of a concept (the paper's Table 2) + Figure 3."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import device_opt, opt, progress_opt, to_dict
from ..errors import MammoSaeError
from ..io import write_json, write_text_atomic, writer_lock
from . import DEFAULT_THRESHOLD


@dataclass
class LocalizeConfig:
    """Heatmap of each latent on each evaluated image (bilinear or nearest, model-input frame) →
    threshold (of the heatmap or of the native cell grid) → one box per connected region
    (w·h ≥ min-box-area, ≥ min-mass of the heat) scored by its mean activation → VOC
    all-point AP at the IoU threshold (and at 0.1 / 0.25 / 0.5) and pointing-game accuracy,
    pooled over images, per latent; baselines: chance boxes,
    the classifier's own activation map (--classifier) and an oracle box. Writes
    localization.json, localization.csv (one row per latent), table2.csv (one row, AP per rank
    and per baseline), detections.json and figure3.png into --out. See docs/localization.md."""

    store: Path = opt(help="activation store with full patch grids (subsample 1.0)")
    sae: Path = opt(help="SAE checkpoint")
    concept: str = opt(help="concept whose GT boxes are scored (e.g. Mass, confounder)")
    out: Path = opt(help="output directory")
    ranking: Path | None = opt(
        None,
        help="class-1 ranking JSON from `mammo-sae probe` (list of {rank, index, importance}), "
        "or the probe's --out folder (then --score names the ranking)",
    )
    score: Literal["mean", "centered", "auroc", "peak"] = opt(
        "centered",
        help="with --ranking FOLDER: the probe score whose class-1 ranking is read",
    )
    latents: list[int] = opt([], help="explicit latent indices (instead of --ranking)")
    top: int = opt(10, min=1, help="how many top-ranked latents to score")
    select: Literal["ranking", "pointing"] = opt(
        "ranking",
        help="ranking: the top of --ranking (paper); pointing: the latents whose "
        "strongest cell most often overlaps a GT box on --select-split of --select-store "
        "(chosen without the evaluated images), among --candidates of --ranking or all latents",
    )
    select_store: Path | None = opt(
        None, help="store holding --select-split with full grids (default: --store)"
    )
    select_split: str = opt("training", help="split the pointing selection is made on")
    candidates: int = opt(
        0, min=0, help="pointing: consider only the top N of --ranking (0 = every latent)"
    )
    threshold: str = opt(
        DEFAULT_THRESHOLD,
        help="relmax:F = F x each heatmap's max (relmax:0.3: the released code's rule, chosen "
        "on training AP by the localisation study); pNN = its NN-th percentile (the paper's "
        "text: p95); abs:X",
    )
    threshold_on: Literal["frame", "grid"] = opt(
        "frame",
        help="frame: threshold the upsampled heatmap (paper); grid: threshold the "
        "native cell map, a box spanning each connected group of cells",
    )
    upsample: Literal["bilinear", "nearest"] = opt(
        "bilinear", help="how cells become heatmap pixels: bilinear (paper) or nearest cell"
    )
    min_mass: float = opt(
        0.0,
        min=0.0,
        lt=1.0,
        help="drop connected regions holding less than "
        "this share of the mask's summed heat (0 = keep all)",
    )
    align: Literal["receptive-field", "even"] = opt(
        "receptive-field",
        help="where a cell's value sits when the map is upsampled: at the "
        "cell's receptive-field centre, or evenly laid over the frame (the released code)",
    )
    classifier: Path | None = opt(
        None,
        help="the concept classifier whose features the store "
        "holds: its activation map w·f is scored as a baseline",
    )
    chance_draws: int = opt(
        20,
        min=0,
        help="chance baseline: random boxes of the findings' sizes "
        "in the breast, AP averaged over N draws (0 = none)",
    )
    seed: int = opt(0, help="seed of the chance baseline")
    iou: float = opt(0.25, gt=0.0, max=1.0, help="IoU at which a box counts as a hit")
    split: str = opt("test", help="split of the store to evaluate (training | test | all)")
    images: Literal["positive", "all"] = opt(
        "positive",
        help="positive: images with the concept (label 1); all: every image of the split",
    )
    box_score: Literal["mean", "max"] = opt(
        "mean", help="box confidence: mean or max heatmap value inside the box"
    )
    match: Literal["voc", "coco"] = opt(
        "voc",
        help="voc: a box takes its best-IoU GT or is an FP "
        "(Mammo-CLIP); coco: best free GT (pycocotools)",
    )
    min_box_area: int = opt(10, min=0, help="drop boxes with width x height below this (px)")
    figure_images: int = opt(4, min=0, help="images (columns) in figure3.png; 0 = no figure")
    batch_rows: int = opt(8192, min=1, help="patch rows per SAE encode call")
    device: str = device_opt()
    progress: bool = progress_opt("show a progress bar")
    label: str | None = opt(
        None, help="row name in table2.csv (default: the concept), e.g. 'Mass finetuned'"
    )


def ranking_in_folder(folder: Path, score: str) -> Path:
    """The class-1 ranking by `score` in a `mammo-sae probe` output folder."""
    from .probe import ranking_file_name

    path = folder / ranking_file_name(1, score)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("ranking_class=1_*.json"))
        raise MammoSaeError(
            f"{folder} has no class-1 ranking by score {score!r} ({path.name}); "
            f"it holds: {', '.join(found) or 'no rankings (is it a probe --out folder?)'}"
        )
    return path


def run_localize(cfg: LocalizeConfig) -> int:
    from .intervene import load_head
    from .localize import REPORTED_IOUS, localize, pointing_scores, save_figure_grid, table2
    from .probe import read_ranking
    from .summaries import open_sae, open_store

    if cfg.ranking is not None and Path(cfg.ranking).is_dir():
        cfg = dataclasses.replace(cfg, ranking=ranking_in_folder(Path(cfg.ranking), cfg.score))
    store, sae = open_store(cfg.store), open_sae(cfg.sae, cfg.device)
    head = load_head(cfg.classifier) if cfg.classifier is not None else None
    selection: dict[str, Any] = {"method": cfg.select}
    if cfg.select == "pointing":
        if cfg.latents:
            raise MammoSaeError("--select pointing chooses the latents itself: drop --latents")
        if cfg.candidates and cfg.ranking is None:
            raise MammoSaeError("--candidates N takes the top N of --ranking: give --ranking FILE")
        pool = (
            read_ranking(cfg.ranking, cfg.candidates)[0] if cfg.ranking and cfg.candidates else None
        )
        sel_store = open_store(cfg.select_store) if cfg.select_store else store
        lat, score, n = pointing_scores(
            sel_store,
            sae,
            cfg.concept,
            split=cfg.select_split,
            latents=pool,
            align=cfg.align,
            batch_rows=cfg.batch_rows,
            progress=cfg.progress,
        )
        order = np.lexsort((lat, -score))[: cfg.top]
        latents, importances = [int(lat[k]) for k in order], [float(score[k]) for k in order]
        selection.update(
            split=cfg.select_split,
            store=str(cfg.select_store or cfg.store),
            images=n,
            candidates=len(lat),
            scores=dict(zip(map(str, latents), importances)),
        )
    elif (cfg.ranking is None) == (not cfg.latents):
        raise MammoSaeError("give exactly one of --ranking FILE or --latents I,J,...")
    elif cfg.ranking is not None:
        latents, importances = read_ranking(cfg.ranking, cfg.top)
    else:
        latents, importances = list(cfg.latents), []
    result = localize(
        store,
        sae,
        cfg.concept,
        latents,
        threshold=cfg.threshold,
        iou_threshold=cfg.iou,
        split=cfg.split,
        image_set=cfg.images,
        box_score=cfg.box_score,
        min_box_area=cfg.min_box_area,
        match=cfg.match,
        align=cfg.align,
        threshold_on=cfg.threshold_on,
        upsample=cfg.upsample,
        min_mass=cfg.min_mass,
        head=head,
        chance_draws=cfg.chance_draws,
        seed=cfg.seed,
        batch_rows=cfg.batch_rows,
        progress=cfg.progress,
    )
    if importances:
        result.table.insert(2, "importance", importances)
    out = Path(cfg.out)
    with writer_lock(out):
        payload = result.to_json()
        payload["config"] = to_dict(cfg)
        payload["selection"] = selection
        write_json(out / "localization.json", payload)
        write_text_atomic(out / "localization.csv", result.table.to_csv(index=False))
        write_json(out / "detections.json", result.detections_json())
        wide = table2({cfg.label or cfg.concept: result})
        write_text_atomic(out / "table2.csv", wide.to_csv(index=False))
        if cfg.figure_images > 0:
            save_figure_grid(
                store,
                sae,
                result,
                out / "figure3.png",
                n_images=cfg.figure_images,
                head=head,
                label=cfg.label,
                batch_rows=cfg.batch_rows,
            )
    cols = [
        "rank",
        "latent",
        "ap",
        *(f"ap_iou_{v:g}" for v in REPORTED_IOUS),
        "pointing",
        "n_pred",
        "n_gt",
    ]
    print(result.table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        "baselines: "
        + ", ".join(f"{name} AP {b['ap']:.3f}" for name, b in result.baselines.items())
    )
    print(f"wrote {out}/localization.json, localization.csv, table2.csv, detections.json")
    return 0
