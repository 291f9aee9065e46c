"""Decoder int8 (export/quantize.py): GPTQ rounding, SmoothQuant folded into a norm, two activation levels and
fp32 outlier channels, each checked on a small hand-built graph against its fp32 result."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bbt_onnx_export import quantize
from bbt_onnx_export.quantize import LLAMA_MLP, Int8Settings, calibrate, gptq, rewrite

K, N, OUTLIER = 64, 48, 5


def graph(rng, exact_weights=False) -> onnx.ModelProto:
    """x -> Mul(norm weight) -> gate/up (a group a norm feeds: one level), and Relu(x) -> down (two levels)."""
    def weight(name):
        w = rng.normal(0, 0.1, (K, N))
        if exact_weights:  # already on the int8 grid of its column scales: no rounding error at all
            w = np.round(w / quantize.column_scales(w)) * quantize.column_scales(w)
        return numpy_helper.from_array(w.astype(np.float32), name)

    nodes = [helper.make_node("Mul", ["x", "gamma"], ["normed"], name="/layers.1/norm/Mul"),
             helper.make_node("MatMul", ["normed", "w_gate"], ["gate"], name="/layers.1/mlp/gate_proj/MatMul"),
             helper.make_node("MatMul", ["normed", "w_up"], ["up"], name="/layers.1/mlp/up_proj/MatMul"),
             helper.make_node("Relu", ["x"], ["act"], name="/layers.1/mlp/Relu"),
             helper.make_node("MatMul", ["act", "w_down"], ["down"], name="/layers.1/mlp/down_proj/MatMul")]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, K).astype(np.float32), "gamma"),
             weight("w_gate"), weight("w_up"), weight("w_down")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("gate", "up", "down")],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def inputs(rng, count=4):
    """Activations with one outlier channel, 40x the others, as decoders have."""
    out = []
    for _ in range(count):
        x = rng.normal(0, 1, (3, 16, K)).astype(np.float32)
        x[..., OUTLIER] *= 40
        out.append({"x": x})
    return out


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def rel_error(got, want):
    return float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))


def quantized(model, feeds, **settings):
    q = onnx.ModelProto()
    q.CopyFrom(model)
    stats = rewrite(q, calibrate(model, feeds), LLAMA_MLP, num_layers=3, settings=Int8Settings(edge_layers=1,
                                                                                                       **settings))
    return q, stats


def test_gptq_beats_rounding_on_the_calibration_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (512, K)) @ rng.normal(0, 1, (K, K))  # correlated inputs, as real activations are
    w = rng.normal(0, 0.1, (K, N))
    scale = quantize.column_scales(w)
    nearest = np.clip(np.round(w / scale), -127, 127)
    rounded = gptq(w, x.T @ x, scale)
    assert rounded.dtype == np.int8 and np.abs(rounded.astype(int) - nearest).max() >= 1
    err = lambda q: np.linalg.norm(x @ w - x @ (q * scale))  # noqa: E731
    assert err(rounded) < 0.8 * err(nearest)


def test_each_path_stays_close_to_fp32_and_far_closer_than_dynamic_int8(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    model = graph(rng)
    feeds = inputs(rng)
    q, stats = quantized(model, feeds)
    assert stats == {"one-level groups": 1, "smoothed groups": 1, "two-level groups": 1, "outlier groups": 1}
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 + 2 and ops.count("MatMul") == 1  # down: two levels + fp32 outliers
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    dynamic = onnx.load(tmp_path / "d.onnx")
    test = inputs(np.random.default_rng(2), 1)[0]
    want, got, dyn = run(model, test), run(q, test), run(dynamic, test)
    for w, g, d in zip(want, got, dyn):
        assert rel_error(g, w) < 0.02 and rel_error(g, w) < 0.5 * rel_error(d, w)


def test_the_smoothing_is_folded_into_the_norm_weight():
    rng = np.random.default_rng(3)
    model = graph(rng)
    q, _ = quantized(model, inputs(rng))
    mul = next(n for n in q.graph.node if n.name == "/layers.1/norm/Mul")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    folded = inits[mul.input[1]]
    gamma = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gamma"))
    ratio = gamma / folded  # the smoothing scales: the outlier channel is divided most
    assert np.argmax(ratio) == OUTLIER and ratio[OUTLIER] > 3 * np.median(ratio)


def test_two_levels_carry_the_activation_to_about_15_bits():
    """With weights already on their int8 grid, only the activations are rounded: one level (dynamic int8 of the
    whole tensor) is off by about 1e-2, two levels by far less."""
    rng = np.random.default_rng(4)
    model = graph(rng, exact_weights=True)
    feeds = inputs(rng)
    q, stats = quantized(model, feeds, outliers=0)
    assert stats["two-level groups"] == 1 and "outlier groups" not in stats
    test = inputs(np.random.default_rng(5), 1)[0]
    want, got = run(model, test)[2], run(q, test)[2]
    assert rel_error(got, want) < 1e-3


@pytest.mark.parametrize("family,settings", [(quantize.Int8Family(), Int8Settings(edge_layers=1)),
                                              (LLAMA_MLP, Int8Settings(edge_layers=1, one_level=False))])
def test_two_levels_everywhere_without_a_record_or_when_asked(family, settings):
    rng = np.random.default_rng(6)
    model = graph(rng)
    stats = rewrite(model, calibrate(model, inputs(rng)), family, num_layers=3, settings=settings)
    assert stats.get("one-level groups", 0) == 0 and stats["two-level groups"] == 2


@pytest.mark.parametrize("layer,one_level", [(0, False), (1, True), (2, False)])
def test_the_edge_layers_keep_two_levels(layer, one_level):
    rng = np.random.default_rng(7)
    model = graph(rng)
    for node in model.graph.node:
        node.name = node.name.replace("layers.1", f"layers.{layer}")
    q, stats = quantized(model, inputs(rng))
    assert (stats.get("one-level groups", 0) == 1) == one_level


def test_a_decoder_exports_its_deep_graph_in_int8_too(tmp_path):
    """BBTv2's deep graph is calibrated with prompts on every layer, and scores close to its fp32 twin (on weights
    at the usual init scale: the shared test models' 25x larger weights are far harder on int8)."""
    from bbt_onnx import Model, OrtSpec
    from bbt_onnx.synthetic import sentiment_examples
    from bbt_onnx.tasks import Task
    from bbt_onnx_export import ExportOptions, export_model
    from bbt_onnx_export.tiny import make_tiny_causal

    src = make_tiny_causal(tmp_path / "src", "LlamaForCausalLM")
    m = export_model(ExportOptions(str(src), tmp_path / "model", prompt_tokens=4, deep=True, int8=True))
    assert m.graphs["deep-int8"].fused_ops["two-level groups"] >= 4
    task = Task("sentiment", " Review: {text}\nSentiment:", (("0", "bad"), ("1", "great")))
    rng = np.random.default_rng(0)
    layers = np.stack([rng.normal(0, s, (4, m.hidden_size)) for s in m.layer_std]).astype(np.float32)
    out = {}
    for precision in ("fp32", "int8"):
        model = Model.load(tmp_path / "model", OrtSpec("cpu", precision), deep=True)
        enc = model.encoder(task, 4).encode(sentiment_examples(6, seed=0))
        out[precision] = model.engine.deep_label_logits(layers[1][None], enc, layers, 1)
    assert rel_error(out["int8"], out["fp32"]) < 0.02


@pytest.mark.parametrize("levels,one_level", [(None, 1), ("two", 0)])
def test_export_cli_int8_levels(tmp_path, levels, one_level):
    """5 layers: the middle one (2) is the only one past the two edge layers on each side."""
    import json

    from bbt_onnx_export.tiny import make_tiny_causal
    from helpers import invoke

    src = make_tiny_causal(tmp_path / "src", "LlamaForCausalLM", layers=5)
    r = invoke(["export", "--model", src, "--out", tmp_path / "m", "--prompt-tokens", 4, "--int8",
                *(["--int8-levels", levels] if levels else [])])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)["graphs"]["int8"]["fused_ops"]
    assert stats.get("one-level groups", 0) == one_level and stats["two-level groups"] == 4 * 5 - one_level
