"""A run directory: settings, per-generation log, checkpoints, the prompt and the plot.

One tune at a time may write a run directory: `claim` holds an exclusive flock on the directory for the whole run
(the kernel drops it when the process dies, even on kill -9).

Nothing is lost, and nothing stale blocks a rerun:
- `--force` over an earlier run moves its files aside (into `.replaced/`, by renames that need no room on disk)
  and removes them only once the new run has something to resume (its first checkpoint) or is finished. If the new
  run fails or is killed before that (a full disk, Ctrl-C, kill -9), the earlier run is put back: at once, or by
  the next tune on the directory.
- A run stopped before its first checkpoint (run.json says "running", no checkpoint, no tune holding it) is a stub
  with nothing to resume: the next tune on the directory clears it, so the same command starts it again.
Checks touch nothing: what a directory holds is judged as it will be once put in order (`view`), and it is put in
order (`settle`) only under the lock, after every input has been checked.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import RunError
from .fileio import (JSON_LIMIT, LOG_LIMIT, check_out_path, dumps, read_bounded, read_text_bounded, remove_tree,
                     storage_error, write_bytes_atomic, write_json_atomic)
from .plot import plot_run

RUN_JSON = "run.json"
LOG = "log.jsonl"
CHECKPOINT = "checkpoint.npz"
PROMPT_NAME = "prompt.npz"  # what the run hands back: a prompt, an ensemble or a kept template
LEGACY_CHECKPOINT = "checkpoint.pkl"  # pickle, from bbt-onnx before 0.2: read only with --trust-checkpoint
PLOT = "loss.png"
TUNED = "tuned.npz"  # the tuned prompt, when the run kept a plain template instead
TRACKED = "tracking.json"  # the experiment tracker's run for this run, so that a resumed run continues it
OWN_FILES = (RUN_JSON, LOG, CHECKPOINT, LEGACY_CHECKPOINT, PROMPT_NAME, PLOT, TUNED, TRACKED)  # run.json first: see start()
CHECKPOINTS = (CHECKPOINT, LEGACY_CHECKPOINT)
REPLACED = ".replaced"  # an earlier run's files, until the run that replaces it has something to resume
MOVING = ".replaced.partial"  # the same while they are moved there


def is_temp(name: str) -> bool:
    """A temporary file of an atomic write of one of our files (`.run.json.x1y2z3`), left by a kill."""
    return any(name.startswith(f".{own}.") for own in OWN_FILES)


def has_checkpoint(files: dict[str, Path]) -> bool:
    return any(name in files for name in CHECKPOINTS)


@dataclass
class View:
    """What a run directory holds once put in order: the run's files (wherever they are now), whether they are a
    stub, and the entries that are not ours."""

    files: dict[str, Path] = field(default_factory=dict)
    stub: bool = False
    foreign: list[str] = field(default_factory=list)

    @property
    def run(self) -> dict[str, Path]:
        """The run's files as the next tune sees them: none for a stub."""
        return {} if self.stub else self.files


