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
import functools
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import shutil
import stat
import struct
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        tmp_path, mode = _new_temporary(path)
    except OSError as exc:
        raise MammoSaeError(f"could not write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp_path
        if stat.S_IMODE(os.stat(tmp_path).st_mode) != mode:
            os.chmod(tmp_path, mode)  # a writer that made its own file (safetensors: 0600)
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
            raise MammoSaeError(
                f"could not write {path}: {type(exc).__name__}: {exc} "
                f"({_mib(free)} free on its disk)"
            ) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file `.<name>.<random>.tmp` beside `path` and its permission bits: 0666 less
    the umask, like any ordinary file (mkstemp's 0600 would hide every artefact from
    collaborators on a shared volume)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


LOW_DISK_BYTES = 64 << 20
TMP_SUFFIX = ".tmp"
# `atomic_path`'s temporary names: "." + final name + "." + 8 random hex digits + ".tmp".
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
_HELD: dict[Path, tuple[int, int]] = {}  # resolved folder -> (fd, depth)


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8"))
        return f"process {int(info['pid'])} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has locked the file but not yet written its name


def _busy(folder: Path, lock_file: Path) -> MammoSaeError:
    return MammoSaeError(
        f"{folder} is being written by {_holder(lock_file)}; wait for it to "
        f"finish or use another output directory (lock file {lock_file})"
    )


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
    _probe_ancestors(key)  # before creating anything inside a folder another process writes
    created = [p for p in (key, *key.parents) if not p.exists()]  # deepest first
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
        if created and [p.name for p in key.iterdir()] == [LOCK_NAME]:
            # Refused before writing anything (bad input): leave no trace of the attempt. Safe
            # while we still hold the lock; a folder that existed keeps its lock file, since
            # deleting it could race a new holder.
            lock_file.unlink(missing_ok=True)
            for folder_created in created:
                with contextlib.suppress(OSError):
                    folder_created.rmdir()
        os.close(fd)  # releases the lock


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mib(n: int | None) -> str:
    return "unknown space" if n is None else f"{n / 2**20:.1f} MiB"


def _says_write_failed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        k in text
        for k in (
            "no space",
            "write failed",
            "unexpected pos",
            "i/o error",
            "disk quota",
            "read-only file system",
        )
    )


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


def portable_path(
    path: str | os.PathLike[str], recorder: str | os.PathLike[str], max_up: int = 2
) -> str:
    """How a file written in folder `recorder` (a store, an SAE) records `path` as provenance:
    relative to `recorder` when that climbs at most `max_up` folders (a run's RUN/stores/x →
    ../../data, RUN/sae → ../stores/x: the pair moves together), absolute otherwise. Read it
    back with `resolve_recorded(stored, recorder)`."""
    target, start = Path(path).resolve(), Path(recorder).resolve()
    rel = Path(os.path.relpath(target, start))
    if rel.parts.count("..") <= max_up:  # relpath puts every ".." first
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


def verify_sha256(path: str | os.PathLike[str], expected: str | None, recorded_in: str) -> str:
    """The sha256 of `path`; a CheckpointError naming both files when `expected` (the hash that
    `recorded_in` records for it) is given and differs."""
    actual = sha256_file(path)
    if expected and actual != expected:
        raise CheckpointError(
            f"{path}: checksum differs from {recorded_in} (corrupt or replaced file)"
        )
    return actual


# ---------------------------------------------------------------------------------------------
# Loading torch files (docs/security.md). Every .pt/.pth/.tar a user hands us goes through
# `load_torch_weights`: the file is sniffed first (a TorchScript archive or anything that is not
# a torch zip, a legacy torch pickle or safetensors is refused before torch sees it), then read
# with torch's weights-only unpickler plus the allow-list below. Nothing in a file can run code.


