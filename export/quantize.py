"""Accurate int8 for decoders: calibrated, smoothed, GPTQ-rounded weights and two-level activations.

onnxruntime's `quantize_dynamic` quantizes each activation tensor with one 8-bit scale. On a
decoder such as SmolLM2 that flips the label-word argmax on about a third of the rows: a few
channels carry outliers, and 8 bits across a whole tensor are too coarse for the small margins
between label words. This pass keeps onnxruntime's fast integer kernels (MatMulIntegerToFloat)
and spends their speed on precision where it matters:

- every linear layer's input is quantized once per tensor, and by default the residual a second
  time at 1/254 of the step, so the activations carry about 15 bits in two integer matmuls;
- the layers a family names (a decoder's MLP input projections) take one level: their input comes
  from a norm whose weight absorbs SmoothQuant scales, computed on calibration rows at export;
- weights are int8 per output column, rounded by GPTQ against the calibration rows' Gram matrix;
- input channels with outliers on a layer that takes two levels and has no norm to smooth into are
  taken out of the integer path and multiplied in fp32.

The first and last `edge_layers` layers keep two levels everywhere.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import ExportError

MS_DOMAIN = "com.microsoft"
LEVEL2 = 254.0  # the residual of a step-s quantization lies within +-s/2: step s/254 fills int8


@dataclass(frozen=True)
class Int8Family:
    """One architecture's int8 record (a field of its export family): the linears that take one activation level,
    and how to find a layer."""

    one_level: str = r"$^"  # regex on the MatMul node name; matches nothing by default
    layer: str = r"layers\.(\d+)/"


LLAMA_MLP = Int8Family(one_level=r"/mlp/(gate|up)_proj/")  # the MLP input projections, after the RMSNorm


@dataclass(frozen=True)
class Int8Settings:
    one_level: bool = True  # the family's one-level groups take one level (False: two levels everywhere)
    edge_layers: int = 2  # the first and last layers keep two levels everywhere
    alpha: float = 0.8  # SmoothQuant migration strength for the one-level layers
    outliers: int = 8  # input channels kept in fp32 on a two-level layer without a norm ...
    outlier_ratio: float = 20.0  # ... when its largest channel is this many times the median channel
    damp: float = 0.01  # GPTQ's dampening, a fraction of the Gram matrix's mean diagonal
    block: int = 128  # GPTQ's lazy-update block


@dataclass
class Calibration:
    """Per linear input (by tensor name): the largest |x| per channel, and X^T X over real tokens."""

    channel_max: dict[str, np.ndarray]
    gram: dict[str, np.ndarray]


# --------------------------------------------------------------------------- pure maths
def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|x_j|^a / max|w_j|^(1-a): x / s and s * W have the product of x and W."""
    return np.maximum(act_max, 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)


def column_scales(weight: np.ndarray) -> np.ndarray:
    """Symmetric int8 scale per output column of W [K, N]."""
    return np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0


def gptq(weight: np.ndarray, gram: np.ndarray, scale: np.ndarray, damp: float = 0.01,
         block: int = 128) -> np.ndarray:
    """Round W [K, N] to int8 at the given column scales, one input row at a time, moving each row's rounding
    error onto the rows not yet rounded through the inverse Gram matrix (GPTQ, Frantar et al. 2022): it
    minimises ||X W - X W_q|| over the calibration rows X instead of ||W - W_q||."""
    w = np.array(weight, dtype=np.float64)
    h = np.array(gram, dtype=np.float64)
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # inv(H) = U^T U
    q = np.zeros_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[b0:b1].copy()
        err = np.zeros_like(wb)
        for i in range(b1 - b0):
            q[b0 + i] = np.clip(np.round(wb[i] / scale), -127, 127)
            err[i] = (wb[i] - q[b0 + i] * scale) / upper[b0 + i, b0 + i]
            wb[i + 1:] -= np.outer(upper[b0 + i, b0 + i + 1:b1], err[i])
        w[b1:] -= upper[b0:b1, b1:].T @ err
    return q.astype(np.int8)


def outlier_channels(channel_max: np.ndarray, count: int, ratio: float) -> np.ndarray:
    """The `count` largest channels, when the largest is over `ratio` times the median; else none."""
    out = np.zeros(channel_max.shape, bool)
    if count and channel_max.max() > ratio * np.median(channel_max):
        out[np.argsort(channel_max)[-count:]] = True
    return out


# --------------------------------------------------------------------------- graph
def _plain_gemm(node) -> bool:
    """A Gemm that is x @ W (+ bias): GPT-2's Conv1D exports as one."""
    attrs = {a.name: _attr(a) for a in node.attribute}
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)


def _attr(attribute):
    from onnx import helper

    return helper.get_attribute_value(attribute)


def linear_groups(model) -> dict[str, list]:
    """MatMuls (and plain Gemms) with a constant 2-D weight, grouped by their activation input (q/k/v share one)."""
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    groups: dict[str, list] = collections.defaultdict(list)
    for node in model.graph.node:
        if node.input[1:2] and node.input[1] in weights and (
                node.op_type == "MatMul" or (node.op_type == "Gemm" and _plain_gemm(node))):
            groups[node.input[0]].append(node)
    return dict(groups)


