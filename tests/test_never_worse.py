"""Never worse than the user's own template: the baselines a run scores, the choice between them and the tuned
prompt, the start of the search, calibration, patience."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from bbt_onnx import Model, PRESETS, TuneConfig
from bbt_onnx.baselines import init_candidates, plain_framings
from bbt_onnx.calibration import calibrated, content_free_rows, log_prior
from bbt_onnx.choice import ChoicePolicy, choose, scored
from bbt_onnx.data import DataSpec, load_splits
from bbt_onnx.errors import BBTError
from bbt_onnx.prompt import TunedPrompt, load_prompt
from bbt_onnx.stats import paired_margin, spread
from bbt_onnx.tasks import Framing, make_task
from bbt_onnx.jobs.tune import TuneRequest, tune
from bbt_onnx.losses import metric as metric_of
from bbt_onnx.tuning.tuner import BlackBoxTuner

from helpers import generations, invoke
from test_tune import tune_args


def one_hot(predictions, k=2) -> np.ndarray:
    return np.eye(k)[np.asarray(predictions)] * 5.0


# -- pure parts -------------------------------------------------------------------------------------------------
def test_paired_margin_is_zero_for_one_prompt_and_above_zero_for_a_clearly_better_one():
    labels = np.array([0, 1] * 50)
    same = paired_margin("accuracy", one_hot(labels), one_hot(labels), labels)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    wrong = labels.copy()
    wrong[:40] = 1 - wrong[:40]  # b misses 40 of 100 rows that a gets right
    better = paired_margin("accuracy", one_hot(labels), one_hot(wrong), labels)
    assert better.value == pytest.approx(0.4) and 0.25 < better.low <= better.value <= better.high
    few = paired_margin("accuracy", one_hot(labels[:8]), one_hot(np.r_[1 - labels[:1], labels[1:8]]), labels[:8])
    assert few.value == pytest.approx(0.125) and few.low <= 0  # one row of eight: not clearly better


def test_the_interval_rule_keeps_the_template_unless_the_margin_is_clear():
    labels = np.array([0, 1] * 16)
    template = scored("template", one_hot(np.r_[1 - labels[:10], labels[10:]]), labels, "accuracy")  # 22/32
    lucky = scored("tuned", one_hot(np.r_[1 - labels[:8], labels[8:]]), labels, "accuracy")  # 24/32
    strong = scored("tuned", one_hot(labels), labels, "accuracy")  # 32/32
    assert not choose([lucky], [template], labels, "accuracy").tuned  # +2 rows of 32 is noise
    assert choose([lucky], [template], labels, "accuracy", rule="max").tuned  # max takes any gain
    assert choose([strong], [template], labels, "accuracy").tuned
    tie = choose([scored("tuned", template.logits, labels, "accuracy")], [template], labels, "accuracy", rule="max")
    assert not tie.tuned  # a tie keeps the template
    forced = choose([scored("tuned", one_hot(1 - labels), labels, "accuracy")], [template], labels, "accuracy",
                    fallback=False)
    assert forced.tuned and forced.margin.value < 0  # --no-fallback keeps it, and says by how much it loses


def test_the_best_baseline_is_the_one_compared():
    labels = np.array([0, 1] * 16)
    weak = scored("template (BOS)", one_hot(1 - labels), labels, "accuracy")
    strong = scored("template (no BOS)", one_hot(labels), labels, "accuracy")
    tuned = scored("tuned", one_hot(np.r_[1 - labels[:4], labels[4:]]), labels, "accuracy")
    choice = choose([tuned], [weak, strong], labels, "accuracy", rule="max")
    assert choice.kept == "template (no BOS)" and choice.best_baseline == "template (no BOS)"


def test_the_best_template_is_ranked_on_train_and_dev_and_compared_on_dev():
    labels = np.array([0, 1] * 16)
    lucky = scored("template (BOS)", one_hot(np.r_[1 - labels[:6], labels[6:]]), labels, "accuracy",
                   (one_hot(1 - labels), labels))  # 26/32 on dev, 0/32 on train
    steady = scored("template (no BOS)", one_hot(np.r_[1 - labels[:8], labels[8:]]), labels, "accuracy",
                    (one_hot(labels), labels))  # 24/32 on dev, 32/32 on train
    assert (lucky.rank, lucky.rows, steady.rank) == (pytest.approx(26 / 64), 64, pytest.approx(56 / 64))
    tuned = scored("tuned", one_hot(np.r_[1 - labels[:7], labels[7:]]), labels, "accuracy")  # 25/32
    choice = choose([tuned], [lucky, steady], labels, "accuracy", rule="max")
    assert choice.best_baseline == "template (no BOS)" and choice.tuned  # compared on dev: 25 against 24
    assert choice.margin.value == pytest.approx(1 / 32) and "over 64 train and dev rows" in choice.reason
    on_dev = [scored(c.name, c.logits, labels, "accuracy") for c in (lucky, steady)]
    assert choose([tuned], on_dev, labels, "accuracy", rule="max").kept == "template (BOS)"


def test_calibration_divides_out_the_prior():
    prior_logits = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.85, 0.15]]))
    prior = log_prior(prior_logits)
    assert np.exp(prior) == pytest.approx([0.85, 0.15])
    row = np.log(np.array([[0.7, 0.3]]))  # leans to label 0 less than the template itself does
    out = np.exp(calibrated(row, prior))
    assert out.sum() == pytest.approx(1.0) and out[0, 1] > out[0, 0]  # (0.3/0.15) > (0.7/0.85)
    assert np.exp(calibrated(row, None))[0] == pytest.approx([0.7, 0.3])
    pair = content_free_rows(PRESETS["mrpc"])
    assert [r.text for r in pair] == ["N/A", "", "[MASK]"] and all(r.text_b == r.text for r in pair)


def test_spread_over_seeds():
    s = spread([0.7, 0.8, None, float("nan"), 0.9])
    assert (s.n, s.mean) == (3, pytest.approx(0.8)) and s.std == pytest.approx(0.1)
    assert str(spread([0.5])) == "0.5000"


# -- what a model allows ------------------------------------------------------------------------------------
def test_plain_framings_per_kind(tiny_model, exports):
    masked = Model.load(tiny_model)
    assert [n for n, _ in plain_framings(PRESETS["sst2"], masked.manifest)] == ["template"]
    llama = exports.get("LlamaForCausalLM")
    m = Model.load(llama.model)
    task = make_task("review", " Review: {text}\nSentiment:", (("0", " bad"), ("1", " great")),
                     framing=Framing(bos="never", position="suffix"))
    framings = plain_framings(task, m.manifest)
    names = [n for n, _ in framings]
    assert names[0] == "template (no BOS)"  # the user's own framing first
    assert set(names) == {"template (no BOS)", "template (BOS)"} | ({"template (chat)"} if m.manifest.has_chat
                                                                     else set())
    assert all(t.framing.position == "suffix" for _, t in framings)
    assert len({t.framing for _, t in framings}) == len(framings)


def test_start_candidates(tiny_model):
    m = Model.load(tiny_model)
    task = PRESETS["sst2"]
    found = dict(init_candidates(m.tokenizer, m.manifest, task, 4))
    assert list(found)[0] == "reference" and found["reference"] == list(m.manifest.placeholder_ids[:4])
    assert all(len(ids) == 4 for ids in found.values()) and len({tuple(i) for i in found.values()}) == len(found)
    assert "template words" in found
    with pytest.raises(BBTError, match="pass prompt_tokens"):
        init_candidates(m.tokenizer, m.manifest, task, 4, text="a much longer text than four tokens here")


# -- the run -----------------------------------------------------------------------------------------------------
def request(model, data_dir, out, fallback: bool = True, **config) -> TuneRequest:
    cfg = TuneConfig(**{"prompt_tokens": 4, "intrinsic_dim": 20, "popsize": 6, "budget": 60, "eval_every": 12,
                        "seed": 3, "checkpoint_every": 0, **config})
    return TuneRequest(str(model), PRESETS["sst2"], DataSpec(str(data_dir / "pool.csv"), test=str(data_dir / "test.csv"),
                                                             k_shot=8, seed=3), cfg, str(out),
                       policy=ChoicePolicy(fallback=fallback))


def test_a_run_scores_the_baselines_and_keeps_what_its_rule_says(tiny_model, data_dir, tmp_path):
    outcome = tune(request(tiny_model, data_dir, tmp_path / "run"))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    names = [b["name"] for b in run["baselines"]]
    assert names[0] == "template" and names[1].startswith("z = 0")
    assert run["settings"]["policy"]["baseline_rows"] == "train+dev"
    model = Model.load(tiny_model)
    template = TunedPrompt.template(model.manifest, PRESETS["sst2"])
    splits = load_splits(request(tiny_model, data_dir, tmp_path).data, PRESETS["sst2"].label_keys)
    assert run["baselines"][0]["train_metric"] == pytest.approx(template.evaluate(model, splits.train).metric)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][:2]
    assert [r["baseline"] for r in logged] == names and logged[0]["dev_metric"] == run["baselines"][0]["dev_metric"]
    choice = run["choice"]
    margin = choice["dev_margin"]
    assert choice["rule"] == "interval" and choice["tuned"] == (margin["low"] > 0)
    assert f"over {len(splits.train) + len(splits.dev)} train and dev rows" in choice["reason"]
    kept = load_prompt(tmp_path / "run")
    if choice["tuned"]:
        assert kept.origin == "tuned" and not (tmp_path / "run" / "tuned.npz").exists()
    else:  # the template, scored in its own framing; the tuned prompt kept beside it
        assert kept.origin == "template" and kept.prompt_tokens == 0
        assert TunedPrompt.load(tmp_path / "run" / "tuned.npz").z.tobytes() == outcome.tuned.z.tobytes()
        assert run["metrics"]["test_metric"] == pytest.approx(template.evaluate(model, data_rows(data_dir)).metric)
        assert run["metrics"]["test_metric"] == pytest.approx(run["baselines"][0]["test_metric"])
    assert run["metrics"]["kept"] == kept.origin


def data_rows(data_dir):
    from bbt_onnx import read_examples

    return read_examples(str(data_dir / "test.csv"))


def test_a_template_that_wins_is_what_evaluate_and_predict_use(tiny_model, data_dir, tmp_path):
    """A tuned prompt that cannot win (budget of one generation, rule max against a tie-free dev): whichever is
    kept, evaluate, predict and check score exactly it."""
    r = invoke(tune_args(tiny_model, data_dir, tmp_path / "run", "--budget", 10, "--fallback", "--choose", "max",
                         "-q"))
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    ev = invoke(["evaluate", "--model", tiny_model, "--prompt", tmp_path / "run", "--data", data_dir / "test.csv",
                 "-q"])
    assert json.loads(ev.stdout)["metric"] == pytest.approx(metrics["test_metric"])
    pr = invoke(["predict", "--model", tiny_model, "--prompt", tmp_path / "run", "--input", data_dir / "test.csv",
                 "-q"])
    assert pr.exit_code == 0 and len(pr.stdout.splitlines()) == 60
    ck = invoke(["check", "--model", tiny_model, "--prompt", tmp_path / "run", "--data", data_dir / "test.csv",
                 "--engines", "cpu:fp32", "--json"])
    assert ck.exit_code == 0, ck.output
    assert json.loads(ck.stdout)["prompts"][0] == run["choice"]["kept"].replace("the tuned prompt", "tuned")


def test_the_kept_template_is_not_the_tuned_prompt_when_fallback_is_off(tiny_model, data_dir, tmp_path):
    outcome = tune(request(tiny_model, data_dir, tmp_path / "run", fallback=False))
    assert outcome.prompt.origin == "tuned" and outcome.record["choice"]["tuned"]
    assert outcome.prompt.z.tobytes() == outcome.tuned.z.tobytes()


def test_a_tuned_prompt_clearly_better_on_dev_is_kept(tiny_model, data_dir, tmp_path, monkeypatch):
    """The rule sees dev logits only: hand it a tuned prompt that is perfect on dev and it is kept."""
    import bbt_onnx.jobs.settle as settle

    real = settle.scored

    def perfect_tuned(name, logits, labels, metric, unseen=None):
        return real(name, one_hot(labels, logits.shape[-1]) if name == "the tuned prompt" else logits, labels, metric,
                    unseen)

    monkeypatch.setattr(settle, "scored", perfect_tuned)
    outcome = tune(request(tiny_model, data_dir, tmp_path / "run"))
    assert outcome.record["choice"]["tuned"] and outcome.record["choice"]["dev_margin"]["low"] > 0


def test_the_start_is_the_cheapest_on_dev_and_reference_keeps_the_papers_ids(tiny_model, data_dir, tmp_path):
    auto = tune(request(tiny_model, data_dir, tmp_path / "auto", fallback=False))
    start = auto.record["settings"]["start"]
    best = max(start["candidates"], key=lambda c: (c["dev_metric"], -c["dev_ce"]))
    assert start["name"] == best["name"] and list(auto.tuned.placeholder_ids) == best["ids"]
    ref = tune(request(tiny_model, data_dir, tmp_path / "ref", prompt_init="reference", fallback=False))
    manifest = Model.load(tiny_model).manifest
    assert ref.record["settings"]["start"]["name"] == "reference"
    assert ref.record["settings"]["start"]["ids"] == list(manifest.placeholder_ids[:4])
    zero = invoke(["evaluate", "--model", tiny_model, "--prompt", tmp_path / "auto", "--no-prompt", "--data",
                   data_dir / "test.csv", "-q"])
    z0 = next(b for b in auto.record["baselines"] if b["name"].startswith("z = 0"))
    assert json.loads(zero.stdout)["metric"] == pytest.approx(z0["test_metric"])  # --no-prompt: the run's own start


def test_calibrate_reaches_the_prompt_and_both_numbers_are_recorded(tiny_model, data_dir, tmp_path):
    outcome = tune(request(tiny_model, data_dir, tmp_path / "run", calibrate=True, fallback=False))
    prompt = load_prompt(tmp_path / "run")
    assert prompt.calibration is not None and len(prompt.calibration) == 2
    model = Model.load(tiny_model)
    raw = replace(prompt, calibration=None)
    cf = raw.logits(model, [r.text for r in content_free_rows(PRESETS["sst2"])[:1]] + ["[MASK]"])
    assert np.isfinite(cf).all()
    assert prompt.evaluate(model, data_rows(data_dir)).metric == pytest.approx(outcome.metrics["test_metric"])
    base = outcome.record["baselines"][0]
    assert base["dev_metric"] == base["dev_metric_calibrated"] and "dev_metric_uncalibrated" in base
    rows = data_rows(data_dir)
    expect = calibrated(raw.logits(model, rows), np.array(prompt.calibration))
    assert prompt.logits(model, rows) == pytest.approx(expect.astype(np.float32), abs=1e-6)


def log_probs(logits) -> np.ndarray:
    """log-softmax over the labels, written here so that the checks below do not lean on the library's."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cf_prior(cf_logits) -> np.ndarray:
    """Zhao et al.'s p_cf: the mean label probabilities on the content-free rows, as logs."""
    return np.log(np.exp(log_probs(cf_logits)).mean(axis=0))


