"""A tiny stage runner: stages in order, each skipped when its inputs are unchanged.

A stage's *key* is the hash of its own settings plus the keys of the stages it depends on,
so changing a setting reruns that stage and everything downstream, and nothing else.
Each finished stage writes `RUN/stages/<name>.json` ({key, outputs, seconds, files}) atomically,
after its outputs exist: a crash or Ctrl-C leaves the finished stages marked and the next run
resumes at the first stage whose record is missing or stale. `files` lists every file under the
stage's output folders with its size (resume-only files such as training states, and writer
lock files, excepted); a file deleted or changed in size since makes the stage (and what
follows) run again instead of being trusted. Sizes, not times: a run directory copied without
its file times stays valid; content the size check cannot see is the stages' own business
(stores carry checksums).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MammoSaeError
from .io import LOCK_NAME, read_json, sha256_json, write_json
from .layout import RunLayout

STAGE_SCHEMA_VERSION = 1


@dataclass
class Stage:
    name: str
    run: Callable[[], dict[str, Any]]  # returns a JSON-able summary of its outputs
    settings: dict[str, Any]  # everything that changes the stage's result
    deps: tuple[str, ...] = ()
    description: str = ""
    outputs: tuple[str, ...] = ()  # folders/files under the run directory it writes
    transient: tuple[str, ...] = ()  # globs (relative to the run) of resume-only files


@dataclass
class PlanItem:
    stage: Stage
    key: str
    action: str  # "run" | "skip" | "not selected"
    reason: str = ""


@dataclass
class Runner:
    run_dir: Path
    stages: list[Stage] = field(default_factory=list)
    log: Callable[[str], None] = print

    def add(self, stage: Stage) -> None:
        known = {s.name for s in self.stages}
        missing = [d for d in stage.deps if d not in known]
        if missing:
            raise ValueError(f"stage {stage.name} depends on unknown/later stages {missing}")
        self.stages.append(stage)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def _record_path(self, name: str) -> Path:
        return RunLayout(self.run_dir).stage_record(name)

    def _record(self, name: str) -> dict[str, Any] | None:
        path = self._record_path(name)
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except MammoSaeError:
            return None  # a corrupt record means "not done"

    def plan(self, *, only: str | None = None, start: str | None = None) -> list[PlanItem]:
        for name in (only, start):
            if name is not None and name not in self.names():
                raise MammoSaeError(f"unknown stage {name!r}; stages: {', '.join(self.names())}")
        keys: dict[str, str] = {}
        rerun: set[str] = set()
        items: list[PlanItem] = []
        started = start is None
        for stage in self.stages:
            key = sha256_json(
                {
                    "stage": stage.name,
                    "settings": stage.settings,
                    "deps": [keys[d] for d in stage.deps],
                }
            )[:16]
            keys[stage.name] = key
            started = started or stage.name == start
            record = self._record(stage.name)
            if only is not None and stage.name != only:
                action, reason = "not selected", ""
            elif not started:
                action, reason = "not selected", f"before --from {start}"
            elif start is not None or only is not None:
                action, reason = "run", "selected"
            elif record is None:
                action, reason = "run", "not done yet"
            elif record.get("key") != key:
                action, reason = "run", "inputs or settings changed"
            elif any(d in rerun for d in stage.deps):
                action, reason = "run", "upstream reran"
            elif changed := self._changed_files(record):
                action, reason = (
                    "run",
                    f"output missing or changed in size since it ran: {changed[0]}",
                )
            else:
                action, reason = "skip", "up to date"
            if action == "run":
                rerun.add(stage.name)
            items.append(PlanItem(stage, key, action, reason))
        return items

    def execute(
        self, *, only: str | None = None, start: str | None = None, dry_run: bool = False
    ) -> list[PlanItem]:
        plan = self.plan(only=only, start=start)
        for item in plan:
            self.log(f"[{item.action:>12}] {item.stage.name:<12} {item.reason}")
        if dry_run:
            return plan
        for item in plan:
            if item.action != "run":
                continue
            self.log(f"==> {item.stage.name}: {item.stage.description}")
            t0 = time.perf_counter()
            outputs = item.stage.run()
            seconds = time.perf_counter() - t0
            write_json(
                self._record_path(item.stage.name),
                {
                    "schema_version": STAGE_SCHEMA_VERSION,
                    "stage": item.stage.name,
                    "key": item.key,
                    "seconds": round(seconds, 2),
                    "outputs": outputs,
                    "files": self._file_states(item.stage),
                },
            )
            self.log(f"    {item.stage.name} done in {seconds:.1f} s")
        return plan

    def _file_states(self, stage: Stage) -> dict[str, int]:
        """{path relative to the run: size} of every file under the stage's outputs."""
        states: dict[str, int] = {}
        for rel in stage.outputs:
            root = self.run_dir / rel
            paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for path in paths:
                name = path.relative_to(self.run_dir).as_posix()
                if path.name == LOCK_NAME:
                    continue  # a writer lock's content changes with every writer
                if not any(fnmatch.fnmatch(name, pattern) for pattern in stage.transient):
                    states[name] = path.stat().st_size
        return states

    def changed_outputs(self, name: str) -> list[str]:
        """Recorded output files of stage `name` that are gone or changed in size."""
        return self._changed_files(self._record(name))

    def _changed_files(self, record: dict[str, Any] | None) -> list[str]:
        files = record.get("files") if record else None
        if not isinstance(files, dict):
            return []  # never ran, or a record from before outputs were listed
        changed = []
        for rel, size in files.items():
            try:
                if (self.run_dir / rel).stat().st_size != size:
                    changed.append(rel)
            except OSError:
                changed.append(rel)
        return changed

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.names():
            rec = self._record(name)
            if rec is not None:
                out[name] = float(rec.get("seconds", 0.0))
        return out
