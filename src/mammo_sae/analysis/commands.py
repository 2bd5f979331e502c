"""CLI commands of the analysis subpackage: summarize, probe, intervene, fidelity, separation.

Each is a thin wrapper: open inputs, call the library (summaries/probe/intervene/fidelity/
separation), write JSON + CSV (+ a figure) into --out. See docs/analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..config import device_opt, opt, progress_opt, to_dict
from ..errors import MammoSaeError
from ..io import write_json, write_text_atomic
from . import DEFAULT_KS
from .results import FidelityRecord, FidelityResult, InterveneRecord, SweepPoint

if TYPE_CHECKING:
    from .intervene import MaskedLogits

Level = Literal["image", "row"]
SCHEMA_VERSION = 1
DEFAULT_ATTRIBUTE = "confounder"  # the phantom's planted marker label
CACHE_DIR_HELP = (
    "summaries cache (default: summaries/ inside the SAE directory, or beside a .pt SAE)"
)


# --------------------------------------------------------------------------- shared helpers
def _summaries(store: Path, sae: Path, cfg: Any) -> Any:
    from .summaries import summaries_for_command

    return summaries_for_command(store, sae, cfg)


def _select(
    store_path: Path, concept: str, split: str, level: str
) -> tuple[Any, np.ndarray, np.ndarray]:
    from .summaries import labelled_rows, open_store

    store = open_store(store_path)
    rows, y = labelled_rows(
        store.images,
        concept,
        split=split,
        level=level,
        store_level=store.manifest.get("level", "image"),
    )
    if len(rows) == 0:
        raise MammoSaeError(f"store {store_path}: no images in split {split!r}")
    return store, rows, y


def attribute_values(
    images: Any, rows: np.ndarray, attribute: str, level: str
) -> np.ndarray | None:
    """The binary `attribute` label of each row (image level unless `level` is row), or None
    when the store's labels do not have it."""
    column = "labels" if level == "row" or "image_labels" not in images else "image_labels"
    labels = [images.at[int(r), column] for r in rows]
    if not attribute or not labels or any(attribute not in lab for lab in labels):
        return None
    try:
        values = np.asarray([int(lab[attribute]) for lab in labels], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise MammoSaeError(
            f"attribute {attribute!r} has a value that is not an integer label: {exc}"
        ) from exc
    if not set(np.unique(values)).issubset({0, 1}):
        raise MammoSaeError(
            f"attribute {attribute!r} is not binary (values {sorted(set(values.tolist()))})"
        )
    return values


def _write_csv(path: Path, frame: Any) -> None:
    write_text_atomic(path, frame.to_csv(index=False))


def _head_and_concept(classifier: Path, concept: str | None) -> tuple[Any, str]:
    from ..models.checkpoints import warn_assumed_concept
    from .intervene import load_head

    head = load_head(classifier)
    warn_assumed_concept(classifier, head.concept, concept)
    name = concept or head.concept
    if not name:
        raise MammoSaeError(f"classifier {classifier} does not name its concept; pass --concept")
    return head, name


# --------------------------------------------------------------------------- summarize


@dataclass
class SummarizeConfig:
    """Encode every patch of a store with an SAE once and cache per-image mean/max latent vectors
    (sparse), reconstruction error, L0 and per-latent off-breast/confounder mass, keyed by the
    store's and the SAE's hashes. Later analyses reuse the cache."""

    store: Path = opt(help="activation store")
    sae: Path = opt(help="SAE checkpoint")
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    out: Path | None = opt(None, help="also write a summary JSON here")
    batch_rows: int = opt(8192, min=1, help="patch rows per SAE call")
    device: str = device_opt()
    progress: bool = progress_opt()
    recompute: bool = opt(False, help="ignore a cached entry")


def run_summarize(cfg: SummarizeConfig) -> int:
    from .summaries import summaries_for

    s = summaries_for(
        cfg.store,
        cfg.sae,
        cache_dir=cfg.cache_dir,
        batch_rows=cfg.batch_rows,
        device=cfg.device,
        recompute=cfg.recompute,
        progress=cfg.progress,
    )
    stats = s.reconstruction_stats(np.flatnonzero(s.n_positions_n > 0))
    info = {
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        **s.meta,
        "nnz_mean": int(s.mean_nh.nnz),
        "density": s.mean_nh.nnz / max(1, s.n_images * s.h),
        **stats,
    }
    if cfg.out:
        write_json(cfg.out, info)
    print(
        f"{s.n_images} images, h = {s.h}: FVU {stats['fvu']:.4f}, L0 {stats['l0']:.1f}, "
        f"dead {stats['dead_fraction']:.3f}"
    )
    return 0


# --------------------------------------------------------------------------- probe
@dataclass
class ProbeConfig:
    """Class-wise mean latent activation z̄(c) (paper Eq. 2) and per-class latent rankings under
    the scores mean (paper), centered (class mean − global mean: the released rankings), auroc
    (per-latent discriminative) and peak (centred class mean of each image's max activation:
    local findings). Writes ranking_class={0,1}_{score}.json (released format:
    rank, index, importance), probe.csv (one row per latent) and probe.json."""

    store: Path = opt(help="activation store (rankings are computed on --split)")
    sae: Path = opt(help="SAE checkpoint")
    concept: str = opt(help="binary concept label, e.g. Mass or Suspicious_Calcification")
    out: Path = opt(help="output directory")
    split: str = opt("training", help="split to rank on (training | test | all)")
    level: Level = opt("image", help="image (label = any row) or row (needs a row-level store)")
    scores: list[str] = opt(["mean", "centered", "auroc", "peak"], help="scores to rank by")
    top: int = opt(20, min=1, help="top latents per class listed in probe.json")
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    batch_rows: int = opt(8192, min=1, help="patch rows per SAE call")
    device: str = device_opt()
    progress: bool = progress_opt()


def run_probe(cfg: ProbeConfig) -> int:
    from .probe import probe, probe_table, ranking_file_name

    _, rows, y = _select(cfg.store, cfg.concept, cfg.split, cfg.level)
    s = _summaries(cfg.store, cfg.sae, cfg)
    mean = s.mean_rows(rows)
    result = probe(mean, y, concept=cfg.concept, scores=cfg.scores, max_nh=s.max_rows(rows))
    cfg.out.mkdir(parents=True, exist_ok=True)
    tops: dict[str, Any] = {}
    for score in result.scores:
        tops[score] = {}
        for c in (0, 1):
            entries = result.ranking(score, c)
            write_json(cfg.out / ranking_file_name(c, score), entries)
            tops[score][str(c)] = entries[: cfg.top]
    images_active = np.asarray((mean > 0).sum(axis=0)).ravel()
    _write_csv(cfg.out / "probe.csv", probe_table(result, max_images_active=images_active))
    write_json(
        cfg.out / "probe.json",
        {
            "schema_version": SCHEMA_VERSION,
            "config": to_dict(cfg),
            "concept": cfg.concept,
            "n_per_class": result.n_per_class,
            "h": s.h,
            "store_sha256": s.meta.get("store_sha256"),
            "sae_sha256": s.meta.get("sae_sha256"),
            "subsample_fraction": s.meta.get("subsample_fraction"),
            "top": tops,
        },
    )
    first = tops.get("centered", next(iter(tops.values())))["1"][:10]
    print(f"{cfg.concept}: top class-1 latents: {[e['index'] for e in first]}")
    return 0


# --------------------------------------------------------------------------- intervene
@dataclass
class InterveneConfig:
    """Top-k activated (keep the union of the class-0 and class-1 top-k latents) and deactivated
    (zero that union) sweeps, AUROC/AUPRC with bootstrap 95% CIs on the evaluation split, via the
    exact pooled identity (or --exact-decode: decode every patch). A store of an earlier layer
    (extract --layer blocks.N) is read exactly: each edited map runs through the rest of the
    classifier's network. With --latents, a single targeted edit (--mode off|on) instead.
    Rankings: a probe output directory (--rankings) or, if absent, computed on --rank-split of
    --rank-store (default: --store)."""

    store: Path = opt(help="activation store of the model being edited")
    sae: Path = opt(help="SAE checkpoint")
    classifier: Path = opt(help="classifier checkpoint (its head gives the logit)")
    out: Path = opt(help="output directory")
    concept: str | None = opt(None, help="label to score (default: the classifier's concept)")
    rankings: Path | None = opt(
        None, help="probe output directory with ranking_class={0,1}_SCORE.json"
    )
    score: Literal["mean", "centered", "auroc", "peak"] = opt(
        "centered", help="which ranking files to use"
    )
    rank_class0: Path | None = opt(
        None, help="explicit class-0 ranking JSON (e.g. a released file)"
    )
    rank_class1: Path | None = opt(None, help="explicit class-1 ranking JSON")
    rank_store: Path | None = opt(None, help="store to rank on when no rankings are given")
    rank_split: str = opt("training", help="split to rank on when no rankings are given")
    split: str = opt("test", help="evaluation split")
    level: Level = opt("image", help="image or row level (row needs a row-level store)")
    ks: list[int] = opt(list(DEFAULT_KS), help="k values (clipped to h, deduplicated)")
    latents: list[int] = opt([], help="targeted edit: these latents (e.g. 13867,15699)")
    mode: Literal["on", "off"] = opt(
        "off", help="targeted edit: keep only (on) or zero (off) --latents"
    )
    attribute: str | None = opt(
        None,
        help="targeted edit: also report how well the logit tells this "
        "binary image label apart among concept negatives (the "
        "classifier's shortcut; e.g. confounder), before and after",
    )
    exact_decode: bool = opt(False, help="decode every patch instead of the pooled identity (slow)")
    n_boot: int = opt(1000, min=0, help="bootstrap resamples for the 95% CIs (0 = none)")
    seed: int = opt(0, help="bootstrap seed")
    label: str | None = opt(None, help="curve label in the figure")
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    batch_rows: int = opt(8192, min=1, help="patch rows per SAE call")
    device: str = device_opt()
    progress: bool = progress_opt()


def _rankings(cfg: InterveneConfig, concept: str) -> tuple[list[np.ndarray], str]:
    from .probe import probe, ranking_file_name, ranking_order, read_ranking

    def load(path: Path) -> np.ndarray:
        return np.asarray(read_ranking(path)[0], dtype=np.int64)

    if cfg.rank_class0 or cfg.rank_class1:
        if not (cfg.rank_class0 and cfg.rank_class1):
            raise MammoSaeError("give both --rank-class0 and --rank-class1")
        return [load(cfg.rank_class0), load(cfg.rank_class1)], "given files"
    if cfg.rankings:
        return [
            load(cfg.rankings / ranking_file_name(c, cfg.score)) for c in (0, 1)
        ], f"{cfg.rankings} ({cfg.score})"
    rank_store = cfg.rank_store or cfg.store
    _, rows, y = _select(rank_store, concept, cfg.rank_split, cfg.level)
    s = _summaries(rank_store, cfg.sae, cfg)
    res = probe(s.mean_rows(rows), y, concept=concept, scores=[cfg.score], max_nh=s.max_rows(rows))
    return [
        ranking_order(res.scores[cfg.score][c]) for c in (0, 1)
    ], f"{cfg.score} on {rank_store} split {cfg.rank_split}"


def tapped_layer(store: Any) -> str:
    """The encoder layer a store holds: `final` unless an earlier tap (stem, blocks.N) of a
    classifier; a store from elsewhere (a synthetic one, a Mammo-CLIP export) counts as final and
    the head checks its width."""
    from ..layout import FINAL_LAYER, LAYER_PATTERN

    layer = str(store.manifest.get("layer") or FINAL_LAYER)
    return layer if LAYER_PATTERN.fullmatch(layer) else FINAL_LAYER


def _logit_path(
    cfg: Any, store: Any, summaries: Any, sae: Any, head: Any, rows: np.ndarray, exact: bool
) -> tuple[MaskedLogits, str]:
    """How latent masks become the concept logits of `rows`: the pooled identity at the final
    layer (or the exact decode with `exact`), the rest of the network below it."""
    from ..devices import resolve_device
    from ..models.checkpoints import load_classifier
    from .intervene import (
        PooledReadout,
        exact_logits,
        layer_readout,
        pooled_logits,
        sae_readout,
    )

    layer = tapped_layer(store)
    if layer == "final" and not exact:
        v_h, c = sae_readout(sae, head)
        mean = summaries.mean_rows(rows)
        return pooled_logits(mean, v_h, c), "pooled-identity"
    # The final layer needs only the head already loaded; earlier layers the whole network.
    readout = (
        PooledReadout(head)
        if layer == "final"
        else layer_readout(load_classifier(cfg.classifier), layer, resolve_device(cfg.device))
    )

    def masked(masks: Any) -> tuple[np.ndarray, np.ndarray]:
        got = exact_logits(store, sae, readout, rows, masks, progress=cfg.progress)
        return got["on"], got["off"]

    return masked, readout.path


def run_intervene(cfg: InterveneConfig) -> int:
    from .figures import Curve, plot_topk_grid
    from .intervene import edit_set, sae_width, sweep
    from .summaries import open_sae

    head, concept = _head_and_concept(cfg.classifier, cfg.concept)
    store, rows, y = _select(cfg.store, concept, cfg.split, cfg.level)
    s = _summaries(cfg.store, cfg.sae, cfg)
    sae = open_sae(cfg.sae, cfg.device)
    h = sae_width(sae)
    masked, path = _logit_path(cfg, store, s, sae, head, rows, cfg.exact_decode)
    cfg.out.mkdir(parents=True, exist_ok=True)
    base = {
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        "concept": concept,
        "store_sha256": s.meta.get("store_sha256"),
        "sae_sha256": s.meta.get("sae_sha256"),
    }
    if cfg.latents:
        attribute = None
        if cfg.attribute:
            attribute = attribute_values(store.images, rows, cfg.attribute, cfg.level)
            if attribute is None:
                raise MammoSaeError(
                    f"--attribute {cfg.attribute!r}: not a label of every image in {cfg.store}"
                )
        result = edit_set(
            y,
            h,
            masked,
            cfg.latents,
            cfg.mode,
            n_boot=cfg.n_boot,
            seed=cfg.seed,
            attribute=attribute,
        )
        write_json(cfg.out / "edit.json", {**base, **result})
        print(
            f"{cfg.mode} {len(result['latents'])} latents: AUROC {result['plain_sae']['auroc']:.4f} -> "
            f"{result['edited']['auroc']:.4f}"
        )
        if "shortcut" in result:
            sc = result["shortcut"].get("attribute_auroc_among_negatives")
            print(
                f"shortcut ({cfg.attribute} among negatives): "
                + (
                    f"AUROC {sc['plain_sae']:.4f} -> {sc['edited']:.4f}"
                    if sc
                    else result["shortcut"]["skipped"]
                )
            )
        return 0
    rankings, source = _rankings(cfg, concept)
    res = sweep(y, rankings, h, masked, cfg.ks, n_boot=cfg.n_boot, seed=cfg.seed)
    import pandas as pd

    table = pd.DataFrame(res.rows())
    _write_csv(cfg.out / "intervene.csv", table)
    record = InterveneRecord(
        concept=concept,
        n=res.n,
        n_pos=res.n_pos,
        results=[SweepPoint.from_json(row, "sweep") for row in res.rows()],
        rankings=source,
        path=path,
        store_sha256=base["store_sha256"],
        sae_sha256=base["sae_sha256"],
        config=base["config"],
    )
    write_json(cfg.out / "intervene.json", record.to_json())
    ks_x = np.asarray(res.ks, dtype=float)
    panels = {
        mode: [Curve(cfg.label or concept, ks_x, m["auroc"], m["auroc_low"], m["auroc_high"])]
        for mode, m in res.metrics.items()
    }
    plot_topk_grid({f"{concept} ({cfg.split})": panels}, cfg.out / "intervene.png")
    print(table[["mode", "k", "union_size", "auroc"]].to_string(index=False))
    return 0


# --------------------------------------------------------------------------- fidelity
@dataclass
class FidelityConfig:
    """AUROC/AUPRC with original pooled features vs SAE-reconstructed features (no error term)
    for each (store, classifier) pair: the paper's Table 1, plus recovered fraction, FVU, L0 and
    dead fraction on the same split. A store of an earlier layer is read by running the stored
    and the reconstructed map through the rest of the classifier's network (the pooled identity
    holds only at the final layer). Writes table1.csv and fidelity.json."""

    stores: list[str] = opt(help="activation stores, one per model (comma separated)")
    classifiers: list[str] = opt(help="classifier checkpoints, paired with --stores")
    sae: Path = opt(help="SAE checkpoint (applied to every model)")
    out: Path = opt(help="output directory")
    names: list[str] = opt([], help="row names (default: classifier file names)")
    concepts: list[str] = opt(
        [],
        help="label to score per classifier (one for all, or one each; default: each classifier's own concept)",
    )
    split: str = opt("test", help="evaluation split")
    level: Level = opt("image", help="image or row level")
    n_boot: int = opt(1000, min=0, help="bootstrap resamples (0 = none)")
    seed: int = opt(0, help="bootstrap seed")
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    batch_rows: int = opt(8192, min=1, help="patch rows per SAE call")
    device: str = device_opt()
    progress: bool = progress_opt()


def _fidelity_logits(
    cfg: FidelityConfig, store: Any, sae: Any, classifier: Path, rows: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """(original, SAE) logits through the rest of the network for a store below the final layer;
    None at the final layer (the pooled identity)."""
    from ..devices import resolve_device
    from ..models.checkpoints import load_classifier
    from .intervene import exact_logits, layer_readout

    layer = tapped_layer(store)
    if layer == "final":
        return None, "pooled-identity"
    readout = layer_readout(load_classifier(classifier), layer, resolve_device(cfg.device))
    got = exact_logits(store, sae, readout, rows, progress=cfg.progress)
    return (got["original"], got["sae"]), readout.path


def run_fidelity(cfg: FidelityConfig) -> int:
    import pandas as pd

    from .fidelity import fidelity
    from .summaries import open_sae

    if len(cfg.stores) != len(cfg.classifiers) or not cfg.stores:
        raise MammoSaeError(
            f"--stores ({len(cfg.stores)}) and --classifiers ({len(cfg.classifiers)}) "
            "must pair up one to one"
        )
    if cfg.names and len(cfg.names) != len(cfg.stores):
        raise MammoSaeError("--names must give one name per store")
    if len(cfg.concepts) not in (0, 1, len(cfg.stores)):
        raise MammoSaeError(
            f"--concepts gives {len(cfg.concepts)} labels for {len(cfg.stores)} classifiers: "
            "give one for all or one per classifier"
        )
    sae = open_sae(cfg.sae, cfg.device)
    results: dict[str, FidelityResult] = {}
    table = []
    for j, (store_path, clf_path) in enumerate(zip(cfg.stores, cfg.classifiers, strict=True)):
        name = cfg.names[j] if cfg.names else Path(clf_path).name
        given = cfg.concepts[j if len(cfg.concepts) > 1 else 0] if cfg.concepts else None
        head, concept = _head_and_concept(Path(clf_path), given)
        store, rows, y = _select(Path(store_path), concept, cfg.split, cfg.level)
        s = _summaries(Path(store_path), cfg.sae, cfg)
        logits, path = _fidelity_logits(cfg, store, sae, Path(clf_path), rows)
        found = fidelity(
            s,
            store.pooled_nd,
            rows,
            y,
            sae,
            head,
            n_boot=cfg.n_boot,
            seed=cfg.seed,
            logits=logits,
            path=path,
        )
        r = FidelityResult.from_json(
            {"concept": concept, "store": store_path, "classifier": clf_path, **found}, name
        )
        results[name] = r
        table.append(
            {
                "model": name,
                "concept": concept,
                "n": r.n,
                "n_pos": r.n_pos,
                "auroc_original": r.original.auroc,
                "auroc_sae": r.sae.auroc,
                "recovered": r.recovered,
                "auprc_original": r.original.auprc,
                "auprc_sae": r.sae.auprc,
                "fvu": r.fvu,
                "l0": r.l0,
                "dead_fraction": r.dead_fraction,
            }
        )
    cfg.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(table)
    _write_csv(cfg.out / "table1.csv", frame)
    record = FidelityRecord(results, config=to_dict(cfg))
    write_json(cfg.out / "fidelity.json", record.to_json())
    print(frame.to_string(index=False))
    return 0


# --------------------------------------------------------------------------- separation
@dataclass
class SeparationConfig:
    """Class-mean latent vectors z̄(0), z̄(1) of several models (e.g. linear-probe vs finetuned)
    through the same SAE, as the paper's Figures 4/5; a separation index per model; per-latent
    off-breast and confounder scores; confounding latents flagged automatically (rule in
    docs/analysis.md). Writes separation.json, separation.csv and separation.png."""

    stores: list[str] = opt(help="activation stores, one per model (comma separated)")
    sae: Path = opt(help="SAE checkpoint (the same for every model)")
    concept: str = opt(help="binary concept label")
    out: Path = opt(help="output directory")
    names: list[str] = opt([], help="model names (default: store folder names)")
    split: str = opt("training", help="split whose images are averaged")
    level: Level = opt("image", help="image or row level")
    top: int = opt(10, min=1, help="class-1-dominant latents checked for flags and listed")
    confounder_threshold: float = opt(
        0.3, min=0.0, max=1.0, help="flag when the confounder score reaches this ..."
    )
    off_breast_threshold: float = opt(
        0.75, min=0.0, max=1.0, help="flag when the off-breast score reaches this ..."
    )
    min_enrichment: float = opt(
        3.0, min=0.0, help="... and is this many times the share of positions there"
    )
    attribute: str = opt(
        DEFAULT_ATTRIBUTE,
        help="binary image label tested for association with each "
        "latent among concept-negative images (the default is skipped when the store "
        "lacks it; another name must be a label of the store)",
    )
    association_auroc: float = opt(
        0.8,
        gt=0.5,
        max=1.0,
        help="flag 'associated' when a latent's AUROC for the attribute "
        "is at least this (or at most 1 minus it)",
    )
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    batch_rows: int = opt(8192, min=1, help="patch rows per SAE call")
    device: str = device_opt()
    progress: bool = progress_opt()


def run_separation(cfg: SeparationConfig) -> int:
    from .separation import FlagRule, compare, latent_table, plot_separation, public

    if cfg.names and len(cfg.names) != len(cfg.stores):
        raise MammoSaeError("--names must give one name per store")
    models = {}
    for j, store_path in enumerate(cfg.stores):
        name = cfg.names[j] if cfg.names else Path(store_path).name
        store, rows, y = _select(Path(store_path), cfg.concept, cfg.split, cfg.level)
        attribute = attribute_values(store.images, rows, cfg.attribute, cfg.level)
        if (
            attribute is None and cfg.attribute != DEFAULT_ATTRIBUTE
        ):  # only the default may be absent
            raise MammoSaeError(
                f"--attribute {cfg.attribute!r}: not a label of every image in {store_path}"
            )
        models[name] = (_summaries(Path(store_path), cfg.sae, cfg), rows, y, attribute)
    rule = FlagRule(
        top=cfg.top,
        confounder_threshold=cfg.confounder_threshold,
        off_breast_threshold=cfg.off_breast_threshold,
        min_enrichment=cfg.min_enrichment,
        association_auroc=cfg.association_auroc,
    )
    results = compare(models, rule)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(
        cfg.out / "separation.json",
        {
            "schema_version": SCHEMA_VERSION,
            "config": to_dict(cfg),
            "concept": cfg.concept,
            "models": {k: public(v) for k, v in results.items()},
        },
    )
    _write_csv(cfg.out / "separation.csv", latent_table(results))
    plot_separation(results, cfg.out / "separation.png", concept=cfg.concept)
    for name, r in results.items():
        tested = models[name][3] is not None
        print(
            f"{name}: separation {r['separation']:.3f}; flagged "
            f"{[(e['index'], e['flags']) for e in r['flagged']]}; "
            + (
                f"{len(r['associated'])} latents associated with {cfg.attribute!r}"
                if tested
                else f"association not tested (the store has no {cfg.attribute!r} label)"
            )
        )
    return 0
