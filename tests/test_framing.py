"""Decoder framing (BOS, chat template, prefix or suffix prompt) and the cached text/tail pair of graphs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx import BlackBoxTuner, Model, TuneConfig, TunedPrompt
from bbt_onnx.data import Example
from bbt_onnx.engines import OrtEngine
from bbt_onnx.contract import CACHE_AXES, GRAPH_OUTPUTS, TAIL_INPUTS, TEXT_INPUTS, TEXT_OUTPUTS
from bbt_onnx.encoding import EncodedSet
from bbt_onnx.errors import ModelError, SettingsError
from bbt_onnx.fileio import sha256_file
from bbt_onnx.manifest import load_manifest
from bbt_onnx.synthetic import sentiment_examples, sentiment_rows, write_csv
from bbt_onnx.tasks import Framing, Task, make_framing, resolve_task
from bbt_onnx_export import validate
from bbt_onnx_export.loading import load_model
from bbt_onnx_export.pipeline import export_onnx, tensor_specs
from bbt_onnx_export.wrappers import CausalTailGraph, CausalTextGraph

from conftest import without_graphs
from helpers import cli_error, invoke

TEMPLATE = " Review: {text}\nSentiment:"
SUFFIX = Framing(position="suffix")


def task(framing: Framing = Framing()) -> Task:
    return Task("sentiment", TEMPLATE, (("0", "bad"), ("1", "great")), framing=framing)


def rows(n: int = 12, seed: int = 1) -> list[Example]:
    return sentiment_examples(n, seed=seed, min_words=2, max_words=14)


# -- the task's framing -------------------------------------------------------------------------------------------
def test_framing_round_trips_and_old_tasks_read_as_before():
    plain = task()
    assert "bos" not in plain.to_json() and Task.from_json(plain.to_json()) == plain  # nothing new in old files
    framed = task(Framing(bos="never", chat=True, position="suffix"))
    raw = framed.to_json()
    assert raw["bos"] == "never" and raw["chat"] is True and raw["prompt_position"] == "suffix"
    assert Task.from_json(json.loads(json.dumps(raw))) == framed
    assert resolve_task("sst2", position="suffix", bos="never").framing == Framing("never", False, "suffix")


@pytest.mark.parametrize("bad, match", [({"bos": "sometimes"}, "bos 'sometimes'"),
                                        ({"position": "middle"}, "position 'middle'"),
                                        ({"chat": "yes"}, "chat must be true or false")])
def test_bad_framing_is_refused(bad, match):
    with pytest.raises(SettingsError, match=match):
        make_framing(**bad)


# -- encoding ---------------------------------------------------------------------------------------------------
def test_the_manifest_records_the_chat_template_and_bos(decoder):
    m = load_manifest(decoder.model)
    if decoder.arch.startswith("Qwen2"):  # its own ChatML template, and no BOS token at all
        assert m.chat_prefix == "<|im_start|>user\n" and m.chat_suffix == "<|im_end|>\n<|im_start|>assistant\n"
        assert m.bos_token_id is None
    else:
        assert m.chat_prefix == "<s>[user] " and m.chat_suffix == " </s><s>[assistant] "
        assert m.bos_token_id is not None
    assert {"deep-fp32", "fp32", "tail-fp32", "text-fp32"} <= set(m.graphs)
    assert m.graphs["tail-fp32"].parity["max_abs_diff_fp64"] <= 1e-4
    assert m.graphs["tail-fp32"].parity["prefix"]["max_abs_diff_fp64"] <= 1e-4  # export's own shared prefix
    assert all(m.graphs[k].takes("prefix_kv") for k in ("text-fp32", "tail-fp32"))


def test_bos_choices(decoder):
    model = Model.load(decoder.model)
    m = model.manifest
    ex = [Example("a fine film")]
    auto = model.encoder(task(), 3).encode(ex)
    never = model.encoder(task(Framing(bos="never")), 3).encode(ex)
    if m.bos_token_id is None:  # Qwen2: no BOS token to put first
        with pytest.raises(SettingsError, match="no BOS token"):
            model.encoder(task(Framing(bos="always")), 3)
        assert list(auto.input_ids[0]) == list(never.input_ids[0]) and m.prompt_start == 0
        return
    always = model.encoder(task(Framing(bos="always")), 3).encode(ex)
    bos = m.bos_token_id
    assert always.input_ids[0, 0] == bos and always.prompt_pos[0] == 1
    assert never.input_ids[0, 0] != bos and never.prompt_pos[0] == 0
    assert list(always.input_ids[0, 1:]) == list(never.input_ids[0])  # the same row, with and without BOS
    # auto is what the tokenizer does: the tiny Llama's adds <s>, GPT-2's adds nothing
    assert auto.prompt_pos[0] == (1 if decoder.arch.startswith("Llama") else 0) == m.prompt_start


def test_suffix_puts_the_slots_between_the_text_and_the_cue(decoder):
    out = decoder.model
    model = Model.load(out)
    enc = model.encoder(task(SUFFIX), 4).encode(rows())
    placeholders = list(model.manifest.placeholder_ids[:4])
    cue = model.tokenizer.encode("\nSentiment:", add_special_tokens=False).ids
    for i in range(len(enc)):
        p, n = int(enc.prompt_pos[i]), int(enc.lengths[i])
        assert list(enc.input_ids[i, p:p + 4]) == placeholders
        assert list(enc.input_ids[i, p + 4:n]) == cue  # the answer cue ends every row
        assert enc.mask_pos[i] == n - 1
    assert enc.suffix_tail == 4 + len(cue) and len(set(enc.prompt_pos)) > 1
    assert model.encoder(task(), 4).encode(rows()).suffix_tail is None  # a prefix prompt is not cacheable


def test_chat_wraps_the_template_in_the_user_turn_and_opens_the_reply_with_the_cue(decoder):
    model = Model.load(decoder.model)
    before, after = model.manifest.chat_prefix, model.manifest.chat_suffix
    for framing, expected in ((Framing(chat=True), before + "{slots}Review: a fine film" + after + "Sentiment:"),
                              (Framing(chat=True, position="suffix"),
                               before + "Review: a fine film{slots}" + after + "Sentiment:")):
        enc = model.encoder(task(framing), 2).encode([Example("a fine film")])
        ids = list(enc.input_ids[0])
        p = int(enc.prompt_pos[0])
        slots = model.tokenizer.decode(ids[p:p + 2])
        text = "{slots}".join(model.tokenizer.decode(part, skip_special_tokens=False)
                              for part in (ids[:p], ids[p + 2:]))
        assert slots == model.tokenizer.decode(list(model.manifest.placeholder_ids[:2]))
        assert text.replace(" ", "") == expected.replace(" ", "")  # byte-level decoding may space tokens apart
        head = model.tokenizer.encode(model.manifest.chat_prefix, add_special_tokens=False).ids
        assert ids[:len(head)] == head  # the chat's own markup first, no BOS on top of it


def test_truncation_cuts_the_text_only_in_either_position(decoder):
    out = decoder.model
    model = Model.load(out)
    long = [Example(" ".join(["good"] * 200))]
    for framing in (Framing(), SUFFIX, Framing(chat=True, position="suffix")):
        enc = model.encoder(task(framing), 4, max_length=64).encode(long)
        assert enc.truncated == 1 and enc.lengths[0] == 64
        p = int(enc.prompt_pos[0])
        assert list(enc.input_ids[0, p:p + 4]) == list(model.manifest.placeholder_ids[:4])


# -- scores -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framing", [SUFFIX, Framing(bos="never"), Framing(bos="always"), Framing(chat=True),
                                     Framing(chat=True, position="suffix")])
def test_every_framing_scores_as_the_hf_model_does(decoder, framing):
    model = Model.load(decoder.model)
    if framing.bos == "always" and model.manifest.bos_token_id is None:
        pytest.skip("this tokenizer has no BOS token (test_bos_choices checks the refusal)")
    loaded = load_model(str(decoder.src))
    enc = model.encoder(task(framing), 4).encode(rows(5))
    prompts = np.random.default_rng(0).normal(0, 0.5, (3, 4, model.manifest.hidden_size)).astype(np.float32)
    want = validate.torch_reference(loaded, validate.ParityInputs(enc.input_ids, enc.attention_mask, enc.mask_pos,
                                                                  prompts, enc.label_ids, prompt_pos=enc.prompt_pos))
    full = OrtEngine(model.manifest, kv_cache=False)
    np.testing.assert_allclose(full.label_logits(prompts, enc), want, atol=1e-4)
    if framing.position == "suffix":
        np.testing.assert_allclose(OrtEngine(model.manifest, kv_cache=True).label_logits(prompts, enc), want, atol=1e-4)


def test_the_cached_text_gives_the_full_graphs_logits_across_buckets_and_batches(decoder):
    out = decoder.model
    m = load_manifest(out)
    full, cached = OrtEngine(m, kv_cache=False), OrtEngine(m)
    assert cached.kv_cache and not full.kv_cache
    enc = Model.load(out).encoder(task(SUFFIX), 6).encode(rows(24))
    rng = np.random.default_rng(1)
    sub = enc.take(np.arange(3, 11))  # another batch: its own text
    for c in (1, 5):
        prompts = rng.normal(0, m.embedding_std * 3, (c, 6, m.hidden_size)).astype(np.float32)
        np.testing.assert_allclose(cached.label_logits(prompts, enc), full.label_logits(prompts, enc), atol=1e-4)
        np.testing.assert_allclose(cached.label_logits(prompts, sub), full.label_logits(prompts, sub), atol=1e-4)
    runs = cached.text_runs  # the texts were kept, not recomputed per call: one run per set of rows and bucket
    cached.label_logits(prompts, enc)
    assert runs == cached.text_runs == cached.plan_summary(enc)["calls"] + cached.plan_summary(sub)["calls"]
    one_call = OrtEngine(m, max_buckets=1)  # rows in one call, in their own (unsorted) order
    assert not (np.diff(enc.prompt_pos) >= 0).all()
    np.testing.assert_allclose(one_call.label_logits(prompts, enc), full.label_logits(prompts, enc), atol=1e-4)
    bound = OrtEngine(m)  # CUDA's path, with the rows and the cached keys and values bound as OrtValues
    bound.io_binding = True
    np.testing.assert_allclose(bound.label_logits(prompts, enc), full.label_logits(prompts, enc), atol=1e-4)
    assert bound.plan_summary(enc)["text_kv_on_device"]


def test_a_tune_on_the_cached_text_ends_with_the_same_z(decoder):
    out = decoder.model
    cfg = TuneConfig(prompt_tokens=6, intrinsic_dim=8, popsize=6, budget=36, eval_every=12, seed=3)
    z = []
    for kv in (False, True):
        m = load_manifest(out)
        model = Model(m, Model.load(out).tokenizer, OrtEngine(m, kv_cache=kv))
        z.append(BlackBoxTuner(model, task(SUFFIX), cfg).fit(rows(16), rows(8, seed=5)).z)
    np.testing.assert_allclose(z[0], z[1], rtol=0, atol=1e-12)  # CMA-ES sees only the ranking of the losses


def test_bbtv2_takes_a_suffix_prompt_on_the_deep_graph(decoder):
    out, src = decoder.model, decoder.src
    model = Model.load(out, deep=True)
    cfg = TuneConfig(prompt_tokens=4, intrinsic_dim=8, popsize=4, budget=4 * 2 * model.manifest.num_layers,
                     method="bbtv2", sigma=0.2, alpha=0.2)
    prompt = BlackBoxTuner(model, task(SUFFIX), cfg).fit(rows(8))
    enc = prompt.encoder(model).encode(rows(4))
    loaded = load_model(str(src))
    inputs = validate.ParityInputs(enc.input_ids, enc.attention_mask, enc.mask_pos, prompt.embeds[:1],
                                   enc.label_ids, deep_prompts=prompt.embeds, prompt_layer=0,
                                   prompt_pos=enc.prompt_pos)
    want = validate.torch_reference(loaded, inputs)[0]
    np.testing.assert_allclose(prompt.logits(model, enc), want, atol=1e-4)


# -- a prefix every row shares (demonstrations) -------------------------------------------------------------------
DEMOS = " Review: a fine , warm film\nSentiment: great\n Review: dull and long\nSentiment: bad\n"


def prefixed_rows(model, n: int = 24, prompt_tokens: int = 6, demos: str = DEMOS) -> EncodedSet:
    """Suffix-prompt rows whose own ids carry no BOS, with BOS (when the model's rows open with it) and two
    demonstrations as the prefix they share."""
    own = model.encoder(task(Framing(bos="never", position="suffix")), prompt_tokens).encode(rows(n))
    lead = [] if model.manifest.bos_id is None else [model.manifest.bos_id]
    demo = model.tokenizer.encode(demos, add_special_tokens=False).ids
    return replace(own, prefix_ids=np.array(lead + demo, np.int64))


def in_one_piece(enc: EncodedSet, pad_id: int) -> EncodedSet:
    """The same rows written out whole, row by row: the prefix's ids, then the row's own, positions after both."""
    prefix = [int(i) for i in enc.prefix_ids]
    whole = [prefix + [int(i) for i in enc.input_ids[r, :n]] for r, n in enumerate(enc.lengths)]
    width = max(map(len, whole))
    ids = np.array([r + [pad_id] * (width - len(r)) for r in whole], np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in whole], np.int64)
    return EncodedSet(ids, mask, enc.mask_pos + len(prefix), enc.labels, enc.label_ids,
                      prompt_pos=None if enc.prompt_pos is None else enc.prompt_pos + len(prefix))


def test_a_shared_prefix_runs_once_and_scores_as_the_whole_rows(decoder):
    """Prefix (demonstrations), then each row's text, then the slots and the cue: the full graph's logits on the
    rows in one piece, across candidates, buckets and batches, the prefix run once per engine."""
    model = Model.load(decoder.model)
    m = model.manifest
    enc = prefixed_rows(model)
    whole = in_one_piece(enc, m.pad_id)
    full, cached = OrtEngine(m, kv_cache=False), OrtEngine(m)
    sub = enc.take(np.arange(3, 11))  # another set of rows with the same prefix: its own text, the same prefix
    rng = np.random.default_rng(4)
    for c in (1, 4):
        prompts = rng.normal(0, m.embedding_std * 3, (c, 6, m.hidden_size)).astype(np.float32)
        want = full.label_logits(prompts, whole)
        np.testing.assert_allclose(cached.label_logits(prompts, enc), want, atol=1e-4)
        np.testing.assert_allclose(full.label_logits(prompts, enc), want, atol=1e-4)  # no cache: run whole
        np.testing.assert_allclose(cached.label_logits(prompts, sub), full.label_logits(prompts, whole.take(
            np.arange(3, 11))), atol=1e-4)
    assert cached.plan_summary(enc)["cached_prefix"] and not full.plan_summary(enc)["cached_text"]
    assert cached.prefix_runs == 1  # one prefix, kept: not per call, per set of rows nor per bucket
    assert cached.text_runs == cached.plan_summary(enc)["calls"] + cached.plan_summary(sub)["calls"]
    again = replace(enc, prefix_ids=enc.prefix_ids.copy())  # the same ids in another array: the same entry
    np.testing.assert_allclose(cached.label_logits(prompts, again), want, atol=1e-4)
    assert cached.prefix_runs == 1
    one_call = OrtEngine(m, max_buckets=1)  # rows in one call, in their own (unsorted) order
    np.testing.assert_allclose(one_call.label_logits(prompts, enc), want, atol=1e-4)
    bound = OrtEngine(m)  # CUDA's path: the prefix, the texts' keys and values and the rows bound as OrtValues
    bound.io_binding = True
    np.testing.assert_allclose(bound.label_logits(prompts, enc), want, atol=1e-4)
    np.testing.assert_allclose(bound.label_logits(prompts, replace(enc, prefix_ids=None)),
                               full.label_logits(prompts, replace(enc, prefix_ids=None)), atol=1e-4)
    assert bound.plan_summary(enc)["text_kv_on_device"]


def test_the_prefix_scores_as_the_hf_model_on_the_whole_rows(decoder):
    model = Model.load(decoder.model)
    enc = prefixed_rows(model, n=5, prompt_tokens=4)
    whole = in_one_piece(enc, model.manifest.pad_id)
    prompts = np.random.default_rng(0).normal(0, 0.5, (3, 4, model.manifest.hidden_size)).astype(np.float32)
    want = validate.torch_reference(load_model(str(decoder.src)), validate.ParityInputs(
        whole.input_ids, whole.attention_mask, whole.mask_pos, prompts, whole.label_ids, prompt_pos=whole.prompt_pos))
    np.testing.assert_allclose(OrtEngine(model.manifest).label_logits(prompts, enc), want, atol=1e-4)


def test_two_prefixes_never_share_keys_and_values(decoder):
    model = Model.load(decoder.model)
    m = model.manifest
    a = prefixed_rows(model, n=10)
    b = replace(a, prefix_ids=np.concatenate([a.prefix_ids[:-1], [a.prefix_ids[-1] + 1]]))  # one id apart
    c = prefixed_rows(model, n=10, demos=DEMOS[:-1])  # one token shorter
    assert a.attention_mask is b.attention_mask  # the same rows: only the prefix tells them apart
    engine, full = OrtEngine(m), OrtEngine(m, kv_cache=False)
    prompts = np.random.default_rng(5).normal(0, m.embedding_std * 3, (3, 6, m.hidden_size)).astype(np.float32)
    got = {}
    for name, rows_ in (("a", a), ("b", b), ("c", c), ("a again", a)):
        got[name] = engine.label_logits(prompts, rows_)
        np.testing.assert_allclose(got[name], full.label_logits(prompts, in_one_piece(rows_, m.pad_id)), atol=1e-4)
    assert engine.prefix_runs == 3
    assert np.abs(got["a"] - got["b"]).max() > 1e-3 and np.abs(got["a"] - got["c"]).max() > 1e-3


def kv_bytes(m, tokens: int) -> int:
    """What `tokens` tokens of one row take in the cache: every layer's keys and values in fp32."""
    shape = next(t.shape for t in m.graphs["tail-fp32"].inputs if t.name == "text_kv")
    return int(np.prod([d for d in shape if isinstance(d, int)])) * 4 * tokens


def test_the_prefix_counts_against_the_cache_limit(decoder):
    model = Model.load(decoder.model)
    m = model.manifest
    a = prefixed_rows(model, n=6)
    b = replace(a, prefix_ids=a.prefix_ids[:-1])
    prompts = np.zeros((2, 6, m.hidden_size), np.float32)
    p, text = a.prefix_length, int(a.prompt_pos.max()) * len(a)  # the texts at their padded width, in one call
    with pytest.raises(SettingsError, match=r"shared prefix \(\d+ tokens\) would take .* over the engine's "
                                            r"kv_cache_limit"):
        OrtEngine(m, kv_cache_limit=kv_bytes(m, p) - 1).label_logits(prompts, a)
    with pytest.raises(SettingsError, match=r"these 6 rows after a shared prefix of \d+ tokens would take"):
        OrtEngine(m, kv_cache_limit=kv_bytes(m, p + text) - 1, max_buckets=1).label_logits(prompts, a)
    # room for one prefix and its rows: the other prefix's entry replaces it, and each scores as its whole rows
    engine = OrtEngine(m, kv_cache_limit=kv_bytes(m, p + text), max_buckets=1)
    full = OrtEngine(m, kv_cache=False)
    for rows_ in (a, b, a):
        np.testing.assert_allclose(engine.label_logits(prompts, rows_),
                                   full.label_logits(prompts, in_one_piece(rows_, m.pad_id)), atol=1e-4)
    assert engine.prefix_runs == 3  # a, then b in its place, then a again
    # room for two prefixes: the least recently used goes first
    c = replace(a, prefix_ids=a.prefix_ids[:-2])
    engine = OrtEngine(m, kv_cache_limit=kv_bytes(m, 2 * p - 1 + text), max_buckets=1)
    for rows_ in (a, b, a, c, a):  # a is used again before c comes, so b is the one c replaces
        np.testing.assert_allclose(engine.label_logits(prompts, rows_),
                                   full.label_logits(prompts, in_one_piece(rows_, m.pad_id)), atol=1e-4)
    assert engine.prefix_runs == 3
    engine.label_logits(prompts, b)
    assert engine.prefix_runs == 4


def old_pair(decoder, out) -> Path:
    """A copy of the model directory whose cached pair is the one exported before shared prefixes existed."""
    target = without_graphs(decoder.model, out, lambda key: True)
    loaded = load_model(str(decoder.src))
    m = load_manifest(target)
    enc = Model.load(target).encoder(task(SUFFIX), 4).encode(rows(4))
    split = validate.ParityInputs(enc.input_ids, enc.attention_mask, enc.mask_pos, None, enc.label_ids,
                                  prompt_pos=enc.prompt_pos).cache_split()
    text, tail = target / m.graphs["text-fp32"].file, target / m.graphs["tail-fp32"].file
    feeds = {"input_ids": split.text_ids, "attention_mask": split.text_mask}
    export_onnx(CausalTextGraph(loaded.model, loaded.family).eval(), feeds, text, m.opset,
                (list(TEXT_INPUTS), list(TEXT_OUTPUTS)), CACHE_AXES)
    kv = validate.session(text).run(None, feeds)[0]
    export_onnx(CausalTailGraph(loaded.model, loaded.family).eval(),
                {"text_kv": kv, "text_mask": split.text_mask, "tail_ids": split.tail_ids,
                 "mask_pos": split.tail_mask_pos, "prompt_embeds": np.zeros((2, 4, m.hidden_size), np.float32),
                 "label_ids": enc.label_ids}, tail, m.opset, (list(TAIL_INPUTS), list(GRAPH_OUTPUTS)), CACHE_AXES)
    graphs = dict(m.graphs)
    for key, path in (("text-fp32", text), ("tail-fp32", tail)):
        inputs, outputs = tensor_specs(path)
        graphs[key] = replace(graphs[key], sha256=sha256_file(path), inputs=inputs, outputs=outputs)
    replace(m, graphs=graphs).write(target)
    return target


def test_a_pair_from_before_prefixes_keeps_its_rows_bit_for_bit_and_refuses_a_prefix(decoder, tmp_path):
    model = Model.load(decoder.model)
    m = model.manifest
    old = load_manifest(old_pair(decoder, tmp_path / "old"))
    assert not old.graphs["tail-fp32"].takes("prefix_kv") and old.has_cache_graphs("fp32")
    enc = prefixed_rows(model, n=12)
    plain = replace(enc, prefix_ids=None)
    prompts = np.random.default_rng(6).normal(0, m.embedding_std * 3, (3, 6, m.hidden_size)).astype(np.float32)
    before, now = OrtEngine(old), OrtEngine(m)
    # rows without a prefix: the new pair, fed an empty prefix, is the old pair to the bit
    np.testing.assert_array_equal(now.label_logits(prompts, plain), before.label_logits(prompts, plain))
    assert before.plan_summary(plain)["cached_text"]
    with pytest.raises(ModelError, match=r"before shared prefixes: re-export it with `bbt-onnx export --kv-cache`"):
        before.label_logits(prompts, enc)
    # without the cache, the old directory runs the rows whole
    np.testing.assert_allclose(OrtEngine(old, kv_cache=False).label_logits(prompts, enc),
                               now.label_logits(prompts, enc), atol=1e-4)


def test_a_masked_lm_runs_the_prefix_with_each_row(tiny_model):
    """A masked LM has no cached pair: the prefix (here <s>, the prompt's slots and a demonstration, so the prompt
    stays right after <s>) is put before every row, and scores as the rows written out whole."""
    model = Model.load(tiny_model)
    m = model.manifest
    enc = model.encoder(resolve_task("sst2"), 4).encode(rows(9))
    head = 1 + 4  # <s> and the slots
    demo = model.tokenizer.encode(" a fine film . It was great .", add_special_tokens=False).ids
    own = EncodedSet(enc.input_ids[:, head:], enc.attention_mask[:, head:], enc.mask_pos - head, enc.labels,
                     enc.label_ids, prefix_ids=np.array(list(enc.input_ids[0, :head]) + demo, np.int64))
    whole = in_one_piece(own, m.pad_id)
    prompts = np.random.default_rng(7).normal(0, m.embedding_std * 3, (2, 4, m.hidden_size)).astype(np.float32)
    engine = OrtEngine(m)
    np.testing.assert_allclose(engine.label_logits(prompts, own), engine.label_logits(prompts, whole), atol=1e-5)
    assert not engine.plan_summary(own)["cached_text"]


def test_rows_with_a_prefix_over_the_models_positions_are_refused(decoder):
    model = Model.load(decoder.model)
    enc = prefixed_rows(model, n=4)
    long = replace(enc, prefix_ids=np.resize(enc.prefix_ids, model.manifest.max_positions))
    with pytest.raises(SettingsError, match="over the model's .* positions; use a shorter prefix"):
        OrtEngine(model.manifest).label_logits(np.zeros((1, 6, model.manifest.hidden_size), np.float32), long)


def test_joined_rows_keep_their_shared_prefix_and_refuse_another(decoder):
    model = Model.load(decoder.model)
    enc = prefixed_rows(model, n=6)
    joined = enc.take(np.arange(3)).join(enc.take(np.arange(3, 6)), model.manifest.pad_id)
    assert np.array_equal(joined.prefix_ids, enc.prefix_ids)
    with pytest.raises(ValueError, match="cannot be joined"):
        enc.join(replace(enc, prefix_ids=enc.prefix_ids[:-1]), model.manifest.pad_id)
    with pytest.raises(ValueError, match="cannot be joined"):
        enc.join(replace(enc, prefix_ids=None), model.manifest.pad_id)


# -- refusals ---------------------------------------------------------------------------------------------------
def test_the_cache_refuses_rows_over_its_limit(decoder):
    out = decoder.model
    m = load_manifest(out)
    engine = OrtEngine(m, kv_cache_limit=1000)
    enc = Model.load(out).encoder(task(SUFFIX), 6).encode(rows(24))
    prompts = np.zeros((2, 6, m.hidden_size), np.float32)
    with pytest.raises(SettingsError, match=r"cached keys and values of these \d+ rows would take"):
        engine.label_logits(prompts, enc)


def test_a_graph_without_prompt_positions_refuses_rows_that_need_them(decoder):
    out = decoder.model
    m = load_manifest(out)
    engine = OrtEngine(m, kv_cache=False)
    engine.takes_prompt_pos = False  # as a graph exported before prompt positions existed
    prompts = np.zeros((1, 4, m.hidden_size), np.float32)
    model = Model.load(out)
    engine.label_logits(prompts, model.encoder(task(), 4).encode(rows(3)))  # right after BOS: fine
    with pytest.raises(ModelError, match="re-export the model"):
        engine.label_logits(prompts, model.encoder(task(SUFFIX), 4).encode(rows(3)))


def test_a_model_without_a_chat_template_refuses_chat(decoder, tmp_path):
    out = without_graphs(decoder.model, tmp_path / "m", lambda key: key == "fp32")
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**raw, "chat_prefix": None, "chat_suffix": None}))
    model = Model.load(out)
    assert model.manifest.chat_prefix is None and not model.manifest.has_cache_graphs("fp32")
    with pytest.raises(SettingsError, match="needs the model's chat template"):
        model.encoder(task(Framing(chat=True)), 2)
    with pytest.raises(ModelError, match="no cached pair"):
        OrtEngine(model.manifest, kv_cache=True)
    # a suffix prompt still works without the pair: the full graph recomputes the text
    enc = model.encoder(task(SUFFIX), 2).encode(rows(3))
    assert model.engine.label_logits(np.zeros((1, 2, model.manifest.hidden_size), np.float32), enc).shape == (1, 3, 2)


