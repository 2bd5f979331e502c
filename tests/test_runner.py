from pathlib import Path

import pytest

from mammo_sae.errors import MammoSaeError
from mammo_sae.runner import Runner, Stage


def _runner(tmp_path: Path, calls: list[str], settings: dict[str, int], fail: str | None = None) -> Runner:
    r = Runner(tmp_path, log=lambda s: None)

    def make(name: str):
        def run() -> dict:
            if name == fail:
                raise RuntimeError("boom")
            calls.append(name)
            return {"name": name}
        return run

    r.add(Stage("a", make("a"), {"x": settings["a"]}))
    r.add(Stage("b", make("b"), {"x": settings["b"]}, deps=("a",)))
    r.add(Stage("c", make("c"), {"x": settings["c"]}, deps=("b",)))
    r.add(Stage("d", make("d"), {"x": settings["d"]}, deps=("a",)))
    return r


def test_second_run_skips_everything(tmp_path: Path) -> None:
    calls: list[str] = []
    s = {"a": 1, "b": 1, "c": 1, "d": 1}
    _runner(tmp_path, calls, s).execute()
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    _runner(tmp_path, calls, s).execute()
    assert calls == []


def test_changed_setting_reruns_stage_and_downstream_only(tmp_path: Path) -> None:
    calls: list[str] = []
    _runner(tmp_path, calls, {"a": 1, "b": 1, "c": 1, "d": 1}).execute()
    calls.clear()
    _runner(tmp_path, calls, {"a": 1, "b": 2, "c": 1, "d": 1}).execute()
    assert calls == ["b", "c"]


def test_crash_resumes_at_failed_stage(tmp_path: Path) -> None:
    calls: list[str] = []
    s = {"a": 1, "b": 1, "c": 1, "d": 1}
    with pytest.raises(RuntimeError):
        _runner(tmp_path, calls, s, fail="c").execute()
    assert calls == ["a", "b"]
    calls.clear()
    _runner(tmp_path, calls, s).execute()
    assert calls == ["c", "d"]


def test_only_from_and_dry_run(tmp_path: Path) -> None:
    calls: list[str] = []
    s = {"a": 1, "b": 1, "c": 1, "d": 1}
    plan = _runner(tmp_path, calls, s).execute(dry_run=True)
    assert calls == [] and [p.action for p in plan] == ["run"] * 4
    _runner(tmp_path, calls, s).execute(only="a")
    assert calls == ["a"]
    calls.clear()
    _runner(tmp_path, calls, s).execute(start="c")
    assert calls == ["c", "d"]
    with pytest.raises(MammoSaeError, match="unknown stage"):
        _runner(tmp_path, calls, s).execute(only="nope")
