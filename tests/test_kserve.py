"""`triton-repo --kserve NAME --storage-uri URI`: the model repository, and in its root a KServe InferenceService
that serves it on KServe's stock Triton runtime.

The manifest is checked with the check-jsonschema CLI against a JSON Schema of the InferenceService fields we write
(fixtures/inferenceservice.schema.json, from the CRD), and a real tritonserver starts on a repository with the
manifest in its root. No cluster is involved.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from bbt_onnx.serving.kserve import Service, inference_service, to_yaml

from helpers import cli_error, invoke
from test_triton import MISSING_BACKEND, index, ok, start_triton

SCHEMA = Path(__file__).parent / "fixtures" / "inferenceservice.schema.json"
CHECK = Path(sys.executable).parent / "check-jsonschema"
MANIFEST = "inferenceservice.yaml"
SERVICE = ["--kserve", "tiny-svc", "--storage-uri", "s3://models/tiny"]


def load(path: Path):
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK), "--schemafile", str(SCHEMA), str(path)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def kserve_repo(tiny_model, tmp_path_factory) -> Path:
    """A CPU repository (two instances) with its InferenceService: up to 4 replicas."""
    out = tmp_path_factory.mktemp("kserve") / "repo"
    result = invoke(["triton-repo", "--model", tiny_model, "--out", out, "--kind", "cpu", "--threads", "1",
                     "--instances", "2", *SERVICE, "--max-replicas", "4"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"kubectl apply -f {out / MANIFEST}" in result.stderr
    return out


def test_the_manifest_validates_against_the_crd_schema(kserve_repo):
    done = check_jsonschema(kserve_repo / MANIFEST)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = load(kserve_repo / MANIFEST)
    assert manifest == inference_service(Service("tiny-svc", "s3://models/tiny", 1, 4, concurrency=2))
    predictor = manifest["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 2)  # the instances
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2" and model["storageUri"] == "s3://models/tiny"
    assert model["ports"] == [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}]  # gRPC
    assert model["args"] == ["--disable-auto-complete-config"] and "resources" not in model  # CPU: no GPU asked
    assert sorted(p.name for p in kserve_repo.iterdir()) == [MANIFEST, "tiny-roberta", "tiny-roberta.deep"]


def test_gpu_instances_ask_for_a_gpu_and_the_settings_reach_the_manifest(tiny_model, tmp_path):
    out = tmp_path / "repo"
    ok(["triton-repo", "--model", tiny_model, "--out", out, "--kserve", "a-1", "--storage-uri",
        "gs://b/tiny/", "--min-replicas", "2", "--concurrency", "3"])
    done = check_jsonschema(out / MANIFEST)
    assert done.returncode == 0, done.stdout + done.stderr
    predictor = load(out / MANIFEST)["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleTarget"]) == (2, 2, 3)
    assert predictor["model"]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert predictor["model"]["storageUri"] == "gs://b/tiny/"


def edit(path: tuple, value):
    """The manifest with the field at `path` set to `value` (a missing last key is added)."""
    def apply(manifest: dict) -> dict:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return manifest
    return apply


def rename(path: tuple, new: str):
    def apply(manifest: dict) -> dict:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[new] = node.pop(path[-1])
        return manifest
    return apply


PREDICTOR, MODEL = ("spec", "predictor"), ("spec", "predictor", "model")
WRONG = {  # a typo or a wrong value of each kind; check-jsonschema names the field
    "misspelt-min-replicas": (rename((*PREDICTOR, "minReplicas"), "minReplica"), "minReplica"),
    "misspelt-storage-uri": (rename((*MODEL, "storageUri"), "storageURI"), "storageURI"),
    "scale-metric-not-an-enum": (edit((*PREDICTOR, "scaleMetric"), "requests"), "requests"),
    "protocol-not-an-enum": (edit((*MODEL, "protocolVersion"), "v3"), "v3"),
    "port-a-string": (edit((*MODEL, "ports"), [{"name": "h2c", "containerPort": "9000"}]), "9000"),
    "replicas-negative": (edit((*PREDICTOR, "minReplicas"), -1), "-1"),
    "name-not-a-dns-label": (edit(("metadata", "name"), "Tiny_Svc"), "Tiny_Svc"),
    "no-model-format": (edit((*MODEL, "modelFormat"), {"version": "2"}), "name"),
    "gpu-not-a-quantity": (edit((*MODEL, "resources"), {"limits": {"nvidia.com/gpu": "one"}}), "one"),
    "model-beside-the-predictor": (edit(("spec", "model"), {}), "model"),
}


@pytest.mark.parametrize("case", WRONG, ids=list(WRONG))
def test_a_wrong_manifest_fails_the_schema(case, tmp_path):
    """The schema can fail: each object on the way to the model is closed, and the CRD's enums and types hold."""
    change, named = WRONG[case]
    good = inference_service(Service("tiny-svc", "s3://models/tiny", gpus=1))
    path = tmp_path / MANIFEST
    path.write_text(to_yaml(change(copy.deepcopy(good))), encoding="utf-8")
    done = check_jsonschema(path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Schema validation errors" in done.stdout + done.stderr and named in done.stdout + done.stderr


def test_the_yaml_reads_back_as_written():
    """Strings stay strings whatever they look like; keys YAML would read as booleans are quoted."""
    data = {"a": ["1", "true", "no", "null", "~", "a: b", "#x", "- y", "", "é ü", "tab\there", "nl\nx", "\x7f\x85",
                  "\u2028", "\U0001f600", 'quote " back \\'],
            "on": 1, "yes": False, "n": None, "nested": [{"k": [1, [2, {}]], "e": []}, []], "nvidia.com/gpu": "1"}
    assert YAML(typ="safe").load(to_yaml(data, "a comment\nover two lines")) == data
    assert to_yaml(data) == to_yaml(copy.deepcopy(data))


def test_mistakes_are_one_line_and_write_nothing(tiny_model, tmp_path):
    def line(*args):
        out = tmp_path / "out"
        message = cli_error(["triton-repo", "--model", tiny_model, "--out", out, "--kind", "cpu", *args])
        assert not out.exists()
        return message

    assert "--kserve 'Tiny_Svc' is not a Kubernetes name" in line("--kserve", "Tiny_Svc", "--storage-uri", "s3://m/t")
    assert "--kserve '9lives' is not a Kubernetes name" in line("--kserve", "9lives", "--storage-uri", "s3://m/t")
    assert "is not a Kubernetes name" in line("--kserve", "a" * 64, "--storage-uri", "s3://m/t")
    assert "--storage-uri is a setting of the InferenceService, which only --kserve NAME writes" in \
        line("--storage-uri", "s3://m/t")
    assert "--min-replicas, --max-replicas are settings of the InferenceService" in \
        line("--min-replicas", "1", "--max-replicas", "2")
    assert "--kserve writes an InferenceService, which needs --storage-uri" in line("--kserve", "svc")
    assert "--max-replicas (2) is below --min-replicas (3)" in \
        line(*SERVICE, "--min-replicas", "3", "--max-replicas", "2")
    assert "--storage-uri 'repo/tiny' is not a location KServe downloads" in \
        line("--kserve", "svc", "--storage-uri", "repo/tiny")
    assert "is not a location KServe downloads" in line("--kserve", "svc", "--storage-uri", "ftp://m/t")
    assert "is not a location KServe downloads" in line("--kserve", "svc", "--storage-uri", "s3://m/a b")
    assert "use --backend onnxruntime" in line(*SERVICE, "--backend", "python")
    assert "--concurrency" in line(*SERVICE, "--concurrency", "0")  # click's bound


def test_force_replaces_a_repository_with_its_manifest(kserve_repo, tiny_model, tmp_path):
    """An earlier --kserve repository is ours to replace; written again without --kserve, its manifest is gone."""
    out = tmp_path / "repo"
    shutil.copytree(kserve_repo, out)
    assert "not empty; pass --force" in cli_error(["triton-repo", "--model", tiny_model, "--out", out, "--kind",
                                                   "cpu"])
    ok(["triton-repo", "--model", tiny_model, "--out", out, "--kind", "cpu", "--force"])
    assert not (out / MANIFEST).exists() and (out / "tiny-roberta" / "config.pbtxt").is_file()
    (out / MANIFEST).mkdir()  # a folder of that name is no manifest
    assert "does not look like a model repository" in cli_error(
        ["triton-repo", "--model", tiny_model, "--out", out, "--kind", "cpu", "--force"])


def test_tritonserver_starts_on_the_repository_with_the_manifest_in_it(kserve_repo, tiny_model, tmp_path,
                                                                      tmp_path_factory, stop_later):
    """The manifest in the repository's root is no model to tritonserver: the KServe repository's own models meet
    only the missing onnxruntime backend here, and a python-backend model put beside them loads and is ready."""
    ok(["triton-repo", "--model", tiny_model, "--out", tmp_path / "py", "--backend", "python", "--kind", "cpu",
        "--precision", "fp32", "--threads", "1", "--name", "py"])
    repo = tmp_path / "served"
    shutil.copytree(kserve_repo, repo)
    for model in (tmp_path / "py").iterdir():
        shutil.copytree(model, repo / model.name)
    assert (repo / MANIFEST).is_file()
    server = start_triton(repo, tmp_path_factory.mktemp("triton-kserve"), ["py", "py.deep"])
    try:
        states = {m["name"]: (m.get("state"), m.get("reason", "")) for m in index(server)}
        assert set(states) == {"tiny-roberta", "tiny-roberta.deep", "py", "py.deep"}  # no entry for the manifest
        for name in ("tiny-roberta", "tiny-roberta.deep"):
            assert states[name][0] == "UNAVAILABLE" and MISSING_BACKEND in states[name][1], states[name]
        assert states["py"][0] == states["py.deep"][0] == "READY"
        log = server.log_file.read_text()
        assert "Poll failed" not in log and MANIFEST not in log
    finally:
        stop_later(server.stop)
