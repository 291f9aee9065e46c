"""The classifier on Triton, for real: `deploy --format triton` loaded by the tritonserver PyTriton ships (python
backend only: the stock onnxruntime variant is checked by its config passing tritonserver's own checks, as in
test_triton.py), and `serve --prompt` with `predict --server`."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb
from tritonclient.utils import InferenceServerException

from bbt_onnx import Model
from bbt_onnx.data import Example
from bbt_onnx.prompt import load_prompt
from bbt_onnx.synthetic import sentiment_rows

from conftest import without_graphs
from test_serve import TOKEN, Server, ok, token_file  # noqa: F401
from test_triton import MISSING_BACKEND, index, start_triton

TEXTS = [t for t, _ in sentiment_rows(12, seed=7, min_words=2, max_words=25)] + \
    ["café naïve 😀 東京", "  spaces  around  ", "a <mask> typed in"]


@pytest.fixture(scope="module")
def runs(exports, data_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(model, run) for the tiny RoBERTa (a tuned prompt, tokenizer in the graph) and the tiny BERT (WordPiece:
    the graph takes ids, the python backend encodes), each without its deep graphs."""
    out = {}
    for key, arch in (("roberta", "RobertaForMaskedLM"), ("bert", "BertForMaskedLM")):
        root = tmp_path_factory.mktemp(key)
        model = without_graphs(exports.get(arch).model, root / "model", lambda k: not k.startswith("deep"))
        ok(["tune", "--model", model, "--task", "sst2", "--data", data_dir / "pool.csv", "--out", root / "run",
            "--prompt-tokens", "4", "--intrinsic-dim", "10", "--popsize", "6", "--budget", "24", "--no-fallback",
            "-q"])
        out[key] = (model, root / "run")
    return out


def predicted(model_dir: Path, run: Path, texts: list[str]) -> np.ndarray:
    """What predict gives (the runtime's encoder, so that an empty text is the template alone, as in the graph)."""
    prompt, model = load_prompt(run), Model.load(model_dir)
    enc = prompt.encoder(model).encode([Example(t.strip()) for t in texts])
    return np.array([[p.probabilities[k] for k in prompt.task.label_keys] for p in prompt.predict(model, enc)])


@pytest.fixture(scope="module")
def repository(runs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repos")
    repo = root / "repository"
    repo.mkdir()
    kinds = {"py": (runs["roberta"], ["--backend", "python"]),
             "ort": (runs["roberta"], ["--backend", "onnxruntime", "--name", "ort.classify"]),
             "bert": (runs["bert"], ["--backend", "python"])}
    for name, ((model, run), args) in kinds.items():
        ok(["deploy", "--model", model, "--prompt", run, "--out", root / name, "--format", "triton", *args, "-q"])
        for served in (root / name).iterdir():
            shutil.copytree(served, repo / served.name)
    return repo


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory, stop_later):
    python_models = [p.name for p in repository.iterdir() if p.name != "ort.classify"]
    server = start_triton(repository, tmp_path_factory.mktemp("triton"), python_models)
    yield server
    stop_later(server.stop)


def infer(port: int, model: str, texts: list, token: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    array = np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=object).reshape(-1, 1)
    item = httpclient.InferInput("text", list(array.shape), "BYTES")
    item.set_data_from_numpy(array)
    result = client.infer(model, [item], headers={"triton-access-token": token} if token else None)
    return result.as_numpy("probabilities"), result.as_numpy("label")


