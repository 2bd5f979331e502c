"""Phantom generation throughput: images/s at 512x320 (target: 1,000 images in under a minute).

Usage: python benchmarks/phantom_gen.py [--n-images 1000] [--height 512] [--width 320]
Prints figures, asserts nothing. Timings on a shared machine are distorted by other load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mammo_sae.data.phantom import PhantomConfig, generate, plan, render_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=320)
    args = parser.parse_args()

    print(
        f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f} (other users distort timings)"
    )
    cfg = PhantomConfig(out=Path("unused"), n_images=64, height=args.height, width=args.width)
    specs = plan(cfg)
    t0 = time.perf_counter()
    for spec in specs:
        render_image(spec, cfg.height, cfg.width, cfg.seed)
    render_ms = (time.perf_counter() - t0) / len(specs) * 1e3
    print(f"render only, 1 process: {render_ms:.1f} ms/image at {args.height}x{args.width}")

    cpus = os.cpu_count() or 1
    for workers in sorted({1, cpus}):
        with tempfile.TemporaryDirectory() as tmp:
            run = PhantomConfig(
                out=Path(tmp) / "ph",
                n_images=args.n_images,
                height=args.height,
                width=args.width,
                workers=workers,
            )
            t0 = time.perf_counter()
            generate(run, progress=False)
            seconds = time.perf_counter() - t0
        rate = args.n_images / seconds
        print(
            f"generate {args.n_images} images, {workers} worker(s): {seconds:.1f} s = {rate:.0f} images/s; "
            f"1,000 images would take {1000 / rate:.0f} s (target < 60 s, ratio {1000 / rate / 60:.2f})"
        )


if __name__ == "__main__":
    main()
