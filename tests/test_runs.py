"""Run directories under stress: one tune at a time, nothing lost, damaged files named, write failures
as one line, and interruptions that tell the truth."""

from __future__ import annotations

import errno
import shutil
import json
import os

import pytest

from bbt_onnx import TunedPrompt
from bbt_onnx.runs import RunDir

from helpers import cli_error, generations, invoke
from test_tune import tune_args


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_tune_on_a_busy_run_directory_is_refused(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "-q")).exit_code == 0
    before = snapshot(out)
    with RunDir(out).claim():  # what a running tune holds
        for extra in ((), ("--force",)):
            assert "in use by another bbt-onnx tune" in cli_error(tune_args(tiny_model, data_dir, out, *extra))
        assert "in use by another bbt-onnx tune" in cli_error(["tune", "--resume", out])
    assert snapshot(out) == before
    assert invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "--force", "-q")).exit_code == 0  # free again


def test_interrupt_before_the_first_checkpoint_leaves_nothing_and_says_so(tiny_model, data_dir, tmp_path,
                                                                        monkeypatch):
    real = RunDir.append_log

    def interrupt(self, row):
        real(self, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_log", interrupt)
    out = tmp_path / "run"
    cut = invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "-q"))
    assert cut.exit_code == 130 and "--resume" not in cut.stderr and "nothing to resume" in cut.stderr
    assert not out.exists()  # no stub to block the rerun
    monkeypatch.setattr(RunDir, "append_log", real)
    assert invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "-q")).exit_code == 0  # the same command


def test_a_full_disk_mid_run_is_one_line_and_leaves_no_stub(tiny_model, data_dir, tmp_path, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("bbt_onnx.runs.open", full, raising=False)  # the log's appends
    out = tmp_path / "run"
    line = cli_error(tune_args(tiny_model, data_dir, out, "-q"))
    assert "No space left on device" in line and str(out) in line
    assert not out.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_atomic_writes_that_fail_leave_no_file_and_no_temp(tiny_model, data_dir, tmp_path, monkeypatch, code):
    run = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, run, "--budget", 20, "-q")).exit_code == 0
    target = tmp_path / "out" / "labels.jsonl"
    target.parent.mkdir()

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("bbt_onnx.fileio.os.fsync", refuse)
    line = cli_error(["predict", "--model", tiny_model, "--prompt", run, "--input", data_dir / "test.csv",
                      "--output", target, "-q"])
    assert os.strerror(code) in line and str(target) in line
    assert list(target.parent.iterdir()) == []


def test_resume_drops_a_log_line_cut_short_and_ends_like_an_uninterrupted_run(tiny_model, data_dir, tmp_path,
                                                                                 monkeypatch):
    whole = tmp_path / "whole"
    assert invoke(tune_args(tiny_model, data_dir, whole, "-q")).exit_code == 0
    real = RunDir.append_log

    def crash(self, row):
        real(self, row)
        if row["generation"] == 10:
            with open(self.path / "log.jsonl", "a") as f:
                f.write('{"generation": 11, "calls": 1')  # what a crash mid-write leaves
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_log", crash)
    out = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, out, "-q")).exit_code == 130
    monkeypatch.setattr(RunDir, "append_log", real)
    resumed = invoke(["tune", "--resume", out, "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert TunedPrompt.load(out).z.tobytes() == TunedPrompt.load(whole).z.tobytes()
    log = [row["generation"] for row in generations(out)]
    assert log == list(range(1, 21))


def test_a_log_damaged_before_its_last_line_is_named(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, out, "-q")).exit_code == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "running"}))
    lines = (out / "log.jsonl").read_text().splitlines()
    lines[3] = lines[3][:20]
    (out / "log.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(out)
    assert "log.jsonl line 4 is damaged" in cli_error(["tune", "--resume", out])
    assert snapshot(out) == before


def test_bad_settings_with_force_keep_the_earlier_run(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "-q")).exit_code == 0
    before = snapshot(out)
    for flag, value in (("--prompt-tokens", 0), ("--sigma", "nan"), ("--alpha", "inf"), ("--seed", -1),
                        ("--max-length", 4), ("--k-shot", 0)):
        cli_error(tune_args(tiny_model, data_dir, out, "--force", flag, value))
        assert snapshot(out) == before, flag


