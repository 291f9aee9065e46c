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
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx import Model, TuneConfig
from bbt_onnx.data import DataSpec
from bbt_onnx.engines import OrtSpec, Remote, TritonEngine, TritonSpec
from bbt_onnx.errors import ServerError
from bbt_onnx.synthetic import write_csv
from bbt_onnx.tasks import resolve_task
from bbt_onnx.jobs.tune import TuneRequest, tune
from conftest import LAYERS, PROMPT_TOKENS, without_graphs
from helpers import cli_error, invoke


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

    def __init__(self, models: list[Path], token_file: Path, log: Path, env=None, extra: list[str] = ()):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.token_file = token_file
        self.log = log
        cmd = [sys.executable, "-m", "bbt_onnx.cli", "serve", *(a for m in models for a in ("--model", str(m))),
               "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--token-file", str(token_file),
               "--max-request", str(MAX_REQUEST), "--threads", "1", *extra]
        with open(log, "w") as err:  # the child keeps its own copy of the file
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        deadline = time.monotonic() + 120
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

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
def server(served, token_file, tmp_path_factory, stop_later):
    """One server for every model of `served`, with torch unimportable in the server and its backend."""
    tmp = tmp_path_factory.mktemp("serve")
    srv = Server(list(served.values()), token_file, tmp / "serve.log", env=torch_blocked(tmp))
    yield srv
    if srv.proc.poll() is None:
        stop_later(srv.stop)


@pytest.fixture(scope="module")
def client_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client") / "tiny"
    ok(["client-dir", "--model", str(tiny_model), "--out", str(out)])
    return out


