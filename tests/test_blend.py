"""Blends: the tuned side and a plain template averaged, weighed by tune --blend among the tuned candidates, kept
like any result (saved, loaded, evaluated, predicted, checked, deployed)."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest

from bbt_onnx import Model, PRESETS, read_examples
from bbt_onnx.errors import PromptError
from bbt_onnx.losses import log_softmax, mixed
from bbt_onnx.prompt import Blend, BlendRows, PromptEnsemble, TunedPrompt, load_prompt
from bbt_onnx.runs import TUNED
from bbt_onnx.synthetic import sentiment_examples
from bbt_onnx.tasks import Framing

from helpers import invoke
from test_deploy import random_prompt


def blend_of(manifest, model) -> Blend:
    tuned = PromptEnsemble(tuple(random_prompt(manifest, PRESETS["sst2"], "bbt", seed=s) for s in range(2)))
    template = TunedPrompt.template(manifest, PRESETS["sst2"], "template").calibrate(model)
    return Blend((tuned, template), (0.75, 0.25), "ensemble + 0.25 x template")


def test_a_blend_reads_rows_as_its_members_weighted_mean(tiny_model):
    model = Model.load(tiny_model)
    blend = blend_of(model.manifest, model)
    rows = sentiment_examples(12, seed=4)
    enc = blend.encoder(model).encode(rows)
    assert isinstance(enc, BlendRows) and len(enc) == 12 and enc.parts[0].input_ids.shape != enc.parts[1].input_ids.shape
    want = mixed([m.logits(model, rows) for m in blend.members], blend.weights)
    np.testing.assert_allclose(blend.logits(model, rows), want, rtol=1e-5)
    probs = np.exp(log_softmax(blend.logits(model, rows).astype(np.float64)))
    np.testing.assert_allclose(probs, 0.75 * np.exp(log_softmax(blend.members[0].logits(model, rows).astype(
        np.float64))) + 0.25 * np.exp(log_softmax(blend.members[1].logits(model, rows).astype(np.float64))), rtol=1e-5)
    assert blend.evaluate(model, enc.take(np.arange(4))).rows == 4


def test_a_blend_round_trips_through_its_file(tiny_model, tmp_path):
    model = Model.load(tiny_model)
    blend = blend_of(model.manifest, model)
    blend.save(tmp_path / "prompt.npz")
    again = load_prompt(tmp_path)
    assert isinstance(again, Blend) and again.weights == blend.weights and again.origin == blend.origin
    assert isinstance(again.members[0], PromptEnsemble) and again.members[1].calibration == blend.members[1].calibration
    rows = sentiment_examples(8, seed=5)
    np.testing.assert_array_equal(again.logits(model, rows), blend.logits(model, rows))
    with pytest.raises(PromptError, match="load it with load_prompt"):
        TunedPrompt.load(tmp_path)
    with np.load(tmp_path / "prompt.npz") as f:  # a blend whose description lies about its weights
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "weights": [0.9, 0.9]}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "prompt.npz").write_bytes(buf.getvalue())
    with pytest.raises(PromptError, match="sum to 1"):
        load_prompt(tmp_path / "bad")


@pytest.mark.parametrize("members, weights, match", [
    ("one", (1.0,), "2 to 8 results"),
    ("two", (0.5, 0.6), "sum to 1"),
    ("other labels", (0.5, 0.5), "share the labels"),
])
def test_bad_blends_are_refused(tiny_model, members, weights, match):
    model = Model.load(tiny_model)
    template = TunedPrompt.template(model.manifest, PRESETS["sst2"])
    other = TunedPrompt.template(model.manifest, PRESETS["snli"])
    parts = {"one": (template,), "two": (template, template), "other labels": (template, other)}[members]
    with pytest.raises(PromptError, match=match):
        Blend(parts, weights)


# -- a run that weighs blends --------------------------------------------------------------------------------------
def tune_args(model, data_dir, out, *extra):
    return ["tune", "--model", model, "--template", " Review: {text}\nSentiment:", "--labels", "0=bad,1=great",
            "--prompt-position", "suffix", "--data", data_dir / "pool.csv", "--test", data_dir / "test.csv",
            "--k-shot", 8, "--out", out, "--prompt-tokens", 4, "--intrinsic-dim", 20, "--popsize", 6, "--budget", 24,
            "--eval-every", 12, "--checkpoint-every", 0, "--seeds", "0,1", "--blend", "-q", *extra]


def test_a_run_scores_every_blend_as_the_blend_itself_would(exports, data_dir, tmp_path):
    model_dir = exports.get("LlamaForCausalLM").model
    out = tmp_path / "run"
    r = invoke(tune_args(model_dir, data_dir, out, "--choose", "max"))
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["policy"]["blend"] is True
    bases = [b for b in run["baselines"] if "framing" in b]
    assert len(run["blends"]) == 2 * len(bases)
    assert run["choice"]["best_tuned"] in ["ensemble"] + [b["name"] for b in run["blends"]]
    model = Model.load(model_dir)
    tuned = load_prompt(out / TUNED) if (out / TUNED).exists() else load_prompt(out)
    if isinstance(tuned, Blend):
        tuned = tuned.members[0]
    test = read_examples(str(data_dir / "test.csv"))
    for record in run["blends"][::3]:
        base = next(b for b in bases if b["name"] == record["template"])
        template = TunedPrompt.template(model.manifest, replace(tuned.task, framing=Framing.from_json(base["framing"])),
                                        base["name"])
        blend = Blend((tuned, template), (1 - record["weight"], record["weight"]))
        assert record["test_metric"] == pytest.approx(blend.evaluate(model, test).metric)


def test_a_blend_the_choice_keeps_is_the_runs_result_everywhere(exports, data_dir, tmp_path, monkeypatch):
    """Hand the choice a blend perfect on dev: the run keeps it, and evaluate, predict and deploy use it."""
    import bbt_onnx.jobs.settle as settle

    real = settle.scored

    def perfect_blend(name, logits, labels, metric, unseen=None):
        top = name == "ensemble + 0.25 x template (no BOS)"
        return real(name, np.eye(logits.shape[-1])[labels] * 5.0 if top else logits, labels, metric, unseen)

    monkeypatch.setattr(settle, "scored", perfect_blend)
    model_dir = exports.get("LlamaForCausalLM").model
    out = tmp_path / "run"
    r = invoke(tune_args(model_dir, data_dir, out))
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    kept = load_prompt(out)
    assert isinstance(kept, Blend) and kept.origin == run["metrics"]["kept"] == "ensemble + 0.25 x template (no BOS)"
    assert kept.weights == (0.75, 0.25) and kept.members[1].task.framing == Framing(bos="never", position="suffix")
    r = invoke(["evaluate", "--model", model_dir, "--prompt", out, "--data", data_dir / "test.csv", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metric"] == pytest.approx(run["metrics"]["test_metric"])
    r = invoke(["deploy", "--model", model_dir, "--prompt", out, "--out", tmp_path / "clf", "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["result"] == kept.origin and summary["check"]["max_abs_diff"] < 1e-4
