"""Atomic file writes, strict JSON and hashing: every file the tool writes appears whole or not at all,
and a failed write is one clear StorageError, never a traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import SettingsError, StorageError


def storage_error(path: str | Path, exc: OSError, doing: str = "write") -> StorageError:
    """One line that says which file, and why the system refused it."""
    path = Path(path)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT and doing == "write":
        parent = next((p for p in path.parents if p.exists()), None)
        missing = next((p for p in reversed(path.parents) if not p.exists()), path.parent)
        if parent is not None and not parent.is_dir():
            reason = f"{parent} is a file, not a folder"
        else:
            reason = f"the folder {missing} does not exist"
    elif exc.errno == errno.ENOTDIR:
        file_part = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{file_part} is a file, not a folder" if file_part else reason
    return StorageError(f"cannot {doing} {path}: {reason}")


def check_writable(path: str | Path) -> None:
    """Before long work whose result goes to `path`: its folder must exist, and `path` must not be one."""
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise storage_error(path, FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise storage_error(path, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(path, exc) from None
        raise


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinity replaced by None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON: non-finite numbers become null rather than the invalid `NaN`."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, dumps(obj, indent=2) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as exc:
        raise storage_error(path, exc, "read") from None
    return h.hexdigest()


def check_out_path(out: str | Path) -> None:
    """An --out directory that can be created or replaced: neither it nor a folder above it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out} is a file")
    file_parent = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file_parent is not None:
        raise SettingsError(f"--out {out} cannot be created: {file_parent} is a file, not a folder")


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of `out` to build a directory in, with the permissions a new folder would get."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o777 & ~umask())
    except OSError as exc:
        raise storage_error(out, exc, "create") from None
    return tmp


def swap_in(staging: Path, out: Path) -> None:
    """Move a finished `staging` directory to `out`. An old `out` is renamed aside first and removed only once the
    new one is in place; if the move fails, the old one is put back. At no moment is neither on disk."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir(out: str | Path, force: bool, fill: Callable[[Path], None]) -> Path:
    """A directory written whole: `fill` writes into a staging sibling, which then takes `out`'s place
    (`swap_in`). A non-empty `out` is replaced only with `force`; a failure leaves `out` as it was and no
    staging behind."""
    out = Path(out)
    check_out_path(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SettingsError(f"{out} exists and is not empty; pass --force to replace it")
    staging = staging_dir(out)
    try:
        fill(staging)
        swap_in(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise storage_error(out, exc) from None
        raise
    return out
