"""A tuned prompt baked into one ONNX graph: `build_classifier(manifest, prompt, precision, inputs)`.

The model's scoring graph is kept as exported; its prompt inputs become constants (the prompt's embeddings for
BBT; every layer's prompt, with layer 0 searched, for BBTv2), its label ids too, and a classifier head turns
its label logits into `probabilities` [N, K] (float32, in the task's label order) and `label` [N] (int64). In
front of it either the in-graph tokenizer (`front.py`: `text` [N] strings, and `text_b` for a pair task) or
nothing (the row inputs `input_ids`, `attention_mask`, `mask_pos` and, for decoders, `prompt_pos`, built by
the recipe beside it). The recipe (`layout`) is read off the runtime's own `Encoder`, so the classifier's rows
are the runtime's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..version import __version__
from ..contract import PROMPT_POS
from ..encoding import Encoder, load_tokenizer
from ..errors import ModelError, SettingsError
from ..manifest import Manifest
from ..prompt import Blend, PromptEnsemble, Result
from .front import CONTRIB, Graph, build_front, graph_tokenizer
from .recipe import RECIPE_FORMAT, TEXT_FIELDS
from .recipe import encode as recipe_encode

INPUTS = ("auto", "text", "ids")
ROW_INPUTS = ("input_ids", "attention_mask", "mask_pos")
OUTPUTS = ("probabilities", "label")


def onnx_module():
    """The onnx package, or one line naming the extra that brings it."""
    try:
        import onnx
    except ImportError:
        raise SettingsError("deploy builds graphs with the onnx package: pip install 'bbt-onnx[deploy]'") from None
    return onnx


def layout(encoder: Encoder, prompt_positions: bool) -> dict:
    """The recipe of this encoder's rows (see recipe.py): one string holds the text fields, every id around it
    is fixed."""
    def has_fields(parts) -> bool:
        return any(part[1] in TEXT_FIELDS for part in parts)

    before, after = encoder.before, encoder.after
    if has_fields(before) == has_fields(after):
        raise SettingsError("the text fields must all lie on one side of the prompt slots")
    variable_after = has_fields(after)
    variable, fixed = (after, before) if variable_after else (before, after)
    fixed_text = "".join(part[0] for part in fixed)
    fixed_ids = encoder.tokenizer.encode(fixed_text, add_special_tokens=False).ids if fixed else []
    segments = []
    for literal, name, _, _ in variable:
        if literal:
            segments.append(["literal", literal])
        if name == "mask":
            segments.append(["mask", encoder.mask_text])
        elif name is not None:
            segments.append(["field", name])
    # a decoder's demonstrations (with BOS and a chat opening) are ids before every row: the front writes them
    # out in each row, which the runtime computes once; the row's own limit stays the runtime's
    shared = [int(i) for i in encoder.prefix_ids]
    lead, slots, tail = shared + list(encoder.lead), list(encoder.placeholder_ids), list(encoder.tail)
    if variable_after:
        pre, post, prompt_pos = lead + fixed_ids + slots, tail, len(lead) + len(fixed_ids)
    else:
        pre, post, prompt_pos = lead, slots + fixed_ids + tail, len(lead)
    return {"format": RECIPE_FORMAT,
            "fields": [f for f in TEXT_FIELDS if any(s == ["field", f] for s in segments)],
            "segments": segments, "pre_ids": [int(i) for i in pre], "post_ids": [int(i) for i in post],
            "max_length": int(encoder.max_length) + len(shared), "pad_id": int(encoder.manifest.pad_id),
            "mask": "token" if encoder.manifest.lm.mask_token else "last",
            "prompt_pos": prompt_pos, "prompt_after_text": not variable_after,
            "prompt_positions": bool(prompt_positions)}


@dataclass
class Classifier:
    """The built graph and what goes beside it."""

    model: object  # onnx.ModelProto
    inputs: str  # "text": strings in; "ids": token ids in, with the recipe beside it
    recipe: dict
    metadata: dict[str, str]
    labels: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    parts: list["Classifier"] = field(default_factory=list)  # a blend's members' own classifiers, for the checks

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input]


def choose_inputs(requested: str, tokenizer_json: dict) -> tuple[str, str | None]:
    """("text" or "ids", why the tokenizer cannot run in the graph or None)."""
    if requested not in INPUTS:
        raise SettingsError(f"inputs {requested!r} is not one of {', '.join(INPUTS)}", "inputs")
    why = graph_tokenizer(tokenizer_json)
    if requested == "text" and why:
        raise SettingsError(f"inputs text: onnxruntime-extensions cannot run this model's tokenizer in the graph "
                            f"({why}); deploy with ids instead, a graph that takes token ids, and its recipe",
                            "inputs")
    if requested == "auto":
        return ("ids" if why else "text"), why
    return requested, why


def build_classifier(manifest: Manifest, prompt: Result, precision: str = "fp32", inputs: str = "auto",
                     prompt_sha256: str = "") -> Classifier:
    """The classifier graph of what a run kept (a tuned prompt, the seeds' ensemble or a plain template, calibrated
    or not, or a blend of them) on this model's `precision` graph."""
    if isinstance(prompt, Blend):
        return build_blend(manifest, prompt, precision, inputs, prompt_sha256)
    onnx = onnx_module()
    from onnx import TensorProto, helper, numpy_helper

    tokenizer = load_tokenizer(manifest)
    tokenizer_json = json.loads(manifest.tokenizer_path.read_text(encoding="utf-8"))
    kind, why = choose_inputs(inputs, tokenizer_json)
    path = manifest.graph_path(precision, prompt.deep)  # a ModelError names the graphs the model has
    model = onnx.load(str(path))
    graph = model.graph
    names = {i.name: i for i in graph.input}
    encoder = Encoder(tokenizer, manifest, prompt.task, prompt.prompt_tokens, prompt.max_length,
                      prompt.placeholder_ids)
    recipe = layout(encoder, PROMPT_POS in names)
    moved = recipe["prompt_after_text"] or recipe["prompt_pos"] != manifest.prompt_start
    if not recipe["prompt_positions"] and moved:
        raise ModelError(f"the {path.name} graph puts the prompt right after BOS only, and this prompt's framing "
                         "puts it elsewhere; re-export the model")
    dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[
        names["prompt_embeds"].type.tensor_type.elem_type]
    members = prompt.members if isinstance(prompt, PromptEnsemble) else (prompt,)
    embeds = [np.asarray(m.embeds, dtype=dtype) for m in members]
    label_ids = np.asarray(encoder.label_ids, np.int64)
    if prompt.deep:  # BBTv2: every layer's prompt; the graph's searched layer is layer 0, whose prompt is embeds[0]
        layer_dims = [d.dim_value for d in names["prompt_layer"].type.tensor_type.shape.dim]
        per_member = [{"prompt_embeds": e[:1], "deep_prompts": e, "prompt_layer": np.zeros(layer_dims, np.int64),
                       "label_ids": label_ids} for e in embeds]
    else:  # every member is one candidate of the same call: [S, N, K] out
        per_member = [{"prompt_embeds": np.stack(embeds), "label_ids": label_ids}]
    constants = per_member[0]
    row_inputs = [n for n in (*ROW_INPUTS, PROMPT_POS) if n in names]
    keep = [i for i in graph.input if i.name not in constants and (kind == "ids" or i.name not in row_inputs)]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    del graph.input[:]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    g = Graph("bbt_front/", opset)
    # a batch of no rows runs one stand-in row (the scoring graph cannot take none), whose outputs are dropped
    if kind == "text":
        graph.input.extend(helper.make_tensor_value_info(f, TensorProto.STRING, ["N"]) for f in recipe["fields"])
        rows = g.op("Gather", g.op("Shape", recipe["fields"][0]), g.const(0, np.int64), axis=0)
        chosen = _unless_empty(g, rows, {f: np.array([""], dtype=object) for f in recipe["fields"]})
        build_front(g, recipe, tokenizer_json, {n: n for n in row_inputs}, chosen)
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
        # the front's outputs keep the shapes the graph's inputs declared, for onnxruntime's shape inference
        graph.value_info.extend(names[n] for n in row_inputs)
    else:
        graph.input.extend(keep)
        rows = g.op("Gather", g.op("Shape", "input_ids"), g.const(0, np.int64), axis=0)
        stand_in = recipe_encode(recipe, tokenizer, [""], [""] if "text_b" in recipe["fields"] else None)
        chosen = _unless_empty(g, rows, {n: stand_in[n] for n in row_inputs})
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in chosen:
                    node.input[i] = chosen[name]
    head = Graph("bbt_head/", opset)  # label_logits [S, N, K] -> probabilities, label; the stand-in row dropped
    copies, copied_inits, more = _copies(graph, per_member[1:])  # one per BBTv2 member beyond the first
    outputs = [graph.output[0].name] + more
    raw = outputs[0] if len(outputs) == 1 else head.op("Concat", *outputs, axis=0)
    scores = head.op("LogSoftmax", _class_scores(head, head.op("Cast", raw, to=TensorProto.FLOAT),
                                                 encoder.label_groups), axis=-1)  # [S, N, K]
    if len(members) == 1:
        scores = head.op("Squeeze", scores, head.const([0], np.int64))
    else:  # the members' probabilities averaged, as PromptEnsemble scores them
        mean = head.op("Div", head.reduce("ReduceSum", head.op("Exp", scores), 0),
                       head.const(np.float32(len(members)), np.float32))
        scores = head.op("Log", mean)
    if prompt.calibration is not None:  # contextual calibration: the label prior on content-free rows divided out
        scores = head.op("Sub", scores, head.const(np.asarray(prompt.calibration, np.float32), np.float32))
    first = head.op("Reshape", rows, head.const([1], np.int64))
    start, axis = head.const([0], np.int64), head.const([0], np.int64)
    head.op("Slice", head.op("Softmax", scores, axis=-1), start, first, axis, out="probabilities")
    head.op("Slice", head.op("ArgMax", scores, axis=-1, keepdims=0), start, first, axis, out="label")
    k = len(prompt.task.labels)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
                         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])])
    nodes = list(graph.node) + copies
    del graph.node[:]
    graph.node.extend(g.nodes + nodes + head.nodes)
    graph.initializer.extend(g.inits + head.inits + copied_inits)
    graph.name = "bbt_onnx_classifier"
    labels = prompt.task.label_keys
    metadata = {
        "labels": json.dumps(list(labels)),
        "label_words": json.dumps(list(prompt.task.label_words)),
        "class_words": json.dumps([list(w) for w in prompt.task.class_words]),
        "task": json.dumps(prompt.task.to_json()),
        "template": prompt.task.template,
        "model_fingerprint": manifest.fingerprint(),
        "prompt_sha256": prompt_sha256,
        "method": prompt.method,
        "result": prompt.origin,  # "tuned", "ensemble", or the plain template a run kept
        "members": str(len(members)),
        "calibration": json.dumps(None if prompt.calibration is None else list(prompt.calibration)),
        "precision": precision,
        "inputs": json.dumps([i.name for i in graph.input]),
        "source": manifest.source,
        "max_length": str(recipe["max_length"]),
        "bbt_onnx_version": __version__,
    }
    if kind == "text":
        metadata["onnxruntime_extensions_version"] = _version("onnxruntime-extensions")
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "bbt-onnx deploy", __version__
    notes = [f"the tokenizer runs outside the graph ({why}): encode.py and recipe.json build its inputs"] \
        if kind == "ids" and why else []
    return Classifier(model, kind, recipe, metadata, labels, notes)


