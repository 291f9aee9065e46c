"""serve's life: ready only once its models are, riding over a tritonserver death, and leaving nothing behind
whatever stops it. A module of its own (with its own server), so that it runs beside test_serve.py."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx import PRESETS, Model
from bbt_onnx.engines import OrtSpec, Remote, TritonSpec
from bbt_onnx.errors import ServerError
from bbt_onnx.jobs.tune import tune
from bbt_onnx.synthetic import sentiment_examples
from conftest import PROMPT_TOKENS
from test_serve import (TOKEN, Server, alive, children, free_ports, ok, raw_infer, request, token_file,  # noqa: F401
                        torch_blocked)


@pytest.fixture(scope="module")
def server(tiny_model, token_file, tmp_path_factory):
    """The tiny RoBERTa served with torch unimportable; the last test of this module stops it with SIGTERM."""
    tmp = tmp_path_factory.mktemp("serve")
    srv = Server([tiny_model], token_file, tmp / "serve.log", env=torch_blocked(tmp))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def client_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client") / "tiny"
    ok(["client-dir", "--model", str(tiny_model), "--out", str(out)])
    return out


def test_a_tune_rides_over_a_tritonserver_death(server, client_dir, tiny_model, data_dir, tmp_path):
    """tritonserver killed mid-tune: serve starts it again, the gates answer 503 meanwhile, and the client waits:
    the run ends with the in-process z."""
    expected = tune(request(tiny_model, data_dir, tmp_path / "local", budget=300)).prompt.z
    done = {}
    runner = threading.Thread(target=lambda: done.update(z=tune(request(
        client_dir, data_dir, tmp_path / "remote", Remote(server.url("grpc"), TOKEN), budget=300)).prompt.z))
    runner.start()
    while not (tmp_path / "remote" / "log.jsonl").is_file() or not (tmp_path / "remote" / "log.jsonl").read_text():
        time.sleep(0.05)  # mid-run
    triton = [p for p in children(server.proc.pid) if "tritonserver" in proc_name(p)]
    assert len(triton) == 1
    os.kill(triton[0], signal.SIGKILL)
    runner.join(timeout=120)
    np.testing.assert_array_equal(done["z"], expected)
    assert "starting it again" in server.log.read_text() and "serving again" in server.log.read_text()
    assert "tritonserver exited (killed by SIGKILL); starting it again" in server.log.read_text()  # no start-up line


def test_a_death_is_told_by_its_signal_and_its_own_error_lines(tmp_path):
    """The cause a restart line gives: the signal, and the last E line or crash words this process wrote, not a
    warning that mentions an error, nor an earlier process's lines."""
    import subprocess
    import sys

    from bbt_onnx.serving.tritonserver import TritonProcess

    log = tmp_path / "tritonserver.log"
    log.write_text("E1207 09:00:00.000 1 server.cc:1] an earlier process's error\n")
    triton = TritonProcess(tmp_path, tmp_path, 1, 2, log_file=log)
    triton.log_start = log.stat().st_size
    with open(log, "a") as f:
        f.write("I1207 10:00:00.000 1 model.cc:1] loaded\nW1207 10:00:01.000 1 pb.cc:1] error_code is deprecated\n")
    assert triton.last_error() == ""
    with open(log, "a") as f:
        f.write("E1207 10:00:02.000 1 infer.cc:1] shape overflow\nW1207 10:00:02.500 1 x.cc:1] an error later\n"
                "terminate called after throwing an instance of 'std::length_error'\n")
    assert triton.last_error() == ": terminate called after throwing an instance of 'std::length_error'"
    triton.proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"])
    triton.proc.wait()
    assert triton.exit_cause() == "killed by SIGABRT"

def test_a_killed_model_backend_is_healed(server, client_dir, tiny_model):
    """kill -9 of a model's python-backend process (as the out-of-memory killer would): tritonserver stays up and
    ready but fails that model's requests, so serve starts it again; then the model answers as in process."""
    from bbt_onnx.serving.tritonserver import STUB

    triton = next(p for p in children(server.proc.pid) if "tritonserver" in proc_name(p))
    stubs = [p for p in children(triton) if STUB in proc_name(p)]
    assert stubs
    os.kill(stubs[0], signal.SIGKILL)
    def healed() -> bool:
        text = server.log.read_text()
        return "model backend died" in text and "serving again" in text.split("model backend died")[-1]

    deadline = time.monotonic() + 120
    while not healed() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"tritonserver's model backend died (pid {stubs[0]}); starting it again" in server.log.read_text()
    local = Model.load(tiny_model, OrtSpec(threads=1))
    remote = Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN)))
    prompts = np.random.default_rng(0).normal(0, 0.5, (2, PROMPT_TOKENS, 32)).astype(np.float32)
    rows = local.encoder(PRESETS["sst2"], PROMPT_TOKENS).encode(sentiment_examples(6, seed=1))
    np.testing.assert_array_equal(remote.engine.label_logits(prompts, rows), local.engine.label_logits(prompts, rows))


