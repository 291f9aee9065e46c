"""`bbt-onnx check`: one set of rows and prompts on every engine, compared with CPU fp32, with tolerances that
fail an engine when broken."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bbt_onnx.jobs.check import CheckReport, Tolerances, check_engines, random_prompts, sample_rows
from bbt_onnx.encoding import load_tokenizer
from bbt_onnx.engines import OrtSpec, all_local_engines, parse_engines
from bbt_onnx.errors import SettingsError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.prompt import TunedPrompt
from bbt_onnx.subspace import ProjectionSpec
from bbt_onnx.tasks import PRESETS

from conftest import PROMPT_TOKENS
from helpers import cli_error, invoke
from test_tune import tune_args


class Skewed:
    """Another engine's logits, moved: what a broken provider or a bad graph would return."""

    def __init__(self, engine, shift=0.0, flip=False):
        self.engine, self.shift, self.flip = engine, shift, flip
        self.provider, self.precision, self.deep = engine.provider, engine.precision, engine.deep

    def label_logits(self, prompts, batch):
        out = self.engine.label_logits(prompts, batch) + self.shift
        return -out if self.flip else out

    def deep_label_logits(self, *args):
        raise NotImplementedError


def pretend_cuda(monkeypatch, **skew):
    """cuda:fp32 opens a skewed CPU engine, so tolerances can be seen to fail here."""
    real_unavailable, real_open = OrtSpec.unavailable, OrtSpec.open

    def unavailable(self, manifest, deep=False):
        return None if self == OrtSpec("cuda", "fp32") else real_unavailable(self, manifest, deep)

    def open_(self, manifest, deep=False):
        if self == OrtSpec("cuda", "fp32"):
            return Skewed(real_open(OrtSpec("cpu", "fp32"), manifest, deep), **skew)
        return real_open(self, manifest, deep)

    monkeypatch.setattr(OrtSpec, "unavailable", unavailable)
    monkeypatch.setattr(OrtSpec, "open", open_)