def _weight(node, inits) -> np.ndarray:
    """The node's weight as [K, N]."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and _attr(a) for a in node.attribute)
    return w.T if transposed else w


def calibrate(model, feeds: Iterable[dict[str, np.ndarray]], threads: int | None = None) -> Calibration:
    """Run the fp32 graph on calibration feeds and record every linear input's channel max and Gram matrix.
    Padding positions are left out when the activation is laid out [C*N, T, K] like the rows."""
    import onnx
    import onnxruntime as ort

    names = list(linear_groups(model))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    channel_max: dict[str, np.ndarray] = {}
    gram: dict[str, np.ndarray] = {}
    for feed in feeds:
        mask = feed["attention_mask"].astype(bool) if "attention_mask" in feed else None
        for name, x in zip(names, session.run(names, feed)):
            rows = x.reshape(-1, x.shape[-1])
            if mask is not None and x.ndim == 3 and x.shape[0] % mask.shape[0] == 0 and x.shape[1] == mask.shape[1]:
                rows = x[np.tile(mask, (x.shape[0] // mask.shape[0], 1))]
            rows = rows.astype(np.float64)
            top = np.abs(rows).max(axis=0)
            channel_max[name] = np.maximum(channel_max[name], top) if name in channel_max else top
            gram[name] = gram[name] + rows.T @ rows if name in gram else rows.T @ rows
    return Calibration(channel_max, gram)


def _layer(name: str, family: Int8Family) -> int | None:
    found = re.search(family.layer, name)
    return int(found.group(1)) if found else None


def _norm_weight(node, inits: dict, producer: dict, width: int):
    """(node, its input, the initializer behind it) when `node` is a Mul by a [width] initializer (an RMSNorm's
    scale), which can absorb smoothing scales; else None. The exporter shares equal weights through Identity."""
    if node is None or node.op_type != "Mul":
        return None
    for name in node.input:
        source = name
        while source not in inits and source in producer and producer[source].op_type == "Identity":
            source = producer[source].input[0]
        if source in inits and tuple(inits[source].dims) == (width,):
            return node, name, source
    return None


@dataclass
class GroupPlan:
    """How one group (the linears reading one tensor) is quantized."""

    one_level: bool
    scales: np.ndarray  # smoothing: the input is divided by these, the weights' rows multiplied
    outliers: np.ndarray  # [K] bool: channels multiplied in fp32
    norm: tuple | None  # (Mul node, its input, the initializer behind it) that absorbs the smoothing


def plan_group(model_facts: tuple, activation: str, linears: list, weights: list[np.ndarray],
               calibration: Calibration, family: Int8Family, num_layers: int, settings: Int8Settings) -> GroupPlan:
    """One level (smoothed into the norm) for the family's groups past the edge layers; else two levels, with
    fp32 outlier channels where no norm could have smoothed them."""
    inits, producer, readers = model_facts
    width = weights[0].shape[0]
    act_max = calibration.channel_max[activation]
    layer = _layer(linears[0].name, family)
    edge = layer is None or layer < settings.edge_layers or layer >= num_layers - settings.edge_layers
    # the norm can take the smoothing only when the group's linears are all that read its output
    norm = _norm_weight(producer.get(activation), inits, producer, width) if readers[activation] == len(linears) \
        else None
    one_level = (settings.one_level and not edge and norm is not None
                 and all(re.search(family.one_level, n.name) for n in linears))
    if one_level:
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        return GroupPlan(True, smoothing_scales(act_max, w_max, settings.alpha), np.zeros(width, bool), norm)
    outliers = np.zeros(width, bool) if norm is not None else \
        outlier_channels(act_max, settings.outliers, settings.outlier_ratio)
    return GroupPlan(False, np.ones(width), outliers, None)


def activation_nodes(tag: str, activation: str, plan: GroupPlan) -> tuple[list, list]:
    """Quantize the group's input once (and its residual, for two levels); split off fp32 outlier channels."""
    from onnx import helper, numpy_helper

    nodes, inits, source = [], [], activation
    if plan.outliers.any():
        inits += [numpy_helper.from_array((~plan.outliers).astype(np.float32), tag + "_keep"),
                  numpy_helper.from_array(np.nonzero(plan.outliers)[0].astype(np.int64), tag + "_outliers")]
        nodes += [helper.make_node("Mul", [activation, tag + "_keep"], [tag + "_in"]),
                  helper.make_node("Gather", [activation, tag + "_outliers"], [tag + "_out"], axis=-1)]
        source = tag + "_in"
    nodes.append(helper.make_node("DynamicQuantizeLinear", [source], [tag + "_q", tag + "_s", tag + "_zp"]))
    if not plan.one_level:
        nodes += [helper.make_node("DequantizeLinear", [tag + "_q", tag + "_s", tag + "_zp"], [tag + "_dq"]),
                  helper.make_node("Sub", [source, tag + "_dq"], [tag + "_r"]),
                  helper.make_node("Mul", [tag + "_s", "int8_level2"], [tag + "_s2"]),
                  helper.make_node("QuantizeLinear", [tag + "_r", tag + "_s2", "int8_zero_point"], [tag + "_q2"])]
    return nodes, inits