def divided(raw, prior) -> np.ndarray:
    """p / p_cf, renormalised, as log-probabilities."""
    return log_probs(log_probs(raw) - prior)


def test_dev_scores_divide_out_the_prompts_content_free_prior_and_no_other(tiny_model, data_dir):
    """The tuner's dev scores are the raw scores with the prompt's own prior on "N/A", "" and "[MASK]" divided out:
    not the dev rows' own prior, not none (the rows here tell the three apart)."""
    model = Model.load(tiny_model)
    task = PRESETS["sst2"]
    tuner = BlackBoxTuner(model, task, TuneConfig(prompt_tokens=4, intrinsic_dim=20, popsize=6, budget=60,
                                                  calibrate=True, prompt_init="reference"))
    rows = tuner.encode(data_rows(data_dir)[:24])
    z = np.random.default_rng(0).normal(0.0, 1.0, tuner.method.zero().shape)
    score = tuner.method.z_scorer(z)
    raw = score(rows)[0]
    prior = cf_prior(score(tuner.encoder.encode(content_free_rows(task)))[0])
    expect = divided(raw, prior)
    assert np.abs(expect - divided(raw, cf_prior(raw))).max() > 1e-3  # the dev rows' own prior
    assert np.abs(expect - log_probs(raw)).max() > 1e-3  # no prior
    assert tuner.dev_logits(z, rows) == pytest.approx(expect, abs=1e-5)
    assert tuner.prior(z) == pytest.approx(prior, abs=1e-6)
    assert tuner.dev_logits(z, rows, tuner.prior(z)) == pytest.approx(expect, abs=1e-5)


