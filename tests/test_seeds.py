"""Seeds in one call: lock-step tuning bit for bit like single-seed runs, the seeds' ensemble, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt_onnx import Model, PRESETS, TuneConfig
from bbt_onnx.data import DataSpec
from bbt_onnx.losses import log_softmax
from bbt_onnx.prompt import PromptEnsemble, load_prompt
from bbt_onnx.runs import RunDir
from bbt_onnx.choice import ChoicePolicy
from bbt_onnx.jobs.tune import TuneRequest, tune

from helpers import cli_error, generations, invoke
from test_never_worse import data_rows
from test_tune import tune_args


def request(model, data_dir, out, seeds=(), seed=0, **config) -> TuneRequest:
    cfg = TuneConfig(**{"prompt_tokens": 4, "intrinsic_dim": 20, "popsize": 6, "budget": 48, "eval_every": 12,
                        "seed": seed, "checkpoint_every": 0, **config})
    data = DataSpec(str(data_dir / "pool.csv"), test=str(data_dir / "test.csv"), k_shot=8, seed=5)  # one split
    return TuneRequest(str(model), PRESETS["sst2"], data, cfg, str(out), seeds=tuple(seeds),
                       policy=ChoicePolicy(fallback=False))


def test_each_lockstep_seed_ends_bit_for_bit_like_its_own_run_in_one_call_per_generation(tiny_model, data_dir,
                                                                                          tmp_path, monkeypatch):
    from bbt_onnx.engines.ort import OrtEngine

    sizes = []
    real = OrtEngine.label_logits

    def counted(self, prompts, batch):
        sizes.append(len(prompts))
        return real(self, prompts, batch)

    monkeypatch.setattr(OrtEngine, "label_logits", counted)
    together = tune(request(tiny_model, data_dir, tmp_path / "all", seeds=(0, 1, 2)))
    generations_run = together.metrics["generations"]
    assert sizes.count(18) == generations_run and 6 not in sizes  # 3 seeds x popsize 6, always together
    monkeypatch.setattr(OrtEngine, "label_logits", real)
    for seed, prompt in zip((0, 1, 2), together.seed_prompts):
        alone = tune(request(tiny_model, data_dir, tmp_path / f"seed{seed}", seed=seed))
        assert prompt.z.tobytes() == alone.tuned.z.tobytes()
        ours = next(s for s in together.record["seeds"] if s["seed"] == seed)
        assert ours["test_metric"] == alone.record["seeds"][0]["test_metric"]
    assert len({p.z.tobytes() for p in together.seed_prompts}) == 3  # the seeds did differ
    rows = generations(tmp_path / "all")
    assert sorted({r["seed"] for r in rows}) == [0, 1, 2]


def test_bbtv2_seeds_step_together_and_match_their_own_runs(tiny_model, data_dir, tmp_path):
    v2 = {"method": "bbtv2", "budget": 36, "popsize": 4, "eval_every": 12}
    together = tune(request(tiny_model, data_dir, tmp_path / "all", seeds=(0, 1), **v2))
    for seed, prompt in zip((0, 1), together.seed_prompts):
        alone = tune(request(tiny_model, data_dir, tmp_path / f"s{seed}", seed=seed, **v2))
        assert prompt.z.tobytes() == alone.tuned.z.tobytes()


def test_the_ensemble_averages_the_seeds_probabilities_and_every_command_takes_it(tiny_model, data_dir, tmp_path):
    outcome = tune(request(tiny_model, data_dir, tmp_path / "run", seeds=(0, 1, 2)))
    ensemble = load_prompt(tmp_path / "run")
    assert isinstance(ensemble, PromptEnsemble) and len(ensemble.members) == 3
    for saved, tuned in zip(ensemble.members, outcome.seed_prompts):
        assert saved.z.tobytes() == tuned.z.tobytes()
    model = Model.load(tiny_model)
    rows = data_rows(data_dir)
    probs = np.mean([np.exp(log_softmax(m.logits(model, rows).astype(np.float64))) for m in ensemble.members], 0)
    assert np.exp(log_softmax(ensemble.logits(model, rows).astype(np.float64))) == pytest.approx(probs, abs=1e-6)
    assert ensemble.evaluate(model, rows).metric == pytest.approx(outcome.record["ensemble"]["test_metric"])
    assert outcome.metrics["test_metric"] == outcome.record["ensemble"]["test_metric"]
    for args in (["evaluate", "--data", data_dir / "test.csv"], ["predict", "--input", data_dir / "test.csv"],
                 ["check", "--data", data_dir / "test.csv", "--engines", "cpu:fp32"]):
        r = invoke([args[0], "--model", tiny_model, "--prompt", tmp_path / "run", *args[1:]])
        assert r.exit_code == 0, r.output
    ev = invoke(["evaluate", "--model", tiny_model, "--prompt", tmp_path / "run", "--data", data_dir / "test.csv",
                 "-q"])
    assert json.loads(ev.stdout)["metric"] == pytest.approx(outcome.metrics["test_metric"])


def test_a_lockstep_run_resumes_bit_for_bit(tiny_model, data_dir, tmp_path, monkeypatch):
    whole = tune(request(tiny_model, data_dir, tmp_path / "whole", seeds=(0, 1), checkpoint_every=2))
    real = RunDir.append_log

    def crash(self, row):
        real(self, row)
        if row.get("generation") == 5 and row.get("seed") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_log", crash)
    with pytest.raises(KeyboardInterrupt):
        tune(request(tiny_model, data_dir, tmp_path / "run", seeds=(0, 1), checkpoint_every=2))
    monkeypatch.setattr(RunDir, "append_log", real)
    settings = RunDir(tmp_path / "run").read_json()["settings"]
    resumed = tune(TuneRequest.from_settings(settings, str(tmp_path / "run")), resume=True)
    for a, b in zip(whole.seed_prompts, resumed.seed_prompts):
        assert a.z.tobytes() == b.z.tobytes()
    rows = [(r["seed"], r["generation"]) for r in generations(tmp_path / "run")]
    assert sorted(rows) == sorted((s, g) for s in (0, 1) for g in range(1, 9))


def test_seeds_on_the_command_line(tiny_model, data_dir, tmp_path):
    assert "--seeds names every seed" in cli_error(tune_args(tiny_model, data_dir, tmp_path / "r", "--seeds", "0,1",
                                                             "--seed", 3))
    assert "comma-separated" in cli_error(tune_args(tiny_model, data_dir, tmp_path / "r", "--seeds", "0,x"))
    assert "twice" in cli_error(tune_args(tiny_model, data_dir, tmp_path / "r", "--seeds", "1,1"))
    r = invoke(tune_args(tiny_model, data_dir, tmp_path / "r", "--seeds", "4,5", "--budget", 20, "-q"))
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["settings"]["seeds"] == [4, 5] and run["settings"]["data"]["seed"] == 4  # the first seed's split
    assert [s["seed"] for s in run["seeds"]] == [4, 5] and run["ensemble"]["seeds"] == 2
    d = invoke(tune_args(tiny_model, data_dir, tmp_path / "d", "--seeds", "4,5", "--data-seed", 9, "--budget", 20,
                         "-q"))
    assert d.exit_code == 0 and json.loads((tmp_path / "d" / "run.json").read_text())["settings"]["data"]["seed"] == 9