def build_blend(manifest: Manifest, blend: Blend, precision: str, inputs: str, prompt_sha256: str) -> Classifier:
    """A blend's classifier: each member's own classifier (its front, scoring graph and head) side by side in one
    graph, sharing the texts and the model's weights, and their probabilities averaged by the blend's weights."""
    onnx = onnx_module()
    from onnx import TensorProto, helper

    parts = [build_classifier(manifest, m, precision, inputs, prompt_sha256) for m in blend.members]
    if any(p.inputs != "text" for p in parts):
        raise SettingsError("a blend's members frame rows differently, which needs the tokenizer in the graph, and "
                            "this model's tokenizer cannot run there; deploy one result of the run instead", "inputs")
    shared = {}  # the model's weights, by the graph file they come from: one copy each
    for m in blend.members:
        path = manifest.graph_path(precision, m.deep)
        shared.setdefault(path, {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer})
    merged, first = onnx.ModelProto(), parts[0].model
    merged.CopyFrom(first)
    graph = merged.graph
    del graph.node[:], graph.initializer[:], graph.value_info[:], graph.output[:]
    texts = {i.name for i in first.graph.input}
    kept: set[str] = set()
    head = Graph("bbt_blend/", next(o.version for o in first.opset_import if o.domain in ("", "ai.onnx")))
    scaled = []
    for i, (member, part) in enumerate(zip(blend.members, parts)):
        weights = shared[manifest.graph_path(precision, member.deep)]

        def rename(name: str) -> str:
            return name if name in texts or name in weights or not name else f"b{i}/{name}"

        for node in part.model.graph.node:
            _rename_node(node, rename, f"b{i}/")
            graph.node.append(node)
        for init in part.model.graph.initializer:
            name = rename(init.name)
            if name not in kept:
                init.name = name
                graph.initializer.append(init)
                kept.add(name)
        for info in part.model.graph.value_info:
            info.name = rename(info.name)
            graph.value_info.append(info)
        scaled.append(head.op("Mul", rename("probabilities"), head.const(np.float32(blend.weights[i]), np.float32)))
    probabilities = head.op("Sum", *scaled, out="probabilities")
    head.op("ArgMax", probabilities, axis=-1, keepdims=0, out="label")
    graph.node.extend(head.nodes)
    graph.initializer.extend(head.inits)
    k = len(blend.task.labels)
    graph.output.extend([helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
                         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])])
    metadata = dict(parts[0].metadata, result=blend.origin, members=str(len(blend.members)),
                    blend=json.dumps([{"result": m.origin, "weight": w, "task": m.task.to_json()}
                                      for m, w in zip(blend.members, blend.weights)]),
                    calibration=json.dumps(None), prompt_sha256=prompt_sha256)
    del merged.metadata_props[:]
    for key, value in metadata.items():
        merged.metadata_props.add(key=key, value=value)
    recipe = dict(parts[0].recipe, max_length=max(p.recipe["max_length"] for p in parts))
    return Classifier(merged, "text", recipe, metadata, blend.task.label_keys, parts[0].notes, parts)


