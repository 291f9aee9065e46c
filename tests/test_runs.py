"""Run directories under stress: one tune at a time, nothing lost, damaged files named, write failures
as one line, and interruptions that tell the truth."""

from __future__ import annotations

import errno
import json
import os

import pytest

from bbt_onnx import TunedPrompt
from bbt_onnx.runs import RunDir

from helpers import cli_error, invoke
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
    cut = invoke(tune_args(tiny_model, data_dir, out, "-q"))
    assert cut.exit_code == 130 and "--resume" not in cut.stderr and "nothing to resume" in cut.stderr
    assert not out.exists()  # no stub to block the rerun
    monkeypatch.setattr(RunDir, "append_log", real)
    assert invoke(tune_args(tiny_model, data_dir, out, "-q")).exit_code == 0  # the same command, again


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
    log = [json.loads(line)["generation"] for line in (out / "log.jsonl").read_text().splitlines()]
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

    args = [str(a) for a in tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 800,
                                      "--checkpoint-every", 2, "-q")]
    proc = subprocess.Popen([sys.executable, "-m", "bbt_onnx.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "checkpoint.pkl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()  # still running: the kill lands mid-run
    assert "in use by another bbt-onnx tune" in cli_error(["tune", "--resume", tmp_path / "run"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()

    resumed = invoke(["tune", "--resume", tmp_path / "run", "-q"])
    assert resumed.exit_code == 0, resumed.output
    whole = invoke(tune_args(tiny_model, data_dir, tmp_path / "whole", "--budget", 800, "--checkpoint-every", 2,
                             "-q"))
    assert whole.exit_code == 0, whole.output
    assert TunedPrompt.load(tmp_path / "run").z.tobytes() == TunedPrompt.load(tmp_path / "whole").z.tobytes()
