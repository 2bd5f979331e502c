"""Label retrieval on the phantom: precision@10, SAE latent fingerprint vs raw pooled features.

    python benchmarks/retrieval_phantom.py [--run runs/demo]
    python benchmarks/retrieval_phantom.py --make-small [--root runs/retrieval_small]

For Mass, Suspicious_Calcification and the `confounder` marker, every positive image of a split
is a query (`mammo-sae retrieve --query LABEL`); precision@10 is the share of its 10 nearest
images (itself excluded) that are positive, for sparse_cosine, sparse_overlap and dense_cosine,
beside chance; laterality and view follow as controls (what whole-image similarity finds
whatever the findings). Each split is measured three ways: centred vectors (the command's default), the
same with the query's own patient left out (a phantom patient's CC and MLO show the same
findings, so the other view is a near duplicate), and raw vectors (`--no-center`).

Default: a finished demo run (`mammo-sae demo` / `make demo`; the atlas stage's store and the
run's SAE and summaries cache), skipped with a message when absent. `--make-small` instead
builds the small chain of tests/test_analysis_phantom.py (phantom → pretext backbone → Mass
probe + finetune → stores → TopK SAE; reused when present) and measures its finetuned stores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from mammo_sae.cli import main as cli

LABELS = ("Mass", "Suspicious_Calcification", "confounder")
CONTROLS = ("laterality", "view")  # global layout: does retrieval work at all on these features?
METHODS = ("sparse_cosine", "sparse_overlap", "dense_cosine")


def demo_inputs(run: Path) -> tuple[list[Path], Path, Path] | None:
    """(stores of the atlas stage's encoder, SAE, summaries cache) of a finished run, or None."""
    record = run / "stages" / "atlas.json"
    if not record.is_file() or not (run / "sae" / "cfg.json").is_file():
        return None
    key = json.loads(record.read_text())["outputs"]["store"]
    stores = sorted(p for p in (run / "stores").glob(f"{key}-*") if (p / "manifest.json").is_file())
    return (stores, run / "sae", run / "analysis" / "summaries") if stores else None


def small_inputs(root: Path, n_images: int) -> tuple[list[Path], Path, None]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_analysis_phantom import build_chain

    chain = build_chain(root, n_images=n_images)
    return [chain["store_finetuned_training"], chain["store_finetuned_test"]], chain["sae"], None


VARIANTS = {
    "centred": [],
    "centred, other patients": ["--exclude-same-patient"],
    "raw": ["--no-center"],
}


def measure(
    store: Path, sae: Path, cache: Path | None, label: str, extra: list[str], out: Path
) -> dict:
    args = [
        "retrieve",
        "--store",
        str(store),
        "--sae",
        str(sae),
        "--out",
        str(out),
        "--query",
        label,
        "--ks",
        "1,5,10",
        "--no-html",
        "--no-progress",
    ]
    args += ["--cache-dir", str(cache)] if cache else []
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = cli(args + extra)
    if status != 0:
        raise SystemExit(err.getvalue().strip() or f"retrieve failed for {label} on {store}")
    return json.loads((out / "retrieve.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="finished demo run")
    ap.add_argument("--make-small", action="store_true", help="build and use a small chain")
    ap.add_argument("--root", type=Path, default=Path("runs/retrieval_small"))
    ap.add_argument("--images", type=int, default=96, help="--make-small: phantom images")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.make_small:
        stores, sae, cache = small_inputs(args.root, args.images)
        source = f"small chain at {args.root} ({args.images} images, 256x160, tests' build_chain)"
    else:
        found = demo_inputs(args.run)
        if found is None:
            print(
                f"no finished demo run at {args.run} (needs stages/atlas.json and sae/): "
                "run `mammo-sae demo`, pass --run, or use --make-small"
            )
            return
        stores, sae, cache = found
        source = f"demo run {args.run}"
    t1 = time.perf_counter()
    print(f"# {source}; setup {t1 - t0:.0f} s")
    print(
        f"{'store':26s} {'label':25s} {'vectors':24s} {'pos/n':>7s} "
        + " ".join(f"{m:>14s}" for m in METHODS)
        + f" {'chance':>7s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for store in stores:
            for label in LABELS + CONTROLS:
                for variant, extra in VARIANTS.items():
                    try:
                        body = measure(store, sae, cache, label, extra, Path(tmp) / "r")
                    except SystemExit as exc:
                        print(f"{store.name:26s} {label:25s} skipped: {exc}")
                        break
                    q = body["query"]
                    p10 = next(r for r in body["precision"] if r["k"] == 10)
                    print(
                        f"{store.name:26s} {label:25s} {variant:24s} "
                        f"{q['n_queries']:>3d}/{q['n_candidates']:<3d} "
                        + " ".join(f"{p10[m]:14.3f}" for m in METHODS)
                        + f" {p10['chance']:7.3f}"
                    )
    print(f"precision@10; retrieval {time.perf_counter() - t1:.1f} s")


if __name__ == "__main__":
    main()