def test_kill_9_mid_tune_frees_the_directory_and_resumes_bit_identically(tiny_model, data_dir, tmp_path):
    """A real process killed without warning: the kernel drops its lock, and --resume ends where an
    uninterrupted run ends, bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    args = [str(a) for a in tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 400,
                                      "--checkpoint-every", 2, "-q")]
    proc = subprocess.Popen([sys.executable, "-m", "bbt_onnx.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()  # still running: the kill lands mid-run
    assert "in use by another bbt-onnx tune" in cli_error(["tune", "--resume", tmp_path / "run"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()

    resumed = invoke(["tune", "--resume", tmp_path / "run", "-q"])
    assert resumed.exit_code == 0, resumed.output
    whole = invoke(tune_args(tiny_model, data_dir, tmp_path / "whole", "--budget", 400, "--checkpoint-every", 2,
                             "-q"))
    assert whole.exit_code == 0, whole.output
    assert TunedPrompt.load(tmp_path / "run").z.tobytes() == TunedPrompt.load(tmp_path / "whole").z.tobytes()


def _kill_when(proc, ready, timeout=60):
    """SIGKILL `proc` as soon as `ready()` holds (it must still be running then)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()  # still running: the kill lands mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def _spawn(args, cwd):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "bbt_onnx.cli", *[str(a) for a in args]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)


def _logged(run):
    return lambda: (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count("\n") >= 1


def test_kill_9_before_the_first_checkpoint_leaves_a_stub_the_same_command_clears(tiny_model, data_dir, tmp_path):
    """run.json ("running") and log.jsonl, no checkpoint, no tune holding it: nothing to resume, and the same
    command starts the run again instead of asking for --force."""
    run = tmp_path / "run"
    args = tune_args(tiny_model, data_dir, run, "--budget", 400, "--checkpoint-every", 1000, "-q")
    _kill_when(_spawn(args, tmp_path), _logged(run))
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "checkpoint.npz").exists()
    before = snapshot(run)
    assert "nothing to resume" in cli_error(["tune", "--resume", run])
    assert snapshot(run) == before  # refused: nothing touched
    assert invoke(args).exit_code == 0  # the same command, no --force
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_kill_9_of_a_forced_run_keeps_the_earlier_run(tiny_model, data_dir, tmp_path):
    """--force moves the earlier run aside until the new one has a checkpoint: killed before that, the earlier
    run is still the directory's run (evaluate scores it), a tune without --force is refused over it, and the
    next tune puts it back before anything else."""
    run = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, run, "-q")).exit_code == 0
    earlier = snapshot(run)
    evaluate = ["evaluate", "--model", tiny_model, "--prompt", run, "--data", data_dir / "test.csv", "-q"]
    scored = invoke(evaluate).stdout
    args = tune_args(tiny_model, data_dir, run, "--budget", 800, "--checkpoint-every", 1000, "--seed", 7, "--force",
                     "-q")
    _kill_when(_spawn(args, tmp_path), lambda: (run / ".replaced").is_dir() and _logged(run)())
    assert invoke(evaluate).stdout == scored  # still the earlier run's prompt
    assert "already holds files" in cli_error(tune_args(tiny_model, data_dir, run))
    assert "is a finished run" in cli_error(["tune", "--resume", run])  # the earlier run, not the killed one
    with RunDir(run).claim():  # what the next tune does first
        pass
    assert snapshot(run) == earlier and not (run / ".replaced").exists()


def test_a_replacement_cut_short_at_any_point_keeps_the_earlier_run(tiny_model, data_dir, tmp_path):
    """Each state a kill can leave while --force moves an earlier run aside: the earlier run is what the checks
    see, and what the next tune restores."""
    from bbt_onnx.runs import MOVING, REPLACED

    base = tmp_path / "base"
    assert invoke(tune_args(tiny_model, data_dir, base, "--checkpoint-every", 1, "-q")).exit_code == 0
    earlier = snapshot(base)
    names = sorted(earlier)

    def state(name, moved, new_files=False, aside=MOVING):
        run = tmp_path / name
        shutil.copytree(base, run)
        (run / aside).mkdir()
        for n in moved:
            os.rename(run / n, run / aside / n)
        if new_files:
            (run / "run.json").write_text(json.dumps({"status": "running", "settings": {}}))
            (run / "log.jsonl").write_text('{"generation": 1}\n')
            (run / ".checkpoint.npz.tmp123").write_text("a write cut short")
        return run

    runs = [state("moving-none", []), state("moving-some", ["run.json", "checkpoint.npz"]),
            state("moved-all", names, aside=REPLACED), state("new-started", names, True, REPLACED)]
    for run in runs:
        view = RunDir(run).view()
        assert sorted(view.files) == names and not view.stub and not view.foreign, run.name
        assert "already holds files" in cli_error(tune_args(tiny_model, data_dir, run)), run.name
        assert TunedPrompt.load(run).z.tobytes() == TunedPrompt.load(base).z.tobytes()
        with RunDir(run).claim():
            pass
        assert snapshot(run) == earlier and not (run / MOVING).exists() and not (run / REPLACED).exists(), run.name