def test_a_runs_calibrated_numbers_divide_out_each_results_content_free_prior(tiny_model, data_dir, tmp_path):
    """Each seed's prompt and the seeds' ensemble carry their own prior on the content-free rows, and run.json's
    calibrated and uncalibrated numbers (the seeds' dev metric is the tuner's) are their scores with and without it."""
    req = replace(request(tiny_model, data_dir, tmp_path / "run", calibrate=True, fallback=False), seeds=(3, 4))
    outcome = tune(req)
    record, model, task = outcome.record, Model.load(tiny_model), PRESETS["sst2"]
    splits = load_splits(req.data, task.label_keys)
    results = [*zip(outcome.seed_prompts, record["seeds"]), (outcome.tuned, record["ensemble"])]
    assert outcome.prompt.origin == "ensemble" and len(results) == 3
    for result, scores in results:
        raw = replace(result, calibration=None)
        prior = cf_prior(raw.logits(model, raw.encoder(model).encode(content_free_rows(task))))
        assert result.calibration == pytest.approx(prior, abs=1e-6)
        for split, rows in (("dev", splits.dev), ("test", splits.test)):
            plain = raw.logits(model, rows)
            labels = raw.encode(model, rows).labels
            assert result.logits(model, rows) == pytest.approx(divided(plain, prior).astype(np.float32), abs=1e-5)
            cal = float(metric_of(task.metric, divided(plain, prior), labels)[0])
            assert scores[f"{split}_metric"] == pytest.approx(cal)
            if scores[f"{split}_metric_calibrated"] is not None:  # a seed's dev metric is the tuner's alone
                assert scores[f"{split}_metric_calibrated"] == pytest.approx(cal)
                assert scores[f"{split}_metric_uncalibrated"] == pytest.approx(
                    float(metric_of(task.metric, plain, labels)[0]))


