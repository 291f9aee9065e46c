"""A sweep's trials as Ray Tune trials (the `ray` extra): one function trial per tune, retried from its run's own
checkpoint when its worker dies (`max_failures`).

By default a local cluster is started for the sweep, on loopback only, with a token of its own and its files in a
temporary folder that goes with it; `address` (or RAY_ADDRESS) joins a running cluster instead, whose
authentication token Ray reads from its own environment and files: bbt-onnx never reads, prints or records it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import re
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import SettingsError
from ..fileio import read_tail
from .sweep import Runner, Sweep, SweepOptions, Trial, TrialResult, exception_line, run_trial

LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = (LOOPBACK, "localhost", "::1")
ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d{1,5})")
REACH_SECONDS = 5.0
MAX_TEMP = 24  # characters of the folder a local cluster's temporary folder is made in
ERROR_TAIL = 16 << 10  # bytes of a failed trial's traceback read back for its line
RAY_RECORDS = "ray"  # Ray Tune's own records of each time the sweep ran, in the sweep's folder


def trainable(config: dict, trials: dict[str, Trial]) -> None:
    """A Ray Tune function trial: the tune of `config["trial"]`, its metrics reported once at the end."""
    from ray import tune as ray_tune

    started = time.monotonic()
    metrics = run_trial(trials[config["trial"]])
    ray_tune.report({"metrics": json.dumps(metrics), "seconds": time.monotonic() - started})


@contextmanager
def cluster(options: SweepOptions):
    """The Ray cluster the trials run on: the one this process already joined, the one `address` names, or a
    local one started here (loopback only; its processes and files are gone when the sweep ends or is stopped)."""
    import ray

    if ray.is_initialized():
        if options.address:
            raise SettingsError("this process has joined a Ray cluster already, which the trials would run on; "
                                "drop address", "address")
        yield "the running cluster"
        return
    address = joined(options)
    scratch = None
    try:
        if address:
            check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.CRITICAL)
            except ConnectionError as exc:
                raise SettingsError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())}",
                                    "address") from None
            where = f"the Ray cluster at {address}"
        else:
            scratch = tempfile.mkdtemp(prefix="bbt-ray-", dir=short_temp())
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _temp_dir=scratch, log_to_driver=False,
                     logging_level=logging.CRITICAL)
            where = f"a local Ray cluster ({int(ray.cluster_resources().get('CPU', 0))} CPUs, {LOOPBACK} only)"
        yield where
    finally:
        ray.shutdown()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def joined(options: SweepOptions) -> str | None:
    return options.address or os.environ.get("RAY_ADDRESS") or None


def host_port(address: str) -> tuple[str, int] | None:
    """HOST and PORT of a cluster's address (HOST:PORT or ray://HOST:PORT); None for `auto` and the like."""
    found = ADDRESS.fullmatch(address.strip())
    return (found["host"].strip("[]"), int(found["port"])) if found else None


def check_reachable(address: str) -> None:
    """A cluster's address that takes connections, checked in seconds (Ray itself retries for minutes)."""
    where = host_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=REACH_SECONDS).close()
    except OSError as exc:
        raise SettingsError(f"cannot join the Ray cluster at {address}: nothing answers there "
                            f"({exc.strerror or exc})", "address") from None


def environment(options: SweepOptions) -> dict[str, str]:
    """What Ray is told through its environment, each only where the user set nothing: no usage reports and no
    console tables; a node address of 127.0.0.1 for a cluster started here or joined on loopback (so that every
    server Ray starts binds to loopback, and a driver dials the loopback address it was given: read when Ray is
    imported); for a cluster started here, a token made for this sweep alone, held in the environment so that none
    is written to ~/.ray; for a cluster joined, token mode wherever the user gave a token, which Ray reads itself
    (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AIR_NEW_OUTPUT": "0"}
    given_token = any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    address = joined(options)
    where = host_port(address) if address else None
    if not address or (where and where[0] in LOOPBACK_NAMES):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if not address:
        env["RAY_AUTH_MODE"] = "token"
        if not given_token:
            env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    elif given_token:
        env["RAY_AUTH_MODE"] = "token"
    return {k: v for k, v in env.items() if k not in os.environ}


@contextmanager
def environ(values: dict[str, str]):
    """`values` in os.environ while the sweep runs (Ray's processes inherit them), then taken out again."""
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)


def short_temp() -> str:
    """A temporary folder short enough for Ray's socket paths (under 108 bytes with its session folder's ~70):
    TMPDIR's, else /tmp."""
    for folder in (tempfile.gettempdir(), "/tmp"):
        if len(folder) <= MAX_TEMP and os.access(folder, os.W_OK):
            return folder
    raise SettingsError(f"Ray's sockets need a temporary folder of at most {MAX_TEMP} characters; set TMPDIR to one",
                        "executor")


def open_ray(options: SweepOptions, log: Callable[[str], None]) -> Runner:
    try:
        with environ(environment(options)):  # before Ray is first imported: it reads some then
            import ray  # noqa: F401
            from ray import tune as _  # noqa: F401
    except ImportError:
        raise SettingsError("executor ray needs Ray Tune: pip install 'bbt-onnx[ray]'", "executor") from None

    def run(sweep: Sweep, done: Callable[[TrialResult], None]) -> None:
        with environ(environment(options)):
            from ray import tune as ray_tune

            trials = {t.name: t for t in sweep.trials}
            # Ray writes some notes (a worker that died) to stdout, which holds the sweep's JSON: they go to stderr
            with contextlib.redirect_stdout(sys.stderr), cluster(options) as where:
                cpus = options.cpus_per_trial
                log(f"{len(trials)} trials on {where}, {cpus} CPU{'s' if cpus > 1 else ''} a trial")
                runnable = ray_tune.with_resources(ray_tune.with_parameters(trainable, trials=trials),
                                                   {"cpu": options.cpus_per_trial})
                tuner = ray_tune.Tuner(
                    runnable, param_space={"trial": ray_tune.grid_search(list(trials))},
                    tune_config=ray_tune.TuneConfig(reuse_actors=True),  # a worker imports once, runs trials in turn
                    run_config=ray_tune.RunConfig(
                        name=time.strftime("%Y%m%d-%H%M%S"),
                        storage_path=str((sweep.folder / RAY_RECORDS).resolve()),
                        failure_config=ray_tune.FailureConfig(max_failures=options.max_failures), verbose=0,
                        callbacks=[reporter(done, log)]))
                tuner.fit()

    return run


def reporter(done: Callable[[TrialResult], None], log: Callable[[str], None]):
    """A Ray Tune callback: each finished or failed trial to `done`, each restart to `log` (made here, so that this
    module imports without Ray)."""
    from ray.tune import Callback

    class Reporter(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            metrics = json.loads(result["metrics"]) if "metrics" in result else None
            done(TrialResult(trial.config["trial"], metrics, None if metrics else "it reported no result",
                             float(result.get("seconds", 0.0))))

        def on_trial_recover(self, iteration, trials, trial, **info):
            log(f"{trial.config['trial']}: its worker failed; starting it again from its last checkpoint")

        def on_trial_error(self, iteration, trials, trial, **info):
            done(TrialResult(trial.config["trial"], None, last_error(trial)))

    return Reporter()


def last_error(trial) -> str:
    """The trial's error as one line (`sweep.exception_line` of its traceback's tail), or what Ray says of it."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        line = exception_line(read_tail(path, ERROR_TAIL))
        if line:
            return line
    return str(getattr(trial, "error_msg", None) or "the trial failed")
