"""`bbt-onnx export`: checkpoint -> validated graphs + tokenizer.json + manifest.json, written atomically."""

from __future__ import annotations

import warnings
from dataclasses import replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from bbt_onnx.contract import AXES, CACHE_AXES, GRAPH_OUTPUTS, PREFIX_KV, graph_key
from bbt_onnx.data import Example
from bbt_onnx.encoding import Encoder, label_token_ids
from bbt_onnx.errors import SettingsError
from bbt_onnx.fileio import sha256_file, storage_error, write_dir
from bbt_onnx.manifest import GraphSpec, Manifest, TensorSpec
from bbt_onnx.tasks import Framing, Task

from . import optimize, quantize, validate
from .errors import ExportError
from .families import Family
from .loading import Loaded, load_model
from bbt_onnx.export_options import MODEL_DIR, ExportOptions
from .wrappers import TAIL_NAMES, TEXT_NAMES, CausalTailGraph, CausalTextGraph, input_names, scorer_for

GRAPH_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PLACEHOLDER_OFFSET = 1000  # the reference's prompt tokens are ids 1000..1000+P
PARITY_TEXTS = [
    "a gripping , funny and moving film",
    "the plot is thin and the acting is worse .",
    "It was fine.",
    "An ambitious story about a family , a war and a long road home , told with patience and care "
    "over three hours that never once drag .",
]
# what a decoder's int8 graph is calibrated on (activation ranges, smoothing, GPTQ): varied everyday text
CALIBRATION_TEXTS = [
    "the film takes its time , but the last hour is worth every minute .",
    "a dull , overlong sequel that forgets what made the first one fun .",
    "Quarterly revenue rose four percent as demand for cloud services grew.",
    "The council voted to close the old bridge to heavy traffic next spring.",
    "She scored in the final minute to send the match into extra time.",
    "Researchers found that the new battery keeps most of its charge after a thousand cycles.",
    "I ordered the soup and it arrived cold, but the staff replaced it quickly.",
    "the jokes land , the songs are catchy , and the cast clearly enjoys itself .",
    "How do I reset my password if I no longer have access to my email?",
    "Heavy rain is expected along the coast, with winds of up to 80 km/h.",
    "The museum's new wing shows paintings that have not been seen in public for decades.",
    "an honest , unsentimental look at growing old in a small town .",
    "Shares in the airline fell after it cut its forecast for the summer.",
    "Mix the flour and butter, then add cold water one spoon at a time.",
    "The minister denied the report and said the talks would continue on Monday.",
    "this is the kind of movie that makes you check your watch twice .",
    "Our delivery was two days late and the box was damaged.",
    "The team's new coach wants a faster, more attacking style of play.",
    "A small study suggests that short walks after meals lower blood sugar.",
    "The phone's camera is excellent in daylight but struggles at night.",
    "the plot makes little sense , yet the performances hold it together .",
    "Parliament will debate the budget after the summer recess.",
    "Tickets for the festival sold out within an hour of going on sale.",
    "Please find attached the invoice for last month's consulting work.",
    "a warm , funny and surprisingly moving story about two brothers .",
    "The company plans to open three new factories and hire 2,000 workers.",
    "He won the race by less than a second after leading from the start.",
    "The software update fixes several bugs and improves battery life.",
    "every scene feels borrowed from a better film .",
    "Farmers say the dry winter could cut this year's wheat harvest.",
    "The hotel was clean and quiet, and breakfast was included.",
    "Scientists have mapped the genome of a rare deep-sea fish.",
]
CALIBRATION_TEMPLATES = (" {text}\nSentiment:", " Text: {text}\nTopic:", " Question: {text}\nAnswer:")
CALIBRATION_PROMPT_TOKENS = 10  # besides the model's P: the short prompts of CPU tuning
ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("bbt-onnx", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def placeholder_ids(vocab_size: int, count: int, special: set[int]) -> list[int]:
    """The reference's ids 1000..1000+P when they fit the vocabulary, else a run from its middle."""
    start = PLACEHOLDER_OFFSET if PLACEHOLDER_OFFSET + count <= vocab_size else max(0, (vocab_size - count) // 2)
    ids = [i for i in range(start, vocab_size) if i not in special][:count]
    if len(ids) < count:
        raise ExportError(f"the vocabulary ({vocab_size} ids) is too small for {count} prompt tokens")
    return ids


def special_ids(tokenizer, family: Family) -> dict[str, int | None]:
    """The ids a row is built from, by the family's names for them (BERT's BOS is [CLS]). A family whose rows
    open with BOS only as its tokenizer does counts it only when the tokenizer adds it; a causal LM has no mask;
    without a pad token, padding reuses EOS (the attention mask hides it)."""
    ids = {name: getattr(tokenizer, f"{token}_token_id", None) for name, token in family.specials.items()}
    ids["bos_token"] = ids["bos"]
    if not family.lm.mask_token:
        ids["mask"] = None
    if not family.bos_always:
        probe = tokenizer("a")["input_ids"]
        if ids["bos"] is None or not probe or probe[0] != ids["bos"]:
            ids["bos"] = None
    if ids["pad"] is None:
        ids["pad"] = next((i for i in (ids["eos"], ids["bos"]) if i is not None), 0)
    return ids


CHAT_SENTINEL = "\x00bbt-onnx-user-message\x00"


def chat_strings(tokenizer) -> tuple[str | None, str | None]:
    """The chat template rendered around one user message and the opening of the assistant's reply, as the two
    strings around it: the runtime has no jinja. (None, None) when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn is not offered
        return None, None
    if not isinstance(text, str) or text.count(CHAT_SENTINEL) != 1:
        return None, None
    before, after = text.split(CHAT_SENTINEL)
    return before, after


def tensor_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}

    def spec(v):
        dims = tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
        return TensorSpec(v.name, ONNX_TYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)), dims)

    return tuple(spec(v) for v in graph.input if v.name not in init), tuple(spec(v) for v in graph.output)


def export_onnx(scorer, feeds: dict[str, np.ndarray], path: Path, opset: int, names: tuple[list[str], list[str]],
                axes: dict) -> None:
    import torch

    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer, args, str(path), dynamo=False, opset_version=opset, input_names=names[0],
                          output_names=names[1], dynamic_axes=axes, do_constant_folding=True)


def probe_labels(manifest: Manifest, tokenizer) -> tuple[tuple[str, str], ...]:
    """Two label words for export's own rows (parity, int8 calibration): the first two vocabulary entries, in id
    order, that are each one token of this tokenizer as the runtime reads a label word, and not the same token.
    They are not the user's words, so no vocabulary may refuse them; the rows score random label ids anyway."""
    words = {}  # token id -> the word that is it
    for i in range(tokenizer.get_vocab_size(with_added_tokens=False)):
        word = tokenizer.decode([i])
        if i in manifest.special_ids or not word.strip():
            continue
        try:
            (first,), split = label_token_ids(tokenizer, [word], manifest.label_prefix)
        except SettingsError:  # it produces no tokens
            continue
        if not split:
            words.setdefault(first, word)
        if len(words) == 2:
            return tuple((str(k), w) for k, w in enumerate(words.values()))
    raise ExportError("the tokenizer has fewer than two tokens that tokenize as themselves; it cannot score labels")


def parity_inputs(manifest: Manifest, tokenizer, family: Family, prompt_count: int = 3,
                  seed: int = 0) -> validate.ParityInputs:
    """Padded, tokenized texts through the runtime's own encoder, random prompts at the embedding scale, in the
    family's parity task (a decoder's rows carry a suffix prompt, so the slots sit at a different position in
    every row), with export's own label words."""
    return encoded_inputs(manifest, tokenizer, family.parity_task(probe_labels(manifest, tokenizer)), PARITY_TEXTS,
                          prompt_count, manifest.prompt_tokens, seed)


def encoded_inputs(manifest: Manifest, tokenizer, task: Task, texts: list[str], prompt_count: int,
                   prompt_tokens: int, seed: int) -> validate.ParityInputs:
    """`texts` in `task`'s rows with `prompt_count` random prompts of `prompt_tokens` and 4 random label ids."""
    rng = np.random.default_rng(seed)
    enc = Encoder(tokenizer, manifest, task, prompt_tokens).encode([Example(t) for t in texts])
    specials = manifest.special_ids
    labels = rng.choice([i for i in range(manifest.vocab_size) if i not in specials], size=4, replace=False)
    enc = replace(enc, label_ids=labels.astype(np.int64))
    prompts = rng.normal(0.0, manifest.embedding_std,
                         size=(prompt_count, prompt_tokens, manifest.hidden_size)).astype(np.float32)
    return validate.ParityInputs(enc.input_ids, enc.attention_mask, enc.mask_pos, prompts, enc.label_ids,
                                 prompt_pos=enc.prompt_pos if manifest.lm.prompt_positions else None)


def calibration_feeds(manifest: Manifest, tokenizer, deep: bool) -> list[dict[str, np.ndarray]]:
    """The int8 calibration's graph inputs: a third of the calibration texts in each generic template, with and
    without BOS, with a short and the model's full prompt length, each scored with the template's own prompt
    (zeros) and a random one at the embedding scale."""
    feeds = []
    lengths = sorted({min(CALIBRATION_PROMPT_TOKENS, manifest.prompt_tokens), manifest.prompt_tokens})
    # with and without BOS: without it, the first text token takes the outsized activations BOS otherwise takes
    framings = [Framing(), Framing(bos="never")] if manifest.bos_id is not None else [Framing()]
    labels = probe_labels(manifest, tokenizer)
    for i, template in enumerate(CALIBRATION_TEMPLATES):
        for framing in framings:
            task = Task("calibration", template, labels, framing=framing)
            for tokens in lengths:
                rows = encoded_inputs(manifest, tokenizer, task, CALIBRATION_TEXTS[i::len(CALIBRATION_TEMPLATES)], 2,
                                      tokens, seed=i)
                rows.prompt_embeds[0] = 0.0
                feeds.append((deep_parity_inputs(manifest, rows) if deep else rows).feeds())
    return feeds


def base_manifest(loaded: Loaded, prompt_tokens: int, opset: int) -> Manifest:
    config, family = loaded.model.config, loaded.family
    ids = special_ids(loaded.tokenizer, family)
    vocab = int(config.vocab_size)
    positions = family.max_positions(config)
    if prompt_tokens > positions - 4:
        raise SettingsError(f"--prompt-tokens {prompt_tokens} leaves no room for text within the model's {positions} "
                          f"positions; use at most {positions - 4}")
    weight = loaded.model.get_input_embeddings().weight.detach().double().numpy()
    chat_prefix, chat_suffix = chat_strings(loaded.tokenizer) if family.chat else (None, None)
    return Manifest(
        kind=family.kind, architecture=family.architecture, model_type=family.model_type, source=loaded.source,
        hidden_size=int(config.hidden_size), num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads), vocab_size=vocab, max_positions=positions,
        prompt_tokens=prompt_tokens, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=int(ids["pad"]),
        mask_id=ids["mask"],
        placeholder_ids=tuple(placeholder_ids(vocab, prompt_tokens, set(loaded.tokenizer.all_special_ids))),
        embedding_std=float(weight.std()), embedding_mean=float(weight.mean()),
        label_prefix=family.label_prefix, opset=opset, versions=_versions(), graphs={},
        gguf_file=loaded.gguf_file, bos_token_id=ids["bos_token"], chat_prefix=chat_prefix, chat_suffix=chat_suffix)


def export_model(opts: ExportOptions, log: Callable[[str], None] = lambda _msg: None) -> Manifest:
    out = Path(opts.out)
    opts.check()
    opts.check_out()
    loaded = load_model(opts.model, opts.gguf_file)
    family = loaded.family
    if opts.int8_levels != "mixed" and family.int8 is None:
        raise SettingsError(f"--int8-levels is for decoders: a {family.architecture}'s int8 graph is dynamic int8")
    if opts.kv_cache and not family.kv_cache:
        raise SettingsError(f"--kv-cache is for decoders: a {family.architecture}'s prompt comes before its text")
    manifest = base_manifest(loaded, opts.prompt_tokens, opts.opset)
    log(f"loaded {opts.model}: {family.architecture}, {manifest.num_layers} layers, hidden size {manifest.hidden_size}")
    done = {}

    def build(tmp: Path) -> None:
        done["manifest"] = build_directory(loaded, manifest, opts, tmp, log)

    write_dir(out, opts.force, build, MODEL_DIR, opts.force_any, opts.inputs(), log)
    log(f"wrote {out}")
    return replace(done["manifest"], directory=out)


def build_directory(loaded: Loaded, manifest: Manifest, opts: ExportOptions, tmp: Path,
                    log: Callable[[str], None]) -> Manifest:
    """Everything a model directory holds, written into `tmp`: the tokenizer, every graph asked for (each checked
    against PyTorch), and the manifest last."""
    path = tmp / "tokenizer.json"
    try:  # written here, not by the tokenizers library, whose own error on a full disk is no OSError
        with open(path, "w", encoding="utf-8") as f:
            f.write(loaded.tokenizer.backend_tokenizer.to_str(pretty=True))
    except OSError as exc:
        raise storage_error(path, exc) from None
    manifest = replace(manifest, directory=tmp)
    from bbt_onnx.encoding import load_tokenizer

    tokenizer = load_tokenizer(manifest)
    sample = parity_inputs(manifest, tokenizer, loaded.family)
    manifest = replace(manifest, layer_std=validate.layer_stds(loaded, sample, manifest.embedding_std))
    graphs = {}
    plain_refs = validate.references(loaded, sample, manifest.prompt_start)
    graphs.update(build_graphs(loaded, manifest, tokenizer, sample, plain_refs, opts, tmp, False, log))
    if opts.deep:
        deep = deep_parity_inputs(manifest, sample)
        graphs.update(build_graphs(loaded, manifest, tokenizer, deep,
                                   validate.references(loaded, deep, manifest.prompt_start), opts, tmp, True, log))
    if opts.kv_cache:
        graphs.update(build_cache_graphs(loaded, manifest, tokenizer, sample, plain_refs, opts, tmp, log))

    specs = {}
    for key, (path, precision, deep, par, fused) in graphs.items():
        inputs, outputs = tensor_specs(path)
        part = key.split("-")[0] if key.startswith(("text-", "tail-")) else ""
        specs[key] = GraphSpec(path.name, precision, sha256_file(path), inputs, outputs, par, fused, deep, part)
    manifest = replace(manifest, graphs=specs)
    manifest.write(tmp)
    return manifest


def build_graphs(loaded: Loaded, manifest: Manifest, tokenizer, sample: validate.ParityInputs,
                 refs: tuple[np.ndarray, np.ndarray], opts: ExportOptions, tmp: Path, deep: bool,
                 log: Callable[[str], None]) -> dict:
    """One contract (plain or deep) in every asked precision, each checked against PyTorch (`refs`: its fp32 and
    fp64 logits on `sample`)."""
    reference, exact = refs
    plain = tmp / ("plain.deep.onnx" if deep else "plain.onnx")
    what = "deep-prompt graph" if deep else "ONNX"
    log(f"exporting {loaded.architecture} to {what} (opset {opts.opset}, P={opts.prompt_tokens})")
    family = loaded.family
    export_onnx(scorer_for(loaded, deep), sample.feeds(), plain, opts.opset, (input_names(family, deep),
                list(GRAPH_OUTPUTS)), AXES)
    fusion = optimize.Fusion(plain, num_heads=manifest.num_heads, hidden_size=manifest.hidden_size,
                             model_type=family.fusion_type)
    builders = {"fp32": partial(fusion.write, fp16=False)}  # fused once, for the CPU and for CUDA
    if opts.fp16:
        builders["fp16"] = partial(fusion.write, fp16=True)
    if opts.int8 and family.int8 is not None:
        feeds = calibration_feeds(manifest, tokenizer, deep)
        builders["int8"] = partial(quantize.accurate_int8, plain, feeds=feeds, family=family.int8,
                                   num_layers=manifest.num_layers,
                                   settings=quantize.Int8Settings(one_level=opts.int8_levels == "mixed"))
    elif opts.int8:
        builders["int8"] = partial(optimize.dynamic_int8, plain)  # from the unfused graph: faster on CPU
    graphs = {}
    for precision, build in builders.items():
        key = graph_key(precision, deep)
        path = tmp / (GRAPH_FILES[precision].replace("model.", "model.deep.", 1) if deep else GRAPH_FILES[precision])
        fused = build(path)
        parity = validate.judge(reference, exact, validate.run_onnx(path, sample))
        graphs[key] = (path, precision, deep, parity, fused)
        log(f"{key}: max abs diff vs PyTorch {parity['max_abs_diff']:.2e} (vs float64 {parity['max_abs_diff_fp64']:.2e}, "
            f"torch fp32's own {parity['torch_fp32_vs_fp64']:.2e}), argmax agreement "
            f"{parity['argmax_agreement']:.1%}" + (f", fused {fused}" if fused else ""))
        if precision == "fp32" and not parity["max_abs_diff_fp64"] <= parity["fp32_tolerance"]:
            raise ExportError(f"the {key} graph disagrees with PyTorch: max abs diff {parity['max_abs_diff_fp64']:.3g} "
                              f"from a float64 reference > {parity['fp32_tolerance']:.3g} (torch's own fp32 error "
                              f"there is {parity['torch_fp32_vs_fp64']:.3g}); this is a bug, please report it")
    plain.unlink()
    return graphs


def build_cache_graphs(loaded: Loaded, manifest: Manifest, tokenizer, sample: validate.ParityInputs,
                       refs: tuple[np.ndarray, np.ndarray], opts: ExportOptions, tmp: Path,
                       log: Callable[[str], None]) -> dict:
    """The text/tail pair (fp32) for suffix prompts on a decoder, judged like the full graph: the tail's logits
    on the cached text against PyTorch on the whole rows (`refs`); and with a prefix every row shares (its keys
    and values from the text graph, once), against PyTorch on the rows with that prefix before them."""
    import torch

    reference, exact = refs
    split = sample.cache_split()
    prefixed = prefixed_inputs(manifest, tokenizer, sample)
    text, tail = tmp / "model.text.onnx", tmp / "model.tail.onnx"
    log(f"exporting the cached pair for suffix prompts (text {text.name}, tail {tail.name})")
    # the pair attends with its own attention (export/attention.py), whatever the model's setting
    text_graph = CausalTextGraph(loaded.model, loaded.family).eval()
    with torch.no_grad():  # an example prefix to trace with (its length is a dynamic axis; any will do)
        ids = torch.from_numpy(np.ascontiguousarray(prefixed.input_ids[:1, :prefixed.prefix]))
        prefix_kv = text_graph(ids, torch.ones_like(ids)).numpy()
    export_onnx(text_graph, {"input_ids": split.text_ids, "attention_mask": split.text_mask,
                             PREFIX_KV: prefix_kv}, text, opts.opset, TEXT_NAMES, CACHE_AXES)
    session = validate.session(text)
    kv = session.run(["text_kv"], {"input_ids": split.text_ids, "attention_mask": split.text_mask,
                                   PREFIX_KV: validate.empty_prefix(session)})[0]
    export_onnx(CausalTailGraph(loaded.model, loaded.family).eval(),
                {"text_kv": kv, "text_mask": split.text_mask, "tail_ids": split.tail_ids,
                 "mask_pos": split.tail_mask_pos, "prompt_embeds": sample.prompt_embeds,
                 "label_ids": sample.label_ids, PREFIX_KV: prefix_kv}, tail, opts.opset, TAIL_NAMES, CACHE_AXES)
    parity = validate.judge(reference, exact, validate.run_cached(text, tail, sample))
    log(f"text+tail: max abs diff vs PyTorch on the whole rows {parity['max_abs_diff']:.2e} (vs float64 "
        f"{parity['max_abs_diff_fp64']:.2e}), argmax agreement {parity['argmax_agreement']:.1%}")
    shared = validate.judge(*validate.references(loaded, prefixed, manifest.prompt_start),
                            validate.run_cached(text, tail, prefixed))
    log(f"prefix+text+tail ({prefixed.prefix} shared ids): max abs diff vs PyTorch on the whole rows "
        f"{shared['max_abs_diff']:.2e} (vs float64 {shared['max_abs_diff_fp64']:.2e})")
    for what, judged in (("", parity), (" with a shared prefix", shared)):
        if not judged["max_abs_diff_fp64"] <= judged["fp32_tolerance"]:
            raise ExportError(f"the cached pair{what} disagrees with PyTorch: max abs diff "
                              f"{judged['max_abs_diff_fp64']:.3g} > {judged['fp32_tolerance']:.3g}; this is a bug, "
                              "please report it")
    return {"text-fp32": (text, "fp32", False, {}, {}), "tail-fp32": (tail, "fp32", False,
                                                                    {**parity, "prefix": shared}, {})}


PREFIX_TEXT = " Review: a quiet , lovely film\n"  # export's own shared prefix (a demonstration) for the pair's parity


def prefixed_inputs(manifest: Manifest, tokenizer, sample: validate.ParityInputs) -> validate.ParityInputs:
    """The parity rows with a prefix every row shares: the rows' BOS (if any), then a demonstration's ids, then
    each row's own ids; its `prefix` is both."""
    lead = manifest.prompt_start  # BOS opens every parity row when the model has one
    demo = np.array(tokenizer.encode(PREFIX_TEXT, add_special_tokens=False).ids, np.int64)
    n = len(sample.input_ids)
    head = np.concatenate([sample.input_ids[:1, :lead], demo[None]], axis=1)
    shift = demo.size
    return replace(sample, input_ids=np.concatenate([np.repeat(head, n, axis=0), sample.input_ids[:, lead:]], axis=1),
                   attention_mask=np.concatenate([np.ones((n, lead + shift), np.int64), sample.attention_mask[:, lead:]],
                                                 axis=1),
                   mask_pos=sample.mask_pos + shift, prompt_pos=sample.prompt_pos + shift, prefix=lead + shift)


def deep_parity_inputs(manifest: Manifest, sample: validate.ParityInputs, seed: int = 1) -> validate.ParityInputs:
    """The plain sample plus a random prompt on every layer, each at its layer's scale; the candidates replace
    a middle layer, so both the replaced and the kept layers are checked."""
    rng = np.random.default_rng(seed)
    _, p, h = sample.prompt_embeds.shape
    deep = np.stack([rng.normal(0.0, std, size=(p, h)) for std in manifest.layer_std]).astype(np.float32)
    layer = manifest.num_layers // 2
    candidates = rng.normal(0.0, manifest.layer_std[layer], size=sample.prompt_embeds.shape).astype(np.float32)
    return replace(sample, prompt_embeds=candidates, deep_prompts=deep, prompt_layer=layer)
