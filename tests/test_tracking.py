"""`tune --track mlflow` against hostile settings: a URI's credentials are never shown, a refused tune creates no
store, and a tracking server that cannot be reached is one line within seconds. Servers here are on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from contextlib import contextmanager

import pytest

from helpers import cli_error
from test_tune import tune_args

pytest.importorskip("mlflow")

HTTP_KNOBS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")


class Overdue(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` on the way (MLflow's, the CLI's) eats it."""


@contextmanager
def deadline(seconds: int):
    """Fail the test, rather than hang it, when the block takes longer than `seconds`."""
    def ring(_signum, _frame):
        raise Overdue(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once by us, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_mlflow_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", *HTTP_KNOBS):
        monkeypatch.delenv(name, raising=False)


def test_redact_hides_userinfo_and_password_parameters():
    from bbt_onnx.tracking import redact, shown

    assert shown("http://user:secret@127.0.0.1:5000/") == "http://***@127.0.0.1:5000/"
    assert shown("postgresql+psycopg2://user:p%40ss@db.local:5432/mlflow?sslmode=require&password=hunter22") == \
        "postgresql+psycopg2://***@db.local:5432/mlflow?sslmode=require&password=***"
    assert shown("mysql://db/x?user=u&pwd=zz9&sslpassword=k3y") == "mysql://db/x?user=u&pwd=***&sslpassword=***"
    assert shown(None) == "MLflow's default store" and shown("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    # a message that quotes the credentials some other way still loses them (as written and decoded)
    said = redact("login failed for user 'user' with password p%40ss (p@ss)", "postgresql://user:p%40ss@db/x")
    assert "p%40ss" not in said and "p@ss" not in said


def test_mlflows_refusal_never_quotes_the_credentials(monkeypatch):
    from mlflow.exceptions import MlflowException

    from bbt_onnx.errors import SettingsError
    from bbt_onnx.tracking import MlflowTracker

    uri = "postgresql://user:secret@127.0.0.1:1/db?password=hunter22"

    def refuse():
        raise MlflowException(f"cannot open {uri}: auth failed for secret/hunter22")

    with pytest.raises(SettingsError) as caught:
        MlflowTracker._call(refuse, uri)
    assert "secret" not in str(caught.value) and "hunter22" not in str(caught.value)
    assert "127.0.0.1:1/db" in str(caught.value) and caught.value.arguments == ("track_uri",)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # no track_uri: MLflow's own variable is hidden the same way
    with pytest.raises(SettingsError) as caught:
        MlflowTracker._call(refuse)
    assert "secret" not in str(caught.value) and "hunter22" not in str(caught.value)


def test_a_password_in_the_tracking_uri_is_never_printed(tiny_model, data_dir, tmp_path, monkeypatch, capfd,
                                                         no_mlflow_env):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own setting: one try, so no wait
    port = free_port()
    with deadline(90):
        line = cli_error(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 20, "--track", "mlflow",
                                   "--track-uri", f"http://user:secret@127.0.0.1:{port}/"))
    assert "secret" not in line and "user:" not in line and f"127.0.0.1:{port}" in line, line
    assert "secret" not in "".join(capfd.readouterr())  # MLflow's own log lines, if any, on the real stderr
    line = cli_error(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 20, "--track", "mlflow",
                               "--track-uri", f"postgresql://user:secret@127.0.0.1:{port}/db?password=hunter22"))
    assert "secret" not in line and "hunter22" not in line and f"127.0.0.1:{port}/db" in line, line
    assert "secret" not in "".join(capfd.readouterr())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("store", ["sqlite", "default"])
def test_a_refused_tune_creates_no_tracking_store(tiny_model, data_dir, tmp_path, monkeypatch, no_mlflow_env, store):
    """Nothing on disk changes until every setting is checked: the store (a database, mlruns/) neither."""
    monkeypatch.chdir(tmp_path)
    uri = ["--track-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"] if store == "sqlite" else []
    cli_error(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 0, "--track", "mlflow", *uri))
    missing = tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 20, "--track", "mlflow", *uri)
    missing[missing.index("--data") + 1] = tmp_path / "no-such.csv"
    cli_error(missing)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store/, mlflow.db, mlruns/ nor run/


def test_an_unreachable_tracking_server_is_one_line_within_seconds(tiny_model, data_dir, tmp_path, no_mlflow_env):
    """MLflow's client alone retries a refused connection for minutes; the tracker gives up after one short try."""
    port = free_port()
    start = time.monotonic()
    with deadline(60):
        line = cli_error(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 20, "--track", "mlflow",
                                   "--track-uri", f"http://user:secret@127.0.0.1:{port}"))
    assert time.monotonic() - start < 30
    assert "tracking server" in line and f"127.0.0.1:{port}" in line and "secret" not in line, line
    assert not (tmp_path / "run").exists()
    assert not any(name in os.environ for name in HTTP_KNOBS)  # MLflow's knobs set only for the tracker's calls