def test_cli_framing_mistakes_are_one_line(decoder, tiny_model, tmp_path):
    out = decoder.model
    write_csv(tmp_path / "rows.csv", sentiment_rows(8, seed=1))
    common = ["--template", TEMPLATE, "--labels", "0=bad,1=great", "--data", tmp_path / "rows.csv", "--no-prompt"]
    assert "for decoders" in cli_error(["evaluate", "--model", tiny_model, "--no-prompt", "--task", "sst2",
                                        "--prompt-position", "suffix", "--data", tmp_path / "rows.csv"])
    assert "--bos" in cli_error(["evaluate", "--model", out, *common, "--bos", "maybe"])
    assert "for decoders" in cli_error(["evaluate", "--model", tiny_model, "--no-prompt", "--task", "sst2",
                                        "--chat", "--data", tmp_path / "rows.csv"])


def test_search_calibrations_content_free_rows_ride_on_the_cached_text(decoder):
    """A suffix prompt's search with content-free calibration scores the training rows and the content-free rows in
    one call on the cached pair: the full graph's logits, and the texts computed once for the whole search."""
    model = Model.load(decoder.model)
    cfg = TuneConfig(prompt_tokens=4, intrinsic_dim=8, popsize=6, budget=24, eval_every=24, calibrate=True,
                     search_calibration="content-free", prompt_init="reference")
    tuner = BlackBoxTuner(model, task(Framing(bos="never", position="suffix")), cfg)
    train = tuner.encode(rows(12))
    joined = tuner.search_rows(train)
    assert len(joined) == len(train) + 3 and joined.suffix_tail == train.suffix_tail is not None
    assert tuner.search_rows(train) is joined and (joined.labels[len(train):] == -1).all()
    prompts = np.random.default_rng(2).normal(0, model.manifest.embedding_std * 3,
                                              (2, 4, model.manifest.hidden_size)).astype(np.float32)
    full = OrtEngine(model.manifest, kv_cache=False)
    np.testing.assert_allclose(model.engine.label_logits(prompts, joined), full.label_logits(prompts, joined),
                               atol=1e-4)
    tuner.start(train)
    tuner.step(train, None)
    runs = model.engine.text_runs
    tuner.step(train, None)
    assert model.engine.text_runs == runs  # the second generation ran only the tails