def _class_scores(head: Graph, word_logits: str, groups) -> str:
    """[S, N, W] word logits -> [S, N, K]: each class the log-sum-exp of its words' logits, as the engines read
    a multi-word verbalizer (`losses.class_scores`); one word a class is the logits as they are."""
    if groups is None:
        return word_logits
    groups = np.asarray(groups)
    parts = [head.op("Unsqueeze", head.reduce("ReduceLogSumExp", head.op(
        "Gather", word_logits, head.const(np.flatnonzero(groups == c).astype(np.int64), np.int64), axis=2), 2),
        head.const([2], np.int64)) for c in range(int(groups.max()) + 1)]
    return head.op("Concat", *parts, axis=2)


def _copies(graph, constants: list[dict[str, np.ndarray]]) -> tuple[list, list, list[str]]:
    """The scoring graph's nodes again for each further BBTv2 member (whose prompts differ on every layer, so that
    they cannot share one call), each fed its own constants, sharing the weights and the rows: (nodes,
    initializers, each copy's label-logits name)."""
    from onnx import numpy_helper

    renamed = set(constants[0]) if constants else set()  # the per-member constants and every computed value
    for node in graph.node:
        renamed.update(_defined(node))
    nodes, inits, outputs = [], [], []
    for s, member in enumerate(constants, start=1):
        def rename(name: str) -> str:
            return f"m{s}/{name}" if name in renamed else name
        inits.extend(numpy_helper.from_array(value, rename(key)) for key, value in member.items())
        for node in graph.node:
            copy = type(node)()
            copy.CopyFrom(node)
            _rename_node(copy, rename, f"m{s}/")
            nodes.append(copy)
        outputs.append(rename(graph.output[0].name))
    return nodes, inits, outputs