def tune_args(model, data_dir, out, *extra):
    return ["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir / "pool.csv"), "--k-shot", "8",
            "--prompt-tokens", str(PROMPT_TOKENS), "--intrinsic-dim", "20", "--popsize", "6", "--budget", "60",
            "--eval-every", "30", "--seed", "3", "--out", str(out), "-q", "--no-fallback", *extra,
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
    """A run that reads several words a class: the server scores every word, the client sums each class's."""
    ok(tune_args(tiny_model, data_dir, tmp_path / "run", "--verbalizer", "auto:2"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["task"]["extra_words"]
    args = ["evaluate", "--prompt", str(tmp_path / "run"), "--data", str(data_dir / "test.csv"), "-q"]
    local = json.loads(ok([*args, "--model", str(tiny_model)]))
    remote = json.loads(ok([*args, "--model", str(client_dir), *server.args("grpc")]))
    assert remote["ce_loss"] == local["ce_loss"] and remote["accuracy"] == local["accuracy"]
    assert remote["provider"].startswith("Triton")
    texts = tmp_path / "in.txt"
    texts.write_text("a fine film\nawful and dull\n")
    args = ["predict", "--prompt", str(tmp_path / "run"), "--input", str(texts), "-q"]
    assert ok([*args, "--model", str(client_dir), *server.args()]) == ok([*args, "--model", str(tiny_model)])


def test_every_kind_of_result_scores_through_the_server(server, client_dir, tiny_model, data_dir, tmp_path):
    """The seeds' calibrated ensemble (several prompts in one request) and a kept template (a prompt of no tokens)
    score through the server as they do in process."""
    from bbt_onnx import PRESETS, TunedPrompt

    ok(["tune", "--model", str(tiny_model), "--task", "sst2", "--data", str(data_dir / "pool.csv"), "--k-shot", "8",
        "--prompt-tokens", str(PROMPT_TOKENS), "--intrinsic-dim", "20", "--popsize", "6", "--budget", "24",
        "--seeds", "1,2", "--calibrate", "--no-fallback", "--out", str(tmp_path / "ens"), "-q"])
    template = TunedPrompt.template(Model.load(tiny_model).manifest, PRESETS["sst2"])
    template.save(tmp_path / "template.npz")
    for result in (tmp_path / "ens", tmp_path / "template.npz"):
        args = ["evaluate", "--prompt", str(result), "--data", str(data_dir / "test.csv"), "-q"]
        local = json.loads(ok([*args, "--model", str(tiny_model)]))
        for protocol in ("http", "grpc"):
            remote = json.loads(ok([*args, "--model", str(client_dir), *server.args(protocol)]))
            assert remote["ce_loss"] == local["ce_loss"] and remote["metric"] == local["metric"]


def test_requests_without_the_right_token_are_refused(server, client_dir, data_dir, tmp_path):
    args = ["evaluate", "--model", str(client_dir), "--no-prompt", "--task", "sst2", "--data",
            str(data_dir / "test.csv"), "-q"]
    for protocol in ("http", "grpc"):
        assert "refused the request: pass --token-file" in cli_error([*args, "--server", server.url(protocol)])
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token")
        line = cli_error([*args, "--server", server.url(protocol), "--token-file", str(wrong)])
        assert "the token in --token-file is not the server's" in line and "not-the-token" not in line
    with urllib.request.urlopen(f"{server.url()}/v2/health/live", timeout=5) as r:  # health stays open
        assert r.status == 200
    odd = tmp_path / "odd"
    odd.write_text("s\u00e9cret-token\n", encoding="utf-8")
    for command in (args, ["serve", "--model", str(client_dir)]):
        line = cli_error([*command, *(["--server", server.url()] if command is args else []), "--token-file",
                          str(odd)])
        assert "non-ASCII" in line and "cret-token" not in line
    line = cli_error([*args, "--server", f"http://user:hunter2@127.0.0.1:{server.http}"])
    assert "user name or password" in line and "hunter2" not in line


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
        with pytest.raises(ServerError, match=r"did not answer within 0.2 s \(4 tries\)"):  # retried quickly
            Model.load(client_dir, TritonSpec(Remote(url, timeout=0.2, backoff=0.01)))
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


def request(model_dir, data_dir, out, remote=None, budget=48) -> TuneRequest:
    config = TuneConfig(prompt_tokens=PROMPT_TOKENS, intrinsic_dim=20, popsize=6, budget=budget, eval_every=24, seed=5)
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


def raw_infer(server, model: str, body: bytes, headers=None) -> tuple[int, str]:
    """POST a raw inference body to the gate with the token: (status, response text)."""
    request = urllib.request.Request(f"{server.url()}/v2/models/{model}/infer", data=body, method="POST",
                                     headers={"triton-access-token": TOKEN, "Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def valid_feeds(model: Model, deep: bool = False) -> dict[str, np.ndarray]:
    from bbt_onnx.tasks import PRESETS
    from bbt_onnx.synthetic import sentiment_examples

    enc = model.encoder(PRESETS["sst2"], PROMPT_TOKENS).encode(sentiment_examples(4, seed=0))
    m = model.manifest
    feeds = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "mask_pos": enc.mask_pos,
             "label_ids": enc.label_ids, "prompt_embeds": np.zeros((2, PROMPT_TOKENS, m.hidden_size), np.float32)}
    if deep:
        feeds.update(deep_prompts=np.zeros((m.num_layers, PROMPT_TOKENS, m.hidden_size), np.float32),
                     prompt_layer=np.array([1], np.int64))
    return feeds


def send(server, model: str, feeds: dict[str, np.ndarray], protocol: str = "http") -> str:
    """One inference request as tritonclient sends it (binary tensors), checked by no client: the error text."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    port = server.http if protocol == "http" else server.grpc
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    inputs = []
    for name, value in feeds.items():
        item = module.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
        item.set_data_from_numpy(value)
        inputs.append(item)
    headers = {("triton-grpc-protocol-" if protocol == "grpc" else "") + "triton-access-token": TOKEN}
    try:
        client.infer(model, inputs, headers=headers)
    except Exception as exc:  # noqa: BLE001 - the refusal is the point
        return str(exc)
    finally:
        client.close()
    return ""


HUGE_SHAPE = json.dumps({"inputs": [{"name": "input_ids", "shape": [1000000, 1000000, 1000000], "datatype": "INT64",
                                     "data": [1]}]}).encode()


def test_hostile_requests_are_one_line_refusals_and_the_server_stays_up(server, client_dir, tiny_model):
    """Every class of bad request a token holder can send: a 400 (413, 411) with one line, no traceback, no server
    path; the JSON request whose shape once aborted tritonserver is refused at the gate; and afterwards the same
    server answers valid requests with the in-process logits."""
    answers = {
        "huge-json-shape": raw_infer(server, "tiny-roberta", HUGE_SHAPE),
        "not-json": raw_infer(server, "tiny-roberta", b"{"),
        "body-over-limit": raw_infer(server, "tiny-roberta", b"0" * 8_000_000),
        "chunked": raw_infer(server, "tiny-roberta", b"x", {"Transfer-Encoding": "chunked"}),
        # tritonserver's own answer to these is a 500: the gate's is a 400
        "string-in-int64": raw_infer(server, "tiny-roberta", b'{"inputs": [{"name": "mask_pos", "shape": [1], '
                                     b'"datatype": "INT64", "data": ["0"]}]}'),
        "utf-16-body": raw_infer(server, "tiny-roberta", '{"inputs": [{"name": "mask_pos", "shape": [1], '
                                 '"datatype": "INT64", "data": [0]}]}'.encode("utf-16")),
    }
    # framing a strict HTTP/1.1 parser refuses (each once aborted tritonserver, or smuggled a second request)
    for name, line, extra in (("absolute-url", b"POST http://x/v2/models/tiny-roberta/infer HTTP/1.1", b""),
                              ("two-spaces", b"POST  /v2/models/tiny-roberta/infer HTTP/1.1", b""),
                              ("space-before-colon", b"POST /v2/models/tiny-roberta/infer HTTP/1.1", b" "),
                              ("two-lengths", b"POST /v2/models/tiny-roberta/infer HTTP/1.1", b"")):
        lengths = b"Content-Length: 2\r\nContent-Length: 9\r\n" if name == "two-lengths" else \
            b"Content-Length" + extra + b": 2\r\n"
        raw = line + b"\r\nHost: x\r\ntriton-access-token: " + TOKEN.encode() + b"\r\n" + lengths + b"\r\n{}"
        with socket.create_connection(("127.0.0.1", server.http), timeout=10) as conn:
            conn.sendall(raw)
            reply = conn.recv(4096).decode(errors="replace")
        answers[name] = (int(reply.split(" ")[1]), reply.split("\r\n\r\n", 1)[-1])
    assert {k: status for k, (status, _) in answers.items()} == {"huge-json-shape": 400, "not-json": 400,
                                                                "body-over-limit": 413, "chunked": 411,
                                                                "string-in-int64": 400, "utf-16-body": 400,
                                                                "absolute-url": 400, "two-spaces": 400,
                                                                "space-before-colon": 400, "two-lengths": 400}
    model = Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN)))
    good, deep = valid_feeds(model), valid_feeds(model, deep=True)
    bad = {
        "5000-labels": (good, "label_ids", np.arange(5000, dtype=np.int64) % 50 + 5),
        "prompt-longer-than-exported": (good, "prompt_embeds", np.zeros((2, PROMPT_TOKENS + 3, 32), np.float32)),
        "mask-past-the-row": (good, "mask_pos", good["mask_pos"] + 500),
        "id-past-the-vocabulary": (good, "input_ids", good["input_ids"] + 10**6),
        "nan-prompt": (good, "prompt_embeds", np.full((2, PROMPT_TOKENS, 32), np.nan, np.float32)),
        "prompt-layer-99": (deep, "prompt_layer", np.array([99], np.int64)),
        "prompt-layer--1": (deep, "prompt_layer", np.array([-1], np.int64)),
    }
    for name, (base, key, value) in bad.items():
        for protocol in ("http", "grpc"):
            text = send(server, "tiny-roberta.deep" if base is deep else "tiny-roberta", {**base, key: value},
                        protocol)
            answers[f"{name}-{protocol}"] = (400, text)
            assert text and ("400" in text or "INVALID_ARGUMENT" in text), (name, protocol, text)
    for name, (_, text) in answers.items():
        assert "Traceback" not in text and "site-packages" not in text and "/tmp/" not in text, (name, text)
        assert len(text.splitlines()) <= 1, (name, text)
    assert send(server, "tiny-roberta", good) == send(server, "tiny-roberta", good, "grpc") == ""
    local = Model.load(tiny_model, OrtSpec(threads=1))
    enc_prompts = np.random.default_rng(0).normal(0, 0.5, (2, PROMPT_TOKENS, 32)).astype(np.float32)
    rows = local.encoder(__import__("bbt_onnx").PRESETS["sst2"], PROMPT_TOKENS).encode(
        __import__("bbt_onnx.synthetic", fromlist=["x"]).sentiment_examples(6, seed=1))
    np.testing.assert_array_equal(model.engine.label_logits(enc_prompts, rows), local.engine.label_logits(enc_prompts, rows))
    assert "starting it again" not in server.log.read_text()  # nothing above took tritonserver down


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
    """Every third request first fails as a dropped connection would (a reset, or the HTTP client's own "connection
    closed"): the run retries it after a jittered backoff, counts it once, and ends where the in-process run
    does."""
    from geventhttpclient.response import HTTPConnectionClosed

    expected = tune(request(tiny_model, data_dir, tmp_path / "local")).prompt.z
    engine = TritonEngine(Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN))).manifest,
                          Remote(server.url(), TOKEN, backoff=0.01))
    real, sent, slept = engine.client.infer, [], []

    def flaky(*args, **kwargs):
        sent.append(1)
        if len(sent) % 3 == 0:  # its retry is the next request, which goes through
            raise ConnectionResetError("connection reset by peer") if len(sent) % 2 else HTTPConnectionClosed("closed")
        return real(*args, **kwargs)

    engine.client.infer = flaky
    real_sleep = time.sleep
    monkeypatch.setattr("bbt_onnx.engines.triton.time.sleep", lambda s: (slept.append(s), real_sleep(s)))
    model = Model(engine.manifest, Model.load(client_dir, TritonSpec(Remote(server.url(), TOKEN))).tokenizer, engine)
    monkeypatch.setattr("bbt_onnx.jobs.tune.Model.load", lambda *a, **k: model)
    outcome = tune(request(client_dir, data_dir, tmp_path / "flaky", Remote(server.url(), TOKEN)))
    np.testing.assert_array_equal(outcome.prompt.z, expected)
    assert engine.retried > 0 and outcome.metrics["api_calls"] == 48
    assert engine.calls == len(sent) - engine.retried
    assert len(set(slept)) == len(slept) and all(0.005 <= s <= 0.015 for s in slept)  # 0.01, jittered


def test_a_client_without_onnxruntime_or_torch_tunes_through_the_server(server, client_dir, tiny_model, data_dir,
                                                                       tmp_path):
    """What the client extra installs is enough: the same tune with onnxruntime, torch and transformers
    unimportable ends with the in-process z."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_TORCH.replace('"bbt_onnx_export")', '"bbt_onnx_export", "onnxruntime")'))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    local = json.loads(ok(tune_args(tiny_model, data_dir, tmp_path / "local")))
    args = [str(a) for a in tune_args(client_dir, data_dir, tmp_path / "remote", *server.args("grpc"))]
    run = subprocess.run([sys.executable, "-m", "bbt_onnx.cli", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(z_of(tmp_path / "remote"), z_of(tmp_path / "local"))
    assert json.loads(run.stdout)["train_loss_final"] == local["train_loss_final"]
    blocked = subprocess.run([sys.executable, "-m", "bbt_onnx.cli", "evaluate", "--model", str(tiny_model),
                              "--no-prompt", "--task", "sst2", "--data", str(data_dir / "test.csv")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert blocked.returncode == 2 and "pip install 'bbt-onnx[cpu]'" in blocked.stderr  # one line naming the extra
    assert "Traceback" not in blocked.stderr


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


def test_the_metrics_port_listens_on_loopback_only(server):
    """tritonserver's metrics cannot check the token, so they listen on 127.0.0.1 whatever the host."""
    from bbt_onnx.serving.server import ServeOptions

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
        assert r.status == 200 and b"nv_" in r.read()
    assert ServeOptions(("m",), host="0.0.0.0", token="t", metrics_port=9100).metrics == ("127.0.0.1", 9100)


def test_a_decoder_scores_demonstrations_through_the_server_as_in_process(server, served, data_dir, tmp_path):
    """serve's NAME.cached computes a shared prefix (the demonstrations) once per server and prefix, and scores the
    rows after it bit for bit as the process does; without it (a server of rows only) every row is sent whole,
    and the scores agree within the graphs' tolerance."""
    model, client = served["qwen2"], tmp_path / "client"
    ok(["client-dir", "--model", str(model), "--out", str(client)])
    write_csv(tmp_path / "demos.csv", [("warm and fine", 1), ("dull , long", 0)])
    write_csv(tmp_path / "other.csv", [("dull , long", 0), ("warm and fine", 1)])
    args = ["evaluate", "--no-prompt", "--template", " Review: {text}\nSentiment:", "--labels", "0=bad,1=good",
            "--bos", "never", "--prompt-position", "suffix", "--prompt-tokens", "0", "--data",
            str(data_dir / "test.csv"), "-q"]
    local = json.loads(ok([*args, "--demos-file", str(tmp_path / "demos.csv"), "--model", str(model),
                           "--threads", "1"]))
    remote = json.loads(ok([*args, "--demos-file", str(tmp_path / "demos.csv"), "--model", str(client),
                            *server.args()]))
    plain = json.loads(ok([*args, "--model", str(model)]))
    assert remote["ce_loss"] == local["ce_loss"] and remote["metric"] == local["metric"]  # bit for bit
    assert abs(plain["ce_loss"] - local["ce_loss"]) > 1e-4  # the demonstrations were scored
    assert Model.load(client, TritonSpec(Remote(server.url(), TOKEN))).engine.cached == "tiny-qwen2.cached"
    before = prefix_runs(server)
    for demos in ("demos.csv", "demos.csv", "other.csv"):  # the same prefix again, then another
        ok([*args, "--demos-file", str(tmp_path / demos), "--model", str(client), *server.args()])
    assert prefix_runs(server) - before == 1  # demos.csv's was kept from the first evaluate; other.csv's is new
    for bad, why in (([10**6], "outside the vocabulary"), ([7] * 500, "within the model's 128 positions")):
        status, text = raw_infer(server, "tiny-qwen2.cached", probe(bad))
        assert status == 400 and why in text and len(text.splitlines()) == 1, text


def probe(prefix: list[int]) -> bytes:
    """A one-row request to a served NAME.cached after `prefix`, asking for both outputs."""
    return json.dumps({"inputs": [
        {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [5, 6]},
        {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]},
        {"name": "mask_pos", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "prompt_pos", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "prefix_ids", "shape": [len(prefix)], "datatype": "INT64", "data": prefix},
        {"name": "prompt_embeds", "shape": [1, 0, 32], "datatype": "FP32", "data": []},
        {"name": "label_ids", "shape": [2], "datatype": "INT64", "data": [8, 9]}],
        "outputs": [{"name": "label_logits"}, {"name": "prefix_runs"}]}).encode()


def prefix_runs(server) -> int:
    """How many shared prefixes the served NAME.cached has computed: its second output, on a one-row request."""
    status, text = raw_infer(server, "tiny-qwen2.cached", probe([7]))
    assert status == 200, text
    runs = next(o for o in json.loads(text)["outputs"] if o["name"] == "prefix_runs")
    return int(runs["data"][0]) - 1  # this probe's own prefix ([7]) counts once


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
    budget = 3 * 4 * LAYERS  # three rounds of popsize 4 over every layer
    v2 = ["--method", "bbtv2", "--budget", str(budget), "--eval-every", "12", "--popsize", "4"]
    local = json.loads(ok([*tune_args(model, data_dir, tmp_path / "local"), *v2]))
    remote = json.loads(ok([*tune_args(client_dir, data_dir, tmp_path / "remote", *server.args()), *v2]))
    args = ["evaluate", "--prompt", str(tmp_path / "remote"), "--data", str(data_dir / "test.csv"), "-q"]
    scored = json.loads(ok([*args, "--model", str(client_dir), *server.args("grpc")]))
    checked = invoke(["check", "--model", str(model), "--prompt", str(tmp_path / "remote"), "--engines",
                      f"cpu:fp32,{server.url()}", "--token-file", str(token_file), "--json"])
    with np.load(tmp_path / "local" / "prompt.npz") as a, np.load(tmp_path / "remote" / "prompt.npz") as b:
        assert a["z"].shape[0] == LAYERS  # one z per layer
        np.testing.assert_array_equal(b["z"], a["z"])
    assert remote["api_calls"] == local["api_calls"] == budget
    assert remote["train_loss_final"] == local["train_loss_final"]
    assert scored["ce_loss"] == json.loads(ok([*args, "--model", str(model)]))["ce_loss"]
    assert checked.exit_code == 0, checked.output
    served = next(r for r in json.loads(checked.stdout)["engines"] if r["engine"] == server.url())
    assert served["max_abs_diff"] == 0.0


def test_bench_exits_1_when_calls_fail(server, tiny_model, token_file):
    """Every call over the server's limit: the report shows the errors, and the exit code says so."""
    result = invoke(["bench", "--model", str(tiny_model), *server.args(), "--batch", "640", "--seq", "100",
                     "--clients", "1", "--calls", "2", "--json"])
    assert result.exit_code == 1, result.output
    load = json.loads(result.stdout)["load"][0]
    assert load["calls"] == 0 and load["errors"] >= 2