def test_an_old_pickle_checkpoint_resumes_only_when_trusted(tiny_model, data_dir, tmp_path, monkeypatch):
    """checkpoint.pkl from before checkpoint.npz: refused without --trust-checkpoint (unpickling can run code),
    resumed bit for bit with it, and replaced by checkpoint.npz at the next checkpoint."""
    import pickle

    from bbt_onnx import BlackBoxTuner, Model, TuneConfig
    from bbt_onnx.tasks import PRESETS

    whole = tmp_path / "whole"
    assert invoke(tune_args(tiny_model, data_dir, whole, "--budget", 120, "-q")).exit_code == 0
    real = RunDir.append_log

    def interrupt(self, row):
        real(self, row)
        if row["generation"] == 9:  # the last checkpoint was at 8
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_log", interrupt)
    run = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, run, "--budget", 120, "-q")).exit_code == 130
    monkeypatch.setattr(RunDir, "append_log", real)
    settings = json.loads((run / "run.json").read_text())["settings"]
    tuner = BlackBoxTuner(Model.load(tiny_model), PRESETS["sst2"], TuneConfig(**settings["tune"]))
    state = tuner.load_state((run / "checkpoint.npz").read_bytes())
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(state))  # what bbt-onnx wrote before
    (run / "checkpoint.npz").unlink()
    before = snapshot(run)
    assert "--trust-checkpoint" in cli_error(["tune", "--resume", run])
    assert snapshot(run) == before
    resumed = invoke(["tune", "--resume", run, "--trust-checkpoint", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert TunedPrompt.load(run).z.tobytes() == TunedPrompt.load(whole).z.tobytes()
    assert (run / "checkpoint.npz").is_file() and not (run / "checkpoint.pkl").exists()


def test_a_stub_is_cleared_when_a_tune_claims_the_directory(tmp_path):
    """run.json "running" with no checkpoint and nobody holding it: a stub. The checks see an empty directory and
    leave it as it is; the claim clears it (with temporaries of writes cut short), and keeps what is not ours."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running", "settings": {}}))
    (run / "log.jsonl").write_text('{"generation": 1}\n')
    (run / ".checkpoint.npz.x1y2z3").write_bytes(b"half a checkpoint")
    (run / "notes.txt").write_text("mine")
    view = RunDir(run).view()
    assert view.stub and view.run == {} and view.foreign == ["notes.txt"]
    before = snapshot(run)
    RunDir.check_new(run, force=True)  # a stub among files that are not a run's: --force is enough
    assert snapshot(run) == before
    with RunDir(run).claim():
        assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_nothing_a_command_did_not_write_is_replaced(tiny_model, data_dir, tmp_path):
    """force_any writes a run beside the user's files, never over files that merely share a run's names; a task
    file is never among the run files a tune replaces; predict never writes into the run of the prompt it reads."""
    mine = tmp_path / "mine"
    mine.mkdir()
    own = {"log.jsonl": b"my notes\n", "loss.png": b"my plot", "notes.txt": b"kept"}
    for name, data in own.items():
        (mine / name).write_bytes(data)
    error = cli_error(tune_args(tiny_model, data_dir, mine, "--force-any", "--budget", 20))
    assert "log.jsonl, loss.png but no run" in error and "--out" in error
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == own

    out = tmp_path / "run"
    out.mkdir()
    task = out / "run.json"  # a task file where the run writes its record
    task.write_text(json.dumps({"template": " . {text} . It was {mask} .", "labels": {"0": "bad", "1": "great"}}))
    args = [a for a in tune_args(tiny_model, data_dir, out, "--force", "--budget", 20) if a not in ("--task", "sst2")]
    assert "which the run reads" in cli_error([*args, "--task-file", task])
    assert json.loads(task.read_text())["labels"] == {"0": "bad", "1": "great"}

    run = tmp_path / "done"
    assert invoke(tune_args(tiny_model, data_dir, run, "--budget", 20, "-q")).exit_code == 0
    record = (run / "run.json").read_bytes()
    (tmp_path / "texts.txt").write_text("a gripping film\n")
    error = cli_error(["predict", "--model", tiny_model, "--prompt", run / "prompt.npz", "--input",
                       tmp_path / "texts.txt", "--output", run / "run.json"])
    assert "lies inside the run" in error and (run / "run.json").read_bytes() == record
