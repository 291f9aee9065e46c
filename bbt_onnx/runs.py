"""A run directory: settings, per-generation log, checkpoints, the prompt and the plot."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from .errors import BBTError
from .fileio import write_bytes_atomic, write_json_atomic
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

    # -- creating and reopening ---------------------------------------------
    @classmethod
    def check_new(cls, path: str | Path, force: bool) -> "RunDir":
        """Refuse to overwrite an earlier run unless forced; touches nothing."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise BBTError(f"--out {run.path} is a file")
        if run.path.is_dir() and any(run.path.iterdir()) and not force:
            resumable = (run.path / CHECKPOINT).exists() and run._status() == "running"
            hint = f"continue it with --resume {run.path}, or " if resumable else ""
            raise BBTError(f"--out {run.path} already holds files; {hint}pass --force to replace them")
        return run

    def start(self, settings: dict) -> None:
        """Clear an old run's files (only ours) and write the settings; called once inputs are known good."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in OWN_FILES:
            (self.path / name).unlink(missing_ok=True)
        write_json_atomic(self.path / RUN_JSON, {"status": "running", "settings": settings})
        (self.path / LOG).write_text("")

    @classmethod
    def open_existing(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        if not (run.path / RUN_JSON).is_file():
            raise BBTError(f"{run.path} has no {RUN_JSON}: not a run directory written by `bbt-onnx tune`")
        if not (run.path / CHECKPOINT).is_file():
            raise BBTError(f"{run.path} has no {CHECKPOINT} to resume from (checkpoints are written every "
                           "--checkpoint-every generations)")
        return run

    def _status(self) -> str | None:
        try:
            return json.loads((self.path / RUN_JSON).read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    def read_json(self) -> dict:
        try:
            return json.loads((self.path / RUN_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BBTError(f"cannot read {self.path / RUN_JSON}: {exc}") from None

    # -- during the run --------------------------------------------------------
    def append_log(self, row: dict) -> None:
        with open(self.path / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def read_log(self) -> list[dict]:
        path = self.path / LOG
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_log(self, generations: int) -> None:
        """Keep the lines up to the checkpoint's generation: the resumed run writes the rest again."""
        rows = [r for r in self.read_log() if r["generation"] <= generations]
        write_bytes_atomic(self.path / LOG, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def save_checkpoint(self, state) -> None:
        write_bytes_atomic(self.path / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_checkpoint(self):
        try:
            return pickle.loads((self.path / CHECKPOINT).read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise BBTError(f"cannot read {self.path / CHECKPOINT}: {exc}") from None

    # -- at the end --------------------------------------------------------------
    def finish(self, settings: dict, metrics: dict, extra: dict | None = None) -> bool:
        write_json_atomic(self.path / RUN_JSON, {"status": "complete", "settings": settings, "metrics": metrics,
                                                 **(extra or {})})
        return plot_run(self.read_log(), self.path / PLOT, title=str(self.path.name))
