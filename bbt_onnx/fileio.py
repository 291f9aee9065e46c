"""Atomic file writes, strict JSON and hashing: every file the tool writes appears whole or not at all,
and a failed write is one clear StorageError, never a traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
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
        raise SettingsError(f"out {out} is a file", "out")
    file_parent = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file_parent is not None:
        raise SettingsError(f"out {out} cannot be created: {file_parent} is a file, not a folder", "out")


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def same_path(a: str | Path, b: str | Path) -> bool:
    """The same file or folder, through links and relative paths alike."""
    try:
        if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return _resolved(a) == _resolved(b)


def inside(path: str | Path, folder: str | Path) -> bool:
    """`path` lies strictly under `folder`."""
    p, f = _resolved(path), _resolved(folder)
    return p != f and f in p.parents


def check_apart(out: str | Path, inputs, argument: str = "out") -> None:
    """A directory a command writes (and may replace) is neither one of its inputs (`(what, path)` pairs: the model
    directory, a run), nor holds one, nor lies inside one."""
    for what, path in inputs:
        if path is None or str(path).startswith("hf:"):
            continue
        if same_path(out, path):
            raise SettingsError(f"{argument} {out} is the {what} {path}; name another directory", argument)
        if inside(path, out):
            raise SettingsError(f"{argument} {out} holds the {what} {path}, which writing it would replace; name "
                                "another directory", argument)
        if Path(path).is_dir() and inside(out, path):
            raise SettingsError(f"{argument} {out} lies inside the {what} {path}; name a directory outside it",
                                argument)


def check_output_file(output: str | Path, inputs, argument: str = "output") -> None:
    """A file a command writes is none of the files it reads, and lies in none of the directories it reads (the model
    directory, a run): `inputs` are `(what, path)` pairs."""
    for what, path in inputs:
        if path is None or str(path) == "-" or str(path).startswith("hf:"):
            continue
        if same_path(output, path):
            raise SettingsError(f"{argument} {output} is the {what}; writing it would overwrite what is read",
                                argument)
        if Path(path).is_dir() and inside(output, path):
            raise SettingsError(f"{argument} {output} lies inside the {what} {path}; write it elsewhere", argument)


def held(path: Path) -> bool:
    """Another process holds the lock a running tune keeps on its run directory (`runs.lock_exclusive`)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def runs_in_use(root: Path) -> list[Path]:
    """Run directories at or under `root` that a tune is writing now (its lock is held)."""
    found = []
    for folder, dirs, files in os.walk(root):
        if "run.json" in files and held(Path(folder)):
            found.append(Path(folder))
    return found


def mount_points() -> set[Path]:
    """Every mount point of this process's namespace (Linux); empty where it cannot be read."""
    points = set()
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            field = line.split(" ")[4]
            points.add(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)))
    except (OSError, IndexError):
        pass
    return points


