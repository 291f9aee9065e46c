"""Experiment tracking at the edge of a tune: one record per tracker in `TRACKERS`, opened by name.

A tracker hears the run's settings once, each generation as it ends, and the finished run (its run.json and
files); it never changes what the run computes. MLflow is the one built in (`--track mlflow`, the `track` extra).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from .errors import SettingsError

FILES = ("prompt.npz", "loss.png", "run.json")  # logged as artifacts when the run wrote them


class Tracker(Protocol):
    def start(self, name: str, settings: dict) -> None: ...

    def generation(self, event) -> None: ...

    def finish(self, run_dir: Path, record: dict) -> None: ...


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys with string values (what trackers take as parameters)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def result_metrics(record: dict) -> dict[str, float]:
    """The numbers of a finished run.json worth a chart: the result's, each baseline's, each seed's."""
    out: dict[str, float] = {}
    metrics = record.get("metrics") or {}
    for key in ("test_metric", "best_dev_metric", "train_loss_initial", "train_loss_final", "wall_seconds"):
        if isinstance(metrics.get(key), (int, float)):
            out[key] = float(metrics[key])
    for base in record.get("baselines", []):
        for split in ("dev", "test"):
            value = base.get(f"{split}_metric")
            if isinstance(value, (int, float)):
                out[f"baseline.{slug(base['name'])}.{split}"] = float(value)
    for seed in record.get("seeds", []):
        for split in ("dev", "test"):
            value = seed.get(f"{split}_metric")
            if isinstance(value, (int, float)):
                out[f"seed{seed['seed']}.{split}"] = float(value)
    choice = record.get("choice") or {}
    margin = (choice.get("dev_margin") or {}).get("value")
    if isinstance(margin, (int, float)):
        out["dev_margin"] = float(margin)
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


class MlflowTracker:
    """Logs to an MLflow tracking store: the URI given, else MLflow's own default (MLFLOW_TRACKING_URI)."""

    def __init__(self, uri: str | None = None, experiment: str = "bbt-onnx"):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise SettingsError("track mlflow needs MLflow: pip install 'bbt-onnx[track]'", "track") from None
        self.client = self._call(lambda: MlflowClient(uri))
        self.experiment = experiment
        self.run_id: str | None = None
        self.several = False  # several seeds: each seed's curves under its own keys (from the settings, at start)
        self._experiment_id()  # a store that cannot be used is refused before the run starts

    @staticmethod
    def _call(action):
        from mlflow.exceptions import MlflowException

        try:
            return action()
        except MlflowException as exc:
            text = " ".join(str(exc).split())
            if "MLFLOW_ALLOW_FILE_STORE" in text:
                text = ("MLflow keeps its file store (./mlruns, file:...) only with MLFLOW_ALLOW_FILE_STORE=true in the "
                        "environment; set it, or give track_uri a tracking server or database")
            elif "sqlite" in text and "unsupported URI" in text:  # mlflow-skinny alone: no database store
                text = ("its database store (the default, sqlite:///mlflow.db) needs sqlalchemy and alembic: "
                        "pip install 'bbt-onnx[track]'")
            raise SettingsError(f"MLflow refused: {text[:400]}", "track_uri") from None

    def _experiment_id(self) -> str:
        found = self._call(lambda: self.client.get_experiment_by_name(self.experiment))
        if found is not None:
            return found.experiment_id
        return self._call(lambda: self.client.create_experiment(self.experiment))

    def start(self, name: str, settings: dict) -> None:
        from mlflow.entities import Param

        run = self._call(lambda: self.client.create_run(self._experiment_id(), run_name=name))
        self.run_id = run.info.run_id
        self.several = len(settings.get("seeds", ())) > 1
        params = [Param(k, v[:6000]) for k, v in flatten(settings).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self._call(lambda chunk=params[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def generation(self, event) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        prefix = f"seed{event.seed}." if self.several else ""  # lock-step seeds' events interleave
        metrics = [Metric(prefix + "train_loss", event.best_loss_so_far, now, event.calls)]
        if event.dev_metric is not None:
            metrics.append(Metric(prefix + "dev_metric", event.dev_metric, now, event.calls))
        self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def finish(self, run_dir: Path, record: dict) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in result_metrics(record).items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics))
        for name in FILES:
            if (Path(run_dir) / name).is_file():
                self._call(lambda path=Path(run_dir) / name: self.client.log_artifact(self.run_id, str(path)))
        self._call(lambda: self.client.set_terminated(self.run_id))


TRACKERS = {"mlflow": MlflowTracker}


def track(hooks, name: str, uri: str | None = None):
    """`hooks` that also log the run to the tracker `name` (its start, every generation, its end)."""
    from dataclasses import replace

    tracker = open_tracker(name, uri)

    def event(e) -> None:
        hooks.event(e)
        tracker.generation(e)

    return replace(hooks, event=event, begin=tracker.start, end=tracker.finish)


def open_tracker(name: str, uri: str | None = None) -> Tracker:
    try:
        kind = TRACKERS[name]
    except KeyError:
        raise SettingsError(f"track {name!r} is not one of {', '.join(TRACKERS)}", "track") from None
    return kind(uri)
