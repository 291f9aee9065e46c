"""Experiment tracking at the edge of a tune: one record per tracker in `TRACKERS`, opened by name.

A tracker hears the run's settings once, each generation as it ends, and the finished run (its run.json and
files), or how it stopped unfinished; it never changes what the run computes. A sweep's trials are nested under
a run of the sweep's own (a group). MLflow is the one built in (`--track mlflow`, the `track` extra).
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from .errors import BBTError, SettingsError
from .fileio import JSON_LIMIT, read_text_bounded, storage_error, write_json_atomic
from .provenance import HIDDEN, SECRET_PARAM, hide_credentials
from .runs import TRACKED

FILES = ("prompt.npz", "loss.png", "run.json")  # logged as artifacts when the run wrote them
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI shows the run nested under that one
ERROR_TAG = "bbt_onnx.error"  # the line of the error that stopped a run
# MLflow's HTTP client retries a refused connection seven times with growing waits (minutes). Unless the user set
# them, the tracker's calls wait this long for a server: the first (opening the store) one try, the later ones a few.
CONNECT_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
CALL_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
_ENV_LOCK = threading.Lock()


class Tracker(Protocol):
    def start(self, run_dir: Path, settings: dict, resumed: bool) -> None: ...

    def generation(self, event) -> None: ...

    def finish(self, run_dir: Path, record: dict) -> None: ...

    def stopped(self, exc: BaseException) -> None: ...

    def open_group(self, name: str, settings: dict, known: str | None) -> str: ...

    def close_group(self, group: str, counts: dict, status: str) -> None: ...


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


def secrets_of(uri: str | None) -> set[str]:
    """The credentials a URI carries: its userinfo's password and any secret query parameter's value (as written
    and decoded), to be hidden wherever text about the URI is shown."""
    if not uri:
        return set()
    found: set[str] = set()
    try:
        parts = urlsplit(uri)
        found.update(v for v in (parts.password,) if v)
    except ValueError:
        pass
    found.update(m.group(0)[len(m.group(1)):] for m in SECRET_PARAM.finditer(uri))
    found.update({unquote(v) for v in found})
    return {v for v in found if len(v) >= 3}  # shorter ones only by their place (a URI's userinfo, a parameter)


def shown(uri: str | None) -> str:
    """How a message names the store: the URI without its credentials."""
    return redact(uri, uri) if uri else "MLflow's default store"


def redact(text: str, uri: str | None = None) -> str:
    """`text` (a URI, or a message that may quote one) with every URI's userinfo and secret query parameters
    hidden, and the credentials of `uri` hidden wherever they appear."""
    text = hide_credentials(text)
    for secret in sorted(secrets_of(uri), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


@contextmanager
def http_limits(defaults: dict[str, str]):
    """MLflow's HTTP timeout and retries as `defaults` says, for the duration of a call, where the user has not set
    them in the environment."""
    with _ENV_LOCK:
        added = [k for k in defaults if k not in os.environ]
        for key in added:
            os.environ[key] = defaults[key]
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)


def unreachable(exc: BaseException) -> str | None:
    """Why the server could not be reached, when `exc` comes from a refused or timed-out connection."""
    import requests

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, requests.exceptions.Timeout):
            return "no answer in time"
        if isinstance(cause, requests.exceptions.ConnectionError):
            text = str(cause)
            for known in ("Connection refused", "Name or service not known", "No route to host",
                          "Network is unreachable", "timed out"):
                if known in text:
                    return known.lower() if known != "timed out" else "no answer in time"
            return "the connection failed"
        cause = cause.__cause__ or cause.__context__
    return None


class MlflowTracker:
    """Logs to an MLflow tracking store: the URI given, else MLflow's own default (MLFLOW_TRACKING_URI).

    Nothing touches the store until the run begins (`start`, after the job has checked every setting): a refused
    tune creates no database and no mlruns/. The URI is shown only with its credentials hidden."""

    def __init__(self, uri: str | None = None, experiment: str = "bbt-onnx", parent: str | None = None):
        try:
            import mlflow.tracking  # noqa: F401  (only the import: the store is opened at start)
        except ImportError:
            raise SettingsError("track mlflow needs MLflow: pip install 'bbt-onnx[track]'", "track") from None
        self.uri = uri
        self.client = None
        self.experiment = experiment
        self.parent = parent  # a sweep's run, which this run is nested under
        self.run_id: str | None = None
        self.several = False  # several seeds: each seed's curves under its own keys (from the settings, at start)

    @staticmethod
    def _call(action, uri: str | None = None, limits: dict[str, str] = CALL_ENV):
        """`action()`, MLflow's refusals as one line with `uri` (else MLFLOW_TRACKING_URI) shown without credentials."""
        from mlflow.exceptions import MlflowException

        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with http_limits(limits):
                return action()
        except ImportError as exc:  # a store's own package missing: a database's driver (psycopg), boto3, ...
            raise SettingsError(f"MLflow cannot use {shown(uri)} (track_uri) without a package it imports: "
                                f"{redact(str(exc), uri)}", "track_uri") from None
        except MlflowException as exc:
            why = unreachable(exc)
            if why is not None:
                raise SettingsError(f"cannot reach the MLflow tracking server at {shown(uri)} (track_uri): {why}",
                                    "track_uri") from None
            text = " ".join(str(exc).split())
            if "MLFLOW_ALLOW_FILE_STORE" in text:
                text = ("MLflow keeps its file store (./mlruns, file:...) only with MLFLOW_ALLOW_FILE_STORE=true in the "
                        "environment; set it, or give track_uri a tracking server or database")
            elif "sqlite" in text and "unsupported URI" in text:  # mlflow-skinny alone: no database store
                text = ("its database store (the default, sqlite:///mlflow.db) needs sqlalchemy and alembic: "
                        "pip install 'bbt-onnx[track]'")
            raise SettingsError(f"MLflow refused: {redact(text, uri)[:400]}", "track_uri") from None

    def _connect(self) -> None:
        """Open the store (a database is created here) and find or create the experiment: one try, a short wait."""
        from mlflow.tracking import MlflowClient

        self.client = self._call(lambda: MlflowClient(self.uri), self.uri, CONNECT_ENV)
        found = self._call(lambda: self.client.get_experiment_by_name(self.experiment), self.uri, CONNECT_ENV)
        self.experiment_id = found.experiment_id if found is not None else \
            self._call(lambda: self.client.create_experiment(self.experiment), self.uri)

    def start(self, run_dir: Path, settings: dict, resumed: bool) -> None:
        """A new MLflow run named after the run directory, its id kept there (tracking.json); a resumed run
        continues the MLflow run it began, when this store holds it."""
        self._connect()
        self.several = len(settings.get("seeds", ())) > 1
        if resumed:
            self.run_id = self._continued(Path(run_dir))
            if self.run_id is not None:
                return
        self.run_id = self._new_run(Path(run_dir).name, settings)
        try:
            write_json_atomic(Path(run_dir) / TRACKED, {"tracker": "mlflow", "run_id": self.run_id,
                                                        "experiment_id": self.experiment_id})
        except OSError as exc:
            error = storage_error(Path(run_dir) / TRACKED, exc)
            self.stopped(error)
            raise error from None

    def _new_run(self, name: str, settings: dict) -> str:
        from mlflow.entities import Param

        tags = {} if self.parent is None else {PARENT_TAG: self.parent}
        run = self._call(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags), self.uri)
        params = [Param(k, v[:6000]) for k, v in flatten(settings).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self._call(lambda chunk=params[i:i + 100]: self.client.log_batch(run.info.run_id, params=chunk),
                       self.uri)
        return run.info.run_id

    def _continued(self, run_dir: Path) -> str | None:
        """The MLflow run this run directory began in this store, marked running again; None when there is none."""
        try:
            known = json.loads(read_text_bounded(run_dir / TRACKED, JSON_LIMIT)).get("run_id")
        except (OSError, ValueError, AttributeError, BBTError):
            return None
        run = self._existing(known)
        if run is None:
            return None
        self._call(lambda: self.client.update_run(known, status="RUNNING"), self.uri)
        return known

    def _existing(self, run_id) -> object | None:
        """The run `run_id` in this store's experiment, or None (another store's, deleted, or not an id)."""
        from mlflow.exceptions import MlflowException

        if not isinstance(run_id, str) or not run_id.isalnum():
            return None
        try:
            with http_limits(CALL_ENV):
                run = self.client.get_run(run_id)
        except MlflowException:
            return None
        live = run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id
        return run if live else None

    def generation(self, event) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        prefix = f"seed{event.seed}." if self.several else ""  # lock-step seeds' events interleave
        metrics = [Metric(prefix + "train_loss", event.best_loss_so_far, now, event.calls)]
        if event.dev_metric is not None:
            metrics.append(Metric(prefix + "dev_metric", event.dev_metric, now, event.calls))
        self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics), self.uri)

    def finish(self, run_dir: Path, record: dict) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in result_metrics(record).items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics), self.uri)
        for name in FILES:
            if (Path(run_dir) / name).is_file():
                self._call(lambda path=Path(run_dir) / name: self.client.log_artifact(self.run_id, str(path)),
                           self.uri)
        self._call(lambda: self.client.set_terminated(self.run_id), self.uri)
        self.run_id = None

    def stopped(self, exc: BaseException) -> None:
        """The run stopped unfinished: KILLED after an interrupt, FAILED after an error, with the error's line.
        Best effort: the error that stopped the run is the one the user sees."""
        if self.run_id is None:
            return
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            with http_limits(CALL_ENV):
                if status == "FAILED":
                    line = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
                    self.client.set_tag(self.run_id, ERROR_TAG, line)
                self.client.set_terminated(self.run_id, status=status)
        except Exception:  # noqa: BLE001 - the store may be what failed
            pass
        self.run_id = None

    def open_group(self, name: str, settings: dict, known: str | None) -> str:
        """A sweep's run, under which its trials' runs are nested: `known` (a resumed sweep's) running again when
        this store holds it, else a new one with the sweep's settings."""
        self._connect()
        if known is not None and self._existing(known) is not None:
            self._call(lambda: self.client.update_run(known, status="RUNNING"), self.uri)
            return known
        return self._new_run(name, settings)

    def close_group(self, group: str, counts: dict, status: str) -> None:
        """The sweep's counts (trials, finished, failed, not run) and its end: FINISHED, FAILED or KILLED; with no
        status the run is deleted (a sweep refused before its first trial leaves nothing)."""
        from mlflow.entities import Metric

        if self.client is None:
            self._connect()
        if not status:
            self._call(lambda: self.client.delete_run(group), self.uri)
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in counts.items()]
        self._call(lambda: self.client.log_batch(group, metrics=metrics), self.uri)
        self._call(lambda: self.client.set_terminated(group, status=status), self.uri)


TRACKERS = {"mlflow": MlflowTracker}


def track(hooks, name: str, uri: str | None = None, parent: str | None = None):
    """`hooks` that also log the run to the tracker `name` (its start, every generation, its end, or how it
    stopped unfinished), nested under the tracker's run `parent` when given (a sweep's)."""
    from dataclasses import replace

    tracker = open_tracker(name, uri, parent)

    def event(e) -> None:
        hooks.event(e)
        tracker.generation(e)

    def stopped(exc: BaseException) -> None:
        hooks.stopped(exc)
        tracker.stopped(exc)

    return replace(hooks, event=event, begin=tracker.start, end=tracker.finish, stopped=stopped)


def open_tracker(name: str, uri: str | None = None, parent: str | None = None) -> Tracker:
    try:
        kind = TRACKERS[name]
    except KeyError:
        raise SettingsError(f"track {name!r} is not one of {', '.join(TRACKERS)}", "track") from None
    return kind(uri, parent=parent)