def remove_tree(path: Path) -> list[str]:
    """Remove `path` and everything in it, without following links and without crossing into another filesystem: a
    mount point inside is left (with the folders above it). What could not be removed, each with why."""
    problems: list[str] = []
    try:
        device = os.lstat(path).st_dev
    except FileNotFoundError:
        return problems
    except OSError as exc:
        return [f"{path}: {exc.strerror or exc}"]
    mounts = mount_points()

    def remove(p: Path) -> bool:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return True
        except OSError as exc:
            problems.append(f"{p}: {exc.strerror or exc}")
            return False
        if not stat.S_ISDIR(st.st_mode):
            try:
                os.unlink(p)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                problems.append(f"{p}: {exc.strerror or exc}")
                return False
        if st.st_dev != device or (p != path and _resolved(p) in mounts):
            problems.append(f"{p} is a mount point (another filesystem; nothing on it was touched)")
            return False
        try:
            children = [Path(e.path) for e in os.scandir(p)]
        except OSError as exc:
            problems.append(f"{p}: {exc.strerror or exc}")
            return False
        ok = all([remove(c) for c in children])
        if ok:
            try:
                os.rmdir(p)
            except OSError as exc:
                problems.append(f"{p}: {exc.strerror or exc}")
                return False
        return ok

    remove(path)
    return problems


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of `out` to build a directory in, with the permissions a new folder would get."""
    out = Path(os.path.abspath(out))  # `a/..` names its parent's sibling by its own name, not `..`
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o777 & ~umask())
    except OSError as exc:
        raise storage_error(out, exc, "create") from None
    return tmp


def swap_in(staging: Path, out: Path, log: Callable[[str], None] | None = None) -> None:
    """Move a finished `staging` directory to `out`. An old `out` is renamed aside first and removed only once the
    new one is in place; if the move fails, the old one is put back. At no moment is neither on disk. What of the
    old one cannot be removed (a mount point inside, a folder that refuses) stays aside, and `log` says where."""
    out, old = Path(os.path.abspath(out)), None
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
        problems = remove_tree(old)
        if problems:
            (log or _stderr)(f"warning: the old {out} could not be removed completely; what is left of it is in "
                             f"{old} ({problems[0]}{f', and {len(problems) - 1} more' if len(problems) > 1 else ''})"
                             ": remove it yourself")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class OutputKind:
    """What a command writes as a whole directory, to tell an earlier output of it (which `force` replaces) from
    anything else (which only `force_any` does)."""

    what: str  # e.g. "a client directory (`bbt-onnx client-dir`)"
    ours: Callable[[Path], bool]


def check_replaceable(out: str | Path, force: bool, kind: OutputKind | None = None, force_any: bool = False,
                      inputs=()) -> Path:
    """Whether `write_dir` may write `out`; touches nothing. A non-empty `out` is replaced only with `force`, and only
    when it looks like this command's own output (`kind`), unless `force_any`; never when it is, holds or lies inside
    one of `inputs` (`(what, path)` pairs), or holds a run a tune is writing."""
    out = Path(os.path.normpath(out))  # `a/../b` is b, checked and written as b; `a/..` is the folder it names
    check_out_path(out)
    check_apart(out, inputs)
    check_not_cwd(out)
    entries = sorted(e.name for e in out.iterdir()) if out.is_dir() else []
    if not entries:
        return out
    if not (force or force_any):
        raise SettingsError(f"out {out} exists and is not empty; pass force to replace it", ("out", "force"))
    busy = runs_in_use(out)
    if busy:
        raise SettingsError(f"out {out} holds {busy[0]}, a run a tune is writing now; name another directory", "out")
    if kind is not None and not force_any and not kind.ours(out):
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise SettingsError(f"out {out} holds {shown}: it does not look like {kind.what}, and force replaces only "
                            "an earlier one; remove it yourself, or pass force_any to replace it anyway",
                            ("out", "force", "force_any"))
    return out


def check_not_cwd(out: Path, argument: str = "out") -> None:
    """A directory written whole (and replaced) is neither the working directory (`.`) nor a folder above it:
    replacing it would pull the folder the command runs in from under it."""
    try:
        here = os.getcwd()
    except OSError:  # the working directory is gone: nothing to protect
        return
    if same_path(out, here):
        raise SettingsError(f"{argument} {out} is the working directory, which writing it would replace; name "
                            "another directory (a new folder, e.g. ./out)", argument)
    if inside(here, out):
        raise SettingsError(f"{argument} {out} holds the working directory {here}, which writing it would replace; "
                            "name another directory", argument)


def write_dir(out: str | Path, force: bool, fill: Callable[[Path], None], kind: OutputKind | None = None,
              force_any: bool = False, inputs=(), log: Callable[[str], None] | None = None) -> Path:
    """A directory written whole: `fill` writes into a staging sibling, which then takes `out`'s place
    (`swap_in`), if `check_replaceable` allows. A failure leaves `out` as it was and no staging behind."""
    out = check_replaceable(out, force, kind, force_any, inputs)
    staging = staging_dir(out)
    try:
        fill(staging)
        swap_in(staging, out, log)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise storage_error(out, exc, "replace" if out.exists() else "write") from None
        raise
    return out


def only_files(directory: Path, allowed: Callable[[str], bool], required: tuple[str, ...] = ()) -> bool:
    """`directory` holds only regular files whose names `allowed` accepts, and every one of `required`."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return False
    names = {e.name for e in entries}
    return all(e.is_file(follow_symlinks=False) and allowed(e.name) for e in entries) and \
        all(r in names for r in required)


# Bounds on what a command reads: a hostile or mistaken file (a FIFO, a link to /dev/zero, a zip bomb) is refused
# before it is read, so no read hangs or fills memory.
JSON_LIMIT = 16 << 20  # run.json, manifest.json, a task file
LOG_LIMIT = 256 << 20  # log.jsonl
TOKEN_LIMIT = 64 << 10  # a token file
NPZ_LIMIT = 1 << 30  # prompt.npz and checkpoint.npz, as stored and as inflated


def read_bounded(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them; anything else is an OSError that says why (a FIFO opens
    without waiting for a writer, so it is refused, not waited on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file")
        if info.st_size > limit:
            raise OSError(f"it holds {info.st_size:,} bytes, more than the {limit:,} such a file may hold")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"it grew past the {limit:,} bytes such a file may hold while it was read")
    return data


def read_text_bounded(path: str | Path, limit: int) -> str:
    """`read_bounded` as UTF-8 text."""
    return read_bounded(path, limit).decode("utf-8")


def read_tail(path: str | Path, limit: int) -> str:
    """A file's last `limit` bytes as text (a log or a traceback another program wrote, whatever its size)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        return f.read(limit).decode(errors="replace")


def check_npz(data: bytes, limit: int = NPZ_LIMIT) -> bytes:
    """`data` when it is a zip (an .npz) whose members inflate to at most `limit` bytes in all, as their headers
    say; a zip bomb is refused before anything is inflated (numpy then reads each member to its declared size)."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise OSError(f"not an npz file ({exc})") from None
    if total > limit:
        raise OSError(f"its arrays inflate to {total:,} bytes, more than the {limit:,} allowed")
    return data