def _subgraphs(node) -> list:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _defined(node) -> set[str]:
    """Every name a node defines, in its subgraphs (If branches, loop bodies) too."""
    names = set(node.output)
    for sub in _subgraphs(node):
        names.update(i.name for i in sub.input)
        names.update(t.name for t in sub.initializer)
        for inner in sub.node:
            names.update(_defined(inner))
    return names


def _rename_node(node, rename, prefix: str) -> None:
    node.name = prefix + node.name
    node.input[:] = [rename(i) for i in node.input]
    node.output[:] = [rename(o) for o in node.output]
    for sub in _subgraphs(node):
        for values in (sub.input, sub.output, sub.value_info, sub.initializer):
            for v in values:
                v.name = rename(v.name)
        for inner in sub.node:
            _rename_node(inner, rename, prefix)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _unless_empty(g: Graph, rows: str, stand_in: dict[str, np.ndarray]) -> dict[str, str]:
    """Each named input, or its stand-in when the batch has no rows: one If node."""
    from onnx import helper, numpy_helper

    then_out, else_out, outs = [], [], {}
    then_nodes, else_nodes = [], []
    for name, value in stand_in.items():
        out = g.name(name)
        outs[name] = out
        t, e = g.name("then"), g.name("else")
        then_nodes.append(helper.make_node("Constant", [], [t], value=numpy_helper.from_array(value, t)))
        else_nodes.append(helper.make_node("Identity", [name], [e]))
        then_out.append(helper.make_empty_tensor_value_info(t))
        else_out.append(helper.make_empty_tensor_value_info(e))
    empty = g.op("Equal", rows, g.const(0, np.int64))
    g.nodes.append(helper.make_node(
        "If", [empty], list(outs.values()), name=g.name("n_If"),
        then_branch=helper.make_graph(then_nodes, "no_rows", [], then_out),
        else_branch=helper.make_graph(else_nodes, "rows", [], else_out)))
    return outs


def front_model(manifest: Manifest, recipe: dict):
    """The in-graph tokenizer alone: strings in, the row inputs out (for checks)."""
    onnx_module()
    from onnx import TensorProto, helper

    tokenizer_json = json.loads(manifest.tokenizer_path.read_text(encoding="utf-8"))
    outs = [*ROW_INPUTS] + (["prompt_pos"] if recipe["prompt_positions"] else [])
    g = Graph("bbt_front/", manifest.opset)
    build_front(g, recipe, tokenizer_json, {n: n for n in outs})
    graph = helper.make_graph(
        g.nodes, "bbt_onnx_front", [helper.make_tensor_value_info(f, TensorProto.STRING, ["N"])
                                    for f in recipe["fields"]],
        [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in outs], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", manifest.opset),
                                                   helper.make_opsetid(CONTRIB, 1)], ir_version=8)


def save_model(model, path: Path) -> None:
    """One file, or the file and its weights beside it when protobuf's 2 GB limit is near."""
    onnx = onnx_module()
    large = model.ByteSize() > (1 << 31) - (64 << 20)
    onnx.save(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=path.name + ".data" if large else None)
