"""Latent-atlas time and peak memory at VinDr scale on synthetic summaries (CPU).

    python benchmarks/atlas_speed.py [--images 16000] [--h 16384] [--density 0.05]
        [--clusters 200] [--cluster-images 2000]

Builds random per-image mean/max latent matrices (CSR, `--density` of the entries nonzero,
heavy-tailed firing rates as SAE latents have), the labels of the VinDr folds CSV (11 findings,
density 0–3, BI-RADS 1–5, view, laterality, a marker) and random spatial columns, then times
`build_atlas` (activity, ranks, AUROC/Spearman + BH-FDR for every latent × label, names,
co-activation clusters) and reports the peak memory it allocated (tracemalloc: numpy/scipy
arrays included) and the process's peak RSS. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp

from mammo_sae.analysis.atlas import Label, build_atlas
from mammo_sae.data.records import CONFOUNDER, FINDING_CONCEPTS


def synthetic(
    n: int, h: int, density: float, seed: int
) -> tuple[sp.csr_matrix, sp.csr_matrix, list[Label]]:
    rng = np.random.default_rng(seed)
    # Per-latent firing rates from a log-uniform spread around `density` (some rare, some common).
    rate = np.clip(density * np.exp(rng.uniform(-2.5, 2.5, h)) / 2.4, 0.0, 0.9)
    per_row = rng.binomial(h, rate.mean(), n)
    indptr = np.r_[0, np.cumsum(per_row)]
    p = rate / rate.sum()
    indices = np.concatenate([np.sort(rng.choice(h, size=k, replace=False, p=p)) for k in per_row])
    data = rng.exponential(0.05, len(indices)).astype(np.float32) + 1e-4
    mean = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(n, h))
    peak = sp.csr_matrix(
        (data * rng.uniform(3, 20, len(data)).astype(np.float32), indices.astype(np.int32), indptr),
        shape=(n, h),
    )
    labels = [
        Label(c, "binary", (rng.random(n) < (0.5 if c == "No_Finding" else 0.03)).astype(float))
        for c in FINDING_CONCEPTS
    ]
    labels += [
        Label("density", "ordinal", rng.integers(0, 4, n).astype(float)),
        Label("birads", "ordinal", rng.integers(1, 6, n).astype(float)),
        Label("view", "binary", rng.integers(0, 2, n).astype(float)),
        Label("laterality", "binary", rng.integers(0, 2, n).astype(float)),
        Label(CONFOUNDER, "binary", (rng.random(n) < 0.2).astype(float), attribute=True),
    ]
    return mean, peak, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--h", type=int, default=16384)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument("--cluster-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    mean, peak, labels = synthetic(args.images, args.h, args.density, args.seed)
    t_make = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    spatial = {
        k: rng.random(args.h)
        for k in ("com_across", "com_down", "off_breast", "border_fraction", "marker_box_share")
    }
    logits = {f"model{k}": rng.normal(size=args.h) for k in range(4)}
    print(
        f"synthetic summaries: {args.images} images × h {args.h}, nnz {mean.nnz:,} "
        f"({mean.nnz / (args.images * args.h):.1%}), {len(labels)} labels; made in {t_make:.1f} s"
    )
    tracemalloc.start()
    t0 = time.perf_counter()
    atlas = build_atlas(
        mean,
        labels,
        max_nh=peak,
        spatial=spatial,
        logit_effects=logits,
        n_clusters=args.clusters,
        cluster_images=args.cluster_images,
        seed=args.seed,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t1 = time.perf_counter()
    table = atlas.table()
    t_table = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inputs = (mean.data.nbytes + mean.indices.nbytes + mean.indptr.nbytes) * 2 / 2**20
    print(
        f"build_atlas: {seconds:.1f} s; peak traced allocation {traced_peak / 2**20:.0f} MiB "
        f"(inputs: {inputs:.0f} MiB); process peak RSS {rss:.0f} MiB"
    )
    print(
        f"atlas table: {table.shape[0]} rows × {table.shape[1]} columns in {t_table:.1f} s; "
        f"{len(set(atlas.columns['cluster'].tolist()) - {-1})} clusters; "
        f"{int((np.nan_to_num(atlas.q, nan=1) < 0.05).sum())} significant of "
        f"{int(np.isfinite(atlas.p).sum())} tests (random labels: BH keeps this near 0)"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")


if __name__ == "__main__":
    main()
