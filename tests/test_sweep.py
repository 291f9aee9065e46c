"""Sweeps: a grid of ordinary tunes as trials of Ray Tune (one local cluster for this file) or of submitit's local
executor; a bad spec refused whole; a killed trial resumed bit for bit; a sweep continued; the report over it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bbt_onnx.prompt import load_prompt

from helpers import cli_error, invoke

if importlib.util.find_spec("ray") is None:  # found, not imported: Ray reads its environment when first imported
    pytest.skip("the ray extra is not installed", allow_module_level=True)

SMALL = {"prompt-tokens": 4, "intrinsic-dim": 20, "popsize": 6, "budget": 48, "eval-every": 24,
         "checkpoint-every": 2, "fallback": False}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the file's in-process sweeps, set up as a sweep sets up its own (loopback, a token
    of its own): a sweep joins the cluster its process has."""
    from bbt_onnx.jobs.ray_runner import environ, environment
    from bbt_onnx.jobs.sweep import SweepOptions

    scratch = tempfile.mkdtemp(prefix="bt", dir="/tmp")  # short: Ray's socket paths have a limit
    with environ(environment(SweepOptions())):
        import ray

        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=scratch, log_to_driver=False)
        yield
        ray.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)


def write_spec(path: Path, model, data_dir, grid=None, settings=None, tasks=None) -> Path:
    spec = {"model": str(model),
            "tasks": tasks or {"pos": {"task": "sst2", "data": str(data_dir / "pool.csv"), "k-shot": 8,
                                       "test": str(data_dir / "test.csv")}},
            "settings": {**SMALL, **(settings or {})},
            "grid": grid if grid is not None else {"seed": [1, 2]}}
    path.write_text(json.dumps(spec))
    return path


def plain_tune(tiny_model, data_dir, out, seed, **extra) -> Path:
    """The same trial as an ordinary `bbt-onnx tune`."""
    args = ["tune", "--model", tiny_model, "--task", "sst2", "--data", data_dir / "pool.csv", "--k-shot", 8,
            "--test", data_dir / "test.csv", "--out", out, "--seed", seed, "--threads", 1, "--no-fallback"]
    for key, value in {**SMALL, **extra}.items():
        if key != "fallback":
            args += [f"--{key}", value]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return out


def z_of(run: Path):
    return load_prompt(run).z


