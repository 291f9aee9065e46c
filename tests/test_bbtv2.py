"""BBTv2 (deep prompts, one CMA-ES per layer) against the reference's deepbbt.py: the deep graph's injection at
every layer, the projection scales, the round structure and budget, resume, and the CLI on both families."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt_onnx import BlackBoxTuner, Model, TuneConfig, TunedPrompt, checkpoint
from bbt_onnx.errors import ModelError, SettingsError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.subspace import ProjectionSpec, build_projection, layer_specs, normal_std
from bbt_onnx.synthetic import sentiment_examples, sentiment_rows, write_csv
from bbt_onnx.tasks import PRESETS, Task

from conftest import LAYERS, PROMPT_TOKENS as P, without_graphs
from helpers import cli_error, generations, invoke

CAUSAL_TASK = Task("sentiment", " Review: {text}\nSentiment:", (("0", "bad"), ("1", "great")))


def task_for(tiny):
    return PRESETS["sst2"] if tiny.masked else CAUSAL_TASK


def rows_and_prompts(model, tiny, seed=0):
    enc = model.encoder(task_for(tiny), P).encode(sentiment_examples(6, seed=seed))
    rng = np.random.default_rng(seed)
    m = model.manifest
    layers = np.stack([rng.normal(0, s, (P, m.hidden_size)) for s in m.layer_std]).astype(np.float32)
    cands = rng.normal(0, 1.0, (3, P, m.hidden_size)).astype(np.float32)
    return enc, layers, cands


# -- the graph ------------------------------------------------------------------------------------------------
def test_manifest_holds_the_deep_graph_its_parity_and_the_layer_scales(family):
    m = load_manifest(family.model)
    g = m.graphs["deep-fp32"]
    assert g.deep and g.file == "model.deep.onnx" and g.parity["max_abs_diff"] <= 1e-4
    assert [t.name for t in g.inputs][-2:] == ["deep_prompts", "prompt_layer"]
    assert len(m.layer_std) == m.num_layers == LAYERS and m.layer_std[0] == m.embedding_std
    assert all(s > 0 for s in m.layer_std) and len(set(m.layer_std)) == LAYERS
    assert not m.graphs["fp32"].deep  # the plain graph stays as it was


def test_every_layer_prompt_lands_where_the_reference_puts_it(family):
    """The deep graph against the unmodified Hugging Face model with a pre-hook per layer adding prompt i at the
    prompt slots, with the candidates on each layer in turn."""
    from bbt_onnx_export import validate
    from bbt_onnx_export.loading import load_model

    model = Model.load(family.model, deep=True)
    loaded = load_model(str(family.src))
    enc, layers, cands = rows_and_prompts(model, family)
    for layer in range(LAYERS):
        inputs = validate.ParityInputs(enc.input_ids, enc.attention_mask, enc.mask_pos, cands, enc.label_ids,
                                       layers, layer)
        want = validate.torch_reference(loaded, inputs, model.manifest.prompt_start)
        got = model.engine.deep_label_logits(cands, enc, layers, layer)
        np.testing.assert_allclose(got, want, atol=1e-4)
        # each layer's prompt matters: another prompt on the layer changes the logits (a random one: LayerNorm
        # would cancel a constant shift)
        moved = layers.copy()
        moved[layer] += np.random.default_rng(layer).normal(0, 1.0, moved[layer].shape).astype(np.float32)
        assert np.abs(model.engine.deep_label_logits(cands[:1], enc, moved, (layer + 1) % LAYERS) -
                      model.engine.deep_label_logits(cands[:1], enc, layers, (layer + 1) % LAYERS)).max() > 1e-4


def test_layer_zero_of_the_deep_graph_is_the_bbt_graph(family):
    plain, deep_model = Model.load(family.model), Model.load(family.model, deep=True)
    enc, _, cands = rows_and_prompts(plain, family, seed=1)
    zeros = np.zeros((LAYERS, P, plain.manifest.hidden_size), np.float32)
    want = plain.engine.label_logits(cands, enc)
    np.testing.assert_allclose(deep_model.engine.deep_label_logits(cands, enc, zeros, 0), want, atol=1e-5)
    np.testing.assert_allclose(deep_model.engine.label_logits(cands, enc), want, atol=1e-5)


# -- the projections ------------------------------------------------------------------------------------------
def test_each_layer_has_its_own_projection_at_its_own_scale():
    spec = ProjectionSpec(seed=3, intrinsic_dim=200, prompt_tokens=5, hidden_size=64, embedding_std=0.05,
                          alpha=0.2, sigma=0.2)
    stds = (0.05, 2.0, 7.5)
    specs = layer_specs(spec, stds)
    a = [build_projection(s) for s in specs]
    assert a[0].tobytes() == build_projection(spec).tobytes()  # layer 0 is BBT's A, bit for bit
    for a_i, std in zip(a, stds):
        assert a_i.std() == pytest.approx(normal_std(std, 200, 0.2, 0.2), rel=0.02)
    assert not np.allclose(a[1] / stds[1], a[2] / stds[2])  # independent draws, not rescaled copies


# -- the search -----------------------------------------------------------------------------------------------
ROUND = 6  # the popsize: one generation's calls, on one layer
SMALL = dict(prompt_tokens=P, intrinsic_dim=20, popsize=ROUND, eval_every=36, method="bbtv2")


def test_rounds_visit_the_layers_bottom_up_within_the_budget(family):
    model = Model.load(family.model, deep=True)
    train = sentiment_examples(16, seed=2)
    events = []
    rounds = 100 // (ROUND * LAYERS)  # whole rounds only: a round visits every layer once
    assert 100 % (ROUND * LAYERS)  # the budget leaves a part of a round unused
    tuner = BlackBoxTuner(model, task_for(family), TuneConfig(budget=100, **SMALL))
    tuner.fit(train, on_event=events.append)
    assert [e.layer for e in events] == list(range(LAYERS)) * rounds
    assert tuner.report.api_calls == rounds * LAYERS * ROUND and tuner.report.generations == rounds * LAYERS
    state = tuner.state
    assert len(state.es) == LAYERS and all(es.opts["maxiter"] == rounds for es in state.es)
    for layer, es in enumerate(state.es):  # each layer keeps its own strategy's best ever
        np.testing.assert_array_equal(state.prefix_z[layer], es.result.xbest)
    assert tuner.report.train_loss_final <= tuner.report.train_loss_initial


def test_a_budget_below_one_round_is_a_settings_error(family):
    with pytest.raises(SettingsError, match="less than one BBTv2 round"):
        BlackBoxTuner(Model.load(family.model, deep=True), task_for(family),
                      TuneConfig(budget=ROUND * LAYERS - 1, **SMALL))


def test_bbtv2_needs_the_deep_graph(family, tmp_path):
    with pytest.raises(ModelError, match="deep"):
        BlackBoxTuner(Model.load(family.model), task_for(family), TuneConfig(budget=36, **SMALL))  # the plain engine
    plain_only = without_graphs(family.model, tmp_path / "plain", lambda key: not key.startswith("deep"))
    with pytest.raises(ModelError, match="--deep"):
        Model.load(plain_only, deep=True)  # exported without it


def test_the_best_whole_prompt_is_kept_and_resume_is_bit_identical(family):
    model = Model.load(family.model, deep=True)
    task = task_for(family)
    train, dev = sentiment_examples(16, seed=4), sentiment_examples(16, seed=5)
    cfg = TuneConfig(budget=108, checkpoint_every=2, **SMALL)
    whole = BlackBoxTuner(model, task, cfg)
    prompt = whole.fit(train, dev)
    assert prompt.deep and prompt.z.shape == (LAYERS, 20) and prompt.embeds.shape == (LAYERS, P, model.manifest.hidden_size)
    assert prompt.layer_std == model.manifest.layer_std
    np.testing.assert_array_equal(prompt.z, whole.state.best_dev_z)
    assert prompt.evaluate(model, dev).metric == pytest.approx(whole.report.best_dev_metric)

    saved = []

    class Stop(Exception):
        pass

    def interrupt(event):
        if event.generation == 7:
            raise Stop

    with pytest.raises(Stop):
        BlackBoxTuner(model, task, cfg).fit(train, dev, on_event=interrupt,
                                            on_checkpoint=lambda s: saved.append(checkpoint.dumps(s)))
    tuner = BlackBoxTuner(model, task, cfg)
    resumed = tuner.fit(train, dev, state=tuner.load_state(saved[-1]))
    assert resumed.z.tobytes() == prompt.z.tobytes()


# -- the CLI --------------------------------------------------------------------------------------------------
def test_cli_bbtv2_tune_evaluate_predict(family, tmp_path):
    out = family.model
    write_csv(tmp_path / "pool.csv", sentiment_rows(60, seed=6))
    write_csv(tmp_path / "test.csv", sentiment_rows(20, seed=7))
    args = ["tune", "--model", out, "--data", tmp_path / "pool.csv", "--test", tmp_path / "test.csv", "--k-shot", 8,
            "--prompt-tokens", P, "--intrinsic-dim", 20, "--popsize", ROUND, "--budget", 3 * ROUND * LAYERS,
            "--eval-every", ROUND * LAYERS,
            "--method", "bbtv2", "--out", tmp_path / "run", "-q", "--no-fallback", *family.task_args()]
    tuned = invoke(args)
    assert tuned.exit_code == 0, tuned.output
    metrics = json.loads(tuned.stdout)
    assert metrics["api_calls"] == 3 * ROUND * LAYERS and metrics["generations"] == 3 * LAYERS
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["tune"]["method"] == "bbtv2"
    log = [row["layer"] for row in generations(tmp_path / "run")]
    assert log == list(range(LAYERS)) * 3
    prompt = TunedPrompt.load(tmp_path / "run")
    assert prompt.deep and prompt.embeds.shape[0] == LAYERS

    ev = invoke(["evaluate", "--model", out, "--prompt", tmp_path / "run", "--data", tmp_path / "test.csv", "-q"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["metric"] == pytest.approx(metrics["test_metric"])
    pr = invoke(["predict", "--model", out, "--prompt", tmp_path / "run", "--input", tmp_path / "test.csv", "-q"])
    assert pr.exit_code == 0 and len(pr.stdout.splitlines()) == 20
    base = invoke(["evaluate", "--model", out, "--prompt", tmp_path / "run", "--no-prompt", "--data",
                   tmp_path / "test.csv", "-q"])
    assert base.exit_code == 0, base.output
    checked = invoke(["check", "--model", out, "--prompt", tmp_path / "run", "--data", tmp_path / "test.csv",
                      "--engines", "cpu:fp32", "--json"])  # on the deep graph
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["prompts"] == ["tuned", "z=0"] and report["engines"][0]["metric"] == pytest.approx(
        metrics["test_metric"])
    assert "less than one BBTv2 round" in cli_error([*args, "--budget", 10, "--out", tmp_path / "r2"])
