"""Small file helpers shared by every stage: atomic writes, hashes, JSON, writer locks.

Every artefact is written to a temporary name in the same directory and renamed into place,
so an interrupted run or a full disk never leaves a half-written file under the final name.
A command that writes a directory holds its `writer_lock` for the whole write: a second writer
fails at once instead of mixing its files with the first's (docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError, MammoSaeError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Write failures become MammoSaeError naming `path`: OSError (read-only or full disk, a file
    where a folder should be) and the other errors libraries raise when a write fails
    (torch.save's RuntimeError, safetensors' SafetensorError) when the disk is nearly full or
    their message says so. The temporary file never outlives a failure.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise MammoSaeError(f"could not write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise MammoSaeError(f"could not write {path}: {exc.strerror or exc}") from exc
    except MammoSaeError:
        tmp_path.unlink(missing_ok=True)
        raise
    except Exception as exc:
        tmp_path.unlink(missing_ok=True)
        free = free_bytes(path.parent)
        if _says_write_failed(exc) or (free is not None and free < LOW_DISK_BYTES):
            raise MammoSaeError(f"could not write {path}: {type(exc).__name__}: {exc} "
                                f"({_mib(free)} free on its disk)") from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


LOW_DISK_BYTES = 64 << 20
TMP_SUFFIX = ".tmp"
# `atomic_path`'s temporary names: "." + final name + "." + mkstemp's 8 random characters + ".tmp".
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def is_atomic_temporary(name: str) -> bool:
    """True for a name `atomic_path` gives its temporary files (and nothing else)."""
    return bool(_TMP_NAME.match(name))


def remove_orphaned_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files killed writers left under `folder` (recursively); returns them.

    Only names of `atomic_path`'s pattern are touched. Safe only while holding the folder's
    `writer_lock`: then no live writer of ours can own one of them.
    """
    removed: list[Path] = []
    for parent, dirs, files in os.walk(folder):
        # A subfolder another process is writing (its own lock held) keeps its temporaries.
        dirs[:] = [d for d in dirs if not _locked_by_other(Path(parent) / d)]
        for name in files:
            if is_atomic_temporary(name):
                path = Path(parent) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


# ---------------------------------------------------------------------------- writer locks
LOCK_NAME = ".mammo-sae.lock"
# Folders whose lock this process holds, with their nesting depth: `run` holds its run
# directory while its stages lock their own folders, and a stage may lock a folder again.
# (A second flock on a new descriptor of the same file conflicts even within one process.)
_HELD: dict[Path, tuple[int, int]] = {}      # resolved folder -> (fd, depth)


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8"))
        return f"process {int(info['pid'])} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"   # it has locked the file but not yet written its name


def _busy(folder: Path, lock_file: Path) -> MammoSaeError:
    return MammoSaeError(f"{folder} is being written by {_holder(lock_file)}; wait for it to "
                         f"finish or use another output directory (lock file {lock_file})")


def _locked_by_other(folder: Path) -> bool:
    """Whether another process holds `folder`'s writer lock (a shared-lock attempt, released at
    once; folders this process holds and folders without a lock file are free)."""
    lock_file = folder / LOCK_NAME
    if not lock_file.is_file() or folder.resolve() in _HELD:
        return False
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


