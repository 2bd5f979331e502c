"""One writer per output directory (io.writer_lock), its temporaries, relocatable runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mammo_sae
from mammo_sae.cli import main
from mammo_sae.io import LOCK_NAME, atomic_path, is_atomic_temporary, writer_lock
from mammo_sae.pipeline import PACKAGE_CONFIGS

SRC = str(Path(mammo_sae.__file__).resolve().parents[1])
HOLD = """import sys, time
from mammo_sae.io import writer_lock
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""
KILLED = """import os, signal, sys
from mammo_sae.io import writer_lock
with writer_lock(sys.argv[1]):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _python(code: str, *args: str, **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kw)


@pytest.fixture
def holder():
    """start(folder) -> a live process holding folder's writer lock (killed at the end)."""
    procs: list[subprocess.Popen] = []

    def start(folder: Path) -> subprocess.Popen:
        proc = _python(HOLD, str(folder), stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _commands(out: Path) -> dict[str, list[str]]:
    return {
        # (A dry run writes nothing and takes no lock: the cheapest stage stands in.)
        "run": ["run", str(PACKAGE_CONFIGS / "phantom.yaml"), "--out", str(out), "--only", "data"],
        "sae train": ["sae", "train", "--store", "no-store", "--out", str(out)],
        "extract": [
            "extract",
            "--data",
            "no-data",
            "--model",
            "efficientnet-phantom",
            "--out",
            str(out),
        ],
        "classifier train": [
            "classifier",
            "train",
            "--data",
            "no-data",
            "--concept",
            "Mass",
            "--init",
            "efficientnet-phantom",
            "--out",
            str(out),
        ],
        "classifier pretrain": ["classifier", "pretrain", "--data", "no-data", "--out", str(out)],
        "phantom": [
            "phantom",
            "--out",
            str(out),
            "--n-images",
            "4",
            "--height",
            "64",
            "--width",
            "64",
            "--no-progress",
        ],
    }


@pytest.mark.parametrize("command", list(_commands(Path("x"))))
def test_a_second_writer_of_a_directory_exits_2_at_once(tmp_path, holder, capsys, command) -> None:
    out = tmp_path / "out"
    proc = holder(out)
    assert main(_commands(out)[command]) == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by process {proc.pid} since " in err, err
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing else written
    # Inside a folder another process writes: refused too (e.g. RUN/sae while `run` writes RUN).
    assert main(_commands(out / "sub")[command]) == 2
    assert f"{out} is being written by process {proc.pid}" in capsys.readouterr().err


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    proc = _python(KILLED, str(out))
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    assert main(_commands(out)["phantom"]) == 0, capsys.readouterr().err
    assert (out / "phantom.json").is_file()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_nested_use_in_one_process_does_not_deadlock(tmp_path) -> None:
    with writer_lock(tmp_path / "run"):
        with writer_lock(tmp_path / "run"), writer_lock(tmp_path / "run" / "sae"):
            pass
        with writer_lock(tmp_path / "run" / "sae"):  # released and taken again
            pass


def test_temporaries_of_the_atomic_writer_match_the_cleanup_pattern(tmp_path, holder) -> None:
    with atomic_path(tmp_path / "state.pt") as tmp:
        assert is_atomic_temporary(tmp.name), tmp.name
    for name in ("state.pt", "notes.tmp", ".x.tmp", "state.pt.tmp", "model.tmp"):
        assert not is_atomic_temporary(name), name
    # Taking a lock removes orphans, but not inside a subfolder another process is writing.
    busy = tmp_path / "run" / "busy"
    holder(busy)
    (busy / ".a.npy.abcd1234.tmp").write_text("live")
    (tmp_path / "run" / ".b.npy.abcd1234.tmp").write_text("orphan")
    with writer_lock(tmp_path / "run"):
        assert (busy / ".a.npy.abcd1234.tmp").exists()
        assert not (tmp_path / "run" / ".b.npy.abcd1234.tmp").exists()


# ------------------------------------------------------------------ relocatable run directories
TINY_RUN = """
name: tiny
seed: 0
device: cpu
data:
  kind: phantom
  phantom: {n_images: 24, height: 128, width: 80, seed: 0, workers: 1}
models:
  concepts: [Mass]
  pretrain: {epochs: 1}
  linear_probe: {epochs: 1}
  finetune: {epochs: 1}
  eval: {n_boot: 0}
extract:
  options: {dtype: float32, batch_size: 16, workers: 0}
  sae_source: Mass/finetuned
sae: {expansion: 1, epochs: 1, batch_size: 256, resample_every: 0, eval_patches: 256,
      measure_matmul: false}
analysis:
  intervene: {n_boot: 0, ks: [0, 1]}
"""
DONE = ("data", "models", "extract", "sae", "summaries", "probe", "intervene")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The stages up to intervene of a tiny phantom config, run from a relative --out."""
    root = tmp_path_factory.mktemp("tiny_run")
    config = root / "tiny.yaml"
    config.write_text(TINY_RUN)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in DONE:
            assert (
                main(["run", "tiny.yaml", "--out", "runs/tiny", "--only", stage, "--no-progress"])
                == 0
            )
    finally:
        os.chdir(cwd)
    return config, root / "runs" / "tiny"


def _plan(capsys) -> dict[str, str]:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    return {line.split("]")[1].split()[0]: line.split("]")[0].strip("[ ") for line in lines}


def test_a_run_records_paths_relative_to_itself(tiny_run) -> None:
    _, run = tiny_run
    models = json.loads((run / "models" / "models.json").read_text())["models"]
    assert [m["classifier"] for m in models] == [
        "models/Mass-pretrained/model",
        "models/Mass-finetuned/model",
    ]
    stores = json.loads((run / "stores" / "stores.json").read_text())["stores"]
    assert {s["out"] for s in stores} >= {"stores/sae-train", "stores/pretrained-test"}
    assert json.loads((run / "stages" / "sae.json").read_text())["outputs"] == {"sae": "sae"}
    sae_record = json.loads((run / "sae" / "cfg.json").read_text())
    assert sae_record["source_store"] == "../stores/sae-train"
    from mammo_sae.activations.store import ActivationStore

    store = ActivationStore(run / "stores" / "pretrained-test")
    assert store.manifest["data"]["source"] == "../../data"
    assert all(r.path.is_file() for r in store.records())


@pytest.mark.parametrize("move", [False, True])
def test_a_run_is_used_from_another_directory_and_after_moving(
    tiny_run, tmp_path, monkeypatch, capsys, move
) -> None:
    """From another working directory, and after the run directory moved: nothing reruns, and a
    stage that reads models.json (intervene loads the classifiers) runs again fine."""
    config, run = tiny_run
    if move:  # (of a copy: the module's run stays for the other tests)
        first = Path(shutil.copytree(run, tmp_path / "first"))
        (tmp_path / "elsewhere").mkdir()
        run = first.rename(tmp_path / "elsewhere" / "renamed")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--dry-run"]) == 0
    plan = _plan(capsys)
    assert [plan[s] for s in DONE] == ["skip"] * len(DONE), plan
    assert (
        main(["run", str(config), "--out", str(run), "--only", "intervene", "--no-progress"]) == 0
    )
    assert (run / "analysis" / "intervene" / "Mass-finetuned").is_dir()
    from mammo_sae.activations.store import ActivationStore

    store = ActivationStore(run / "stores" / "pretrained-test")
    assert all(
        r.path.is_file() and run.resolve() in r.path.resolve().parents for r in store.records()
    )  # the images of the run's own data, where it is now


def test_a_models_json_from_before_relocation_is_still_read(tiny_run, tmp_path, capsys) -> None:
    """Older runs recorded paths relative to the first run's working directory."""
    from mammo_sae.pipeline import Pipeline, load_pipeline_config

    config, run = tiny_run
    copy = Path(shutil.copytree(run, tmp_path / "old"))
    path = copy / "models" / "models.json"
    data = json.loads(path.read_text())
    for m in data["models"]:
        m["classifier"] = "runs/tiny/" + m["classifier"]
    path.write_text(json.dumps(data))
    models = Pipeline(load_pipeline_config(config), copy, progress=False).models()
    assert [Path(m.classifier) for m in models] == [
        copy / "models" / "Mass-pretrained" / "model",
        copy / "models" / "Mass-finetuned" / "model",
    ]
    assert "from before run directories were relocatable" in capsys.readouterr().out