class RunDir:
    def __init__(self, path: str | Path, log: Callable[[str], None] = lambda _m: None):
        self.path = Path(path)
        self.log = log
        self.started = False  # this process has begun a new run here (start)

    # -- checks that touch nothing -------------------------------------------------
    @classmethod
    def check_new(cls, path: str | Path, force: bool, force_any: bool = False) -> "RunDir":
        """Refuse to overwrite an earlier run unless forced, a directory that is not a run unless `force_any`, or a
        directory another tune holds; touches nothing."""
        run = cls(path)
        check_out_path(run.path)
        run.check_idle()
        run.check_empty(force, force_any)
        return run

    def check_empty(self, force: bool, force_any: bool = False) -> None:
        view = self.view()
        files = view.run
        if not files and not view.foreign:
            return
        if not (force or force_any):
            resumable = has_checkpoint(files) and _status(files.get(RUN_JSON)) == "running"
            hint = f"continue it with resume {self.path}, or " if resumable else ""
            raise RunError(f"out {self.path} already holds files; {hint}pass force to replace them",
                           ("out", "resume", "force"))
        if RUN_JSON not in view.files and not force_any:  # a stub is a run directory too
            shown = ", ".join(sorted(view.foreign)[:4])
            raise RunError(f"out {self.path} holds {shown}: it does not look like a run directory, and force replaces "
                           "only an earlier run; choose another directory, or pass force_any to write the run there "
                           "anyway", ("out", "force", "force_any"))
        if RUN_JSON not in view.files and files:  # named like a run's files, with no run: they are someone's own
            raise RunError(f"out {self.path} holds {', '.join(sorted(files))} but no run: files of yours that the run "
                           "would replace (force_any writes a run beside what it did not write, never over it); move "
                           "them, or choose another directory", "out")

    @classmethod
    def open_existing(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        view = run.view()
        if RUN_JSON not in view.files:
            raise RunError(f"{run.path} has no {RUN_JSON}: not a run directory written by `bbt-onnx tune`")
        run.check_idle()
        if view.stub:
            raise RunError(f"{run.path} stopped before its first checkpoint, so there is nothing to resume; run the "
                           "same tune command again to start it over")
        if not has_checkpoint(view.files):
            raise RunError(f"{run.path} has no {CHECKPOINT} to resume from (checkpoints are written every "
                           "checkpoint_every generations)", "checkpoint_every")
        if _status(view.files[RUN_JSON]) == "complete":
            raise RunError(f"{run.path} is a finished run: there is nothing to resume (start it again with force)",
                           "force")
        return run

    def check_idle(self) -> None:
        """Refuse, before anything else, a directory that another tune holds right now."""
        if not self.path.is_dir():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # unreadable: the claim says why
        try:
            lock_exclusive(fd, self.path)
        finally:
            os.close(fd)

    def view(self) -> View:
        """What this directory holds once put in order (see the module's doc); reads, never writes."""
        p = self.path
        try:
            names = [e.name for e in os.scandir(p)] if p.is_dir() else []
        except OSError:
            names = []
        here = {n: p / n for n in OWN_FILES if n in names}
        moving, replaced = p / MOVING, p / REPLACED
        if MOVING in names:  # a replacement cut short while the old files were moved: they are all old
            files = {**here, **_own_in(moving)}
        elif REPLACED in names and not has_checkpoint(here):  # the new run has nothing to resume: the old one counts
            files = _own_in(replaced)
        else:
            files = here
        stub = bool(files) and not has_checkpoint(files) and _status(files.get(RUN_JSON)) == "running"
        foreign = [n for n in names if n not in OWN_FILES and n not in (MOVING, REPLACED) and not is_temp(n)]
        return View(files, stub, foreign)

    def file(self, name: str) -> Path:
        """Where the run's file `name` is now (before `settle`, perhaps aside)."""
        return self.view().files.get(name, self.path / name)

    def read_json(self) -> dict:
        """run.json, checked for the shape tune writes: an object whose settings are an object."""
        return read_run_json(self.file(RUN_JSON))

    # -- owning the directory ----------------------------------------------------
    @contextmanager
    def claim(self):
        """Create the directory if needed, hold a lock on it (a second tune on it is refused) and put it in order
        (`settle`). A new run that fails or is interrupted before its first checkpoint is removed again, and the
        run it replaced put back."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            if created:
                _rmdir(self.path)
            raise storage_error(self.path, exc, "create") from None
        try:
            lock_exclusive(fd, self.path)
            try:
                self.settle()
                yield self
            except BaseException:
                if self.started and not has_checkpoint(self._here()):
                    self._undo()
                if created:
                    _rmdir(self.path)  # only when empty
                raise
        finally:
            os.close(fd)  # closing it releases the lock

    def _here(self) -> dict[str, Path]:
        return {n: self.path / n for n in OWN_FILES if (self.path / n).exists()}

    def settle(self) -> None:
        """Put the directory in order, under the lock: finish or undo a replacement an earlier tune left, clear a
        stub and the temporary files of writes cut short."""
        p, moving, replaced = self.path, self.path / MOVING, self.path / REPLACED
        try:
            if moving.is_dir():
                _move_all(moving, p)
                moving.rmdir()
            if replaced.is_dir():
                if has_checkpoint(self._here()):
                    self._drop_replaced()
                else:
                    self._undo()
            if self.view().stub:
                for name in OWN_FILES:
                    (p / name).unlink(missing_ok=True)
            for entry in os.scandir(p):
                if is_temp(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
        except OSError as exc:
            raise storage_error(p, exc, "put in order") from None

    def _undo(self) -> None:
        """Remove this run's files and put back the run it replaced."""
        p = self.path
        for name in OWN_FILES:
            (p / name).unlink(missing_ok=True)
        for aside in (p / MOVING, p / REPLACED):
            if aside.is_dir():
                _move_all(aside, p)
                aside.rmdir()

    def _drop_replaced(self) -> None:
        """The new run has something to resume: the run it replaced goes."""
        replaced = self.path / REPLACED
        if replaced.is_dir():
            problems = remove_tree(replaced)
            if problems:
                self.log(f"warning: the replaced run's files could not all be removed; they are in {replaced} "
                         f"({problems[0]})")

    def start(self, settings: dict) -> None:
        """Begin a new run: an earlier run's files (only ours) go aside until this run has a checkpoint, then the
        settings are written. Called once every input is known good."""
        self.started = True
        p = self.path
        try:
            old = [name for name in OWN_FILES if (p / name).exists()]
            if old:
                moving = p / MOVING
                moving.mkdir()
                for name in old:  # run.json first: without it here, the files here are the old run's
                    os.rename(p / name, moving / name)
                os.rename(moving, p / REPLACED)  # all moved: the files here now are the new run's
            write_json_atomic(p / RUN_JSON, {"status": "running", "settings": settings})
            (p / LOG).write_text("")
        except OSError as exc:
            raise storage_error(p / LOG, exc) from None

    # -- during the run --------------------------------------------------------
    def append_log(self, row: dict) -> None:
        try:
            with open(self.path / LOG, "a", encoding="utf-8") as f:
                f.write(dumps(row) + "\n")
        except OSError as exc:
            raise storage_error(self.path / LOG, exc) from None

    def read_log(self) -> list[dict]:
        """The logged generations; a last line cut short (a crash, a full disk) is dropped, damage elsewhere
        is an error."""
        path = self.file(LOG)
        if not path.exists():
            return []
        try:
            lines = read_bounded(path, LOG_LIMIT).decode("utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise storage_error(path, exc, "read") from None
        rows = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("generation"), int):
                if i == len(lines):
                    break
                raise RunError(f"{path} line {i} is damaged; it is not a generation written by `bbt-onnx tune`")
            rows.append(row)
        return rows

    def truncate_log(self, generations: int) -> None:
        """Keep the lines up to the checkpoint's generation: the resumed run writes the rest again."""
        rows = [r for r in self.read_log() if r["generation"] <= generations]
        write_bytes_atomic(self.path / LOG, "".join(dumps(r) + "\n" for r in rows).encode())

    def save_checkpoint(self, data: bytes) -> None:
        """checkpoint.npz (`tuning.checkpoint.dumps_many`'s bytes); then the run this one replaced (or an old pickle
        checkpoint) goes."""
        write_bytes_atomic(self.path / CHECKPOINT, data)
        (self.path / LEGACY_CHECKPOINT).unlink(missing_ok=True)
        self._drop_replaced()

    def checkpoint_file(self) -> tuple[Path, bool]:
        """Where the checkpoint lies, and whether it is an old pickle (checkpoint.pkl, read only when the user
        trusts it): `tuning.checkpoint.read_states` reads either."""
        path = self.file(CHECKPOINT)
        return (path, False) if path.is_file() else (self.file(LEGACY_CHECKPOINT), True)

    # -- at the end --------------------------------------------------------------
    def finish(self, settings: dict, metrics: dict, extra: dict | None = None) -> bool:
        write_json_atomic(self.path / RUN_JSON, {"status": "complete", "settings": settings, "metrics": metrics,
                                                 **(extra or {})})
        self._drop_replaced()
        return plot_run(self.read_log(), self.path / PLOT, title=str(self.path.name))


def _status(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        raw = json.loads(read_text_bounded(path, JSON_LIMIT))
        return raw.get("status") if isinstance(raw, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def _own_in(folder: Path) -> dict[str, Path]:
    return {n: folder / n for n in OWN_FILES if (folder / n).exists()}


def _move_all(src: Path, dst: Path) -> None:
    """Our files in `src` back into `dst`, each replacing the one there."""
    for name in OWN_FILES:
        if (src / name).exists():
            os.replace(src / name, dst / name)
    for entry in os.scandir(src):  # temporary files of writes cut short
        if is_temp(entry.name):
            os.unlink(entry.path)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def lock_exclusive(fd: int, path: Path) -> None:
    """flock on the directory itself, not fcntl locks: two opens conflict even inside one process, and
    nothing is added to the run directory."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(f"{path} is in use by another bbt-onnx tune; wait for it to finish, or choose another out",
                       "out") from None


def read_run_json(path: Path) -> dict:
    """A run.json, checked for the shape tune writes: an object whose settings are an object."""
    try:
        raw = json.loads(read_text_bounded(path, JSON_LIMIT))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict):
        raise RunError(f"{path} is not a run.json written by `bbt-onnx tune` (no settings object)")
    return raw


def interrupted_hint(out: str | Path) -> str:
    """What to do after Ctrl-C: resume from the checkpoint, or, before the first one, run the command again."""
    if any((Path(out) / name).is_file() for name in CHECKPOINTS):
        return f"interrupted; continue with: bbt-onnx tune --resume {out}"
    return "interrupted before the first checkpoint, so there is nothing to resume; run the same command again to " \
           "start over"


def result_file(path: str | Path) -> Path:
    """The file that holds a run's result (a run directory, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        return RunDir(path).file(PROMPT_NAME)  # a run a force replacement left aside is still the run
    return path


def run_of(path: str | Path) -> Path | None:
    """The run directory a result lies in: the directory given, or a prompt file's own run (its folder holds
    run.json); None for a prompt file that lies outside any run."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent if (path.parent / RUN_JSON).exists() else None