def _probe_ancestors(folder: Path) -> None:
    """Fail if a folder above `folder` is being written by another process (e.g. `sae train
    --out RUN/sae` while `run` writes RUN)."""
    for parent in folder.parents:
        if _locked_by_other(parent):
            raise _busy(parent, parent / LOCK_NAME)


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike[str], *, enabled: bool = True) -> Iterator[None]:
    """Hold the exclusive right to write `folder` (created if missing) for the block.

    `flock` on FOLDER/.mammo-sae.lock, non-blocking: a second writer gets a MammoSaeError
    naming the holder's pid and start time. The OS releases the lock when its process ends, so
    the file a killed process leaves behind blocks nobody. Nested use in one process (a stage
    of `run`, a folder locked twice) is allowed. On taking the lock, the temporary files that
    killed writers left in the folder are removed. `enabled=False` (DDP ranks other than 0,
    which share rank 0's folder) makes this a no-op.
    """
    if not enabled:
        yield
        return
    path = Path(folder)
    key = path.resolve()
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            _HELD[key] = (fd, depth)
        return
    _probe_ancestors(key)   # before creating anything inside a folder another process writes
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MammoSaeError(f"could not create {path}: {exc.strerror or exc}") from exc
    lock_file = key / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MammoSaeError(f"could not create {lock_file}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise _busy(path, lock_file) from None
        raise MammoSaeError(f"could not lock {lock_file}: {exc.strerror or exc}") from exc
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S %z")
        info = {"pid": os.getpid(), "since": since, "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        _HELD[key] = (fd, 0)
        remove_orphaned_temporaries(key)
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)   # releases the lock; the file stays (deleting it would race a new holder)


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mib(n: int | None) -> str:
    return "unknown space" if n is None else f"{n / 2 ** 20:.1f} MiB"


def _says_write_failed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(k in text for k in ("no space", "write failed", "unexpected pos", "i/o error",
                                   "disk quota", "read-only file system"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _strict(obj: Any) -> Any:
    """NaN/±Inf → null, also inside numpy values: the files stay valid JSON for every reader
    (jq, browsers, other languages), not only Python's lenient one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if type(obj).__module__ == "numpy" or hasattr(obj, "__dataclass_fields__"):
        return _strict(_json_default(obj))
    return obj


def dumps_json(obj: Any) -> str:
    """Indented, strict JSON (non-finite numbers become null; see `_strict`)."""
    return json.dumps(_strict(obj), indent=2, default=_json_default, allow_nan=False) + "\n"


def dumps_json_line(obj: Any) -> str:
    """One strict JSON line (for .jsonl logs)."""
    return json.dumps(_strict(obj), default=_json_default, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, dumps_json(obj))


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MammoSaeError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MammoSaeError(f"corrupt JSON in {path}: {exc}") from exc


def recorded_path(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """How a record inside `base` (a run directory) stores `path`: relative to `base` when the
    path is inside it, so the record stays valid when `base` moves or is used from another
    working directory; absolute otherwise (a file outside moves on its own)."""
    target, root = Path(path).resolve(), Path(base).resolve()
    try:
        return target.relative_to(root).as_posix()
    except ValueError:
        return str(target)


def portable_path(path: str | os.PathLike[str], recorder: str | os.PathLike[str],
                  max_up: int = 2) -> str:
    """How a file written in folder `recorder` (a store, an SAE) records `path` as provenance:
    relative to `recorder` when that climbs at most `max_up` folders (a run's RUN/stores/x →
    ../../data, RUN/sae → ../stores/x: the pair moves together), absolute otherwise. Read it
    back with `resolve_recorded(stored, recorder)`."""
    target, start = Path(path).resolve(), Path(recorder).resolve()
    rel = Path(os.path.relpath(target, start))
    if rel.parts.count("..") <= max_up:   # relpath puts every ".." first
        return rel.as_posix()
    return str(target)


def resolve_recorded(stored: str, base: str | os.PathLike[str]) -> Path:
    """The file a record inside `base` names (see `recorded_path`). Records written before runs
    were relocatable hold paths relative to the first run's working directory
    (`runs/x/models/m`) or absolute ones into the run's old place: those are found by their
    longest tail that exists under `base`. A path found nowhere comes back as recorded."""
    root = Path(base)
    path = Path(stored)
    direct = path if path.is_absolute() else root / path
    if direct.exists():
        return direct
    parts = path.parts
    for i in range(1, len(parts)):
        candidate = root.joinpath(*parts[i:])
        if candidate.exists():
            return candidate
    return direct


def load_npy(path: str | os.PathLike[str], *, mmap: bool = False) -> Any:
    """np.load without pickles; a missing or corrupt file is a MammoSaeError naming it. A damaged
    header fails in many ways (ValueError, SyntaxError or tokenize errors from its parser), all
    of which mean the same thing here."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MammoSaeError(f"missing file: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise MammoSaeError(f"corrupt array file {path}: {type(exc).__name__}: {exc}") from exc


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Content hash of a JSON-able object (keys sorted), for cache keys and provenance."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=_json_default).encode())


def load_torch_weights(path: str | os.PathLike[str], what: str) -> Any:
    """torch.load(weights_only=True) on CPU for tensors-and-containers files (our training
    states, the released MammoSAE SAE). Any failure is a CheckpointError naming `what` and the
    file, without torch's advice to retry with weights_only=False (that would run code from an
    untrusted file)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"cannot read {path} as {what} (corrupt file or unsupported "
                              f"content): {torch_load_reason(exc)}") from exc


def torch_load_reason(exc: BaseException) -> str:
    """The cause from torch.load's error, without its weights_only=False advice."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        return rest.split("\n\n")[0].strip()[:200] or type(exc).__name__
    return f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"