@pytest.mark.parametrize("calibrate", [True, False])
def test_each_result_computes_its_prior_once(tiny_model, data_dir, tmp_path, monkeypatch, calibrate):
    """A result that carries its prior is not stripped and scored on the content-free rows again: each seed's
    prompt, the ensemble and the template pay for it once, and a kept template keeps the prior its scores used."""
    import bbt_onnx.prompt as prompt_module

    real, calls = prompt_module.prior_of, Counter()

    def counting(result, model):
        calls[result.origin] += 1
        return real(result, model)

    for module in [m for name, m in sys.modules.items() if name.startswith("bbt_onnx")]:
        if getattr(module, "prior_of", None) is real:  # wherever it was imported
            monkeypatch.setattr(module, "prior_of", counting)
    outcome = tune(replace(request(tiny_model, data_dir, tmp_path / "run", calibrate=calibrate), seeds=(3, 4)))
    assert calls == {"tuned": 2, "ensemble": 1, "template": 1}
    kept = outcome.prompt
    assert (kept.calibration is not None) == calibrate
    if calibrate and kept.origin == "template":
        assert kept.calibration == real(replace(kept, calibration=None), Model.load(tiny_model))


def test_patience_stops_early_and_says_so(tiny_model, data_dir, tmp_path):
    outcome = tune(request(tiny_model, data_dir, tmp_path / "run", budget=120, eval_every=6, patience=2,
                           fallback=False))
    m = outcome.metrics
    assert "patience=2" in m["stop_reason"] and m["api_calls"] < 120  # 18 here
    dev = [row["dev_metric"] for row in generations(tmp_path / "run") if row["dev_metric"] is not None]
    assert len(dev) >= 3 and max(dev[-2:]) <= max(dev[:-2])  # the last two evaluations did not improve
    whole = tune(request(tiny_model, data_dir, tmp_path / "whole", budget=120, eval_every=6, fallback=False))
    assert whole.metrics["api_calls"] == 120  # patience 0: the whole budget, as the reference