def test_the_grpc_gate_caps_calls_per_client_and_overall(server):
    """The gRPC gate admits calls within the HTTP gate's limits: overall and per client address."""
    import tritonclient.grpc as grpcclient

    from bbt_onnx.serving.gate import Admission, GrpcGate

    admission = Admission(total=3, per_client=2)
    assert admission.enter("a") and admission.enter("a") and not admission.enter("a")  # two from one address
    assert admission.enter("b") and not admission.enter("c")  # three in all
    admission.leave("a")
    assert admission.enter("c")
    port = free_ports(1)[0]
    gate = GrpcGate("127.0.0.1", port, server.grpc, 1 << 22, lambda: "serving", limits={"per_client": 0})
    gate.start()
    try:
        with pytest.raises(Exception, match="too many calls at once"):
            grpcclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_live()
    finally:
        gate.stop()


def proc_name(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

def test_a_starting_server_is_waited_for_and_named_not_ready(server, client_dir):
    """A gate that says the models are loading: live but not ready; the client waits, bounded, and then either
    connects or says "not ready", never "no such model"."""
    from bbt_onnx.serving.gate import GrpcGate, HttpGate
    from bbt_onnx.serving.server import State

    state = State()
    http, grpc = free_ports(2)
    gates = [HttpGate("127.0.0.1", http, server.http, 1 << 22, state),
             GrpcGate("127.0.0.1", grpc, server.grpc, 1 << 22, state)]
    for gate in gates:
        gate.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=5) as r:
            assert r.status == 200
        status, text = raw_infer(type("S", (), {"url": lambda self: f"http://127.0.0.1:{http}"})(), "tiny-roberta",
                                 b"{}")
        assert status == 503 and "starting" in text
        for protocol, port in (("http", http), ("grpc", grpc)):
            with pytest.raises(ServerError, match="not ready within 0.3 s"):
                Model.load(client_dir, TritonSpec(Remote(f"{protocol}://127.0.0.1:{port}", TOKEN, timeout=0.3,
                                                         backoff=0.05)))
            threading.Timer(0.5, lambda: setattr(state, "value", "serving")).start()
            t0 = time.monotonic()
            model = Model.load(client_dir, TritonSpec(Remote(f"{protocol}://127.0.0.1:{port}", TOKEN, timeout=30,
                                                             backoff=0.05)))
            assert time.monotonic() - t0 >= 0.45 and model.engine.model == "tiny-roberta"
            state.value = "starting"
    finally:
        for gate in gates:
            gate.stop()

def test_kill_9_of_serve_leaves_no_process_memory_or_folder(token_file, tiny_model, tmp_path):
    """serve owns its whole process group: killed outright, its watchdog still removes tritonserver, the backend
    stubs, their shared memory and the workspace."""
    srv = Server([tiny_model], token_file, tmp_path / "serve.log")
    kids = children(srv.proc.pid)
    line = next(l for l in srv.log.read_text().splitlines() if "workspace" in l)
    workspace = Path(line.rsplit("workspace ", 1)[1].strip())
    triton = next(proc_name(p) for p in kids if "tritonserver" in proc_name(p))
    # this server's own segments: other servers of the suite, started meanwhile by other workers, are not its own
    prefix = triton.split("shm-region-prefix-name=", 1)[1].split()[0]
    shm = set(Path("/dev/shm").glob(f"{prefix}*"))
    assert workspace.is_dir() and shm
    srv.proc.kill()
    srv.proc.wait(timeout=30)
    everything = kids | {p for p in all_pids() if "bbt-onnx watchdog" in proc_name(p) or str(workspace) in proc_name(p)}
    deadline = time.monotonic() + 30
    while any(alive(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in everything if alive(p)], [proc_name(p) for p in everything if alive(p)]
    assert not workspace.exists() and not set(Path("/dev/shm").glob(f"{prefix}*"))

def all_pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


# -- last: it stops the module's server ---------------------------------------------------------------------------
def test_sigterm_stops_tritonserver_and_removes_the_workspace(server):
    """The module's server, which ran every test above with torch, transformers and onnx unimportable."""
    kids = children(server.proc.pid)
    line = next(l for l in server.log.read_text().splitlines() if "workspace" in l)
    workspace = Path(line.rsplit("workspace ", 1)[1].strip())
    assert kids and workspace.is_dir()
    assert server.stop() == 0
    deadline = time.monotonic() + 30
    while any(alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in kids if alive(p)], "tritonserver or a backend process outlived the server"
    assert not workspace.exists()
    assert "SIGTERM: stopping" in server.log.read_text()
    assert server.proc.stdout.read() == b""  # tritonserver's log went to stderr
