"""Phantom classifier cycle: pretext pre-training, then linear probe ("pretrained") and finetune
("finetuned") for Mass and Suspicious_Calcification; prints test AUROCs with 95 % CIs and timings.

    python benchmarks/phantom_classifiers.py [--out DIR] [--n-images 480] [--threads N]

Figures, not assertions: on a shared machine the wall times mostly measure the other load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--n-images", type=int, default=480)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from mammo_sae.data.phantom import PhantomConfig, generate
    from mammo_sae.models.train import train_phantom_models

    out = args.out or Path(tempfile.mkdtemp(prefix="phantom_classifiers_"))
    data = out / "phantom"
    t0 = time.perf_counter()
    generate(
        PhantomConfig(
            out=data, n_images=args.n_images, height=args.height, width=args.width, seed=0
        ),
        progress=False,
    )
    t1 = time.perf_counter()
    paths = train_phantom_models(data, out / "models", n_boot=1000, resume=False, progress=False)
    t2 = time.perf_counter()
    print(f"threads {torch.get_num_threads()}, {args.n_images} images {args.height}x{args.width}")
    print(
        f"phantom {t1 - t0:.1f} s, pretext + 2 x (linear probe + finetune) + eval {t2 - t1:.1f} s"
    )
    for name, log in [("pretext", out / "models" / "pretext" / "train_log.jsonl")] + [
        (k, p.parent / "train_log.jsonl") for k, p in paths.items() if k != "encoder"
    ]:
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        print(
            f"  {name:36s} {len(entries):3d} epochs, {sum(e['epoch_s'] for e in entries):6.1f} s, "
            f"{entries[-1]['images_per_s']:8.1f} images/s (last epoch)"
        )
    for key, path in paths.items():
        if key == "encoder":
            continue
        r = json.loads((path.parent / "eval_test.json").read_text())
        a = r["auroc"]
        print(f"  test AUROC {key:36s} {a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]")


if __name__ == "__main__":
    main()