# -- calibration inside the search -------------------------------------------------------------------------------
def search_tuner(tiny_model, mode: str) -> BlackBoxTuner:
    return BlackBoxTuner(Model.load(tiny_model), PRESETS["sst2"],
                         TuneConfig(prompt_tokens=4, intrinsic_dim=20, popsize=6, budget=60, eval_every=60,
                                    calibrate=True, search_calibration=mode, prompt_init="reference", seed=3))


@pytest.mark.parametrize("mode", ["content-free", "batch"])
def test_the_search_minimises_the_loss_of_each_candidates_calibrated_scores(tiny_model, data_dir, monkeypatch, mode):
    """CMA-ES is told the loss of calibrated scores: each candidate's own prior, from the content-free rows scored
    in the same engine call as the training rows (three more rows, no more calls), or from its training rows."""
    from bbt_onnx.engines.ort import OrtEngine
    from bbt_onnx.losses import loss as loss_of

    tuner = search_tuner(tiny_model, mode)
    train = tuner.encode(data_rows(data_dir)[:24])
    tuner.start(train)
    seen, told, real_tell = [], [], type(tuner.state.es[0]).tell
    real = OrtEngine.label_logits

    def recorded(self, prompts, rows):
        out = real(self, prompts, rows)
        seen.append((len(prompts), len(rows), out))
        return out

    monkeypatch.setattr(OrtEngine, "label_logits", recorded)
    monkeypatch.setattr(type(tuner.state.es[0]), "tell", lambda es, z, f: (told.append(f), real_tell(es, z, f))[1])
    tuner.step(train, None)
    (count, rows, logits), = seen  # one engine call for the generation
    assert count == 6 and rows == len(train) + (3 if mode == "content-free" else 0)
    source = logits[:, len(train):] if mode == "content-free" else logits
    expect = np.stack([divided(c[:len(train)], cf_prior(s)) for c, s in zip(logits, source)])
    assert np.abs(expect - log_probs(logits[:, :len(train)])).max() > 1e-3  # the calibration moved the scores
    assert told == [pytest.approx(loss_of("ce", "accuracy", expect, train.labels).tolist())]
    assert tuner.state.calls == 6  # the extra rows are not calls


