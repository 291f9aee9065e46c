"""Every read is bounded: run.json, log.jsonl, task, token, manifest and npz files that are FIFOs, devices (a link
to /dev/zero), too large, or zip bombs are refused with one line before anything is read whole; a thousand seeds
and a template past any model's positions are refused before any row is tokenized."""

from __future__ import annotations

import io
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx.engines.served import read_token
from bbt_onnx.errors import SettingsError
from bbt_onnx.fileio import check_npz, read_bounded

from helpers import cli_error, invoke
from test_tune import tune_args

WATCHDOG = 30  # seconds: a read that hangs fails the test instead of the suite


def refused(args) -> str:
    """cli_error, on a thread: a command that reads without bound would hang or fill memory."""
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("error", cli_error(args)), daemon=True)
    worker.start()
    worker.join(WATCHDOG)
    assert not worker.is_alive(), f"{args[0]} did not answer within {WATCHDOG} s: an unbounded read"
    return out["error"]


def bomb(npz: bytes) -> bytes:
    """The same zip, its first member's header saying it inflates to 2 GiB (what a zip bomb's headers say)."""
    data = bytearray(npz)
    entry = data.index(b"PK\x01\x02")  # the central directory's first entry; its uncompressed size is at +24
    struct.pack_into("<I", data, entry + 24, 0x7FFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def run(tiny_model, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bounded") / "run"
    result = invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "--checkpoint-every", 1, "-q"))
    assert result.exit_code == 0, result.output
    return out


def interrupted(run: Path, where: Path) -> Path:
    """A copy of the run that a resume would continue."""
    copy = shutil.copytree(run, where)
    text = (copy / "run.json").read_text().replace('"status": "complete"', '"status": "running"')
    (copy / "run.json").write_text(text)
    return copy


def test_a_fifo_a_device_and_a_large_file_are_refused_before_they_are_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    for path, why in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                      (big, "more than the 1,024")):
        with pytest.raises(OSError, match=why):
            read_bounded(path, 1024)
    assert read_bounded(big, 4096) == b"x" * 2048
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(4))
    assert check_npz(buf.getvalue()) == buf.getvalue()
    with pytest.raises(OSError, match="inflate to 2,147,483,647 bytes"):
        check_npz(bomb(buf.getvalue()))
    with pytest.raises(SettingsError, match="token file /dev/zero: not a regular file"):
        read_token("/dev/zero")


def test_a_runs_files_that_are_devices_fifos_or_zip_bombs_are_one_line(run, tiny_model, data_dir, tmp_path):
    zero = interrupted(run, tmp_path / "zero")  # run.json a link to /dev/zero
    (zero / "run.json").unlink()
    (zero / "run.json").symlink_to("/dev/zero")
    assert "not a regular file" in refused(["tune", "--resume", zero])
    assert "not a regular file" in refused(["report", zero])
    assert "not a regular file" in refused(["report", "/dev/zero"])
    fifo = interrupted(run, tmp_path / "fifo")
    (fifo / "run.json").unlink()
    os.mkfifo(fifo / "run.json")
    assert "not a regular file" in refused(["report", fifo])
    log = interrupted(run, tmp_path / "log")  # log.jsonl a link to /dev/zero
    (log / "log.jsonl").unlink()
    (log / "log.jsonl").symlink_to("/dev/zero")
    assert "not a regular file" in refused(["tune", "--resume", log])
    checkpoint = interrupted(run, tmp_path / "ckpt")
    (checkpoint / "checkpoint.npz").write_bytes(bomb((checkpoint / "checkpoint.npz").read_bytes()))
    assert "inflate to 2,14" in refused(["tune", "--resume", checkpoint])
    prompt = shutil.copytree(run, tmp_path / "prompt")
    (prompt / "prompt.npz").write_bytes(bomb((prompt / "prompt.npz").read_bytes()))
    assert "inflate to" in refused(["evaluate", "--model", tiny_model, "--prompt", prompt, "--data",
                                    data_dir / "test.csv"])
    assert "not a regular file" in refused([*tune_args(tiny_model, data_dir, tmp_path / "t")[:3], "--task-file",
                                            "/dev/zero", *tune_args(tiny_model, data_dir, tmp_path / "t")[5:]])


def test_a_thousand_seeds_and_a_template_past_every_model_are_refused_at_once(tiny_model, data_dir, tmp_path):
    seeds = ",".join(str(s) for s in range(1000))
    assert "--seeds names 1000 seeds; a run takes at most 64" in refused(
        tune_args(tiny_model, data_dir, tmp_path / "seeds", "--seeds", seeds))
    args = [a for a in tune_args(tiny_model, data_dir, tmp_path / "template") if a not in ("--task", "sst2")]
    error = refused([*args, "--template", " word" * 32_000 + " {text} It was {mask} .", "--labels", "0=bad,1=great"])
    assert "--template holds 160,023 characters, more than the 100,000" in error
