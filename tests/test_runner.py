from pathlib import Path

import pytest

from mammo_sae.errors import MammoSaeError
from mammo_sae.runner import Runner, Stage


def _runner(
    tmp_path: Path, calls: list[str], settings: dict[str, int], fail: str | None = None
) -> Runner:
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


def _writing_runner(tmp_path: Path, calls: list[str]) -> Runner:
    r = Runner(tmp_path, log=lambda s: None)

    def writer(name: str):
        def run() -> dict:
            calls.append(name)
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / "out.bin").write_bytes(name.encode() * 100)
            (tmp_path / name / "state.pt").write_bytes(b"resume-only")
            return {}

        return run

    for name, deps in (("a", ()), ("b", ("a",)), ("c", ("b",))):
        r.add(Stage(name, writer(name), {}, deps=deps, outputs=(name,), transient=("*/state.pt",)))
    return r


@pytest.mark.parametrize("damage", ["delete", "truncate", "grow"])
def test_a_damaged_output_reruns_its_stage_and_what_follows(tmp_path: Path, damage: str) -> None:
    calls: list[str] = []
    _writing_runner(tmp_path, calls).execute()
    assert calls == ["a", "b", "c"]
    victim = tmp_path / "b" / "out.bin"
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:10])
    else:
        victim.write_bytes(victim.read_bytes() + b"x")
    calls.clear()
    plan = _writing_runner(tmp_path, calls).execute()
    assert calls == ["b", "c"]
    assert [p.reason for p in plan][
        1
    ] == "output missing or changed in size since it ran: b/out.bin"
    calls.clear()
    _writing_runner(tmp_path, calls).execute()
    assert calls == []  # new files recorded: up to date again


def test_copies_without_file_times_and_deleted_resume_files_rerun_nothing(tmp_path: Path) -> None:
    import os
    import shutil

    calls: list[str] = []
    _writing_runner(tmp_path / "run", calls).execute()
    shutil.copytree(tmp_path / "run", tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
    for name in "abc":
        os.utime(tmp_path / "copy" / name / "out.bin", ns=(0, 0))
    (tmp_path / "copy" / "b" / "state.pt").unlink()  # freeing disk after training
    calls.clear()
    _writing_runner(tmp_path / "copy", calls).execute()
    assert calls == []


def test_pipeline_dry_run_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --dry-run` only reads: no run directory appears, and an existing run keeps every file
    byte for byte (its config.yaml above all: the report's boxes must match its Table 2)."""
    from mammo_sae.cli import main

    fresh = tmp_path / "fresh"
    assert main(["run", "phantom.yaml", "--out", str(fresh), "--dry-run"]) == 0
    assert not fresh.exists()
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "config.yaml").write_text("name: phantom\nanalysis:\n  localize: {threshold: p95}\n")
    (run / "stages" / "data.json").write_text('{"schema_version": 1, "stage": "data", "key": "x"}')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["run", "phantom.yaml", "--out", str(run), "--dry-run"]) == 0
    assert "[         run] data" in capsys.readouterr().out  # the plan is still printed
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(run.rglob("*")) == sorted([*before, run / "stages"])
