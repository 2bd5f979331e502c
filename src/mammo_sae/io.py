"""Small file helpers shared by every stage: atomic writes, hashes, JSON.

Every artefact is written to a temporary name in the same directory and renamed into place,
so an interrupted run or a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
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
        tmp_path, mode = _new_temporary(path)
    except OSError as exc:
        raise MammoSaeError(f"could not write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp_path
        if stat.S_IMODE(os.stat(tmp_path).st_mode) != mode:
            os.chmod(tmp_path, mode)   # a writer that made its own file (safetensors: 0600)
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


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file `.<name>.<random>.tmp` beside `path` and its permission bits: 0666 less
    the umask, like any ordinary file (mkstemp's 0600 would hide every artefact from
    collaborators on a shared volume)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
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
