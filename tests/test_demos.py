"""Demonstrations (in-context learning): drawn K per class or read from a file, carried by the task (so by a run's
result), a shared prefix on a decoder and text after the slots on a masked LM, scored as a baseline, and tuned on."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from bbt_onnx import Model, read_examples
from bbt_onnx.data import DataSpec, load_splits
from bbt_onnx.demos import DemoSpec
from bbt_onnx.engines import OrtEngine
from bbt_onnx.jobs.tune import TuneRequest
from bbt_onnx.errors import DataError, SettingsError
from bbt_onnx.prompt import TunedPrompt, load_prompt
from bbt_onnx.synthetic import sentiment_examples, sentiment_rows, write_csv
from bbt_onnx.tasks import Demonstration, Framing, Task

from helpers import cli_error, invoke

TEMPLATE = " Review: {text}\nSentiment:"
LABELS = (("0", "bad"), ("1", "great"))
DEMOS = (Demonstration("a fine , warm film", "1"), Demonstration("dull and long", "0"))


def task(framing: Framing = Framing(position="suffix"), demos=DEMOS) -> Task:
    return Task("sentiment", TEMPLATE, LABELS, framing=framing, demonstrations=demos)


# -- the task carries them ----------------------------------------------------------------------------------------
def test_demonstrations_round_trip_and_tasks_without_them_read_as_before():
    plain = task(demos=())
    assert "demonstrations" not in plain.to_json() and Task.from_json(plain.to_json()) == plain
    raw = json.loads(json.dumps(task().to_json()))
    assert raw["demonstrations"][0] == {"text": "a fine , warm film", "label": "1"}
    assert Task.from_json(raw) == task()
    assert task().without_demonstrations() == plain


@pytest.mark.parametrize("demos, match", [((Demonstration("x", "2"),), "label '2', which the task does not know"),
                                          ("x", "must be a list"),
                                          (({"text": "x", "label": "0"},), "Demonstration records")])
def test_bad_demonstrations_are_refused(demos, match):
    with pytest.raises(SettingsError, match=match):
        task(demos=demos)
    with pytest.raises(SettingsError, match="non-empty text"):
        Demonstration(" ", "0")


# -- drawn apart from the rows they are shown to -------------------------------------------------------------------
def test_demonstrations_are_drawn_after_train_and_dev_balanced(data_dir):
    spec = DataSpec(str(data_dir / "pool.csv"), k_shot=8, seed=3)
    plain, drawn = load_splits(spec, ("0", "1")), load_splits(spec, ("0", "1"), demos=3)
    assert [e.text for e in drawn.train] == [e.text for e in plain.train]  # the k-shot split is unchanged
    assert [e.text for e in drawn.dev] == [e.text for e in plain.dev]
    assert Counter(e.label for e in drawn.demos) == {"0": 3, "1": 3}
    shown = {id(e) for e in drawn.demos}
    assert not shown & {id(e) for e in drawn.train + drawn.dev}
    assert [e.text for e in load_splits(spec, ("0", "1"), demos=3).demos] == [e.text for e in drawn.demos]
    with pytest.raises(DataError, match="rows left for 500 demonstrations"):
        load_splits(spec, ("0", "1"), demos=500)


def test_a_train_file_loses_the_rows_drawn_from_it(tmp_path):
    write_csv(tmp_path / "train.csv", sentiment_rows(20, seed=5))
    spec = DataSpec(train=str(tmp_path / "train.csv"), seed=1)
    splits = load_splits(spec, ("0", "1"), demos=2)
    assert len(splits.demos) == 4 and len(splits.train) == 16
    assert not {e.text for e in splits.demos} & {e.text for e in splits.train}


def test_a_demos_file_is_read_in_order_or_drawn_from(tmp_path):
    rows = sentiment_rows(12, seed=7)
    write_csv(tmp_path / "demos.csv", rows)
    base = task(demos=())
    whole = DemoSpec(demos_file=str(tmp_path / "demos.csv")).apply(base)
    assert [d.text for d in whole.demonstrations] == [text for text, _ in rows]
    two = DemoSpec(2, str(tmp_path / "demos.csv")).apply(base, seed=4)
    assert Counter(d.label for d in two.demonstrations) == {"0": 2, "1": 2}
    with pytest.raises(SettingsError, match="from demos_file here"):
        DemoSpec(2).apply(base)
    assert DemoSpec(2).apply(base, pool=True) == base  # a tune draws them from its pool


# -- how a model sees them ---------------------------------------------------------------------------------------
def test_a_decoder_shares_them_as_a_prefix_and_scores_them_as_the_whole_rows(exports):
    model = Model.load(exports.get("LlamaForCausalLM").model)
    m = model.manifest
    rows = sentiment_examples(10, seed=2)
    plain = model.encoder(task(Framing(bos="auto", position="suffix"), ()), 4).encode(rows)
    enc = model.encoder(task(Framing(bos="auto", position="suffix")), 4).encode(rows)
    block = " Review: a fine , warm film\nSentiment: great\n\n Review: dull and long\nSentiment: bad\n\n"
    assert enc.prefix_ids.tolist() == [m.bos_id] + model.tokenizer.encode(block, add_special_tokens=False).ids
    np.testing.assert_array_equal(enc.input_ids[:, :plain.input_ids.shape[1] - 1], plain.input_ids[:, 1:])  # no BOS
    assert (enc.prompt_pos == plain.prompt_pos - 1).all()
    prompts = np.random.default_rng(1).normal(0, m.embedding_std * 3, (3, 4, m.hidden_size)).astype(np.float32)
    cached, whole = OrtEngine(m), OrtEngine(m, kv_cache=False)
    np.testing.assert_allclose(cached.label_logits(prompts, enc), whole.label_logits(prompts, enc), atol=1e-4)
    assert cached.plan_summary(enc)["cached_prefix"] and cached.prefix_runs == 1
    assert np.abs(cached.label_logits(prompts, enc) - cached.label_logits(prompts, plain)).max() > 1e-3


def test_in_a_chat_the_opening_of_the_user_turn_joins_the_prefix(exports):
    model = Model.load(exports.get("LlamaForCausalLM").model)
    m = model.manifest
    rows = sentiment_examples(4, seed=2)
    enc = model.encoder(task(Framing(chat=True, position="suffix")), 4).encode(rows)
    head = model.tokenizer.encode(m.chat_prefix, add_special_tokens=False).ids
    assert enc.prefix_ids.tolist()[:len(head)] == head
    assert model.tokenizer.decode(enc.input_ids[0].tolist()).lstrip().startswith("Review:")


def test_a_masked_lm_reads_them_as_text_after_the_slots(tiny_model):
    model = Model.load(tiny_model)
    masked = Task("sst2", " {text} It was {mask} .", LABELS, demonstrations=DEMOS)
    rows = sentiment_examples(4, seed=2)
    enc = model.encoder(masked, 3).encode(rows)
    assert enc.prefix_ids is None
    text = model.tokenizer.decode(enc.input_ids[0, 4:].tolist())
    assert text.startswith("a fine , warm film It was great . dull and long It was bad .")
    plain = model.encoder(replace(masked, demonstrations=()), 3).encode(rows)
    assert (enc.mask_pos > plain.mask_pos).all()


def test_demonstrations_that_leave_no_room_are_refused(exports):
    model = Model.load(exports.get("LlamaForCausalLM").model)
    many = tuple(Demonstration("word " * 60, "0") for _ in range(40))
    with pytest.raises(SettingsError, match="leaving no room for a row"):
        model.encoder(task(demos=many), 4)


# -- a run with demonstrations ------------------------------------------------------------------------------------
def tune_cli(model, data_dir, out, *extra):
    return ["tune", "--model", model, "--template", TEMPLATE, "--labels", "0=bad,1=great", "--prompt-position",
            "suffix", "--data", data_dir / "pool.csv", "--test", data_dir / "test.csv", "--k-shot", 8, "--out", out,
            "--prompt-tokens", 4, "--intrinsic-dim", 20, "--popsize", 6, "--budget", 24, "--eval-every", 12,
            "--checkpoint-every", 0, "-q", *extra]


def test_a_tune_with_demonstrations_scores_in_context_learning_and_its_result_carries_them(exports, data_dir,
                                                                                         tmp_path):
    model_dir = exports.get("LlamaForCausalLM").model
    out = tmp_path / "run"
    r = invoke(tune_cli(model_dir, data_dir, out, "--demos", 1, "--no-fallback"))
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    demos = run["settings"]["task"]["demonstrations"]
    assert sorted(d["label"] for d in demos) == ["0", "1"] and run["settings"]["demos"]["demos"] == 1
    names = [b["name"] for b in run["baselines"]]
    assert "template (BOS)" in names and "in-context (BOS)" in names and "in-context (chat)" in names
    kept = load_prompt(out)
    assert len(kept.task.demonstrations) == 2
    again = TuneRequest.from_settings(run["settings"], str(out))  # a resume's request: the run's own
    assert [d.to_json() for d in again.task.demonstrations] == demos and again.demos == DemoSpec(1)
    model = Model.load(model_dir)
    test = read_examples(str(data_dir / "test.csv"))
    icl = next(b for b in run["baselines"] if b["name"] == "in-context (BOS)")
    framed = replace(kept.task, framing=Framing(**{"bos": "auto", "position": "suffix"}))
    assert icl["test_metric"] == pytest.approx(TunedPrompt.template(model.manifest, framed).evaluate(model, test).metric)
    r = invoke(["evaluate", "--model", model_dir, "--prompt", out, "--data", data_dir / "test.csv", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metric"] == pytest.approx(kept.evaluate(model, test).metric)
    assert json.loads(r.stdout)["metric"] == pytest.approx(run["metrics"]["test_metric"])


def test_demonstration_flags_are_refused_where_they_cannot_apply(exports, data_dir, tmp_path):
    model_dir = exports.get("LlamaForCausalLM").model
    write_csv(tmp_path / "demos.csv", sentiment_rows(2, seed=9, min_words=2, max_words=4))
    out = tmp_path / "run"
    assert invoke(tune_cli(model_dir, data_dir, out, "--demos-file", tmp_path / "demos.csv")).exit_code == 0
    assert len(json.loads((out / "run.json").read_text())["settings"]["task"]["demonstrations"]) == 2
    assert "come from the run" in cli_error(["evaluate", "--model", model_dir, "--prompt", out, "--data",
                                             data_dir / "test.csv", "--demos-file", tmp_path / "demos.csv"])
    assert "from --demos-file here" in cli_error(["evaluate", "--model", model_dir, "--no-prompt", "--template",
                                                  TEMPLATE, "--labels", "0=bad,1=great", "--data",
                                                  data_dir / "test.csv", "--demos", 2])
    assert "rows left for 99 demonstrations" in cli_error(tune_cli(model_dir, data_dir, tmp_path / "r2", "--demos", 99))
    r = invoke(["evaluate", "--model", model_dir, "--no-prompt", "--template", TEMPLATE, "--labels", "0=bad,1=great",
                "--prompt-position", "suffix", "--data", data_dir / "test.csv", "--demos-file",
                tmp_path / "demos.csv", "--prompt-tokens", 0, "-q"])
    assert r.exit_code == 0, r.output
