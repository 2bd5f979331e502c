"""`mammo-sae atlas`: every latent of an SAE described from a store's cached summaries.

Writes `atlas.csv` (one row per latent: name, flags, activity, spatial profile, logit effects,
cluster, and per label its AUROC or ρ and q-value) and `atlas.json` (schema-versioned: labels,
per-latent entries with their strongest associations, co-activation clusters). See
docs/analysis.md ("Latent atlas") and `atlas.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import device_opt, opt, progress_opt, to_dict
from ..errors import MammoSaeError
from ..io import write_json, write_text_atomic
from .commands import CACHE_DIR_HELP

ATLAS_CSV, ATLAS_JSON = "atlas.csv", "atlas.json"


@dataclass
class AtlasConfig:
    """For every latent of the SAE, from the store's cached per-image summaries (no backbone
    pass): firing rate, mean/max activation, entropy over images; AUROC (binary labels) or
    Spearman ρ (ordinal labels) with every label of the dataset, Mann–Whitney / t p-values and
    Benjamini–Hochberg q-values over latents × labels; spatial profile; effect on each given
    classifier's logit; an automatic name and flags; co-activation clusters."""

    store: Path = opt(help="activation store")
    sae: Path = opt(help="SAE checkpoint")
    out: Path = opt(help="output directory (atlas.csv, atlas.json)")
    split: str = opt("all", help="images to describe: training | test | all")
    level: Literal["image", "row"] = opt(
        "image", help="image or row level (row needs a row-level store)"
    )
    classifiers: list[str] = opt([], help="classifier checkpoints whose logit effect v_j to list")
    names: list[str] = opt([], help="column names for --classifiers (default: their folder names)")
    alpha: float = opt(
        0.05, gt=0.0, max=1.0, help="BH q-value below which an association is significant"
    )
    min_auroc: float = opt(
        0.7, min=0.5, max=1.0, help="AUROC (or 1 − AUROC) to name a binary association"
    )
    min_rho: float = opt(0.3, min=0.0, max=1.0, help="|Spearman ρ| to name an ordinal association")
    clusters: int = opt(200, min=0, help="co-activation clusters (0 = none)")
    cluster_images: int = opt(2000, min=1, help="images subsampled for the clustering")
    seed: int = opt(0, help="seed of the clustering's subsample and start")
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    batch_rows: int = opt(
        8192, min=1, help="patch rows per SAE call (if summaries must be computed)"
    )
    device: str = device_opt()
    progress: bool = progress_opt()


def logit_effects(
    sae_path: Path, classifiers: list[str], names: list[str], device: str = "cpu"
) -> dict[str, np.ndarray]:
    """v = W_decᵀ w per classifier (the pooled identity: logit change per unit mean activation)."""
    from .intervene import load_head, sae_readout
    from .summaries import open_sae

    if names and len(names) != len(classifiers):
        raise MammoSaeError(
            f"--names has {len(names)} entries for {len(classifiers)} --classifiers"
        )
    if not classifiers:
        return {}
    sae = open_sae(sae_path, device)
    out = {}
    for k, path in enumerate(classifiers):
        p = Path(path)
        name = names[k] if names else (p.parent.name if p.name == "model" else p.stem)
        if name in out:
            raise MammoSaeError(f"two classifiers are both named {name!r}; pass --names")
        out[name] = sae_readout(sae, load_head(p))[0]
    return out


def run_atlas(cfg: AtlasConfig) -> int:
    from .atlas import AtlasRules, build_atlas, image_labels, spatial_from_summaries, to_json
    from .summaries import open_store, selected_rows, summaries_for_command

    t0 = time.perf_counter()
    store = open_store(cfg.store)
    rows, column = selected_rows(
        store.images,
        split=cfg.split,
        level=cfg.level,
        store_level=store.manifest.get("level", "image"),
    )
    if len(rows) < 3:
        raise MammoSaeError(
            f"store {cfg.store}: {len(rows)} usable images in split {cfg.split!r}; "
            "the atlas needs at least 3"
        )
    labels, skipped = image_labels(store.images, rows, column)
    effects = logit_effects(cfg.sae, cfg.classifiers, cfg.names, cfg.device)
    s = summaries_for_command(cfg.store, cfg.sae, cfg)
    rules = AtlasRules(alpha=cfg.alpha, min_auroc=cfg.min_auroc, min_rho=cfg.min_rho)
    atlas = build_atlas(
        s.mean_rows(rows),
        labels,
        max_nh=s.max_rows(rows),
        spatial=spatial_from_summaries(s),
        logit_effects=effects,
        n_clusters=cfg.clusters,
        cluster_images=cfg.cluster_images,
        seed=cfg.seed,
        rules=rules,
        skipped_labels=skipped,
        progress=cfg.progress,
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.out / ATLAS_CSV, atlas.table().to_csv(index=False))
    body = to_json(atlas, alpha=cfg.alpha)
    notes = _spatial_notes(s)
    write_json(
        cfg.out / ATLAS_JSON,
        {
            "schema_version": _schema(),
            "config": to_dict(cfg),
            "split": cfg.split,
            "store_sha256": s.meta.get("store_sha256"),
            "sae_sha256": s.meta.get("sae_sha256"),
            "subsample_fraction": s.meta.get("subsample_fraction"),
            "models": sorted(effects),
            "spatial_notes": notes,
            "seconds": round(time.perf_counter() - t0, 2),
            **body,
        },
    )
    named = sum(1 for n in atlas.names if not n.startswith(("unexplained", "dead")))
    print(
        f"atlas of {atlas.h} latents over {atlas.n_images} images ({len(labels)} labels, "
        f"{body['n_significant']} significant associations): {named} named; "
        f"{cfg.out / ATLAS_CSV}"
    )
    return 0


def _schema() -> int:
    from .atlas import SCHEMA_VERSION

    return SCHEMA_VERSION


def _spatial_notes(s: Any) -> list[str]:
    notes = []
    if s.border_mass_h is None or not np.isfinite(s.across_mass_h).any():
        notes.append(
            "the summaries hold no centre-of-mass or border sums (summaries made before "
            "schema 4): recompute them (`mammo-sae summarize --recompute`)"
        )
    if not (s.tissue_known_mass_h > 0).any():
        notes.append(
            "no breast-tissue fractions in the store: off-breast shares are NaN and "
            "centres of mass are relative to the frame"
        )
    if not (s.marked_mass_h > 0).any():
        notes.append("no marker boxes in the data: marker-box shares are NaN")
    return notes