def test_each_trial_is_an_ordinary_run_and_the_report_reads_the_sweep(cluster, tiny_model, data_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir)
    result = invoke(["sweep", spec, "--out", tmp_path / "sweep"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["finished"] == 2 and summary["failed"] == [] and summary["not_run"] == []
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert sorted(line.split(":")[0][6:] for line in lines) == ["pos-seed=1", "pos-seed=2"]  # one line a trial
    for seed in (1, 2):
        run = tmp_path / "sweep" / "runs" / f"pos-seed={seed}"
        alone = plain_tune(tiny_model, data_dir, tmp_path / f"alone{seed}", seed)
        assert z_of(run).tobytes() == z_of(alone).tobytes()  # bit for bit the tune the command line runs
        log = (tmp_path / "sweep" / "logs" / f"pos-seed={seed}.log").read_text()
        assert "tuning: 48/48, loss " in log and "done: 48 calls" in log, log  # its progress, and its end
        recorded = json.loads((run / "run.json").read_text())["settings"]["sweep"]
        assert recorded == {"trial": f"pos-seed={seed}", "task": "pos", "point": {"seed": seed}}
    report = invoke(["report", tmp_path / "sweep", "--format", "json"])
    assert report.exit_code == 0, report.output
    rows = json.loads(report.stdout)
    assert rows["runs"] == 2 and rows["unfinished"] == []
    assert {r["setting"].split("; ")[-1] for r in rows["rows"]} == {"seed 1", "seed 2"}  # apart by grid point
    assert {r["task"] for r in rows["rows"]} == {"pos"}


def test_a_killed_trial_starts_again_from_its_checkpoint_bit_for_bit(cluster, tiny_model, data_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = {"budget": 1200, "popsize": 6, "checkpoint-every": 1, "eval-every": 600}
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, grid={"seed": [3]}, settings=long)
    folder = tmp_path / "sweep"
    run = folder / "runs" / "pos-seed=3"
    outcome = {}
    sweeping = threading.Thread(target=lambda: outcome.update(result=invoke(["sweep", spec, "--out", folder,
                                                                             "--max-failures", 1])))
    sweeping.start()
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.npz").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (run / "checkpoint.npz").is_file()
    worker = int((folder / "logs" / "pos-seed=3.log").read_text().split(" pid ")[1].split()[0])
    os.kill(worker, signal.SIGKILL)  # the trial's Ray worker dies mid-run
    sweeping.join(120)
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    log = (folder / "logs" / "pos-seed=3.log").read_text()
    assert ": new" in log and ": resumable" in log, log  # the second attempt continued the first
    assert "starting it again from its last checkpoint" in result.stderr
    alone = plain_tune(tiny_model, data_dir, tmp_path / "alone", 3, **long)
    assert z_of(run).tobytes() == z_of(alone).tobytes()


def test_resume_runs_only_what_did_not_finish(cluster, tiny_model, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir)
    folder = tmp_path / "sweep"
    assert invoke(["sweep", spec, "--out", folder]).exit_code == 0
    kept = folder / "runs" / "pos-seed=1" / "run.json"
    before = kept.stat().st_mtime_ns
    lost = folder / "runs" / "pos-seed=2"
    for f in lost.iterdir():
        f.unlink()
    lost.rmdir()
    report = invoke(["report", folder])
    assert report.exit_code == 0 and "Not finished, so not in the tables" in report.stdout
    assert "pos-seed=2" in report.stdout
    again = invoke(["sweep", "--resume", folder])
    assert again.exit_code == 0, again.output
    assert "1 of 2 trials finished before" in again.stderr
    assert kept.stat().st_mtime_ns == before and (lost / "run.json").is_file()
    assert cli_error(["sweep", spec, "--out", folder]).startswith("error: ")  # a sweep is continued, not replaced


@pytest.mark.parametrize("executor", ["ray", "slurm"])
def test_a_failing_trial_is_one_line_and_the_others_still_run(cluster, tiny_model, data_dir, tmp_path, monkeypatch,
                                                              executor):
    if executor == "slurm":
        pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    tasks = {"pos": {"task": "sst2", "data": str(data_dir / "pool.csv"), "k-shot": 8},
             "gone": {"task": "sst2", "data": str(data_dir / "pool.csv"), "k-shot": 8,
                      "server": "http://127.0.0.1:1"}}  # nothing listens there: the trial fails when it starts
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, grid={"seed": [1]}, tasks=tasks)
    result = invoke(["sweep", spec, "--out", tmp_path / "sweep", "--max-failures", 0, "--executor", executor])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["failed"] == ["gone-seed=1"] and summary["finished"] == 1
    failed = [line for line in result.stderr.splitlines() if "gone-seed=1: failed:" in line]
    assert len(failed) == 1 and "127.0.0.1:1" in failed[0] and "Traceback" not in result.stderr, result.stderr
    assert "bbt-onnx sweep --resume" in result.stderr


def test_slurm_through_submitits_local_executor_gives_the_same_runs(tiny_model, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, grid={"seed": [1]})
    result = invoke(["sweep", spec, "--out", tmp_path / "sweep", "--executor", "slurm"])
    assert result.exit_code == 0, result.output
    assert "local processes" in result.stderr
    run = tmp_path / "sweep" / "runs" / "pos-seed=1"
    alone = plain_tune(tiny_model, data_dir, tmp_path / "alone", 1)
    assert z_of(run).tobytes() == z_of(alone).tobytes()
    assert any((tmp_path / "sweep" / "slurm").iterdir())


def test_a_job_stopped_at_its_time_limit_is_requeued_and_resumes_bit_for_bit(tiny_model, data_dir, tmp_path,
                                                                             monkeypatch):
    """submitit's local executor stops a job as Slurm does at its limit (a signal a little before it): the job is
    requeued, and its trial continues from its checkpoint."""
    pytest.importorskip("submitit")
    from bbt_onnx.cli import sweep_of
    from bbt_onnx.jobs.slurm_runner import open_slurm
    from bbt_onnx.jobs.sweep import SweepOptions, read_spec, run_sweep

    monkeypatch.chdir(tmp_path)
    long = {"budget": 6000, "popsize": 6, "checkpoint-every": 1, "eval-every": 6000}
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, grid={"seed": [4]}, settings=long)
    options = SweepOptions(executor="slurm", slurm_minutes=0.1, max_failures=8)  # a 6 s limit, told at 4 s
    lines = []
    summary = run_sweep(sweep_of(tmp_path / "sweep", read_spec(spec), options, str(tmp_path)),
                        open_slurm(options, lines.append), log=lines.append)
    assert summary["finished"] == 1, (summary, lines)
    log = (tmp_path / "sweep" / "logs" / "pos-seed=4.log").read_text()
    assert log.count(": resumable") >= 1 and ": new" in log, log
    alone = plain_tune(tiny_model, data_dir, tmp_path / "alone", 4, **long)
    assert z_of(tmp_path / "sweep" / "runs" / "pos-seed=4").tobytes() == z_of(alone).tobytes()


