"""Decoder framing (BOS, chat template, prefix or suffix prompt) and the cached text/tail pair of graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt_onnx import BlackBoxTuner, Model, TuneConfig, TunedPrompt
from bbt_onnx.data import Example
from bbt_onnx.engines import OrtEngine
from bbt_onnx.errors import ModelError, SettingsError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.synthetic import sentiment_examples, sentiment_rows, write_csv
from bbt_onnx.tasks import Framing, Task, make_framing, resolve_task
from bbt_onnx_export import validate
from bbt_onnx_export.loading import load_model

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
