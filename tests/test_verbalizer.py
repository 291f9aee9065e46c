"""A wider readout: further words a class (a task's extra_words, or chosen on the training rows by
--verbalizer auto[:K]), read as the log of their summed probability by every engine, kept by the run, and scored
as a baseline on the plain template."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from bbt_onnx import Model, read_examples
from bbt_onnx.baselines import plain_framings
from bbt_onnx.engines import OrtEngine
from bbt_onnx.errors import SettingsError
from bbt_onnx.losses import class_scores, cross_entropy
from bbt_onnx.prompt import TunedPrompt, load_prompt
from bbt_onnx.synthetic import sentiment_examples
from bbt_onnx.tasks import Framing, Task
from bbt_onnx.tuning.config import TuneConfig
from bbt_onnx.verbalizer import VerbalizerSpec, candidate_words, choose_words

from helpers import cli_error, invoke

TEMPLATE = " Review: {text}\nSentiment:"
LABELS = (("0", "bad"), ("1", "great"))
WORDS = ((" awful", " dull"), (" fun", " warm"))


def worded(extra=WORDS, **framing) -> Task:
    return Task("sentiment", TEMPLATE, LABELS, framing=Framing(**framing), extra_words=extra)


# -- the task carries them ----------------------------------------------------------------------------------------
def test_extra_words_round_trip_and_a_task_without_them_reads_as_before():
    task = worded()
    assert task.class_words == (("bad", " awful", " dull"), ("great", " fun", " warm"))
    assert Task.from_json(json.loads(json.dumps(task.to_json()))) == task
    bare = task.with_extra_words()
    assert "extra_words" not in bare.to_json() and bare.class_words == (("bad",), ("great",))
    assert worded(((), ())).extra_words == ()  # nothing more for any class is the label words alone


@pytest.mark.parametrize("extra, match", [
    ((("x",),), "1 lists for 2 classes"),
    ((" dull", " fun"), "must be a list of words"),
    ((("dull",), ("dull",)), "counts for two classes"),
    ((("great",), ()), "counts for two classes, or is a label word"),
    ((("",), ()), "is not a word"),
    ((("w",) * 65, ()), "at most 64"),
])
def test_bad_extra_words_are_refused(extra, match):
    with pytest.raises(SettingsError, match=match):
        worded(extra)


def test_the_verbalizer_setting_is_checked():
    assert VerbalizerSpec.parse("auto") == VerbalizerSpec("auto", 4)
    assert str(VerbalizerSpec.parse("auto:7")) == "auto:7" and not VerbalizerSpec.parse(None).auto
    for bad in ("auto:0", "auto:x", "auto:64", "words"):
        with pytest.raises(SettingsError, match="verbalizer"):
            TuneConfig(verbalizer=bad)


# -- the readout's maths ------------------------------------------------------------------------------------------
def test_a_class_scores_the_log_of_its_words_summed_probability():
    rng = np.random.default_rng(0)
    words = rng.normal(0, 5, (3, 4, 5)).astype(np.float32)
    groups = np.array([0, 1, 1, 0, 1])
    got = class_scores(words, groups)
    assert got.shape == (3, 4, 2) and got.dtype == np.float32
    want = np.log(np.stack([np.exp(words[..., groups == c].astype(np.float64)).sum(-1) for c in (0, 1)], -1))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert class_scores(words, None) is words
    # a softmax over classes is the words' probability summed per class
    p = np.exp(words - words.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(got - got.max(-1, keepdims=True))
    np.testing.assert_allclose(q / q.sum(-1, keepdims=True), np.stack([p[..., groups == c].sum(-1) for c in (0, 1)], -1), rtol=1e-5)


def test_words_join_a_class_only_while_they_lower_the_training_loss():
    labels = np.array([0, 0, 0, 1, 1, 1])
    logits = np.zeros((6, 7))  # columns 0 and 1: the label words, as weak as the rest
    logits[:3, 2] = 4.0  # word 2: class 0's rows say it
    logits[3:, 3] = 3.0  # word 3: class 1's rows say it
    logits[:, 4] = 5.0  # word 4: every row says it, so it separates nothing
    logits[:3, 5] = 6.0  # word 5: class 0's rows, but reserved
    logits[3:, 6] = 0.5  # word 6: a little on class 1's rows
    chosen = choose_words(logits, labels, [0, 1], 3, reserved={5})
    assert chosen.index[0] == (2,) and chosen.index[1][0] == 3
    assert 4 not in chosen.index[0] + chosen.index[1] and 5 not in chosen.index[0]
    assert all(g > 0 for per in chosen.gain for g in per) and chosen.loss_after < chosen.loss_before
    scores = np.stack([np.logaddexp.reduce(logits[:, [0, *chosen.index[0]]], axis=1),
                       np.logaddexp.reduce(logits[:, [1, *chosen.index[1]]], axis=1)], axis=1)
    assert chosen.loss_after == pytest.approx(cross_entropy(scores, labels)[0])
    assert choose_words(logits, labels, [0, 1], 1).index[1] == (3,)  # k caps each class
    with pytest.raises(SettingsError, match="every class"):
        choose_words(logits[:3], labels[:3], [0, 1], 2)


def test_candidates_are_whole_words_that_tokenize_back_to_one_id(exports):
    model = Model.load(exports.get("LlamaForCausalLM").model)
    words = candidate_words(model.tokenizer, model.manifest, limit=50)
    assert 10 < len(words) <= 50 and [i for _, i in words] == sorted(i for _, i in words)
    for word, token_id in words:
        assert word.isalpha() and len(word) >= 2
        assert model.tokenizer.encode(" " + word, add_special_tokens=False).ids == [token_id]


# -- how a model reads them ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, task", [
    ("LlamaForCausalLM", worded(position="suffix")),
    ("RobertaForMaskedLM", Task("sst2", " {text} It was {mask} .", LABELS, extra_words=(("awful", "dull"),
                                                                                          ("fun", "warm")))),
])
def test_every_engine_call_reads_each_class_as_its_words_log_sum_exp(exports, arch, task):
    model = Model.load(exports.get(arch).model)
    m = model.manifest
    rows = sentiment_examples(6, seed=3)
    enc = model.encoder(task, 4).encode(rows)
    assert enc.classes == 2 and enc.label_groups.tolist() == [0, 0, 0, 1, 1, 1] and len(set(enc.label_ids)) == 6
    prompts = np.random.default_rng(1).normal(0, m.embedding_std, (3, 4, m.hidden_size)).astype(np.float32)
    engine = OrtEngine(m)
    words = engine.label_logits(prompts, replace(enc, label_groups=None))
    got = engine.label_logits(prompts, enc)
    assert got.shape == (3, 6, 2)
    np.testing.assert_allclose(got, class_scores(words, enc.label_groups), rtol=1e-6)
    bare = model.encoder(task.with_extra_words(), 4).encode(rows)
    np.testing.assert_allclose(engine.label_logits(prompts, bare), words[..., [0, 3]], rtol=1e-6)
    assert np.abs(got - words[..., [0, 3]]).max() > 1e-3  # the further words count


def test_a_baseline_is_scored_with_and_without_the_words(exports):
    manifest = Model.load(exports.get("LlamaForCausalLM").model).manifest
    names = [name for name, _ in plain_framings(worded(), manifest)]
    assert names[:3] == ["template (BOS)", "template (no BOS)", "template (chat)"]
    assert names[3:] == [n + " + words" for n in names[:3]]
    assert [t.extra_words for _, t in plain_framings(worded(), manifest)] == [()] * 3 + [WORDS] * 3


# -- a run that chooses them --------------------------------------------------------------------------------------
def tune_cli(model, data_dir, out, *extra):
    return ["tune", "--model", model, "--template", TEMPLATE, "--labels", "0=bad,1=great", "--prompt-position",
            "suffix", "--data", data_dir / "pool.csv", "--test", data_dir / "test.csv", "--k-shot", 8, "--out", out,
            "--prompt-tokens", 4, "--intrinsic-dim", 20, "--popsize", 6, "--budget", 24, "--eval-every", 12,
            "--checkpoint-every", 0, "-q", *extra]


def test_a_run_chooses_words_on_train_keeps_them_and_every_command_reads_them(exports, data_dir, tmp_path):
    model_dir = exports.get("LlamaForCausalLM").model
    out = tmp_path / "run"
    r = invoke(tune_cli(model_dir, data_dir, out, "--verbalizer", "auto:3", "--no-fallback"))
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    chosen = run["settings"]["verbalizer"]
    assert chosen["spec"] == "auto:3" and chosen["rows"] == 16 and chosen["candidates"] > 20
    extra = run["settings"]["task"]["extra_words"]
    assert [[w for w, _ in chosen["words"][k]] for k in ("0", "1")] == extra
    assert all(len(extra[c]) <= 3 for c in (0, 1)) and all(g > 0 for k in ("0", "1") for _, g in chosen["words"][k])
    assert chosen["train_loss"][1] < chosen["train_loss"][0]
    names = [b["name"] for b in run["baselines"]]
    assert "template (BOS)" in names and "template (BOS) + words" in names
    train = {b["name"]: b.get("train_metric") for b in run["baselines"]}  # words chosen on train are not ranked there
    assert train["template (BOS)"] is not None and train["template (BOS) + words"] is None
    kept = load_prompt(out)
    assert kept.task.extra_words == tuple(tuple(w) for w in extra)
    model = Model.load(model_dir)
    test = read_examples(str(data_dir / "test.csv"))
    plain = next(b for b in run["baselines"] if b["name"] == "template (BOS) + words")
    framed = replace(kept.task, framing=Framing(bos="auto", position="suffix"))
    assert plain["test_metric"] == pytest.approx(TunedPrompt.template(model.manifest, framed).evaluate(model, test).metric)
    r = invoke(["evaluate", "--model", model_dir, "--prompt", out, "--data", data_dir / "test.csv", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metric"] == pytest.approx(run["metrics"]["test_metric"])
    r = invoke(["report", out])
    assert r.exit_code == 0, r.output
    assert "auto:3" in r.output


def test_auto_words_beside_the_tasks_own_are_refused(exports, data_dir, tmp_path):
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(worded().to_json()))
    args = tune_cli(exports.get("LlamaForCausalLM").model, data_dir, tmp_path / "run", "--verbalizer", "auto")
    args[args.index("--template"):args.index("--template") + 6] = ["--task-file", task_file]
    assert "names its own (extra_words)" in cli_error(args)
    assert "K must be a whole number" in cli_error(tune_cli(exports.get("LlamaForCausalLM").model, data_dir,
                                                            tmp_path / "run2", "--verbalizer", "auto:0"))


def test_a_run_with_chosen_words_resumes_with_them_bit_for_bit(exports, data_dir, tmp_path, monkeypatch):
    from bbt_onnx.choice import ChoicePolicy
    from bbt_onnx.data import DataSpec
    from bbt_onnx.jobs.tune import TuneRequest, tune
    from bbt_onnx.runs import RunDir

    def request(out):
        config = TuneConfig(prompt_tokens=4, intrinsic_dim=20, popsize=6, budget=48, eval_every=12,
                            checkpoint_every=2, verbalizer="auto:2", seed=0)
        return TuneRequest(str(exports.get("LlamaForCausalLM").model), worded(extra=(), position="suffix"),
                           DataSpec(str(data_dir / "pool.csv"), k_shot=8, seed=0), config, str(out),
                           policy=ChoicePolicy(fallback=False))

    whole = tune(request(tmp_path / "whole"))
    real = RunDir.append_log

    def crash(self, row):
        real(self, row)
        if row.get("generation") == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_log", crash)
    with pytest.raises(KeyboardInterrupt):
        tune(request(tmp_path / "run"))
    monkeypatch.setattr(RunDir, "append_log", real)
    settings = RunDir(tmp_path / "run").read_json()["settings"]
    resumed = tune(TuneRequest.from_settings(settings, str(tmp_path / "run")), resume=True)
    assert resumed.tuned.task.extra_words and resumed.tuned.task == whole.tuned.task
    assert resumed.tuned.z.tobytes() == whole.tuned.z.tobytes()
    assert RunDir(tmp_path / "run").read_json()["settings"]["verbalizer"] == whole.record["settings"]["verbalizer"]
