"""How long the report of a finished run takes, by number of latent-page workers.

    PYTHONPATH=src python benchmarks/report_speed.py [RUN] [--workers 1,2] [--rounds 2]

RUN defaults to `runs/demo` (from `make demo`). Each round builds the whole report once per
worker count, interleaved (the machine is noisy), into a temporary folder, so RUN/report is
left alone. Prints wall and CPU seconds (this process; forked workers' CPU is not counted) per
build, the median per worker count, and the speed-up over one worker. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mammo_sae.layout import RunLayout
from mammo_sae.report.build import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("runs/demo"))
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not RunLayout(args.run).is_run():
        print(f"skipped: no run directory at {args.run} (run `make demo` first)")
        return 0
    counts = [int(w) for w in args.workers.split(",")]
    walls: dict[int, list[float]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory(prefix="report-speed-") as tmp:
        for r in range(args.rounds):
            for w in counts:
                out = Path(tmp) / f"r{r}-w{w}"
                t0, c0 = time.perf_counter(), time.process_time()
                build_report(args.run, out, progress=False, workers=w)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                walls[w].append(wall)
                pages = len(list((out / "latents").glob("*.html")))
                print(
                    f"round {r + 1} workers {w}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, "
                    f"{pages} latent pages",
                    flush=True,
                )
    base = statistics.median(walls[counts[0]])
    for w in counts:
        med = statistics.median(walls[w])
        print(f"workers {w}: median {med:6.1f} s  ({base / med:.2f}x workers {counts[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
