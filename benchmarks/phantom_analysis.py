"""Phantom ground truth: Table 1, Figure 2 (AUROC at each k), separation and confounder findings.

Builds (or reuses) the chain of `tests/test_analysis_phantom.py` at a chosen size — phantom →
pretext backbone → Mass linear probe ("pretrained") and finetune → stores → TopK SAE on the
finetuned training features — and prints every number the phantom tests check.

    .venv/bin/python benchmarks/phantom_analysis.py --root runs/phantom_analysis --images 128

Slow on a shared 2-core CPU (≈ 10–20 min at 128 images); reruns reuse finished stages.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_analysis_phantom import build_chain, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", type=Path, default=Path("runs/phantom_analysis"))
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    chain = build_chain(
        args.root,
        n_images=args.images,
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs,
        probe_epochs=30,
    )
    t1 = time.perf_counter()
    r = measure(chain, n_boot=args.n_boot)
    print(f"chain {t1 - t0:.0f} s, analyses {time.perf_counter() - t1:.1f} s (shared CPU)")
    print("Table 1 (test split)")
    for v, f in r["fidelity"].items():
        print(
            f"  {v:10s} AUROC orig {f['original']['auroc']:.3f} SAE {f['sae']['auroc']:.3f} "
            f"recovered {f['recovered']:.3f}  FVU {f['fvu']:.3f} L0 {f['l0']:.1f} "
            f"dead {f['dead_fraction']:.3f}  (n {f['n']}, pos {f['n_pos']})"
        )
    print("Figure 2: AUROC vs k (test split)")
    for v, sw in r["sweep"].items():
        print(f"  {v}: k {sw.ks}\n    union {sw.union_size}")
        for mode in ("on", "off"):
            m = sw.metrics[mode]
            print(
                f"    {mode:3s} "
                + " ".join(
                    f"{a:.3f}[{lo:.2f},{hi:.2f}]"
                    for a, lo, hi in zip(m["auroc"], m["auroc_low"], m["auroc_high"])
                )
            )
    print("Separation and confounder (training split)")
    for v, s in r["separation"].items():
        print(f"  {v}: separation {s['separation']:.3f}; top-10 class-1 {r['top10'][v]}")
        print(
            f"    confounder scores {dict((k, round(x, 3)) for k, x in r['confounder_scores'][v].items())} "
            f"(a latent active everywhere: {s['baseline_confounder_share']:.3f})"
        )
        print(f"    flagged {[(e['index'], e['flags']) for e in s['flagged']]}")
        e = r["edit"][v]
        if e:
            print(
                f"    deactivating {e['latents']}: test AUROC {e['plain_sae']['auroc']:.3f} -> "
                f"{e['edited']['auroc']:.3f} (change {e['auroc_change']:+.3f})"
            )


if __name__ == "__main__":
    main()