def test_search_calibration_keeps_lockstep_seeds_bit_for_bit_and_needs_calibrate(tiny_model, data_dir, tmp_path):
    """The content-free rows ride in the seeds' one call; each seed still ends with its own run's z."""
    cal = {"calibrate": True, "search_calibration": "content-free", "budget": 36}
    together = tune(replace(request(tiny_model, data_dir, tmp_path / "all", fallback=False, **cal), seeds=(0, 1)))
    for seed, prompt in zip((0, 1), together.seed_prompts):
        alone = tune(request(tiny_model, data_dir, tmp_path / f"s{seed}", fallback=False, seed=seed, **cal))
        assert prompt.z.tobytes() == alone.tuned.z.tobytes()
    plain = tune(request(tiny_model, data_dir, tmp_path / "after", fallback=False, calibrate=True, budget=36,
                         seed=1, search_calibration="off"))
    assert plain.tuned.z.tobytes() != together.seed_prompts[1].z.tobytes()  # the search saw other losses
    assert TuneConfig(calibrate=True).search_calibration == "content-free"  # what calibrate means for the search
    assert TuneConfig().search_calibration == "off"
    recorded = {k: v for k, v in TuneConfig(calibrate=True).to_json().items() if k != "search_calibration"}
    assert TuneConfig.from_json(recorded).search_calibration == "off"  # a run from before searched raw scores
    assert together.record["settings"]["tune"]["search_calibration"] == "content-free"
    with pytest.raises(BBTError, match="needs calibrate") as caught:
        TuneConfig(search_calibration="batch")
    assert caught.value.arguments == ("search_calibration", "calibrate")
