"""A tiny stage runner: stages in order, each skipped when its inputs are unchanged.

A stage's *key* is the hash of its own settings plus the keys of the stages it depends on,
so changing a setting reruns that stage and everything downstream, and nothing else.
Each finished stage writes `RUN/stages/<name>.json` ({key, outputs, seconds, files}) atomically,
after its outputs exist: a crash or Ctrl-C leaves the finished stages marked and the next run
resumes at the first stage whose record is missing or stale. `files` lists every file under the
stage's output folders with its size and modification time; a file deleted, truncated or
replaced since makes the stage (and what follows) run again instead of being trusted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MammoSaeError
from .io import read_json, sha256_json, write_json

STAGE_SCHEMA_VERSION = 1


@dataclass
class Stage:
    name: str
    run: Callable[[], dict[str, Any]]       # returns a JSON-able summary of its outputs
    settings: dict[str, Any]                # everything that changes the stage's result
    deps: tuple[str, ...] = ()
    description: str = ""
    outputs: tuple[str, ...] = ()           # folders/files under the run directory it writes


@dataclass
class PlanItem:
    stage: Stage
    key: str
    action: str                              # "run" | "skip" | "not selected"
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
        return self.run_dir / "stages" / f"{name}.json"

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
            key = sha256_json({"stage": stage.name, "settings": stage.settings,
                               "deps": [keys[d] for d in stage.deps]})[:16]
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
            elif (changed := self._changed_output(record)) is not None:
                action, reason = "run", f"output missing or changed since it ran: {changed}"
            else:
                action, reason = "skip", "up to date"
            if action == "run":
                rerun.add(stage.name)
            items.append(PlanItem(stage, key, action, reason))
        return items

    def execute(self, *, only: str | None = None, start: str | None = None,
                dry_run: bool = False) -> list[PlanItem]:
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
            write_json(self._record_path(item.stage.name), {
                "schema_version": STAGE_SCHEMA_VERSION, "stage": item.stage.name,
                "key": item.key, "seconds": round(seconds, 2), "outputs": outputs,
                "files": self._file_states(item.stage.outputs)})
            self.log(f"    {item.stage.name} done in {seconds:.1f} s")
        return plan

    def _file_states(self, outputs: tuple[str, ...]) -> dict[str, list[int]]:
        """{path relative to the run: [size, mtime_ns]} of every file under `outputs`."""
        states: dict[str, list[int]] = {}
        for rel in outputs:
            root = self.run_dir / rel
            paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for path in paths:
                st = path.stat()
                states[path.relative_to(self.run_dir).as_posix()] = [st.st_size, st.st_mtime_ns]
        return states

    def _changed_output(self, record: dict[str, Any]) -> str | None:
        """The first recorded output file that is gone or differs, else None."""
        files = record.get("files")
        if not isinstance(files, dict):
            return None   # a record from before outputs were listed
        for rel, (size, mtime_ns) in files.items():
            path = self.run_dir / rel
            try:
                st = path.stat()
            except OSError:
                return rel
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return rel
        return None

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.names():
            rec = self._record(name)
            if rec is not None:
                out[name] = float(rec.get("seconds", 0.0))
        return out
