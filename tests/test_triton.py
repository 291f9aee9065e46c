"""What `triton-repo` writes, loaded by a real tritonserver: the 2.51 binary PyTriton ships, python backend only.

A model for the stock onnxruntime backend cannot run here, but tritonserver still checks its config (with
--disable-auto-complete-config, before it looks for the backend): the only error such a model may meet is the
missing backend. A python-backend repository loads and serves for real, and a tune through it ends with the
in-process z.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from bbt_onnx.manifest import load_manifest
from bbt_onnx.serving.tritonserver import TritonProcess

from conftest import PROMPT_TOKENS
from helpers import cli_error, invoke
from test_serve import free_ports, tune_args, z_of

MISSING_BACKEND = "unable to find backend library for backend 'onnxruntime'"


def ok(args) -> str:
    result = invoke(args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def parse(path: Path):
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.fixture(scope="module")
def repository(tiny_model, exports, tmp_path_factory) -> Path:
    """One repository holding every kind of model triton-repo writes: the onnxruntime backend on GPU (fp16, deep,
    TensorRT) and on CPU (fp32, a decoder with prompt positions), and the python backend (plain and deep)."""
    root = tmp_path_factory.mktemp("repos")
    qwen2 = exports.get("Qwen2ForCausalLM").model
    kinds = {
        "ort-gpu": [tiny_model, "--tensorrt", "--instances", "2", "--name", "ort-gpu"],
        "ort-cpu": [qwen2, "--kind", "cpu", "--precision", "fp32", "--threads", "1", "--name", "ort-cpu"],
        "py": [tiny_model, "--backend", "python", "--kind", "cpu", "--precision", "fp32", "--threads", "1",
               "--instances", "2"],
    }
    repo = root / "repository"
    repo.mkdir()
    for name, args in kinds.items():
        ok(["triton-repo", "--model", str(args[0]), "--out", str(root / name), *map(str, args[1:])])
        for model in (root / name).iterdir():
            shutil.copytree(model, repo / model.name)
    return repo


def start_triton(repository: Path, work: Path, ready_models: list[str]) -> TritonProcess:
    """A real tritonserver on `repository`, ready once every one of `ready_models` is (the others may fail)."""
    http, grpc = free_ports(2)
    server = TritonProcess(repository, work, http, grpc, log_file=work / "tritonserver.log", exit_on_error=False)

    def ready() -> bool:
        try:
            for name in ready_models:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{name}/ready", timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except OSError:
            return False

    server.start(timeout=120, ready=ready)
    return server


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory, stop_later):
    server = start_triton(repository, tmp_path_factory.mktemp("triton"), ["tiny-roberta", "tiny-roberta.deep"])
    yield server
    stop_later(server.stop)


def index(server) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/repository/index", data=b"{}",
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def test_every_config_passes_tritonservers_own_checks(triton, repository):
    """The stock-backend models fail for the missing backend alone; a config error would leave an entry with no
    state, and a "Poll failed" line in the log (the empty-reshape scalar did so before)."""
    states = {m["name"]: (m.get("state"), m.get("reason", "")) for m in index(triton)}
    assert set(states) == {p.name for p in repository.iterdir()}
    for name in ("ort-gpu", "ort-gpu.deep", "ort-cpu", "ort-cpu.deep"):
        assert states[name][0] == "UNAVAILABLE" and MISSING_BACKEND in states[name][1], states[name]
    assert states["tiny-roberta"][0] == states["tiny-roberta.deep"][0] == "READY"
    assert "Poll failed" not in triton.log_file.read_text()


def test_the_configs_say_what_each_instance_needs(repository, tiny_model):
    gpu, deep, cpu = (parse(repository / n / "config.pbtxt") for n in ("ort-gpu", "ort-gpu.deep", "ort-cpu"))
    fp16 = load_manifest(tiny_model).graph("fp16")
    assert (repository / "ort-gpu" / "1" / "model.onnx").read_bytes() == (tiny_model / fp16.file).read_bytes()
    assert gpu.backend == "onnxruntime" and gpu.max_batch_size == 0 and gpu.instance_group[0].count == 2
    assert gpu.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    trt = gpu.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"  # the graph's own precision
    assert f"prompt_embeds:20x{PROMPT_TOKENS}x32" in trt.parameters["trt_profile_opt_shapes"]
    layer = next(i for i in deep.input if i.name == "prompt_layer")
    assert list(layer.dims) == [1] and not layer.HasField("reshape")  # what the deep graph takes: [1]
    assert cpu.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert cpu.parameters["intra_op_thread_count"].string_value == "1"  # instances do not each take every core
    assert cpu.parameters["bbt_row_buckets"].string_value == "4" and gpu.parameters["bbt_row_buckets"].string_value == "1"
    assert [i.name for i in cpu.input][-1] == "prompt_pos"
    assert gpu.parameters["bbt_fingerprint"].string_value == load_manifest(tiny_model).fingerprint()
    warm = gpu.model_warmup[0]
    assert warm.batch_size == 1 and set(warm.inputs) == {t.name for t in fp16.inputs}
    assert all(w.zero_data for w in warm.inputs.values())


def test_gpu_fp32_keeps_fp32(tiny_model, tmp_path):
    """CUDA's default runs fp32 MatMuls in TF32: the config turns it off, as the in-process engine does."""
    ok(["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--precision", "fp32"])
    config = parse(tmp_path / "r" / "tiny-roberta" / "config.pbtxt")
    cuda = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert cuda.name == "cuda" and cuda.parameters["use_tf32"] == "0"


