"""What a run records about itself (provenance), `bbt-onnx report` over run.json files, and MLflow tracking."""

from __future__ import annotations

import json
import shutil

import pytest

from bbt_onnx.provenance import command_line, provenance
from bbt_onnx.jobs.report import summarise

from helpers import cli_error, generations, invoke
from test_tune import tune_args


@pytest.fixture(scope="module")
def runs(tiny_model, data_dir, tmp_path_factory):
    """Two finished runs of one setting (different data draws), one of another setting."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("a", ["--seeds", "0,1", "--data-seed", 1]), ("b", ["--seeds", "0,1", "--data-seed", 2]),
                        ("c", ["--seed", 3, "--calibrate"])):
        r = invoke(tune_args(tiny_model, data_dir, root / name, "--budget", 20, "-q", "--fallback", *extra))
        assert r.exit_code == 0, r.output
    return root


def test_a_run_records_where_it_was_made(runs):
    record = json.loads((runs / "a" / "run.json").read_text())["provenance"]
    assert {"python", "numpy", "onnxruntime", "cma", "blas", "bbt-onnx"} <= set(record["versions"])
    assert record["cpu"] and record["provider"] == "CPUExecutionProvider"
    assert record["command"]  # the argv of whoever ran it (here pytest's)


def test_the_command_line_keeps_no_secret():
    argv = ["bbt-onnx", "tune", "--prompt-tokens", "8", "--token", "s3cret", "--api-key=k3y", "--token-file", "tok",
            "--server", "http://user:pw@127.0.0.1:8000/m", "--track-uri", "postgresql://db/x?password=hunter22&ssl=1"]
    shown = " ".join(command_line(argv))
    assert "s3cret" not in shown and "k3y" not in shown and "pw@" not in shown and "hunter22" not in shown
    assert "postgresql://db/x?password=***&ssl=1" in shown
    assert "--prompt-tokens 8" in shown and "--token-file tok" in shown and "127.0.0.1:8000/m" in shown
    assert provenance("CPUExecutionProvider", argv)["command"] == command_line(argv)


def test_report_groups_by_setting_with_baselines_seeds_mean_and_ensemble(runs):
    report = summarise([runs / "a", runs / "b", runs / "c"])
    settings = {r.setting for r in report.rows}
    assert len(settings) == 2  # a and b share one setting; c calibrates
    ab = [r for r in report.rows if "calibrate False" in r.setting]
    names = [r.candidate for r in ab]
    assert names[0] == "template" and any(n.startswith("z = 0") for n in names)
    assert "seed 0 (data 1)" in names and "seed 1 (data 2)" in names
    mean = next(r for r in ab if r.candidate.startswith("tuned, mean"))
    tests = []
    for name in ("a", "b"):
        run = json.loads((runs / name / "run.json").read_text())
        tests += [s["test_metric"] for s in run["seeds"]]
    assert mean.runs == 4 and mean.test.mean == pytest.approx(sum(tests) / 4)
    ens = next(r for r in ab if r.candidate == "ensemble of the seeds")
    assert ens.runs == 2
    result = next(r for r in ab if r.candidate.startswith("result"))
    kept = [json.loads((runs / n / "run.json").read_text())["metrics"]["test_metric"] for n in ("a", "b")]
    assert result.test.mean == pytest.approx(sum(kept) / 2)
    assert not report.mixed_versions
    for rule, keep in (("max", lambda m: m["value"] > 0), ("interval", lambda m: m["low"] > 0)):
        under = next(r for r in ab if r.candidate == f"result if --choose {rule}")
        expect = []
        for name in ("a", "b"):
            run = json.loads((runs / name / "run.json").read_text())
            base = next(b for b in run["baselines"] if b["name"] == run["choice"]["best_baseline"])
            expect.append(run["ensemble"]["test_metric"] if keep(run["choice"]["dev_margin"]) else base["test_metric"])
        assert under.test.mean == pytest.approx(sum(expect) / 2)


def test_report_on_the_command_line_and_its_refusals(runs, tmp_path):
    md = invoke(["report", runs / "a", runs / "c"])
    assert md.exit_code == 0, md.output
    assert md.stdout.startswith("sst2: method bbt;") and "| Candidate | Runs | Dev | Test |" in md.stdout
    assert "ensemble of the seeds" in md.stdout and md.stdout.count("| Candidate |") == 2  # two settings
    js = invoke(["report", runs / "a", "--format", "json"])
    assert json.loads(js.stdout)["runs"] == 1
    other = tmp_path / "other"
    shutil.copytree(runs / "a", other)
    run = json.loads((other / "run.json").read_text())
    run["provenance"]["versions"]["numpy"] = "2.4.6"
    (other / "run.json").write_text(json.dumps(run))
    mixed = invoke(["report", runs / "a", other])
    assert "different versions (numpy" in mixed.stdout
    run["status"] = "running"
    (other / "run.json").write_text(json.dumps(run))
    assert "not a finished run" in cli_error(["report", other])
    assert "cannot read" in cli_error(["report", tmp_path / "nothing"])


def test_tracking_to_a_real_mlflow_file_store(tiny_model, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    r = invoke(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 40, "--track", "mlflow", "--track-uri",
                         store, "-q"))
    assert r.exit_code == 0, r.output
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("bbt-onnx")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["tune.budget"] == "40" and found.data.params["task.name"] == "sst2"
    history = client.get_metric_history(found.info.run_id, "train_loss")
    assert [m.step for m in history] == [g["calls"] for g in generations(tmp_path / "run")]
    assert found.data.metrics["baseline.template.dev"] == pytest.approx(
        json.loads((tmp_path / "run" / "run.json").read_text())["baselines"][0]["dev_metric"])
    assert {"prompt.npz", "run.json"} <= {a.path for a in client.list_artifacts(found.info.run_id)}


def test_tracking_several_seeds_keeps_one_curve_per_seed(tiny_model, data_dir, tmp_path, monkeypatch):
    """Lock-step seeds' events interleave: each seed's train loss and dev metric go under keys of its own."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store: no database to create (the default's is)
    store = f"file:{tmp_path / 'mlruns'}"
    r = invoke(tune_args(tiny_model, data_dir, tmp_path / "run", "--seeds", "0,1", "--budget", 30, "--eval-every", 20,
                         "--track", "mlflow", "--track-uri", store, "-q"))
    assert r.exit_code == 0, r.output
    client = MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    assert "train_loss" not in found.data.metrics and "dev_metric" not in found.data.metrics
    logged = generations(tmp_path / "run")
    for seed in (0, 1):
        mine = [g for g in logged if g["seed"] == seed]
        assert len(mine) == 3  # 30 calls of 10 candidates
        for key, field in (("train_loss", "best_loss_so_far"), ("dev_metric", "dev_metric")):
            history = sorted(client.get_metric_history(found.info.run_id, f"seed{seed}.{key}"), key=lambda m: m.step)
            expect = [g for g in mine if g[field] is not None]
            assert expect and [m.step for m in history] == [g["calls"] for g in expect]
            assert [m.value for m in history] == pytest.approx([g[field] for g in expect])