def linear_nodes(tag: str, node, weight: np.ndarray, gram: np.ndarray, plan: GroupPlan,
                 settings: Int8Settings) -> tuple[list, list]:
    """One linear on the group's quantized input: an integer matmul per level, plus fp32 outliers, summed into
    the node's own output name."""
    from onnx import helper, numpy_helper

    name = re.sub(r"[^A-Za-z0-9]+", "_", node.name or node.output[0]).strip("_") + "_int8"
    smoothed = np.where(plan.outliers[:, None], 0.0, weight * plan.scales[:, None])
    col = column_scales(smoothed)
    inits = [numpy_helper.from_array(gptq(smoothed, gram, col, settings.damp, settings.block), name + "_w"),
             numpy_helper.from_array(col.astype(np.float32), name + "_ws")]
    bias = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
    nodes = [helper.make_node("MatMulIntegerToFloat", [tag + "_q", name + "_w", tag + "_s", name + "_ws", tag + "_zp",
                                                       *([""] + bias if bias else [])], [name + "_y1"],
                              domain=MS_DOMAIN)]
    parts = [name + "_y1"]
    if not plan.one_level:
        nodes.append(helper.make_node("MatMulIntegerToFloat", [tag + "_q2", name + "_w", tag + "_s2", name + "_ws",
                                                               "int8_zero_point"], [name + "_y2"], domain=MS_DOMAIN))
        parts.append(name + "_y2")
    if plan.outliers.any():
        inits.append(numpy_helper.from_array(weight[plan.outliers].astype(np.float32), name + "_wout"))
        nodes.append(helper.make_node("MatMul", [tag + "_out", name + "_wout"], [name + "_yo"]))
        parts.append(name + "_yo")
    total = parts[0]
    for i, part in enumerate(parts[1:], 1):
        target = node.output[0] if i == len(parts) - 1 else f"{name}_sum{i}"
        nodes.append(helper.make_node("Add", [total, part], [target]))
        total = target
    if len(parts) == 1:
        nodes[-1].output[0] = node.output[0]
    return nodes, inits


def rewrite(model, calibration: Calibration, family: Int8Family, num_layers: int,
            settings: Int8Settings = Int8Settings()) -> dict[str, int]:
    """Replace every constant-weight linear of `model` (in place) with the integer path; returns what it did."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    readers = collections.Counter(name for node in model.graph.node for name in node.input)
    added = [numpy_helper.from_array(np.array(1.0 / LEVEL2, np.float32), "int8_level2"),
             numpy_helper.from_array(np.array(128, np.uint8), "int8_zero_point")]
    replaced: dict[int, list] = {}
    stats = collections.Counter()
    for activation, linears in linear_groups(model).items():
        weights = [_weight(n, inits) for n in linears]
        plan = plan_group((inits, producer, readers), activation, linears, weights, calibration, family, num_layers,
                          settings)
        tag = re.sub(r"[^A-Za-z0-9]+", "_", activation).strip("_") + "_int8"
        if plan.one_level:  # the norm's weight takes 1/s; a new initializer, as the exporter may share weights
            mul, wired, gamma = plan.norm
            folded = numpy_helper.to_array(inits[gamma]).astype(np.float64) / plan.scales
            added.append(numpy_helper.from_array(folded.astype(np.float32), tag + "_norm"))
            mul.input[list(mul.input).index(wired)] = tag + "_norm"
            stats["smoothed groups"] += 1
        stats["one-level groups" if plan.one_level else "two-level groups"] += 1
        stats["outlier groups"] += int(plan.outliers.any())
        nodes, new = activation_nodes(tag, activation, plan)
        added += new
        gram = calibration.gram[activation] / plan.scales[:, None] / plan.scales[None, :]
        gram[plan.outliers, :] = 0.0
        gram[:, plan.outliers] = 0.0
        for node, weight in zip(linears, weights):
            more, new = linear_nodes(tag, node, weight, gram, plan, settings)
            nodes += more
            added += new
        replaced[id(linears[0])] = nodes  # the group's nodes go where its first linear was
        for node in linears[1:]:
            replaced[id(node)] = []
    kept = [n for node in model.graph.node for n in replaced.get(id(node), [node])]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    initializers = [i for i in model.graph.initializer if i.name in used] + added
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return {k: v for k, v in stats.items() if v}


def accurate_int8(src, dst, feeds: list[dict[str, np.ndarray]], family: Int8Family, num_layers: int,
                  settings: Int8Settings = Int8Settings()) -> dict[str, int]:
    """`src` (a plain fp32 decoder graph) -> `dst`, calibrated on `feeds` (the graph's inputs)."""
    import onnx

    model = onnx.load(str(src))
    if not linear_groups(model):
        raise ExportError("the graph has no linear layer with a constant weight to quantize")
    calibration = calibrate(model, feeds)
    stats = rewrite(model, calibration, family, num_layers, settings)
    onnx.save(model, str(dst))
    return stats
