"""`bbt-onnx bench` and the engine's length buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt_onnx import Model
from bbt_onnx.timing import split_batch
from bbt_onnx.data import Example
from bbt_onnx.encoding import length_buckets
from bbt_onnx.errors import BBTError
from bbt_onnx.tasks import PRESETS

from helpers import cli_error, invoke


def test_bench_json_reports_every_precision_against_torch(tiny_model):
    r = invoke(["bench", "--model", tiny_model, "--batch", 32, "--seq", 24, "--precision", "fp32", "--precision",
                "int8", "--repeat", 1, "--e2e-budget", 40, "--e2e-dim", 20, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [x["precision"] for x in report["results"]] == ["fp32", "int8"]
    for x in report["results"]:
        assert x["device"] == "cpu" and x["batch"] == 32 and x["seq"] == 24 and x["ms_per_call"] > 0
        assert x["memcpy_nodes"] == 0
        assert x["sequences_per_s"] == pytest.approx(32000 / x["ms_per_call"])
        assert x["torch_ms_per_call"] > 0 and x["ratio_vs_torch"] == pytest.approx(x["torch_ms_per_call"] / x["ms_per_call"])
    e2e = report["end_to_end"]
    assert e2e["budget"] == 40 and e2e["calls_per_second"] > 0
    assert e2e["engine_seconds"] + e2e["optimizer_seconds"] + e2e["host_seconds"] <= e2e["wall_seconds"] * 1.01
    assert set(report["optimizer_ms_per_generation"]) == {"full", "diagonal"}


def test_bench_table_without_torch(tiny_model):
    r = invoke(["bench", "--model", tiny_model, "--batch", 32, "--seq", 24, "--baseline", "none", "--repeat", 1,
                "--e2e-budget", 0])
    assert r.exit_code == 0, r.output
    assert "ms/call" in r.stdout and "fp32" in r.stdout and "end to end" not in r.stdout


def test_bench_bad_shapes_are_user_errors(tiny_model):
    assert "too short" in cli_error(["bench", "--model", tiny_model, "--seq", 5, "--baseline", "none"])
    assert "multiple of 32" in cli_error(["bench", "--model", tiny_model, "--batch", 48, "--baseline", "none"])
    assert split_batch(640) == (20, 32) and split_batch(16) == (1, 16)
    with pytest.raises(BBTError):
        split_batch(33)


def test_length_buckets_cover_every_row_and_cut_padding():
    lengths = np.array([50, 12, 48, 10, 11, 49, 13, 47])
    groups = length_buckets(lengths, max_buckets=4)
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))
    padded = sum(len(g) * lengths[g].max() for g in groups)
    assert len(groups) == 2 and padded == 4 * 13 + 4 * 50
    assert len(length_buckets(np.full(10, 30))) == 1  # nothing to gain: one call
    assert len(length_buckets(lengths, max_buckets=1)) == 1


def test_bucketed_engine_calls_give_the_same_logits(tiny_model):
    one = Model.load(tiny_model)
    one.engine.max_buckets = 1
    many = Model.load(tiny_model)
    rows = [Example("fun " * n) for n in (1, 30, 2, 28, 3, 25, 1, 2)]
    enc = one.encoder(PRESETS["sst2"], 8).encode(rows)
    assert many.engine.plan_summary(enc)["calls"] > 1
    prompts = np.random.default_rng(0).normal(0, 0.5, (3, 8, one.manifest.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(many.engine.label_logits(prompts, enc), one.engine.label_logits(prompts, enc),
                               atol=1e-5)


def test_io_binding_path_gives_the_same_logits(tiny_model):
    """The CUDA path binds rows once and uploads only prompts; on the CPU device it must agree bit for bit."""
    plain = Model.load(tiny_model)
    bound = Model.load(tiny_model)
    bound.engine.io_binding = True
    enc = plain.encoder(PRESETS["sst2"], 8).encode([Example("fun " * n) for n in (1, 30, 2, 28)])
    prompts = np.random.default_rng(1).normal(0, 0.5, (2, 8, plain.manifest.hidden_size)).astype(np.float32)
    for _ in range(2):  # the second call reuses the bound rows
        np.testing.assert_array_equal(bound.engine.label_logits(prompts, enc), plain.engine.label_logits(prompts, enc))
    assert bound.engine.plan_summary(enc)["rows_on_device"]


def test_memcpy_nodes_are_counted_from_the_optimised_graph(tiny_model, monkeypatch):
    import onnx

    from bbt_onnx.jobs import bench

    m = Model.load(tiny_model).manifest
    assert bench.memcpy_nodes(m, "fp32", "cpu") == 0  # every node on the CPU provider
    # a graph in which onnxruntime placed two copies counts two: the count reads NodeProto op_type fields
    nodes = [onnx.helper.make_node("MemcpyToHost", ["a"], ["b"]), onnx.helper.make_node("MemcpyFromHost", ["b"], ["c"]),
             onnx.helper.make_node("Relu", ["c"], ["d"])]
    graph = onnx.helper.make_graph(nodes, "g", [], [])
    placed = onnx.helper.make_model(graph).SerializeToString()
    monkeypatch.setattr(bench, "optimized_graph", lambda *_: placed)
    assert bench.memcpy_nodes(m, "fp32", "cuda") == 2