def test_a_server_that_never_answers_is_given_up_on(no_mlflow_env, tmp_path):
    """A listener that takes the connection and says nothing: MLflow would wait 120 s a try, eight tries."""
    from bbt_onnx.errors import SettingsError
    from bbt_onnx.tracking import MlflowTracker

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        with deadline(60), pytest.raises(SettingsError, match="tracking server at http://127.0.0.1:.*no answer"):
            MlflowTracker(f"http://127.0.0.1:{silent.getsockname()[1]}").start(tmp_path / "run", {}, False)
        assert time.monotonic() - start < 20


def test_the_users_own_http_settings_win(monkeypatch, no_mlflow_env):
    from bbt_onnx.tracking import CALL_ENV, MlflowTracker

    seen = MlflowTracker._call(lambda: {k: os.environ.get(k) for k in CALL_ENV})
    assert seen == CALL_ENV and not any(k in os.environ for k in CALL_ENV)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    seen = MlflowTracker._call(lambda: {k: os.environ.get(k) for k in CALL_ENV})
    assert seen["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"


def stop_at(generation: int, exc: BaseException):
    """Hooks whose event raises `exc` at `generation` (after the checkpoints before it were written)."""
    from bbt_onnx.jobs.tune import Hooks

    def event(e) -> None:
        if e.generation >= generation:
            raise exc
    return Hooks(event=event)


def small_tune(tiny_model, data_dir, out, hooks):
    from bbt_onnx import ChoicePolicy, TuneConfig, tune

    config = TuneConfig(prompt_tokens=4, intrinsic_dim=40, popsize=10, budget=200, eval_every=40, checkpoint_every=4)
    return tune(tiny_model, "sst2", data_dir / "pool.csv", out, config=config, test=data_dir / "test.csv",
                policy=ChoicePolicy(fallback=False), hooks=hooks)


def test_an_interrupted_run_is_killed_in_mlflow_and_resuming_it_continues_that_run(tiny_model, data_dir, tmp_path,
                                                                                 monkeypatch):
    """Ctrl-C leaves the MLflow run KILLED, not running forever; `tune --resume --track` continues the same MLflow
    run (its id kept in the run directory), so one run holds the whole curve."""
    from mlflow.tracking import MlflowClient

    from bbt_onnx.tracking import track
    from helpers import generations, invoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store, out = f"file:{tmp_path / 'mlruns'}", tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        small_tune(tiny_model, data_dir, out, track(stop_at(6, KeyboardInterrupt()), "mlflow", store))
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bbt-onnx").experiment_id
    (first,) = client.search_runs([experiment])
    assert first.info.status == "KILLED" and first.info.run_name == "run"
    assert json.loads((out / "tracking.json").read_text())["run_id"] == first.info.run_id

    r = invoke(["tune", "--resume", out, "--track", "mlflow", "--track-uri", store, "-q"])
    assert r.exit_code == 0, r.output
    (after,) = client.search_runs([experiment])
    assert after.info.run_id == first.info.run_id and after.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(after.info.run_id, "train_loss")}
    assert sorted(steps) == [g["calls"] for g in generations(out)] and max(steps) == 200
    assert "test_metric" in after.data.metrics


def test_a_failed_run_is_failed_in_mlflow_with_its_error(tiny_model, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from bbt_onnx.tracking import ERROR_TAG, track

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    with pytest.raises(RuntimeError, match="the engine fell over"):
        small_tune(tiny_model, data_dir, tmp_path / "run",
                   track(stop_at(2, RuntimeError("the engine fell over")), "mlflow", store))
    client = MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    assert found.info.status == "FAILED" and found.data.tags[ERROR_TAG] == "the engine fell over"


def test_a_resume_into_another_store_starts_a_run_there(tiny_model, data_dir, tmp_path, monkeypatch):
    """The kept id names a run of the first store: the second store gets a run of its own, with the settings."""
    from mlflow.tracking import MlflowClient

    from bbt_onnx.tracking import track
    from helpers import invoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    first, second, out = f"file:{tmp_path / 'one'}", f"file:{tmp_path / 'two'}", tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        small_tune(tiny_model, data_dir, out, track(stop_at(6, KeyboardInterrupt()), "mlflow", first))
    r = invoke(["tune", "--resume", out, "--track", "mlflow", "--track-uri", second, "-q"])
    assert r.exit_code == 0, r.output
    client = MlflowClient(second)
    (found,) = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    assert found.info.status == "FINISHED" and found.data.params["tune.budget"] == "200"
    assert json.loads((out / "tracking.json").read_text())["run_id"] == found.info.run_id


def test_a_full_disk_at_the_tracking_record_is_one_error_and_a_failed_mlflow_run(tiny_model, data_dir, tmp_path,
                                                                                monkeypatch):
    from mlflow.tracking import MlflowClient

    import bbt_onnx.tracking
    from bbt_onnx.errors import BBTError
    from bbt_onnx.jobs.tune import Hooks
    from bbt_onnx.tracking import track

    def full(path, _obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(bbt_onnx.tracking, "write_json_atomic", full)
    store = f"file:{tmp_path / 'mlruns'}"
    with pytest.raises(BBTError, match="tracking.json"):
        small_tune(tiny_model, data_dir, tmp_path / "run", track(Hooks(), "mlflow", store))
    client = MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    assert found.info.status == "FAILED"
