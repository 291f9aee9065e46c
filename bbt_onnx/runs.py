"""A run directory: settings, per-generation log, checkpoints, the prompt and the plot.

One tune at a time may write a run directory: `claim` holds an exclusive flock on the
directory for the whole run (the kernel drops it when the process dies, even on kill -9),
and removes a run that left nothing resumable, so a stub never blocks a rerun.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

from .errors import RunError
from .fileio import check_out_path, dumps, storage_error, write_bytes_atomic, write_json_atomic
from .plot import plot_run
from .prompt import PROMPT_NAME

RUN_JSON = "run.json"
LOG = "log.jsonl"
CHECKPOINT = "checkpoint.pkl"
PLOT = "loss.png"
OWN_FILES = (RUN_JSON, LOG, CHECKPOINT, PROMPT_NAME, PLOT)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.started = False  # this process has written run files here

    # -- checks that touch nothing -------------------------------------------------
    @classmethod
    def check_new(cls, path: str | Path, force: bool) -> "RunDir":
        """Refuse to overwrite an earlier run unless forced, or a directory another tune holds; touches nothing."""
        run = cls(path)
        check_out_path(run.path)
        run.check_idle()
        run.check_empty(force)
        return run

    def check_empty(self, force: bool) -> None:
        if self.path.is_dir() and any(self.path.iterdir()) and not force:
            resumable = (self.path / CHECKPOINT).exists() and self._status() == "running"
            hint = f"continue it with --resume {self.path}, or " if resumable else ""
            raise RunError(f"--out {self.path} already holds files; {hint}pass --force to replace them")

    @classmethod
    def open_existing(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        if not (run.path / RUN_JSON).is_file():
            raise RunError(f"{run.path} has no {RUN_JSON}: not a run directory written by `bbt-onnx tune`")
        run.check_idle()
        if not (run.path / CHECKPOINT).is_file():
            raise RunError(f"{run.path} has no {CHECKPOINT} to resume from (checkpoints are written every "
                           "--checkpoint-every generations)")
        if run._status() == "complete":
            raise RunError(f"{run.path} is a finished run: there is nothing to resume (start it again with --force)")
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

    def _status(self) -> str | None:
        try:
            return json.loads((self.path / RUN_JSON).read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    def read_json(self) -> dict:
        """run.json, checked for the shape tune writes: an object whose settings are an object."""
        path = self.path / RUN_JSON
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"cannot read {path}: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict):
            raise RunError(f"{path} is not a run.json written by `bbt-onnx tune` (no settings object)")
        return raw

    # -- owning the directory ----------------------------------------------------
    @contextmanager
    def claim(self):
        """Create the directory if needed and hold a lock on it; a second tune on it is refused. A run that
        fails or is interrupted before its first checkpoint is removed again: it has nothing to resume."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            if created:
                self._remove_stub(created)
            raise storage_error(self.path, exc, "create") from None
        try:
            lock_exclusive(fd, self.path)
            try:
                yield self
            except BaseException:
                if (self.started or created) and not (self.path / CHECKPOINT).exists():
                    self._remove_stub(created)
                raise
        finally:
            os.close(fd)  # closing it releases the lock

    def _remove_stub(self, created: bool) -> None:
        for name in OWN_FILES:
            (self.path / name).unlink(missing_ok=True)
        if created:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def start(self, settings: dict) -> None:
        """Clear an old run's files (only ours) and write the settings; called once inputs are known good."""
        self.started = True
        try:
            for name in OWN_FILES:
                (self.path / name).unlink(missing_ok=True)
            write_json_atomic(self.path / RUN_JSON, {"status": "running", "settings": settings})
            (self.path / LOG).write_text("")
        except OSError as exc:
            raise storage_error(self.path / LOG, exc) from None

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
        path = self.path / LOG
        if not path.exists():
            return []
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
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

    def save_checkpoint(self, state) -> None:
        write_bytes_atomic(self.path / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_checkpoint(self):
        from .tuner import TunerState

        path = self.path / CHECKPOINT
        try:
            state = pickle.loads(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - unpickling damaged bytes can raise almost any type
            raise RunError(f"cannot read {path}: it is damaged ({type(exc).__name__}); start the run again "
                           "with --force") from None
        if not isinstance(state, TunerState):
            raise RunError(f"{path} is not a bbt-onnx checkpoint (it holds a {type(state).__name__})")
        return state

    # -- at the end --------------------------------------------------------------
    def finish(self, settings: dict, metrics: dict, extra: dict | None = None) -> bool:
        write_json_atomic(self.path / RUN_JSON, {"status": "complete", "settings": settings, "metrics": metrics,
                                                 **(extra or {})})
        return plot_run(self.read_log(), self.path / PLOT, title=str(self.path.name))


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
        raise RunError(f"{path} is in use by another bbt-onnx tune; wait for it to finish, or choose another "
                       "--out") from None