def test_tracking_to_mlflows_default_store_as_a_new_user(tiny_model, data_dir, tmp_path, monkeypatch):
    """No tracking URI and no file-store switch: MLflow's default, ./mlflow.db, works with the `track` extra."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    r = invoke(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 20, "--track", "mlflow", "-q"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    assert found.info.status == "FINISHED" and "train_loss" in found.data.metrics
    assert "run.json" in {a.path for a in client.list_artifacts(found.info.run_id)}


def test_mlflow_without_its_database_store_says_what_to_install():
    """mlflow-skinny alone refuses its own default URI with a model-registry message; ours names the fix."""
    pytest.importorskip("mlflow")
    from mlflow.exceptions import MlflowException

    from bbt_onnx.errors import SettingsError
    from bbt_onnx.tracking import MlflowTracker

    def refuse():  # what MlflowClient() says in a fresh directory without sqlalchemy (mlflow-skinny 3.18)
        raise MlflowException("Model registry functionality is unavailable; got unsupported URI "
                              "'sqlite:////home/u/mlflow.db' for model registry data storage.")

    with pytest.raises(SettingsError, match=r"sqlite:///mlflow.db\) needs sqlalchemy and alembic") as caught:
        MlflowTracker._call(refuse)
    assert caught.value.arguments == ("track_uri",)


def test_a_tracker_that_cannot_open_is_one_line(tiny_model, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    line = cli_error(tune_args(tiny_model, data_dir, tmp_path / "run", "--track", "mlflow", "--track-uri",
                               f"file:{tmp_path / 'mlruns'}"))
    assert "MLflow refused" in line and not (tmp_path / "run").exists()
    assert "--track-uri goes with --track" in cli_error(tune_args(tiny_model, data_dir, tmp_path / "r",
                                                                  "--track-uri", "x"))


def test_report_reads_the_run_a_killed_force_replacement_left_aside(runs, tmp_path):
    """tune --force moves the earlier run into .replaced/ until the new one has a checkpoint; killed before that,
    the directory still holds the earlier run, for report as for every other command."""
    import shutil

    run = shutil.copytree(runs / "a", tmp_path / "a")
    aside = run / ".replaced"
    aside.mkdir()
    for f in list(run.iterdir()):
        if f.name != ".replaced":
            f.rename(aside / f.name)
    (run / "run.json").write_text(json.dumps({"status": "running", "settings": {}}))  # the new run, killed early
    (run / "log.jsonl").write_text("")
    r = invoke(["report", run, "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads(invoke(["report", runs / "a", "--format", "json"]).stdout)


def test_runs_that_searched_otherwise_are_other_settings():
    """search_calibration decides a run's numbers: runs that differ in it are reported apart, and a run from before
    the option searched raw scores (off)."""
    from bbt_onnx.jobs.report import setting_of

    def run(**tune) -> dict:
        return {"settings": {"tune": {"calibrate": True, "budget": 20, **tune}, "task": {}}}

    assert setting_of(run()) == setting_of(run(search_calibration="off"))
    assert setting_of(run(search_calibration="content-free")) != setting_of(run(search_calibration="off"))
    assert "search_calibration content-free" in setting_of(run(search_calibration="content-free"))