@pytest.mark.parametrize("whom", ["group", "command"])
def test_ctrl_c_on_local_slurm_jobs_is_one_line_and_leaves_no_process(tiny_model, data_dir, tmp_path, whom):
    """Ctrl-C reaches the whole foreground group (the command, submitit's controllers, the trials); `kill -INT`
    the command alone, which stops its jobs itself. Either way the command says how to resume, nothing prints a
    traceback, and no process of the sweep outlives the command."""
    pytest.importorskip("submitit")
    long = {"budget": 3000, "popsize": 6, "checkpoint-every": 1, "eval-every": 3000}
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, settings=long)
    folder = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "bbt_onnx.cli", "sweep", str(spec), "--out", str(folder),
                             "--executor", "slurm"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    logs = [folder / "logs" / f"pos-seed={seed}.log" for seed in (1, 2)]
    deadline = time.monotonic() + 60
    while not all(log.is_file() and ": new" in log.read_text() for log in logs) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the trials are tuning
    if whom == "group":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "", (out, err)
    assert "Traceback" not in err and "interrupted; continue with: bbt-onnx sweep --resume" in err, err

    def of_sweep(pid: str) -> bool:
        try:
            return str(folder) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            return False
    assert [pid for pid in os.listdir("/proc") if pid.isdigit() and of_sweep(pid)] == []
    assert "KeyboardInterrupt" in (folder / "slurm" / "local-controllers.log").read_text()


def test_each_trial_is_tracked_as_its_own_mlflow_run(tiny_model, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("submitit")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the trials' processes inherit it
    store = f"file:{tmp_path / 'mlruns'}"
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, settings={"track": "mlflow", "track-uri": store})
    result = invoke(["sweep", spec, "--out", tmp_path / "sweep", "--executor", "slurm"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    (sweep,) = [r for r in found if r.info.run_name == "sweep"]  # the sweep's own run, the trials nested under it
    trials = [r for r in found if r is not sweep]
    assert sorted(r.info.run_name for r in trials) == ["pos-seed=1", "pos-seed=2"]
    assert all(r.info.status == "FINISHED" and r.data.params["tune.budget"] == "48" for r in trials)
    assert all(r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id for r in trials)
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["finished"] == 2 and sweep.data.metrics["failed"] == 0
    assert sweep.data.params["grid.seed"] == "[1, 2]"
    plan = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert list(plan["tracking"].values()) == [sweep.info.run_id]
    shutil.rmtree(tmp_path / "sweep" / "runs" / "pos-seed=2")  # lost: a resumed sweep runs it again, in its own run
    again = invoke(["sweep", "--resume", tmp_path / "sweep", "--executor", "slurm"])
    assert again.exit_code == 0, again.output
    found = client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id])
    assert [r.info.run_id for r in found if r.info.run_name == "sweep"] == [sweep.info.run_id]
    assert sorted(r.info.run_name for r in found if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id) == \
        ["pos-seed=1", "pos-seed=2", "pos-seed=2"]
    assert client.get_run(sweep.info.run_id).info.status == "FINISHED"