class _Inert:
    """Stand-in for a config object we never need: accepts any construction, keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {type(self).__name__}>"


# The omegaconf / typing objects in Mammo-CLIP's pre-training config (we read only plain values).
INERT_GLOBALS = (
    "omegaconf.listconfig.ListConfig",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
)


def _plain_dict(*args: Any) -> dict[Any, Any]:
    """Stand-in for collections.defaultdict: the weights-only unpickler fills only plain dicts."""
    return {}


@functools.lru_cache(maxsize=1)
def pickle_allow_list() -> tuple[tuple[Any, str], ...]:
    """(object, qualified name) for each pickle global we resolve beyond torch's weights-only set
    (tensors, storages, OrderedDict, torch.Size, _codecs.encode, set, complex): what the
    official Mammo-CLIP files name (numpy arrays and scalars written under numpy 1 or 2, the
    omegaconf config as inert stand-ins, builtin containers as defaultdict factories)."""
    import builtins

    import numpy as np

    try:  # numpy 2 moved numpy.core to numpy._core; files written with numpy 1 name the old path
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]

    allowed: list[tuple[Any, str]] = [(type(name, (_Inert,), {}), name) for name in INERT_GLOBALS]
    allowed.append((_plain_dict, "collections.defaultdict"))
    for n in ("dict", "list", "tuple", "frozenset", "int", "float", "bool", "str", "bytes"):
        allowed.append((getattr(builtins, n), f"builtins.{n}"))
    allowed += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (multiarray._reconstruct, f"{mod}._reconstruct"),
            (multiarray.scalar, f"{mod}.scalar"),
        ]
    for dtype_name in (
        "Float64DType",
        "Float32DType",
        "Float16DType",
        "Int64DType",
        "Int32DType",
        "UInt8DType",
        "BoolDType",
    ):  # the unpickler sets state only on listed types
        if hasattr(np, "dtypes") and hasattr(np.dtypes, dtype_name):
            allowed.append((getattr(np.dtypes, dtype_name), f"numpy.dtypes.{dtype_name}"))
    return tuple(allowed)


# torch's allow-list context is process-wide; one load at a time keeps enter/exit pairs intact.
_ALLOW_LIST_LOCK = threading.Lock()


def _torch_file_kind(f: Any, path: Path, what: str) -> str:
    """The file's format from its first bytes and, for a zip, its member names: "zip", "pickle"
    or "safetensors"; anything else (a TorchScript archive above all) is a CheckpointError."""
    head = f.read(16)
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(f).namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {path} as {what}: damaged zip archive ({exc})"
            ) from None
        finally:
            f.seek(0)
        inner = {n.split("/", 1)[1] for n in names if "/" in n}
        if inner & {"constants.pkl", "bytecode.pkl"} or any(n.startswith("code/") for n in inner):
            raise CheckpointError(
                f"refused to load {path} as {what}: it is a TorchScript archive "
                "(torch.jit.save), whose code would run on loading; give a "
                "state-dict checkpoint (torch.save) or a safetensors file"
            )
        if "data.pkl" not in inner:
            raise CheckpointError(
                f"cannot read {path} as {what}: a zip archive but not a "
                "torch.save checkpoint (no data.pkl)"
            )
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO 2..5 (legacy torch)
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (100 << 20):
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    raise CheckpointError(
        f"cannot read {path} as {what}: not a torch checkpoint (torch.save "
        "zip or pickle) nor a safetensors file (corrupt file? it starts with "
        f"{head[:8]!r})"
    )


def torch_file_kind(path: str | os.PathLike[str], what: str) -> str:
    """The container format `load_torch_weights` would read ("zip", "pickle" or "safetensors"),
    from the first bytes and the zip's member names only: the same refusals, no weights read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return _torch_file_kind(f, path, what)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} as {what}: {exc.strerror or exc}") from None


def load_torch_weights(path: str | os.PathLike[str], what: str) -> Any:
    """Read a torch checkpoint (or a safetensors file) on CPU without running any code from it.

    The one loader for every torch file we are given: Mammo-CLIP checkpoints, the released
    MammoSAE SAE, our training states. Refused, with a CheckpointError naming `what`, the file
    and the reason: TorchScript archives, unknown formats, and pickles naming any global outside
    torch's weights-only set and `pickle_allow_list()` (the message names the global and never
    suggests weights_only=False)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            kind = _torch_file_kind(f, path, what)
            if kind == "safetensors":
                from safetensors.torch import load

                return load(f.read())
            with _ALLOW_LIST_LOCK, torch.serialization.safe_globals(list(pickle_allow_list())):
                # weights_only=True: torch never falls back to full unpickling nor to torch.jit.load
                return torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused:
            raise CheckpointError(
                f"refused to load {path} as {what}: pickle global {refused} "
                "is not on the allow-list (docs/security.md); nothing was "
                "run"
            ) from None
        raise CheckpointError(
            f"refused to load {path} as {what}: {torch_load_reason(exc)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a damaged file
        raise CheckpointError(
            f"cannot read {path} as {what} (corrupt file or unsupported "
            f"content): {torch_load_reason(exc)}"
        ) from None


def _refused_global(message: str) -> str | None:
    """The global torch's weights-only unpickler refused, fully qualified (torch drops the
    `builtins.` prefix from its message: `GLOBAL exec` is builtins.exec)."""
    match = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if not match:
        return None
    name = match.group(1)
    return name if "." in name else f"builtins.{name}"


# Torch's advice around the cause (retry with weights_only=False, allow-list the global, read
# the docs): never shown, it would invite running code from an untrusted file.
_TORCH_ADVICE = re.compile(
    r"Weights only load failed\.|In PyTorch 2\.6,|Re-running `torch\.load`|"
    r"Please (?:use|file an issue)|Check the documentation|\(\d\) "
)


def torch_load_reason(exc: BaseException) -> str:
    """The cause from torch.load's error, without torch's advice (see _TORCH_ADVICE)."""
    reason = ""
    for line in str(exc).split("WeightsUnpickler error:")[-1].splitlines():
        reason = _TORCH_ADVICE.split(line, maxsplit=1)[0].strip()
        if reason:
            break
    match = re.fullmatch(r"Unsupported operand (\d+)", reason)
    if match:  # e.g. FRAME: pickle protocol 4+, which torch's weights-only unpickler does not read
        import pickletools

        code = chr(int(match.group(1)))
        name = next((op.name for op in pickletools.opcodes if op.code == code), match.group(1))
        reason = (
            f"unsupported pickle opcode {name} (protocol 2 and 3 pickles are read; "
            "torch.save writes protocol 2 unless told otherwise)"
        )
    return f"{type(exc).__name__}: {reason[:300]}" if reason else type(exc).__name__