def test_cli_export_refuses_kv_cache_for_a_masked_lm(tiny_src, tmp_path):
    error = cli_error(["export", "--model", tiny_src, "--out", tmp_path / "x", "--kv-cache"])
    assert "--kv-cache is for decoders" in error and not (tmp_path / "x").exists()


def test_cli_tune_with_a_suffix_prompt_records_its_framing(decoder, tmp_path):
    out = decoder.model
    write_csv(tmp_path / "pool.csv", sentiment_rows(60, seed=1))
    write_csv(tmp_path / "test.csv", sentiment_rows(16, seed=2))
    r = invoke(["tune", "--model", out, "--template", TEMPLATE, "--labels", "0=bad,1=great", "--prompt-position",
                "suffix", "--bos", "never", "--data", tmp_path / "pool.csv", "--test", tmp_path / "test.csv",
                "--out", tmp_path / "run", "--prompt-tokens", 4, "--intrinsic-dim", 8, "--popsize", 6, "--budget",
                24, "--k-shot", 8, "-q", "--no-fallback"])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["task"]["prompt_position"] == "suffix" and settings["task"]["bos"] == "never"
    prompt = TunedPrompt.load(tmp_path / "run")
    assert prompt.task.framing == Framing(bos="never", position="suffix")
    ev = invoke(["evaluate", "--model", out, "--prompt", tmp_path / "run", "--data", tmp_path / "test.csv", "-q"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["metric"] == pytest.approx(json.loads(r.stdout)["test_metric"])
    checked = invoke(["check", "--model", out, "--prompt", tmp_path / "run", "--data", tmp_path / "test.csv",
                      "--engines", "cpu:fp32", "--json"])  # the reference engine scores on the cached text
    assert checked.exit_code == 0, checked.output
    assert "come from the run" in cli_error(["evaluate", "--model", out, "--prompt", tmp_path / "run", "--data",
                                             tmp_path / "test.csv", "--chat"])
    assert "--prompt-position" in cli_error(["tune", "--resume", tmp_path / "run", "--prompt-position", "prefix"])


def test_bench_times_the_suffix_prompt_side_by_side(decoder):
    out = decoder.model
    r = invoke(["bench", "--model", out, "--baseline", "none", "--e2e-budget", 0, "--batch", 32, "--seq", 24,
                "--repeat", 1, "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["suffix_cache"]
    assert c["max_abs_diff"] <= 1e-4 and c["rows"] == 32 and c["full_ms_per_generation"] > 0
    cue = Model.load(out).tokenizer.encode("\nSentiment:", add_special_tokens=False).ids
    assert c["tail_tokens"] == c["prompt_tokens"] + len(cue)  # the slots and the answer cue
