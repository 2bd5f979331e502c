"""Latent summaries: one SAE pass over an activation store, kept for every later analysis.

Per image: the mean latent vector over its stored positions (the paper's per-image quantity,
Eq. 2) and the per-latent max, both sparse (CSR; SAE codes are sparse, so most of the
n_images × h entries are exactly 0). Per image also: reconstruction error and L0 (for FVU and
L0 on any split) and the mean patch vector. Per latent over the whole store: activation mass
in total, outside the breast (cells with tissue fraction < 0.5) and inside the records'
attribute boxes (`ImageRecord.attribute_boxes`: boxes of a per-image attribute, not of a
finding, e.g. the phantom's `confounder` marker; cells overlapping them; for off-breast and
confounder scores, `separation.py`),
on the frame's outermost ring of cells, and weighted by each cell's breast-relative position
(for the latent atlas's centre of mass, `atlas.py`).

Through the pooled identity (docs/architecture.md) the per-image mean vectors are all that
fidelity, probing and every masked intervention need. Full patch-latent maps of chosen latents
for heatmaps come from `mammo_sae.analysis.maps.latent_maps`.

The summaries are cached as `<store sha[:16]>-<sae sha[:16]>.npz` (+ `.json`) in a
`summaries/` folder inside the SAE directory (beside a `.pt` SAE; or a given folder) and reused while both are unchanged.
If the store was extracted with subsample < 1 the means are over the stored patches only
(`subsample_fraction` records it); run analyses on full stores.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..devices import module_device
from ..errors import MammoSaeError, StoreError
from ..io import atomic_path, read_json, sha256_file, sha256_json, write_json
from ..protocols import PatchStore, SAELike

SCHEMA_VERSION = 4  # 4: border and centre-of-mass sums (latent atlas)
OFF_BREAST_TISSUE = 0.5  # a cell with less breast-mask coverage than this is "outside the breast"
_ARRAYS = (
    "n_positions_n",
    "n_cells_n",
    "ss_within_n",
    "sse_n",
    "l0_n",
    "x_mean_nd",
    "mass_h",
    "tissue_known_mass_h",
    "off_breast_mass_h",
    "marked_mass_h",
    "confounder_mass_h",
    "border_mass_h",
    "across_mass_h",
    "down_mass_h",
)


@dataclasses.dataclass
class LatentSummaries:
    """Per-image and per-latent SAE statistics of one store (see the module docstring)."""

    mean_nh: sp.csr_matrix  # float32: mean of z over the image's stored positions
    max_nh: sp.csr_matrix  # float32: max of z over them
    n_positions_n: np.ndarray  # int64: stored positions per image (0 for skipped images)
    n_cells_n: np.ndarray  # int64: grid_h × grid_w per image
    ss_within_n: np.ndarray  # float64: Σ ||x − x̄_image||² over the image's positions
    sse_n: np.ndarray  # float64: Σ ||x − x̂||² (no error term)
    l0_n: np.ndarray  # float64: Σ #active latents over positions
    x_mean_nd: np.ndarray  # float32: mean stored patch vector
    mass_h: np.ndarray  # float64: Σ z over every position of the store
    tissue_known_mass_h: np.ndarray  # Σ z over positions whose tissue fraction is known
    off_breast_mass_h: np.ndarray  # Σ z over positions with tissue < OFF_BREAST_TISSUE
    marked_mass_h: np.ndarray  # Σ z over images that have an attribute box (phantom: marker)
    confounder_mass_h: np.ndarray  # Σ z over cells overlapping such a box
    meta: dict[str, Any]
    # Spatial sums for the atlas (None = not computed: spatial profiles are then NaN).
    border_mass_h: np.ndarray | None = None  # Σ z over cells of the grid's outermost ring
    across_mass_h: np.ndarray | None = (
        None  # Σ z·u, u = breast-relative position from the chest wall (0..1)
    )
    down_mass_h: np.ndarray | None = None  # Σ z·v, v = breast-relative position from the top (0..1)

    @property
    def n_images(self) -> int:
        return self.mean_nh.shape[0]

    @property
    def h(self) -> int:
        return self.mean_nh.shape[1]

    def mean_rows(self, rows: Sequence[int] | np.ndarray) -> sp.csr_matrix:
        return self.mean_nh[np.asarray(rows, dtype=np.int64)]

    def max_rows(self, rows: Sequence[int] | np.ndarray) -> sp.csr_matrix:
        return self.max_nh[np.asarray(rows, dtype=np.int64)]

    def off_breast_score(self) -> np.ndarray:
        """Share of each latent's mass outside the breast; NaN where unknown or never active."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.off_breast_mass_h / self.tissue_known_mass_h
        out[~(self.tissue_known_mass_h > 0)] = np.nan
        return out

    def confounder_score(self) -> np.ndarray:
        """Share of each latent's mass on marked images (with an attribute box) that lies inside
        those boxes (the phantom's marker)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.confounder_mass_h / self.marked_mass_h
        out[~(self.marked_mass_h > 0)] = np.nan
        return out

    def spatial_profile(self) -> dict[str, np.ndarray]:
        """Per latent: centre of mass (u across from the chest wall, v down; 0..1 over the
        breast's extent, or the frame where tissue is unknown) and the share of its mass on the
        frame's border ring; NaN for never-active latents."""
        active = self.mass_h > 0
        nan = np.full(self.h, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {
                key: (nan.copy() if sums is None else sums / self.mass_h)
                for key, sums in (
                    ("com_across", self.across_mass_h),
                    ("com_down", self.down_mass_h),
                    ("border_fraction", self.border_mass_h),
                )
            }
        for v in out.values():
            v[~active] = np.nan
        return out

    def reconstruction_stats(self, rows: Sequence[int] | np.ndarray) -> dict[str, float]:
        """FVU, mean L0 and dead fraction over the stored positions of the given images."""
        rows = np.asarray(rows, dtype=np.int64)
        n_pos = self.n_positions_n[rows].astype(np.float64)
        total = n_pos.sum()
        if total == 0:
            raise MammoSaeError("no stored positions in the selected images")
        means_nd = self.x_mean_nd[rows].astype(np.float64)
        mu_d = (means_nd * n_pos[:, None]).sum(0) / total
        # Total sum of squares = within-image + between-image parts (no cancellation).
        variance = self.ss_within_n[rows].sum() + float(
            (n_pos * ((means_nd - mu_d) ** 2).sum(1)).sum()
        )
        active = np.zeros(self.h, dtype=bool)
        active[np.unique(self.mean_nh[rows].indices)] = True
        return {
            "fvu": float(self.sse_n[rows].sum() / variance) if variance > 0 else float("nan"),
            "l0": float(self.l0_n[rows].sum() / total),
            "dead_fraction": float(1.0 - active.mean()),
            "n_positions": int(total),
            "n_images": int(len(rows)),
        }


# --------------------------------------------------------------------------- hashing / cache
def sae_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of an SAE checkpoint: its weights (the SAE module's `sae_sha256`) and, for a
    directory, its cfg.json too (it holds settings such as the batchtopk threshold)."""
    path = Path(path)
    try:
        from ..sae.checkpoints import sae_sha256
    except ImportError:
        sae_sha256 = None
    if sae_sha256 is not None and path.exists():
        weights = str(sae_sha256(path))
        cfg = path / "cfg.json"
        return (
            sha256_json([weights, sha256_file(cfg)]) if path.is_dir() and cfg.is_file() else weights
        )
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "summaries" not in p.parts)
        return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in files})
    raise MammoSaeError(f"SAE checkpoint not found: {path}")


def cache_paths(cache_dir: Path, store_sha: str, sae_sha: str) -> tuple[Path, Path]:
    stem = f"{store_sha[:16]}-{sae_sha[:16]}"
    return cache_dir / f"{stem}.npz", cache_dir / f"{stem}.json"


def default_cache_dir(sae_path: str | os.PathLike[str]) -> Path:
    p = Path(sae_path)
    return (p if p.is_dir() else p.parent) / "summaries"


def save_summaries(s: LatentSummaries, npz_path: Path, json_path: Path) -> None:
    arrays: dict[str, np.ndarray] = {name: getattr(s, name) for name in _ARRAYS}
    for name, value in arrays.items():
        if value is None:  # spatial sums not computed: stored as NaN (a NaN spatial profile)
            arrays[name] = np.full(s.h, np.nan)
    for which in ("mean", "max"):
        m = getattr(s, f"{which}_nh").tocsr()
        arrays.update(
            {
                f"{which}_data": m.data.astype(np.float32),
                f"{which}_indices": m.indices,
                f"{which}_indptr": m.indptr,
            }
        )
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    # The JSON is written last: its presence marks the cache entry complete.
    write_json(json_path, {"schema_version": SCHEMA_VERSION, **s.meta})


def load_summaries(npz_path: Path, json_path: Path | None = None) -> LatentSummaries:
    npz_path = Path(npz_path)
    json_path = Path(json_path) if json_path else npz_path.with_suffix(".json")
    meta = read_json(json_path)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise MammoSaeError(
            f"{json_path}: schema_version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, header and array errors all mean "corrupt"
        raise MammoSaeError(
            f"corrupt latent summaries {npz_path}: {type(exc).__name__}: {exc}"
        ) from exc
    shape = (int(meta["n_images"]), int(meta["h"]))
    try:
        mats = {
            w: sp.csr_matrix(
                (arrays[f"{w}_data"], arrays[f"{w}_indices"], arrays[f"{w}_indptr"]), shape=shape
            )
            for w in ("mean", "max")
        }
        fields = {name: arrays[name] for name in _ARRAYS}
    except (KeyError, ValueError) as exc:
        raise MammoSaeError(f"latent summaries {npz_path} are incomplete: {exc}") from exc
    meta = {k: v for k, v in meta.items() if k != "schema_version"}
    return LatentSummaries(mean_nh=mats["mean"], max_nh=mats["max"], meta=meta, **fields)


# --------------------------------------------------------------------------- computing
def _confounder_cells(
    record: Any, rows_p: np.ndarray, cols_p: np.ndarray, grid_hw: tuple[int, int]
) -> np.ndarray | None:
    """Bool mask of cells that overlap an attribute box (`ImageRecord.attribute_boxes`, the
    phantom's marker); None if the image has none.

    Cell (r, c) covers [c·W/w, (c+1)·W/w) × [r·H/h, (r+1)·H/h) of the model input (the grid
    laid evenly over the frame, as the store's tissue fractions). Overlap rather than "centre
    inside", because a marker is often smaller than one cell (phantom: ≈ 9 px vs 32 px cells)."""
    boxes = record.attribute_boxes()
    if not boxes:
        return None
    frame_h, frame_w = record.frame_hw
    gh, gw = grid_hw
    cell_h, cell_w = frame_h / gh, frame_w / gw
    inside = np.zeros(len(rows_p), dtype=bool)
    for b in boxes:
        inside |= (
            (cols_p * cell_w < b.x1)
            & ((cols_p + 1) * cell_w > b.x0)
            & (rows_p * cell_h < b.y1)
            & ((rows_p + 1) * cell_h > b.y0)
        )
    return inside


def _cell_positions(
    rows_p: np.ndarray,
    cols_p: np.ndarray,
    grid_hw: tuple[int, int],
    tissue_p: np.ndarray,
    *,
    right: bool,
) -> tuple[np.ndarray, ...]:
    """(border, u, v) per stored position: on the grid's outer ring; cell centre across from the
    chest wall (mirrored for right breasts, whose chest wall is on the right) and down, both
    relative to the extent of the breast cells (tissue ≥ OFF_BREAST_TISSUE) and clipped to
    0..1; relative to the whole grid where tissue is unknown or no cell is breast."""
    gh, gw = grid_hw
    border = (rows_p == 0) | (cols_p == 0) | (rows_p == gh - 1) | (cols_p == gw - 1)
    breast = np.nan_to_num(tissue_p, nan=0.0) >= OFF_BREAST_TISSUE
    r0, r1, c0, c1 = (
        (rows_p[breast].min(), rows_p[breast].max(), cols_p[breast].min(), cols_p[breast].max())
        if breast.any()
        else (0, gh - 1, 0, gw - 1)
    )
    across = np.clip((cols_p - c0 + 0.5) / (c1 - c0 + 1), 0.0, 1.0)
    down = np.clip((rows_p - r0 + 0.5) / (r1 - r0 + 1), 0.0, 1.0)
    return border, (1.0 - across if right else across), down


def compute_summaries(
    store: PatchStore,
    sae: SAELike,
    *,
    batch_rows: int = 8192,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> LatentSummaries:
    """Encode every stored patch once (images batched up to `batch_rows` rows per SAE call)."""
    import torch
    from tqdm.auto import tqdm

    d, h = int(store.d), int(getattr(sae, "h", 0) or sae.W_dec.shape[1])
    if getattr(sae, "d", d) != d:
        raise MammoSaeError(f"SAE input dimension {sae.d} does not match the store's d = {d}")
    n = int(store.n_images)
    device = module_device(sae)
    records = store.records()
    images = store.images
    grids = images[["grid_h", "grid_w"]].to_numpy(dtype=np.int64)

    mean_parts: list[tuple[np.ndarray, np.ndarray]] = [
        (np.zeros(0, np.int32), np.zeros(0, np.float32))
    ] * n
    max_parts = list(mean_parts)
    n_pos = np.zeros(n, np.int64)
    ss_within, sse, l0 = np.zeros(n), np.zeros(n), np.zeros(n)
    x_mean = np.zeros((n, d), np.float32)
    mass = {
        k: torch.zeros(h, dtype=torch.float64, device=device)
        for k in ("all", "known", "off", "marked", "conf", "border", "across", "down")
    }
    # Position counts: the share a latent spread evenly over positions would get.
    counts = {
        "tissue_known_positions": 0,
        "off_breast_positions": 0,
        "marked_positions": 0,
        "confounder_positions": 0,
    }

    def flush(
        batch: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]],
    ) -> None:
        # Memory: one (rows, h) float32 code matrix; everything else is (rows,) or (h,). Masses
        # are weighted column sums computed as (rows,) @ (rows, h) products, so no row copies.
        x_md = torch.from_numpy(np.concatenate([b[1] for b in batch])).to(device)
        with torch.no_grad():
            z_mh = sae.encode(x_md).float()
            err_m = (x_md - sae.decode(z_mh).float()).pow(2).sum(1).double().cpu().numpy()
        active_m = (z_mh != 0).sum(1).double().cpu().numpy()
        tissue_m = np.concatenate([b[2] for b in batch])
        known_m = ~np.isnan(tissue_m)
        off_m = known_m & (np.nan_to_num(tissue_m, nan=1.0) < OFF_BREAST_TISSUE)
        inbox_m = np.concatenate(
            [b[3] if b[3] is not None else np.zeros(len(b[1]), bool) for b in batch]
        )
        marked_m = np.concatenate([np.full(len(b[1]), b[3] is not None) for b in batch])
        border_m, across_m, down_m = (np.concatenate([b[4][k] for b in batch]) for k in range(3))
        for key, weight_m in (
            ("all", np.ones(len(tissue_m), bool)),
            ("known", known_m),
            ("off", off_m),
            ("marked", marked_m),
            ("conf", inbox_m),
            ("border", border_m),
            ("across", across_m),
            ("down", down_m),
        ):
            if weight_m.any():
                w_m = torch.from_numpy(weight_m.astype(np.float32)).to(device)
                mass[key] += (w_m @ z_mh).double()
        counts["tissue_known_positions"] += int(known_m.sum())
        counts["off_breast_positions"] += int(off_m.sum())
        counts["marked_positions"] += int(marked_m.sum())
        counts["confounder_positions"] += int(inbox_m.sum())
        start = 0
        for i, acts, _, _, _ in batch:
            p = len(acts)
            sl = slice(start, start + p)
            start += p
            n_pos[i] = p
            mean_h = (z_mh[sl].sum(0, dtype=torch.float64) / p).float().cpu().numpy()
            max_h = z_mh[sl].amax(0).cpu().numpy()
            nz = np.flatnonzero((mean_h != 0) | (max_h != 0)).astype(np.int32)
            mean_parts[i], max_parts[i] = (nz, mean_h[nz]), (nz, max_h[nz])
            acts64 = acts.astype(np.float64)
            mean_d = acts64.mean(0)
            x_mean[i] = mean_d
            ss_within[i] = float(((acts64 - mean_d) ** 2).sum())
            sse[i], l0[i] = err_m[sl].sum(), active_m[sl].sum()

    batch: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]] = []
    n_rows = 0
    for i in tqdm(range(n), desc="encoding store", unit="img", disable=not progress):
        if "ok" in images and not bool(images.at[i, "ok"]):
            continue  # skipped at extraction: no patches, zero summary row
        acts_pd, rows_p, cols_p = store.image_patches(i)
        if len(acts_pd) == 0:
            continue
        acts_pd = np.ascontiguousarray(acts_pd, dtype=np.float32)
        if not np.isfinite(acts_pd).all():
            raise StoreError(f"store image {i}: activations contain NaN or infinite values")
        tissue_p = (
            np.asarray(store.image_tissue(i), np.float32)
            if hasattr(store, "image_tissue")
            else np.full(len(acts_pd), np.nan, np.float32)
        )
        inbox = _confounder_cells(
            records[i], np.asarray(rows_p), np.asarray(cols_p), (int(grids[i, 0]), int(grids[i, 1]))
        )
        if batch and n_rows + len(acts_pd) > batch_rows:
            flush(batch)
            batch, n_rows = [], 0
        where = _cell_positions(
            np.asarray(rows_p),
            np.asarray(cols_p),
            (int(grids[i, 0]), int(grids[i, 1])),
            tissue_p,
            right=records[i].laterality == "R",
        )
        batch.append((i, acts_pd, tissue_p, inbox, where))
        n_rows += len(acts_pd)
    if batch:
        flush(batch)

    def to_csr(parts: list[tuple[np.ndarray, np.ndarray]]) -> sp.csr_matrix:
        indptr = np.r_[0, np.cumsum([len(p[0]) for p in parts])].astype(np.int64)
        indices = np.concatenate([p[0] for p in parts]).astype(np.int32)
        data = np.concatenate([p[1] for p in parts]).astype(np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(n, h))

    subsample = (store.manifest.get("subsample") or {}).get("fraction", 1.0)
    info = {
        "n_images": n,
        "h": h,
        "d": d,
        "subsample_fraction": subsample,
        "store": str(getattr(store, "path", "")),
        "store_level": store.manifest.get("level"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **counts,
        **(meta or {}),
    }
    cpu = {k: v.cpu().numpy() for k, v in mass.items()}
    return LatentSummaries(
        mean_nh=to_csr(mean_parts),
        max_nh=to_csr(max_parts),
        n_positions_n=n_pos,
        n_cells_n=grids.prod(axis=1),
        ss_within_n=ss_within,
        sse_n=sse,
        l0_n=l0,
        x_mean_nd=x_mean,
        mass_h=cpu["all"],
        tissue_known_mass_h=cpu["known"],
        off_breast_mass_h=cpu["off"],
        marked_mass_h=cpu["marked"],
        confounder_mass_h=cpu["conf"],
        border_mass_h=cpu["border"],
        across_mass_h=cpu["across"],
        down_mass_h=cpu["down"],
        meta=info,
    )


def _cached(npz_path: Path, json_path: Path) -> LatentSummaries | None:
    """The cache entry if it is complete, of this schema version and readable; None means
    "recompute" (a damaged entry is a cache miss, said once on stderr, not a failure)."""
    if not (npz_path.is_file() and json_path.is_file()):
        return None
    try:
        meta = read_json(json_path)
        if not (isinstance(meta, dict) and meta.get("schema_version") == SCHEMA_VERSION):
            return None
        return load_summaries(npz_path, json_path)
    except MammoSaeError as exc:
        print(f"warning: cached summaries unreadable ({exc}); recomputing them", file=sys.stderr)
        return None


def summarize(
    store: PatchStore,
    sae: SAELike,
    *,
    store_sha: str,
    sae_sha: str,
    cache_dir: Path | None,
    batch_rows: int = 8192,
    progress: bool = True,
    recompute: bool = False,
) -> LatentSummaries:
    """Cached `compute_summaries`: reuse `cache_dir`'s entry for (store hash, SAE hash) if present."""
    if cache_dir is None:
        return compute_summaries(
            store,
            sae,
            batch_rows=batch_rows,
            progress=progress,
            meta={"store_sha256": store_sha, "sae_sha256": sae_sha},
        )
    npz_path, json_path = cache_paths(Path(cache_dir), store_sha, sae_sha)
    cached = None if recompute else _cached(npz_path, json_path)
    if (
        cached is not None
        and cached.meta.get("store_sha256") == store_sha
        and cached.meta.get("sae_sha256") == sae_sha
    ):
        return cached
    s = compute_summaries(
        store,
        sae,
        batch_rows=batch_rows,
        progress=progress,
        meta={"store_sha256": store_sha, "sae_sha256": sae_sha},
    )
    save_summaries(s, npz_path, json_path)
    return s


def summaries_for_command(
    store_path: str | os.PathLike[str], sae_path: Any, cfg: Any
) -> LatentSummaries:
    """`summaries_for` with a command config's shared options (cache_dir, batch_rows, device,
    progress): how every analysis command opens its summaries."""
    return summaries_for(
        store_path,
        sae_path,
        cache_dir=cfg.cache_dir,
        batch_rows=cfg.batch_rows,
        device=cfg.device,
        progress=cfg.progress,
    )


def summaries_for(
    store_path: str | os.PathLike[str],
    sae_path: str | os.PathLike[str],
    *,
    cache_dir: Path | None = None,
    batch_rows: int = 8192,
    device: str = "cpu",
    progress: bool = True,
    recompute: bool = False,
) -> LatentSummaries:
    """Open the store and SAE from disk and return their (cached) summaries."""
    store = open_store(store_path)
    sae_sha = sae_hash(sae_path)
    cache_dir = default_cache_dir(sae_path) if cache_dir is None else Path(cache_dir)
    npz_path, json_path = cache_paths(cache_dir, store.manifest_sha256, sae_sha)
    cached = None if recompute else _cached(npz_path, json_path)
    if cached is not None:
        return cached
    sae = open_sae(sae_path, device)
    # A miss was just established (the path is keyed by both hashes): compute without re-checking.
    return summarize(
        store,
        sae,
        store_sha=store.manifest_sha256,
        sae_sha=sae_sha,
        cache_dir=cache_dir,
        batch_rows=batch_rows,
        progress=progress,
        recompute=True,
    )


# --------------------------------------------------------------------------- opening inputs
def open_store(path: str | os.PathLike[str]) -> Any:
    from ..activations.store import ActivationStore

    return ActivationStore(path)


def open_sae(path: str | os.PathLike[str], device: str = "cpu") -> Any:
    from ..devices import resolve_device
    from ..sae.checkpoints import load_sae

    target = resolve_device(device)
    sae = load_sae(path)
    sae = sae.to(target) if hasattr(sae, "to") else sae
    return sae.eval() if hasattr(sae, "eval") else sae


# --------------------------------------------------------------------------- label selection
def selected_rows(
    images: Any, *, split: str | None, level: str = "image", store_level: str | None = "image"
) -> tuple[np.ndarray, str]:
    """Image-table rows of `split` (None/"all": every split) at image or row level, skipped
    images left out, and the table column that holds their labels at that level."""
    if level not in ("image", "row"):
        raise MammoSaeError(f"level must be 'image' or 'row', got {level!r}")
    if level == "row" and store_level != "row":
        raise MammoSaeError(
            "row-level analysis needs a store extracted at row level "
            "(`mammo-sae extract --level row`); this store is image level"
        )
    df = images
    keep = np.ones(len(df), dtype=bool)
    if split not in (None, "", "all"):
        splits = sorted(set(df["split"]))
        if split not in splits:
            raise MammoSaeError(f"split {split!r} is not in the store; it has {', '.join(splits)}")
        keep &= (df["split"] == split).to_numpy()
    if "ok" in df:
        keep &= df["ok"].to_numpy(dtype=bool)
    column = "labels" if level == "row" or "image_labels" not in df else "image_labels"
    if level == "image" and store_level == "row":
        keep &= ~df["image_id"].duplicated().to_numpy()
    return np.flatnonzero(keep), column


def labelled_rows(
    images: Any,
    concept: str,
    *,
    split: str | None,
    level: str = "image",
    store_level: str | None = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Image-table rows of `split` with their binary `concept` label, at image or row level.

    Image level: one entry per image id (label = any row positive, `image_labels`). Row level
    needs a store extracted at row level (one entry per CSV row, the reference's protocol).
    Skipped images (`ok` false) are left out.
    """
    df = images
    rows, column = selected_rows(images, split=split, level=level, store_level=store_level)
    labels = []
    for r in rows:
        lab = df.at[r, column]
        if concept not in lab:
            raise MammoSaeError(
                f"unknown concept {concept!r}; labelled concepts in the store: "
                f"{', '.join(sorted(lab)) or 'none'}"
            )
        labels.append(int(lab[concept]))
    y = np.asarray(labels, dtype=np.int64)
    if len(y) and not set(np.unique(y)).issubset({0, 1}):
        raise MammoSaeError(f"concept {concept!r} is not binary (labels {sorted(set(y.tolist()))})")
    return rows, y
