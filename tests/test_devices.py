"""One record per device and per precision (`bbt_onnx.devices`): every part of the tool asks it, none compares names."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

import bbt_onnx
from bbt_onnx.deploy import DeployOptions, deploy
from bbt_onnx.devices import DEVICES, INSTANCES, PRECISIONS, Parity
from bbt_onnx.encoding import load_tokenizer
from bbt_onnx.engines import OrtEngine, OrtSpec
from bbt_onnx.errors import ModelError
from bbt_onnx.jobs.check import check_engines, sample_rows
from bbt_onnx.manifest import load_manifest
from bbt_onnx.prompt import TunedPrompt
from bbt_onnx.serving.repository import Served, model_config
from bbt_onnx.tasks import PRESETS

LIBRARY = Path(bbt_onnx.__file__).parent
NAMES = "|".join(sorted({*DEVICES, *PRECISIONS, *INSTANCES}))
# a name compared: `== "cuda"`, `"fp16" !=`, `in ("fp16", ...)`, `"fp16" in graphs`, `case "cpu":`
COMPARISON = re.compile(
    rf"""[=!]=\s*["']({NAMES})["']|["']({NAMES})["']\s*[=!]=|\bin\s*[(\[{{][^)\]}}]*["']({NAMES})["']"""
    rf"""|["']({NAMES})["']\s+(not\s+)?in\b|\bcase\s+["']({NAMES})["']""", re.IGNORECASE)


def comparisons(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if COMPARISON.search(line)]


def test_the_scan_catches_a_name_compared_and_passes_a_name_used():
    compared = ['if device == "cuda":', "x = 4 if opts.device != 'cpu' else 1", 'if precision in ("fp16", "int8"):',
                'return "fp16" if "fp16" in manifest.graphs else "fp32"', 'if kind not in ["gpu"]:', 'case "int8":',
                'fp16 = device == "CUDA"']
    used = ['device: str = setting("cpu", "provider.")', 'record = {"cpu": processor()}',
            'binding.bind_output(name, "cpu")', 'precision: str = "fp32"', 'DEVICES["cuda"].row_buckets',
            'raise SettingsError("int8_levels needs int8")']
    assert comparisons("\n".join(compared)) == compared
    assert comparisons("\n".join(used)) == []


def test_no_module_but_the_registry_compares_a_device_or_precision_name():
    found = [f"{path.relative_to(LIBRARY)}: {line}" for path in sorted(LIBRARY.rglob("*.py"))
             if path.name != "devices.py" for line in comparisons(path.read_text(encoding="utf-8"))]
    assert found == []


def test_check_and_deploy_hold_a_precision_to_its_one_record(tiny_model, monkeypatch, tmp_path):
    """fp16's record gated like an exact graph (any logit diff fails) and with no room in deploy's probe: check
    fails cpu:fp16 on max diff, deploy refuses its classifier; both read the record, neither the name."""
    m = load_manifest(tiny_model)
    template = TunedPrompt.template(m, PRESETS["sst2"])
    template.save(tmp_path / "prompt.npz")

    def check_fp16():
        report = check_engines(m, load_tokenizer(m), [("template", template)], sample_rows(False),
                               [(OrtSpec("cpu", "fp16"), True)])
        return report.engines[1]

    assert check_fp16().status == "pass"
    assert "max_abs_diff" in deploy(DeployOptions(tiny_model, str(tmp_path / "prompt.npz"), tmp_path / "before",
                                                  precision="fp16"))["check"]
    monkeypatch.setitem(PRECISIONS, "fp16", replace(PRECISIONS["fp16"], parity=Parity("lowp", 0.0, max_diff=0.0),
                                                   probe_tolerance=-1.0))
    strict = check_fp16()
    assert strict.status == "fail" and strict.reasons[0].startswith("max abs diff"), strict
    with pytest.raises(ModelError, match="tolerance -1"):
        deploy(DeployOptions(tiny_model, str(tmp_path / "prompt.npz"), tmp_path / "after", precision="fp16"))
    assert not (tmp_path / "after").exists()


def open_as(monkeypatch, manifest, device: str):
    """An OrtEngine on `device`, its session a CPU one that says it runs on the device's provider; and the
    provider entries it was opened with."""
    import onnxruntime as ort

    real, asked, provider = ort.InferenceSession, [], DEVICES[device].provider

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            asked.append(providers)
            self._session = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return [provider]

        def __getattr__(self, name):
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [d.provider for d in DEVICES.values()])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    return OrtEngine(manifest, device=device), asked


@pytest.mark.parametrize("device", list(DEVICES))
def test_a_served_model_runs_as_the_engine_does_on_each_device(tiny_model, monkeypatch, device):
    """Row buckets and provider options: the repository's config (stock backend and python backend) says what the
    in-process engine does on the same device."""
    m = load_manifest(tiny_model)
    engine, asked = open_as(monkeypatch, m, device)
    kind = DEVICES[device].instance
    stock = model_config(Served(m, m.graph("fp32"), "m", "fp32", kind=kind))
    python = model_config(Served(m, m.graph("fp32"), "m", "fp32", backend="python", kind=kind, device=device))
    for config in (stock, python):
        assert config.parameters["bbt_row_buckets"].string_value == str(engine.max_buckets)
    [(provider, options)] = asked[0]
    assert python.parameters["bbt_provider"].string_value == provider == engine.provider
    assert json.loads(python.parameters["bbt_provider_options"].string_value) == options
    accelerators = stock.optimization.execution_accelerators.gpu_execution_accelerator
    assert {k: v for a in accelerators for k, v in a.parameters.items()} == options  # fp32 kept fp32 alike
