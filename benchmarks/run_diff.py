"""Are two run directories the same bytes? The determinism check of docs/determinism.md.

    python benchmarks/run_diff.py RUN_A RUN_B

Compares every file of both runs. JSON and JSON-lines files are compared as data after
dropping what is measured rather than computed (wall-clock seconds, throughput, the absolute
run path); any other file byte for byte. Prints one line per top-level folder (files, identical,
different, only in one run) and the differing files with the first differing JSON keys. Exit 0
whatever it finds: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

# Keys whose values are timings or speeds: they differ run to run by design.
TIMING_KEY = re.compile(
    r"(^|_)(s|seconds|sec|secs|time|elapsed|per_s|per_sec|throughput|"
    r"patches_per_s|images_per_s|mfu|flops|date|started|finished)$|_s_",
    re.I,
)


def _normalise(value: Any, run: str) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, run) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [_normalise(v, run) for v in value]
    if isinstance(value, str):
        return value.replace(run, "<RUN>")
    return value


def _load(path: Path, run: str) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [_normalise(json.loads(line), run) for line in text.splitlines() if line.strip()]
    return _normalise(json.loads(text), run)


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if type(a) is not type(b):
        return where or "<root>"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}[len {len(a)} vs {len(b)}]"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: {str(a)[:60]} vs {str(b)[:60]}"


def compare(run_a: Path, run_b: Path) -> dict[str, dict[str, list[str]]]:
    """{top folder: {"same": [...], "different": [...], "only": [...]}}."""
    files_a = {p.relative_to(run_a).as_posix() for p in run_a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(run_b).as_posix() for p in run_b.rglob("*") if p.is_file()}
    out: dict[str, dict[str, list[str]]] = defaultdict(
        lambda: {"same": [], "different": [], "only": []}
    )
    for rel in sorted(files_a | files_b):
        group = out[rel.split("/")[0] if "/" in rel else "."]
        if rel not in files_a or rel not in files_b:
            group["only"].append(rel)
            continue
        pa, pb = run_a / rel, run_b / rel
        if pa.suffix in (".json", ".jsonl"):
            try:
                a, b = _load(pa, str(run_a.resolve())), _load(pb, str(run_b.resolve()))
            except (ValueError, UnicodeDecodeError):
                a, b = pa.read_bytes(), pb.read_bytes()
            if a == b:
                group["same"].append(rel)
            else:
                group["different"].append(f"{rel}  ({_first_difference(a, b)})")
        elif pa.read_bytes() == pb.read_bytes():
            group["same"].append(rel)
        else:
            group["different"].append(rel)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    result = compare(args.run_a, args.run_b)
    print(f"{'folder':<12} {'files':>6} {'same':>6} {'differ':>6} {'only one':>8}")
    for group, parts in result.items():
        n = sum(len(v) for v in parts.values())
        print(
            f"{group:<12} {n:>6} {len(parts['same']):>6} {len(parts['different']):>6} "
            f"{len(parts['only']):>8}"
        )
    for parts in result.values():
        for rel in parts["different"]:
            print(f"  differs: {rel}")
        for rel in parts["only"]:
            print(f"  in one run only: {rel}")


if __name__ == "__main__":
    main()
