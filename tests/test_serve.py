"""LMaaS for real: a Triton server (`bbt-onnx serve`, PyTriton) on loopback, and tuning through its API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx import Model, TuneConfig
from bbt_onnx.data import DataSpec
from bbt_onnx.engines import OrtSpec, Remote, TritonEngine, TritonSpec
from bbt_onnx.errors import ServerError
from bbt_onnx.tasks import resolve_task
from bbt_onnx.workflow import TuneRequest, tune
from conftest import LAYERS, PROMPT_TOKENS, without_graphs
from helpers import cli_error, invoke

pytestmark = pytest.mark.xdist_group("serve")  # one worker runs this module: one shared server, stopped last

TOKEN = "test-token-1234"
MAX_REQUEST = 60_000  # C x N x T; the tunes below stay under it


def ok(args) -> str:
    result = invoke(args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """`bbt-onnx serve` in a child process on free loopback ports, with a token, serving one or more models."""

    def __init__(self, models: list[Path], token_file: Path, log: Path, env=None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.token_file = token_file
        self.log = log
        cmd = [sys.executable, "-m", "bbt_onnx.cli", "serve", *(a for m in models for a in ("--model", str(m))),
               "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--token-file", str(token_file),
               "--max-request", str(MAX_REQUEST), "--threads", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), env=env)
        deadline = time.monotonic() + 120
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def ready(self) -> bool:
        try:  # health is open without the token
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=1) as r:
                return r.status == 200 and "serving" in self.log.read_text()
        except OSError:
            return False

    def url(self, protocol: str = "http") -> str:
        return f"{protocol}://127.0.0.1:{self.http if protocol == 'http' else self.grpc}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def args(self, protocol: str = "http") -> list[str]:
        return ["--server", self.url(protocol), "--token-file", str(self.token_file)]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    return path


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx", "bbt_onnx_export"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def torch_blocked(tmp: Path) -> dict:
    """An environment in which torch, transformers and onnx cannot be imported (a sitecustomize that refuses)."""
    (tmp / "sitecustomize.py").write_text(BLOCK_TORCH)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def served(tiny_model, exports, tmp_path_factory) -> dict[str, Path]:
    """What the one server serves: the tiny RoBERTa (NAME and NAME.deep), and BERT and Qwen2 without their deep
    graphs (each served model is one more backend process to start)."""
    def plain(arch):
        return without_graphs(exports.get(arch).model, tmp_path_factory.mktemp(arch) / "model",
                              lambda key: not key.startswith("deep"))

    return {"roberta": tiny_model, "bert": plain("BertForMaskedLM"), "qwen2": plain("Qwen2ForCausalLM")}


@pytest.fixture(scope="module")
def server(served, token_file, tmp_path_factory):
    """One server for every model of `served`, with torch unimportable in the server and its backend. The last test
    of this module stops it with SIGTERM and checks what is left."""
    tmp = tmp_path_factory.mktemp("serve")
    srv = Server(list(served.values()), token_file, tmp / "serve.log", env=torch_blocked(tmp))
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def client_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client") / "tiny"
    ok(["client-dir", "--model", str(tiny_model), "--out", str(out)])
    return out


def tune_args(model, data_dir, out, *extra):
    return ["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir / "pool.csv"), "--k-shot", "8",
            "--prompt-tokens", str(PROMPT_TOKENS), "--intrinsic-dim", "20", "--popsize", "6", "--budget", "60",
            "--eval-every", "30", "--seed", "3", "--out", str(out), "-q", *extra,
            *([] if "--server" in extra else ["--threads", "1"])]


def z_of(run: Path) -> np.ndarray:
    with np.load(run / "prompt.npz") as f:
        return f["z"]


def test_the_client_directory_holds_the_manifest_and_tokenizer_only(client_dir, tiny_model):
    assert sorted(p.name for p in client_dir.iterdir()) == ["manifest.json", "tokenizer.json"]
    assert (client_dir / "manifest.json").read_bytes() == (tiny_model / "manifest.json").read_bytes()
    assert "client directory" in cli_error(["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2",
                                            "--data", str(tiny_model / "manifest.json")])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_tune_through_the_server_ends_with_the_in_process_z(server, client_dir, tiny_model, data_dir, tmp_path,
                                                              protocol):
    local = json.loads(ok(tune_args(tiny_model, data_dir, tmp_path / "local")))
    remote = json.loads(ok(tune_args(client_dir, data_dir, tmp_path / "remote", *server.args(protocol))))
    np.testing.assert_array_equal(z_of(tmp_path / "remote"), z_of(tmp_path / "local"))
    assert remote["api_calls"] == local["api_calls"] == 60
    assert remote["train_loss_final"] == local["train_loss_final"]
    settings = json.loads((tmp_path / "remote" / "run.json").read_text())["settings"]
    assert settings["model"]["server"] == server.url(protocol) and TOKEN not in (tmp_path / "remote" / "run.json").read_text()


def test_evaluate_and_predict_through_the_server_match_in_process(server, client_dir, tiny_model, data_dir, tmp_path):
    ok(tune_args(tiny_model, data_dir, tmp_path / "run"))
    args = ["evaluate", "--prompt", str(tmp_path / "run"), "--data", str(data_dir / "test.csv"), "-q"]
    local = json.loads(ok([*args, "--model", str(tiny_model)]))
    remote = json.loads(ok([*args, "--model", str(client_dir), *server.args("grpc")]))
    assert remote["ce_loss"] == local["ce_loss"] and remote["accuracy"] == local["accuracy"]
    assert remote["provider"].startswith("Triton")
    texts = tmp_path / "in.txt"
    texts.write_text("a fine film\nawful and dull\n")
    args = ["predict", "--prompt", str(tmp_path / "run"), "--input", str(texts), "-q"]
    assert ok([*args, "--model", str(client_dir), *server.args()]) == ok([*args, "--model", str(tiny_model)])


def test_requests_without_the_right_token_are_refused(server, client_dir, data_dir, tmp_path):
    args = ["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2", "--data",
            str(data_dir / "test.csv"), "-q"]
    for protocol in ("http", "grpc"):
        assert "refused the request: pass --token-file" in cli_error([*args, "--server", server.url(protocol)])
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token")
        assert "the token in --token-file is not the server's" in cli_error(
            [*args, "--server", server.url(protocol), "--token-file", str(wrong)])
    with urllib.request.urlopen(f"{server.url()}/v2/health/live", timeout=5) as r:  # health stays open
        assert r.status == 200


def test_a_server_that_is_down_is_one_line(client_dir, data_dir, token_file):
    (port,) = free_ports(1)
    message = cli_error(["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2", "--data",
                         str(data_dir / "test.csv"), "--server", f"http://127.0.0.1:{port}", "--token-file",
                         str(token_file)])
    assert "is down or unreachable" in message
    with pytest.raises(ServerError, match="is down or unreachable"):  # gRPC too, retried as quickly as it may be
        Model.load(client_dir, TritonSpec(Remote(f"grpc://127.0.0.1:{port}", TOKEN, backoff=0.01)))


def test_a_server_that_never_answers_times_out_after_the_retries(client_dir, data_dir):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        message = cli_error(["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2", "--data",
                             str(data_dir / "test.csv"), "--server", url, "--server-timeout", "0.5"])
        assert "did not answer within 0.5 s (4 tries)" in message
        assert time.monotonic() - t0 < 30
    assert "--server-timeout goes with --server" in cli_error(
        ["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2", "--data", str(data_dir / "test.csv"),
         "--server-timeout", "5"])


def edited_client(client_dir: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    manifest = json.loads((client_dir / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "tokenizer.json").write_bytes((client_dir / "tokenizer.json").read_bytes())
    return out


def test_another_model_is_refused_by_name_or_by_fingerprint(server, client_dir, data_dir, tmp_path):
    args = ["--no-prompt", "--task", "sst2", "--data", str(data_dir / "test.csv"), *server.args()]
    unknown = edited_client(client_dir, tmp_path / "a", source="some/other-model")
    assert "serves no model named 'other-model'" in cli_error(["evaluate", "--model", str(unknown), *args])
    changed = edited_client(client_dir, tmp_path / "b", embedding_mean=0.123)
    assert "is not the model in" in cli_error(["evaluate", "--model", str(changed), *args])


def test_a_request_over_the_servers_limit_is_refused(server, client_dir, data_dir, tmp_path, tiny_model):
    # 2000 prompts x (16 rows in at most 4 buckets) x 10+ tokens is over 60,000: the client refuses before sending
    message = cli_error(tune_args(client_dir, data_dir, tmp_path / "big", *server.args()) + ["--popsize", "2000",
                                                                                            "--budget", "4000"])
    assert "over the server's limit of 60000" in message
    assert not (tmp_path / "big").exists()
    # and the server enforces it for a client that does not look
    model = Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN)))
    assert model.engine.max_request == MAX_REQUEST and model.engine.max_buckets == 4  # the CPU server's
    feeds = {"input_ids": np.ones((100, 40), np.int64), "attention_mask": np.ones((100, 40), np.int64),
             "mask_pos": np.ones(100, np.int64), "label_ids": np.array([5, 6], np.int64),
             "prompt_embeds": np.zeros((20, PROMPT_TOKENS, model.manifest.hidden_size), np.float32)}
    client, send = model.engine.client, model.engine.client.infer
    client.infer = lambda *a, **k: pytest.fail("a request over the limit was sent")
    with pytest.raises(ServerError, match="20 prompts x 100 rows x 40 tokens = 80000 is over the server's limit"):
        model.engine.infer(feeds)
    client.infer, model.engine.max_request = send, None
    with pytest.raises(ServerError, match="over the server's limit of 60000"):
        model.engine.infer(feeds)


def test_in_process_flags_and_a_lone_token_file_are_refused(server, client_dir, data_dir, token_file, tmp_path):
    assert "--precision choose the in-process engine" in cli_error(
        tune_args(client_dir, data_dir, tmp_path / "p", *server.args(), "--precision", "fp16"))
    assert "--token-file goes with --server" in cli_error(
        ["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2", "--data",
         str(data_dir / "test.csv"), "--token-file", str(token_file)])


def request(model_dir, data_dir, out, remote=None) -> TuneRequest:
    config = TuneConfig(prompt_tokens=PROMPT_TOKENS, intrinsic_dim=20, popsize=6, budget=48, eval_every=24, seed=5)
    return TuneRequest(str(model_dir), resolve_task("sst2"), DataSpec(str(data_dir / "pool.csv"), k_shot=8, seed=5),
                       config, str(out), OrtSpec(threads=1) if remote is None else TritonSpec(remote))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_refusals_are_not_retried(server, client_dir, protocol):
    """A refused token, an unknown model and a request over the limit are answers, not failures: one request
    each, no retry."""
    from dataclasses import replace

    engine = Model.load(client_dir, TritonSpec(Remote(server.url(protocol), TOKEN))).engine
    real, sent = engine.client.infer, []

    def counting(*args, **kwargs):
        sent.append(args[0])
        return real(*args, **kwargs)

    engine.client.infer = counting
    small = {"input_ids": np.ones((2, 12), np.int64), "attention_mask": np.ones((2, 12), np.int64),
             "mask_pos": np.ones(2, np.int64), "label_ids": np.array([5, 6], np.int64),
             "prompt_embeds": np.zeros((1, PROMPT_TOKENS, engine.manifest.hidden_size), np.float32)}
    big = {**small, "input_ids": np.ones((100, 40), np.int64), "attention_mask": np.ones((100, 40), np.int64),
           "mask_pos": np.ones(100, np.int64),
           "prompt_embeds": np.zeros((20, PROMPT_TOKENS, engine.manifest.hidden_size), np.float32)}
    served, engine.max_request = engine.model, None  # the client does not look: the server refuses
    with pytest.raises(ServerError, match="over the server's limit"):
        engine.infer(big)
    engine.model = "no-such-model"
    with pytest.raises(ServerError, match="serves no model named 'no-such-model'"):
        engine.infer(small)
    engine.model, engine.remote = served, replace(engine.remote, token="wrong")
    engine.wire = engine.remote.wire()
    with pytest.raises(ServerError, match="not the server's"):
        engine.infer(small)
    assert len(sent) == 3 and engine.retried == 0 and sent[-1] == served


def test_eight_concurrent_tuners_each_end_with_their_in_process_z(server, client_dir, tiny_model, data_dir, tmp_path):
    expected = tune(request(tiny_model, data_dir, tmp_path / "local")).prompt.z
    results, errors = {}, []

    def one(i: int) -> None:
        try:
            protocol = "grpc" if i % 2 else "http"
            results[i] = tune(request(client_dir, data_dir, tmp_path / f"r{i}",
                                      Remote(server.url(protocol), TOKEN))).prompt.z
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and len(results) == 8
    for z in results.values():
        np.testing.assert_array_equal(z, expected)


def test_retries_after_transient_failures_change_nothing(server, client_dir, tiny_model, data_dir, tmp_path,
                                                         monkeypatch):
    """Every third request first fails as a dropped connection would: the run retries it, counts it once, and
    ends where the in-process run does."""
    expected = tune(request(tiny_model, data_dir, tmp_path / "local")).prompt.z
    engine = TritonEngine(Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN))).manifest,
                          Remote(server.url(), TOKEN, backoff=0.01))
    real, sent = engine.client.infer, []

    def flaky(*args, **kwargs):
        sent.append(1)
        if len(sent) % 3 == 0:  # its retry is the next request, which goes through
            raise ConnectionResetError("connection reset by peer")
        return real(*args, **kwargs)

    engine.client.infer = flaky
    model = Model(engine.manifest, Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN))).tokenizer, engine)
    monkeypatch.setattr("bbt_onnx.workflow.Model.load", lambda *a, **k: model)
    outcome = tune(request(client_dir, data_dir, tmp_path / "flaky", Remote(server.url(), TOKEN)))
    np.testing.assert_array_equal(outcome.prompt.z, expected)
    assert engine.retried > 0 and outcome.metrics["api_calls"] == 48
    assert engine.calls == len(sent) - engine.retried


def test_serve_checks_its_options_before_starting(tiny_model, tmp_path):
    assert "reachable from other machines: pass --token-file" in cli_error(
        ["serve", "--model", str(tiny_model), "--host", "0.0.0.0"])
    assert "must differ" in cli_error(["serve", "--model", str(tiny_model), "--http-port", "9000", "--grpc-port",
                                       "9000"])
    assert "--max-request must be a positive" in cli_error(["serve", "--model", str(tiny_model), "--max-request", "0"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port} (--grpc-port)" in cli_error(
            ["serve", "--model", str(tiny_model), "--grpc-port", port])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in cli_error(["serve", "--model", str(tiny_model), "--token-file", str(empty)])
    assert "is not http://HOST:PORT" in cli_error(["evaluate", "--model", str(tiny_model), "--no-prompt", "--task",
                                                   "sst2", "--data", "x.csv", "--server", "ftp://host:1"])


def children(pid: int) -> set[int]:
    """Every descendant of `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_check_compares_a_served_engine_with_cpu_fp32(server, tiny_model, token_file):
    result = invoke(["check", "--model", str(tiny_model), "--task", "sst2", "--engines", f"cpu:fp32,{server.url('grpc')}",
                     "--token-file", str(token_file), "--json"])
    assert result.exit_code == 0, result.output
    served = next(r for r in json.loads(result.stdout)["engines"] if r["engine"] == server.url("grpc"))
    assert served["status"] == "pass" and served["max_abs_diff"] == 0.0 and served["argmax_agreement"] == 1.0
    assert "goes with a server URL" in cli_error(["check", "--model", str(tiny_model), "--engines", "cpu:fp32",
                                                   "--token-file", str(token_file)])


def test_bench_loads_the_server_with_concurrent_clients(server, tiny_model, token_file):
    result = invoke(["bench", "--model", str(tiny_model), *server.args(), "--batch", "32", "--seq", "24",
                     "--clients", "1,3", "--calls", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["clients"] for r in report["load"]] == [1, 3]
    assert [r["calls"] for r in report["load"]] == [4, 12] and all(r["errors"] == 0 for r in report["load"])
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in report["load"])
    # int64 ids and mask [32, 24], mask_pos [32], two label ids, and one prompt [P, H] of float32
    assert report["load"][0]["request_bytes"] == 2 * 32 * 24 * 8 + 32 * 8 + 2 * 8 + PROMPT_TOKENS * 32 * 4
    assert report["in_process_ms"] > 0 and report["api_overhead"] is not None
    assert "go with --server" in cli_error(["bench", "--model", str(tiny_model), "--clients", "2"])
    assert "drop --baseline" in cli_error(["bench", "--model", str(tiny_model), *server.args(), "--baseline", "none"])


def test_triton_repo_writes_a_config_the_model_config_protobuf_parses(tiny_model, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from bbt_onnx.manifest import load_manifest

    manifest = load_manifest(tiny_model)
    ok(["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "repo"), "--tensorrt", "--instances", "2"])
    model = tmp_path / "repo" / "tiny-roberta"  # the export source's name
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    fp16 = manifest.graph("fp16")
    assert (model / "1" / "model.onnx").read_bytes() == (tiny_model / fp16.file).read_bytes()  # fp16 for GPUs
    assert config.name == "tiny-roberta" and config.backend == "onnxruntime" and config.max_batch_size == 0
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type)) for i in config.input] == \
        [(t.name, {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}[t.dtype]) for t in fp16.inputs]
    assert list(config.input[0].dims) == [-1, -1] and list(config.output[0].dims) == [-1, -1, -1]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2
    assert config.parameters["bbt_fingerprint"].string_value == manifest.fingerprint()
    assert config.parameters["bbt_precision"].string_value == "fp16"
    assert config.parameters["bbt_row_buckets"].string_value == "1"  # one call per set of rows on a GPU
    trt = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    warm = config.model_warmup[0]
    assert warm.batch_size == 1 and set(warm.inputs) == {t.name for t in fp16.inputs}
    assert all(w.zero_data for w in warm.inputs.values())
    # CPU instances without the accelerator; an existing repository needs --force
    ok(["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "repo"), "--kind", "cpu", "--precision",
        "fp32", "--force"])
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["bbt_row_buckets"].string_value == "4"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert "not empty; pass --force" in cli_error(["triton-repo", "--model", str(tiny_model), "--out",
                                                   str(tmp_path / "repo")])
    assert "--tensorrt runs on GPU instances only" in cli_error(
        ["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "r2"), "--kind", "cpu", "--tensorrt"])


def test_a_decoder_tunes_through_the_server_with_its_prompt_positions(server, served, data_dir, tmp_path):
    """Qwen2 has no BOS, so the prompt starts at 0, not after BOS: the served graph's prompt_pos input carries it.
    This model is served without a deep graph, so BBTv2 through it is refused by name."""
    model, client = served["qwen2"], tmp_path / "client"
    ok(["client-dir", "--model", str(model), "--out", str(client)])
    framing = ["--template", " Review: {text}\nSentiment:", "--labels", "0=bad,1=good", "--bos", "never"]
    args = [a for a in tune_args(model, data_dir, tmp_path / "local") if a != "sst2" and a != "--task"]
    local = json.loads(ok([*args, *framing]))
    args = [a for a in tune_args(client, data_dir, tmp_path / "remote", *server.args("grpc"))
            if a != "sst2" and a != "--task"]
    remote = json.loads(ok([*args, *framing]))
    np.testing.assert_array_equal(z_of(tmp_path / "remote"), z_of(tmp_path / "local"))
    assert remote["train_loss_final"] == local["train_loss_final"]
    assert remote["train_loss_initial"] != remote["train_loss_final"]  # the prompt moved the loss
    assert "does not serve the deep-prompt graph BBTv2 needs" in cli_error(
        [*args, *framing, "--method", "bbtv2", "--out", str(tmp_path / "v2")])


def test_one_server_serves_several_models_each_under_its_name(server, served, data_dir, tmp_path):
    """BERT beside RoBERTa on the same server: its own name, its own fingerprint, the in-process z."""
    model, client = served["bert"], tmp_path / "client"
    ok(["client-dir", "--model", str(model), "--out", str(client)])
    local = json.loads(ok(tune_args(model, data_dir, tmp_path / "local")))
    remote = json.loads(ok(tune_args(client, data_dir, tmp_path / "remote", *server.args())))
    np.testing.assert_array_equal(z_of(tmp_path / "remote"), z_of(tmp_path / "local"))
    assert remote["provider"].startswith("Triton tiny-bert ") and remote["train_loss_final"] == local["train_loss_final"]
    with urllib.request.urlopen(f"{server.url()}/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    ports = [a for flag, port in zip(("--http-port", "--grpc-port", "--metrics-port"), free_ports(3))
             for a in (flag, str(port))]
    assert "the name of" in cli_error(["serve", "--model", str(model), "--model", str(model), *ports])


def test_bbtv2_tunes_through_the_server_on_the_served_deep_graph(server, client_dir, tiny_model, token_file, data_dir,
                                                                 tmp_path):
    """A model exported with --deep is served twice: NAME and NAME.deep (whose scalar prompt_layer travels as [1]).
    BBTv2 through it ends with the in-process prompt, and evaluate and check agree."""
    model = tiny_model
    v2 = ["--method", "bbtv2", "--budget", "36", "--eval-every", "12", "--popsize", "4"]
    local = json.loads(ok([*tune_args(model, data_dir, tmp_path / "local"), *v2]))
    remote = json.loads(ok([*tune_args(client_dir, data_dir, tmp_path / "remote", *server.args()), *v2]))
    args = ["evaluate", "--prompt", str(tmp_path / "remote"), "--data", str(data_dir / "test.csv"), "-q"]
    scored = json.loads(ok([*args, "--model", str(client_dir), *server.args("grpc")]))
    checked = invoke(["check", "--model", str(model), "--prompt", str(tmp_path / "remote"), "--engines",
                      f"cpu:fp32,{server.url()}", "--token-file", str(token_file), "--json"])
    with np.load(tmp_path / "local" / "prompt.npz") as a, np.load(tmp_path / "remote" / "prompt.npz") as b:
        assert a["z"].shape[0] == LAYERS  # one z per layer
        np.testing.assert_array_equal(b["z"], a["z"])
    assert remote["api_calls"] == local["api_calls"] == 36 and remote["train_loss_final"] == local["train_loss_final"]
    assert scored["ce_loss"] == json.loads(ok([*args, "--model", str(model)]))["ce_loss"]
    assert checked.exit_code == 0, checked.output
    served = next(r for r in json.loads(checked.stdout)["engines"] if r["engine"] == server.url())
    assert served["max_abs_diff"] == 0.0
    # the production repository serves the deep graph beside the plain one, with the same scalar as [1]
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from bbt_onnx.manifest import load_manifest

    ok(["triton-repo", "--model", str(model), "--out", str(tmp_path / "repo"), "--kind", "cpu", "--precision", "fp32"])
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny-roberta", "tiny-roberta.deep"]
    config = text_format.Parse((tmp_path / "repo" / "tiny-roberta.deep" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    layer = next(i for i in config.input if i.name == "prompt_layer")
    assert list(layer.dims) == [1] and layer.HasField("reshape") and list(layer.reshape.shape) == []
    assert config.parameters["bbt_fingerprint"].string_value == load_manifest(model).fingerprint()
    assert (tmp_path / "repo" / "tiny-roberta.deep" / "1" / "model.onnx").read_bytes() == \
        (model / load_manifest(model).graph("fp32", deep=True).file).read_bytes()


# -- last: it stops the shared server ---------------------------------------------------------------------------
def test_sigterm_stops_tritonserver_and_removes_the_workspace(server):
    """The shared server, which ran every test above with torch, transformers and onnx unimportable."""
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