def test_a_tune_through_the_python_backend_ends_with_the_in_process_z(triton, tiny_model, data_dir, tmp_path):
    server = [f"http://127.0.0.1:{triton.http_port}"]
    for method in ("bbt", "bbtv2"):
        extra = ["--method", method, "--budget", "36", "--popsize", "4", "--eval-every", "12"]
        local = json.loads(ok([*tune_args(tiny_model, data_dir, tmp_path / f"local-{method}"), *extra]))
        remote = json.loads(ok([*tune_args(tiny_model, data_dir, tmp_path / f"remote-{method}", "--server",
                                           *server), *extra]))
        np.testing.assert_array_equal(z_of(tmp_path / f"remote-{method}"), z_of(tmp_path / f"local-{method}"))
        assert remote["train_loss_final"] == local["train_loss_final"]


def test_a_population_split_over_two_instances_ends_with_the_same_z(triton, repository, tiny_model, data_dir,
                                                                      tmp_path):
    """--shards N sends each generation's candidates as N concurrent requests, which the server's two instances
    take in parallel; every N ends with the in-process z, lock-step seeds too."""
    assert parse(repository / "tiny-roberta" / "config.pbtxt").instance_group[0].count == 2
    server = ["--server", f"http://127.0.0.1:{triton.http_port}"]
    extra = ["--budget", "36", "--popsize", "6", "--eval-every", "12", "--seeds", "3,4"]

    def args(out, *more):
        full = tune_args(tiny_model, data_dir, tmp_path / out, *more)
        at = full.index("--seed")
        return [*full[:at], *full[at + 2:], *extra]

    ok(args("local"))
    for shards in ("1", "2", "4"):
        ok(args(f"shards{shards}", *server, "--shards", shards))
        with np.load(tmp_path / f"shards{shards}" / "prompt.npz") as got, np.load(tmp_path / "local" / "prompt.npz") \
                as want:
            np.testing.assert_array_equal(got["z"], want["z"])
    assert "--shards sends a call as several requests and needs --server" in cli_error([*tune_args(tiny_model, data_dir, tmp_path / "x"), "--shards", "2"])
    assert "shards must be a whole number in 1..64" in cli_error(
        [*tune_args(tiny_model, data_dir, tmp_path / "y", *server), "--shards", "65"])


def test_a_model_name_in_the_url_reaches_a_renamed_model(triton, exports, data_dir, tmp_path):
    """triton-repo --name: the client names it in the URL's path; without it the export's own name is looked for."""
    qwen2 = exports.get("Qwen2ForCausalLM").model
    url = f"http://127.0.0.1:{triton.http_port}"
    task = ["--template", " Review: {text}\nSentiment:", "--labels", "0=bad,1=good", "--no-prompt"]
    line = cli_error(["evaluate", "--model", str(qwen2), *task, "--data", str(data_dir / "test.csv"), "--server",
                      f"{url}/ort-cpu"])
    assert "failed to load 'ort-cpu'" in line  # found by name; its backend is missing here
    assert "serves no model named 'tiny-qwen2'" in cli_error(
        ["evaluate", "--model", str(qwen2), *task, "--data", str(data_dir / "test.csv"), "--server", url])
    assert "not http://HOST:PORT" in cli_error(["evaluate", "--model", str(qwen2), *task, "--data",
                                                str(data_dir / "test.csv"), "--server", f"{url}/a/b"])


def test_types_follow_the_graph_and_an_existing_repository_needs_force(tiny_model, tmp_path):
    ok(["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "repo"), "--kind", "cpu"])
    config = parse(tmp_path / "repo" / "tiny-roberta" / "config.pbtxt")
    fp16 = load_manifest(tiny_model).graph("fp16")
    assert [(i.name, pb.DataType.Name(i.data_type)) for i in config.input] == \
        [(t.name, {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}[t.dtype]) for t in fp16.inputs]
    assert list(config.input[0].dims) == [-1, -1] and list(config.output[0].dims) == [-1, -1, -1]
    assert config.parameters["bbt_precision"].string_value == "fp16"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # CPU: no accelerator
    assert "not empty; pass --force" in cli_error(["triton-repo", "--model", str(tiny_model), "--out",
                                                   str(tmp_path / "repo")])
    ok(["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "repo"), "--precision", "fp32",
        "--force"])
    assert parse(tmp_path / "repo" / "tiny-roberta" / "config.pbtxt").parameters["bbt_precision"].string_value == \
        "fp32"


def test_repository_mistakes_are_one_line(tiny_model, tmp_path):
    assert "--tensorrt runs in onnxruntime on GPU instances only" in cli_error(
        ["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "a"), "--backend", "python",
         "--tensorrt"])
    assert "is not a model name" in cli_error(["triton-repo", "--model", str(tiny_model), "--out",
                                               str(tmp_path / "b"), "--name", "../x"])
    assert "--tensorrt runs in onnxruntime on GPU instances only" in cli_error(
        ["triton-repo", "--model", str(tiny_model), "--out", str(tmp_path / "c"), "--kind", "cpu", "--tensorrt"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