def test_both_variants_pass_tritonservers_own_checks(triton, repository):
    """The stock onnxruntime variant fails for the missing backend alone (its reshapes and custom-op library passed
    the config checks); the python variants load."""
    states = {m["name"]: (m.get("state"), m.get("reason", "")) for m in index(triton)}
    assert states["ort.classify"][0] == "UNAVAILABLE" and MISSING_BACKEND in states["ort.classify"][1]
    assert {n: s[0] for n, s in states.items() if n != "ort.classify"} == \
        {"tiny-roberta.classify": "READY", "tiny-bert.classify": "READY"}
    assert "Poll failed" not in triton.log_file.read_text()
    ort = text_format.Parse((repository / "ort.classify" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert ort.max_batch_size == 64 and ort.dynamic_batching.max_queue_delay_microseconds > 0
    assert Path(ort.model_operations.op_library_filename[0]).is_file()
    assert [i.name for i in ort.input] == ["text"] and ort.input[0].HasField("reshape")


@pytest.mark.parametrize("key", ["roberta", "bert"])
def test_the_served_classifier_labels_texts_as_predict_does(triton, runs, key):
    """A batch in one request, and single texts from 8 clients at once (batched by the server): predict's
    probabilities, with the tokenizer in the graph (RoBERTa) or encoded in the backend (BERT's WordPiece)."""
    model, run = runs[key]
    want = predicted(model, run, TEXTS)
    name = f"tiny-{key}.classify"
    probabilities, label = infer(triton.http_port, name, TEXTS)
    assert np.abs(probabilities - want).max() < 1e-5 and label.reshape(-1).tolist() == want.argmax(1).tolist()
    got = [None] * len(TEXTS)

    def one(i: int) -> None:
        got[i] = infer(triton.http_port, name, [TEXTS[i]])[0][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert np.abs(np.array(got[:8]) - want[:8]).max() < 1e-5


def test_odd_texts_have_a_defined_result_or_one_clear_error(triton, runs):
    model, run = runs["roberta"]
    name = "tiny-roberta.classify"
    probabilities, _ = infer(triton.http_port, name, ["", "good film"])
    assert np.abs(probabilities - predicted(model, run, ["", "good film"])).max() < 1e-5  # empty: the template alone
    for texts, match in (([b"caf\xe9 \xff"], "not UTF-8"), (["x" * ((1 << 20) + 1)], "over the limit")):
        with pytest.raises(InferenceServerException, match=match) as caught:
            infer(triton.http_port, name, texts)
        assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    with pytest.raises(InferenceServerException) as caught:  # no texts: refused by tritonserver itself
        infer(triton.http_port, name, [])
    assert "Traceback" not in str(caught.value)
    assert infer(triton.http_port, name, ["good film"])[0].shape == (1, 2)  # the model is still there


def test_serve_prompt_serves_the_classifier_and_predict_uses_it(runs, token_file, tmp_path, stop_later):  # noqa: F811
    """serve --prompt adds NAME.classify beside NAME, behind the same token; predict --server --prompt labels
    through it, as local predict does; concurrent single texts are batched (more texts than executions)."""
    model, run = runs["roberta"]
    srv = Server([model], token_file, tmp_path / "serve.log", extra=["--prompt", str(run)])
    try:
        (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
        local = ok(["predict", "--model", model, "--prompt", run, "--input", tmp_path / "texts.txt", "-q"])
        for protocol in ("http", "grpc"):
            result_lines = ok(["predict", "--model", model, "--prompt", run, "--input", tmp_path / "texts.txt",
                               *srv.args(protocol), "-q"])
            got, want = [json.loads(x) for x in result_lines.splitlines()], [json.loads(x) for x in local.splitlines()]
            assert [g["label"] for g in got] == [w["label"] for w in want]
            assert max(abs(g["probabilities"][k] - w["probabilities"][k]) for g, w in zip(got, want)
                       for k in w["probabilities"]) < 1e-5
        deadline = time.monotonic() + 10
        while stats(srv)[0] < 2 * len(TEXTS) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats(srv)[0] == 2 * len(TEXTS)  # predict's texts went to the classifier, not the prompt graph
        with pytest.raises(InferenceServerException, match="restricted|token|403|401"):
            infer(srv.http, "tiny-roberta.classify", ["good"])
        before = stats(srv)
        answered = []
        threads = [threading.Thread(target=lambda: answered.extend(
            infer(srv.http, "tiny-roberta.classify", ["a good film"], TOKEN)[1][0, 0] for _ in range(10)))
            for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(answered) == 80
        deadline = time.monotonic() + 10  # tritonserver counts a batch just after it answers it
        while stats(srv)[0] - before[0] < 80 and time.monotonic() < deadline:
            time.sleep(0.1)
        texts, executions = (a - b for a, b in zip(stats(srv), before))
        assert texts == 80 and executions < texts  # single texts shared executions
    finally:
        stop_later(srv.stop)


def stats(srv) -> tuple[int, int]:
    """The served classifier's texts classified and executions run so far."""
    request = urllib.request.Request(f"http://127.0.0.1:{srv.http}/v2/models/tiny-roberta.classify/stats",
                                     headers={"triton-access-token": TOKEN})
    with urllib.request.urlopen(request, timeout=10) as r:
        model = json.loads(r.read())["model_stats"][0]
    return model["inference_count"], model["execution_count"]


def test_serve_refuses_a_prompt_for_a_model_it_does_not_serve(runs, token_file, tmp_path):  # noqa: F811
    from helpers import cli_error

    message = cli_error(["serve", "--model", runs["roberta"][0], "--prompt", runs["bert"][1],
                         "--token-file", token_file])
    assert "none of the models served here" in message