def test_a_sweep_refused_before_its_first_trial_leaves_no_run_in_the_tracker(tiny_model, data_dir, tmp_path,
                                                                              monkeypatch):
    """An executor that fails before any trial begins: the folder is taken back, and so is the sweep's own run."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from bbt_onnx.cli import sweep_of
    from bbt_onnx.jobs.sweep import SweepOptions, read_spec, run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    spec = read_spec(write_spec(tmp_path / "spec.json", tiny_model, data_dir,
                                settings={"track": "mlflow", "track-uri": store}))
    planned = sweep_of(tmp_path / "sweep", spec, SweepOptions(), str(tmp_path))

    def refuses(_sweep, _done):
        raise RuntimeError("no workers")

    with pytest.raises(RuntimeError, match="no workers"):
        run_sweep(planned, refuses)
    assert not (tmp_path / "sweep").exists()
    client = MlflowClient(store)
    assert client.search_runs([client.get_experiment_by_name("bbt-onnx").experiment_id]) == []


@pytest.mark.parametrize("change, words", [
    ({"tasks": {}}, "names no tasks"),
    ({"grid": {"seed": 3}}, "grid.seed is not a non-empty list"),
    ({"grid": {"seed": [1, 1]}}, "names a value twice"),
    ({"settings": {"out": "x"}}, "out is the sweep's to set"),
    ({"settings": {"track": "wandb"}}, "trial pos-seed=1: Invalid value for '--track'"),
    ({"settings": {"budget": 0}}, "trial pos-seed=1: budget must be at least 1"),
    ({"settings": {"bugdet": 10}}, "trial pos-seed=1: bugdet is not a tune setting"),
    ({"settings": {"seeds": [1, 2]}}, "trial pos-seed=1: --seeds names every seed of the run; drop --seed"),
    ({"settings": {"chat": "yes"}}, "chat is a yes/no setting"),
    ({"grid": {"method": ["bbt", "sgd"]}}, "trial pos-method=sgd: Invalid value for '--method'"),
    ({"tasks": {"../x": {"task": "sst2"}}}, "task name '../x'"),
    ({"tasks": {"pos": {"task": "sst2", "data": "missing.csv"}}}, "missing.csv"),
    ({"model": "no-such-model"}, "no-such-model"),
    ({"grid": {"prompt-tokens": [4, 999]}}, "trial pos-prompt_tokens=999: prompt_tokens 999 is outside"),
    ({"grid": {"template": ["{text} no mask"]}}, "trial pos-template="),
    ({"extra": 1}, "unknown keys ['extra']"),
])
def test_a_bad_spec_is_one_error_line_before_any_trial_and_nothing_is_written(tiny_model, data_dir, tmp_path, change,
                                                                           words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {"model": str(tiny_model), "tasks": {"pos": {"task": "sst2", "data": str(data_dir / "pool.csv")}},
            "settings": dict(SMALL), "grid": {"seed": [1, 2]}, **change}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    message = cli_error(["sweep", tmp_path / "spec.json", "--out", tmp_path / "sweep"])
    assert words in message, message
    assert not (tmp_path / "sweep").exists()


def test_a_cluster_that_cannot_be_joined_is_one_line_and_leaves_nothing(tiny_model, data_dir, tmp_path):
    """In a process of its own, as a user runs it (this file's own cluster would be the one joined here)."""
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "bbt_onnx.cli", "sweep", str(spec), "--out", str(tmp_path / "s"),
                             "--address", "127.0.0.1:1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.splitlines()[-1].startswith("error: cannot join the Ray cluster at 127.0.0.1:1")
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


def test_an_address_beside_the_cluster_this_process_joined_is_refused(cluster, tiny_model, data_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir)
    message = cli_error(["sweep", spec, "--out", tmp_path / "sweep", "--address", "127.0.0.1:1"])
    assert "has joined a Ray cluster already" in message and "drop --address" in message
    assert not (tmp_path / "sweep").exists()


def test_a_dry_run_checks_and_lists_every_trial_and_writes_nothing(tiny_model, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, grid={"seed": [1, 2], "popsize": [4, 6]})
    result = invoke(["sweep", spec, "--out", tmp_path / "sweep", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)["trials"]
    assert [t["name"] for t in listed] == ["pos-seed=1-popsize=4", "pos-seed=1-popsize=6", "pos-seed=2-popsize=4",
                                           "pos-seed=2-popsize=6"]
    assert listed[3]["point"] == {"seed": 2, "popsize": 6} and listed[3]["task"] == "pos"
    assert not (tmp_path / "sweep").exists()
    bad = write_spec(tmp_path / "bad.json", tiny_model, data_dir, grid={"prompt-tokens": [4, 999]})
    assert "prompt_tokens 999 is outside" in cli_error(["sweep", bad, "--out", tmp_path / "sweep", "--dry-run"])


def test_sweep_flags_that_do_not_go_together(tmp_path):
    assert "--out is required" in cli_error(["sweep", tmp_path / "spec.json"])
    assert "drop SPEC and --out" in cli_error(["sweep", tmp_path / "spec.json", "--resume", tmp_path])
    assert "give a SPEC and --out, or --resume DIR" in cli_error(["sweep"])
    assert "not a sweep folder" in cli_error(["sweep", "--resume", tmp_path])
    message = cli_error(["sweep", "--resume", tmp_path, "--executor", "slurm", "--address", "auto"])
    assert "--address names a Ray cluster and goes with --executor ray" in message


def test_yaml_spec_with_flag_spellings(tiny_model, data_dir, tmp_path):
    pytest.importorskip("yaml")
    from bbt_onnx.jobs.sweep import read_spec

    (tmp_path / "spec.yaml").write_text(f"model: {tiny_model}\ntasks:\n  pos: {{task: sst2, k-shot: 8}}\n"
                                        "grid:\n  prompt-tokens: [4, 8]\n")
    spec = read_spec(tmp_path / "spec.yaml")
    assert [p.name for p in spec.trials()] == ["pos-prompt_tokens=4", "pos-prompt_tokens=8"]
    assert spec.trials()[1].options == {"task": "sst2", "k_shot": 8, "prompt_tokens": 8}
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert "is not valid YAML" in cli_error(["sweep", tmp_path / "bad.yaml", "--out", tmp_path / "o"])


def test_yaml_aliases_are_read_within_a_bound(tiny_model, tmp_path):
    """An alias repeats what its anchor names: shared settings work, and a 2 KB file that would expand to billions
    of values (or an anchor that holds itself) is one line at once, not a hang."""
    pytest.importorskip("yaml")
    from bbt_onnx.jobs.sweep import read_spec

    (tmp_path / "shared.yaml").write_text(f"model: {tiny_model}\ntasks:\n  pos: &common {{task: sst2, k-shot: 8}}\n"
                                          "  again: *common\n")
    assert [p.name for p in read_spec(tmp_path / "shared.yaml").trials()] == ["pos", "again"]
    levels = ["  l0: &l0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for i in range(1, 8):  # each level 45 copies of the one before: 9 x 45^7 values
        items = ", ".join("[" + ", ".join([f"*l{i - 1}"] * (j + 1)) + "]" for j in range(9))
        levels.append(f"  l{i}: &l{i} [{items}]")
    (tmp_path / "bomb.yaml").write_text(f"model: {tiny_model}\ntasks:\n  pos: {{task: sst2}}\ngrid:\n" +
                                        "\n".join(levels) + "\n")
    (tmp_path / "cycle.yaml").write_text(f"model: {tiny_model}\ntasks: &t\n  pos: {{task: sst2, data: *t}}\n")
    for name in ("bomb.yaml", "cycle.yaml"):  # in a process of its own: an expansion in C would not stop for a test
        done = subprocess.run([sys.executable, "-m", "bbt_onnx.cli", "sweep", str(tmp_path / name), "--out",
                               str(tmp_path / "o"), "--dry-run"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr
        assert "more than 100000 values once its YAML aliases are expanded" in done.stderr
        assert not (tmp_path / "o").exists()


def test_a_local_cluster_listens_on_loopback_only_and_leaves_nothing_behind(tiny_model, data_dir, tmp_path):
    """The command as a user runs it: its own cluster, on 127.0.0.1 only, with the user's Ray token passed through
    and never shown or written; after Ctrl-C no process it started is left and its temporary folder is gone."""
    settings = {"budget": 3000, "popsize": 6, "checkpoint-every": 1, "eval-every": 1500}
    spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir, grid={"seed": [1, 2]}, settings=settings)
    scratch = Path(tempfile.mkdtemp(prefix="bt", dir="/tmp"))  # short: Ray's socket paths have a limit
    token = "bbt-test-" + os.urandom(8).hex()
    env = {**os.environ, "TMPDIR": str(scratch), "RAY_AUTH_TOKEN": token, "HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "bbt_onnx.cli", "sweep", str(spec), "--out", str(tmp_path / "s")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    run = tmp_path / "s" / "runs" / "pos-seed=1"
    while not (run / "checkpoint.npz").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    started = processes_under(scratch)
    assert started and proc.poll() is None, ("the sweep's cluster runs under its temporary folder",
                                             proc.poll() and proc.communicate())
    listening = listening_addresses(started)
    assert listening and all(host == "127.0.0.1" for host, _ in listening), listening
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    stderr += stdout
    assert proc.returncode != 0 and "bbt-onnx sweep --resume" in stderr, stderr
    time.sleep(1)
    assert not processes_under(scratch)
    assert not [p.name for p in scratch.iterdir() if p.name != ".ses"]  # (.ses: onnxruntime's, written on import)
    shutil.rmtree(scratch)
    assert not (tmp_path / "home" / ".ray").exists()  # no token file written for the user
    written = [p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert token not in stderr and not any(token.encode() in b for b in written)


def test_a_sweep_joins_a_running_cluster_with_the_users_token(tiny_model, data_dir, tmp_path):
    """`--address` joins a cluster started apart (`ray start --head`, on loopback, token mode): the user's token
    reaches Ray through its own variable and is never shown or written by the sweep."""
    scratch = Path(tempfile.mkdtemp(prefix="bt", dir="/tmp"))
    token = "bbt-join-" + os.urandom(8).hex()
    port = free_port()
    env = {**os.environ, "RAY_AUTH_TOKEN": token, "HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={scratch}",
                        "--include-dashboard=false", "--disable-usage-stats"], env=head, check=True, timeout=120,
                       capture_output=True)
        spec = write_spec(tmp_path / "spec.json", tiny_model, data_dir)
        result = subprocess.run([sys.executable, "-m", "bbt_onnx.cli", "sweep", str(spec), "--out",
                                 str(tmp_path / "s"), "--address", f"127.0.0.1:{port}"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"on the Ray cluster at 127.0.0.1:{port}" in result.stderr
        assert json.loads(result.stdout)["finished"] == 2
        written = [p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()]
        assert token not in result.stderr + result.stdout and not any(token.encode() in b for b in written)
    finally:
        for pid in processes_under(scratch):  # `ray stop` would stop every cluster of this machine
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(scratch, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (Ray's processes name their session folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(folder) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def listening_addresses(pids: list[int]) -> list[tuple[str, int]]:
    """The TCP sockets `pids` listen on (from /proc: no tool needed), as (host, port)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                address, port = cols[1].split(":")
                found.append((host_of(address, width), int(port, 16)))
    return found


def host_of(hexaddr: str, width: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if width == 8:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
    v6 = b"".join(words)
    if v6 == bytes(15) + b"\x01":
        return "::1"
    if v6[:12] == bytes(10) + b"\xff\xff":
        return ".".join(str(b) for b in v6[12:])
    return v6.hex()