def test_check_alone_scores_every_graph_on_every_provider(tiny_model):
    """The test model's large random weights (init std 0.5) are hard on dynamic int8: the default 98% agreement
    catches it, and a looser tolerance lets it pass."""
    r = invoke(["check", "--model", tiny_model, "--task", "sst2", "--json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    status = {e["engine"]: e["status"] for e in report["engines"]}
    assert status["cpu:fp32"] == "reference" and status["cpu:fp16"] == "pass" and status["cpu:int8"] == "fail"
    int8 = [e for e in report["engines"] if e["engine"] == "cpu:int8"][0]
    assert int8["argmax_agreement"] < 0.98 and "agreement" in int8["reasons"][0] and "FAIL" in r.stderr
    r = invoke(["check", "--model", tiny_model, "--task", "sst2", "--json", "--lowp-agreement", 0.5])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    status = {e["engine"]: e["status"] for e in report["engines"]}
    assert status["cpu:int8"] == "pass"
    assert all(status[s.name] == "skipped" for s in all_local_engines() if s.device == "cuda")  # no CUDA here
    assert report["prompts"] == ["z=0", "random1", "random2", "random3"] and report["rows"] == 16
    assert set(report["graphs"]) == {"fp32", "fp16", "int8", "deep-fp32", "deep-fp16", "deep-int8"}
    assert set(report["graphs"].values()) == {"ok"}
    assert report["passed"] and "PASS" in r.stderr and "cpu:int8" in r.stderr


def test_a_tuned_prompt_is_checked_with_its_metric(tiny_model, data_dir, tmp_path):
    run = tmp_path / "run"
    tuned = invoke(tune_args(tiny_model, data_dir, run, "--budget", 20, "--prompt-init", "reference", "-q"))
    assert tuned.exit_code == 0, tuned.output
    r = invoke(["check", "--model", tiny_model, "--prompt", run, "--data", data_dir / "test.csv",
                "--engines", "cpu:fp16", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["prompts"] == ["tuned", "z=0"] and report["labelled"] and report["rows"] == 60
    ref, fp16 = report["engines"]
    # the reference scores the run's prompt on the test rows as the run itself did
    assert ref["engine"] == "cpu:fp32" and ref["metric"] == pytest.approx(json.loads(tuned.stdout)["test_metric"])
    assert fp16["metric_delta"] is not None
    assert fp16["metric"] == pytest.approx(ref["metric"] + fp16["metric_delta"])


def test_an_engine_beyond_tolerance_fails_the_check(tiny_model, monkeypatch):
    pretend_cuda(monkeypatch, shift=0.01)
    args = ["check", "--model", tiny_model, "--task", "sst2", "--engines", "cpu:fp32,cuda:fp32", "--json"]
    r = invoke(args)
    assert r.exit_code == 1, r.output
    cuda = json.loads(r.stdout)["engines"][1]
    assert cuda["status"] == "fail" and "max abs diff" in cuda["reasons"][0] and "FAIL" in r.stderr
    loose = invoke([*args, "--fp32-max-diff", 0.05])  # the tolerance is the user's to set
    assert loose.exit_code == 0, loose.output


def test_disagreeing_predictions_fail_even_when_numbers_are_close(tiny_model, monkeypatch):
    pretend_cuda(monkeypatch, flip=True)
    r = invoke(["check", "--model", tiny_model, "--task", "sst2", "--engines", "cuda:fp32", "--fp32-max-diff", 1e9,
                "--json"])
    assert r.exit_code == 1
    cuda = [e for e in json.loads(r.stdout)["engines"] if e["engine"] == "cuda:fp32"][0]
    assert any("agreement" in reason for reason in cuda["reasons"])


def test_low_precision_engines_are_judged_by_agreement_and_metric(tiny_model):
    m = load_manifest(tiny_model)
    tok = load_tokenizer(m)
    spec = ProjectionSpec(0, 1, PROMPT_TOKENS, m.hidden_size, m.embedding_std)
    zero = TunedPrompt.zero(spec, PRESETS["sst2"])
    prompts = [("z=0", zero)] + [(f"r{i}", p) for i, p in enumerate(random_prompts(zero, m))]
    rows = sample_rows(False)
    report = check_engines(m, tok, prompts, rows, [(OrtSpec("cpu", "fp16"), True)], Tolerances(lowp_agreement=1.0))
    assert isinstance(report, CheckReport) and report.engines[1].status == "pass" and report.passed
    int8 = check_engines(m, tok, prompts, rows, [(OrtSpec("cpu", "int8"), True)], Tolerances(lowp_agreement=1.0))
    assert int8.engines[1].argmax_agreement < 1 and int8.engines[1].status == "fail" and not int8.passed
    with pytest.raises(SettingsError, match="at most 1"):
        check_engines(m, tok, prompts, rows, [(OrtSpec("cpu", "int8"), True)], Tolerances(lowp_agreement=1.5))


def test_a_damaged_graph_fails_the_check_by_name(tiny_model, tmp_path):
    bad = shutil.copytree(tiny_model, tmp_path / "model")
    with open(bad / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    r = invoke(["check", "--model", bad, "--task", "sst2", "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert "sha256" in report["graphs"]["int8"]
    assert [e["status"] for e in report["engines"] if e["engine"] == "cpu:int8"] == ["fail"]


def test_check_mistakes_are_one_line(tiny_model, tmp_path):
    assert "cpu:fp32 or ort:cuda:fp16" in cli_error(["check", "--model", tiny_model, "--task", "sst2", "--engines",
                                                      "tpu:fp32"])
    assert "cuda:fp32 cannot run here" in cli_error(["check", "--model", tiny_model, "--task", "sst2", "--engines",
                                                     "cuda:fp32"])
    assert "--lowp-agreement" in cli_error(["check", "--model", tiny_model, "--task", "sst2", "--lowp-agreement",
                                            "nan"])
    assert "say what the task is" in cli_error(["check", "--model", tiny_model])
    assert "twice" in cli_error(["check", "--model", tiny_model, "--task", "sst2", "--engines", "cpu:int8,ort:cpu:int8"])


def test_engine_specs_parse_with_or_without_the_backend():
    from bbt_onnx.engines import TritonSpec, parse_engine

    assert parse_engines("cpu:fp32, ort:cuda:fp16") == [OrtSpec("cpu", "fp32"), OrtSpec("cuda", "fp16")]
    assert OrtSpec.parse("CUDA:INT8").name == "cuda:int8"
    with pytest.raises(SettingsError):
        OrtSpec.parse("cpu")
    assert np.all([s.backend == "ort" for s in all_local_engines()])
    served = parse_engine("triton:grpc://127.0.0.1:9001", "secret")
    assert isinstance(served, TritonSpec) and served.remote.token == "secret" and served.name == "grpc://127.0.0.1:9001"
    assert parse_engine("http://127.0.0.1:9000").remote.protocol == "http"
    with pytest.raises(SettingsError, match="token goes with a server URL in engines"):
        parse_engines("cpu:fp32", "secret")
