"""Tuning: mechanics, determinism, resume, the CLI end to end, evaluate/predict, and bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from bbt_onnx import BlackBoxTuner, Model, TuneConfig, TunedPrompt, checkpoint
from bbt_onnx.data import read_examples
from bbt_onnx.errors import BBTError, PromptError, RunError
from bbt_onnx.runs import RunDir
from bbt_onnx.synthetic import sentiment_rows, write_csv
from bbt_onnx.tasks import PRESETS

from conftest import PROMPT_TOKENS
from helpers import cli_error, generations, invoke

SMALL = dict(prompt_tokens=PROMPT_TOKENS, intrinsic_dim=40, popsize=10, eval_every=40)


@pytest.fixture(scope="module")
def model(tiny_model):
    return Model.load(tiny_model)


@pytest.fixture(scope="module")
def splits(data_dir):
    pool = read_examples(data_dir / "pool.csv")
    return pool[:32], pool[32:64]


def train_accuracy(model, prompt, rows):
    return prompt.evaluate(model, rows).accuracy


def test_tuning_lowers_train_loss_and_raises_train_accuracy(model, splits):
    """Without dev, the best-train prompt is kept: random weights can fit 32 rows but not generalise."""
    train, _ = splits
    tuner = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=300, **SMALL))
    prompt = tuner.fit(train)
    r = tuner.report
    assert r.api_calls == 300 and r.generations == 30 and r.dev_calls == 0 and r.best_dev_metric is None
    assert r.train_loss_final == pytest.approx(r.best_train_loss, rel=1e-5)
    assert r.train_loss_final < 0.8 * r.train_loss_initial
    zero = TunedPrompt.zero(prompt.projection, prompt.task)
    assert train_accuracy(model, prompt, train) > train_accuracy(model, zero, train) + 0.1
    assert prompt.embeds.shape == (PROMPT_TOKENS, model.manifest.hidden_size)
    assert r.engine_seconds > 0 and r.optimizer_seconds > 0 and r.calls_per_second > 0


def test_same_seed_same_z_bit_for_bit_and_global_rng_untouched(model, splits):
    train, dev = splits
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    cfg = TuneConfig(budget=100, **SMALL)
    a = BlackBoxTuner(model, PRESETS["sst2"], cfg).fit(train, dev)
    b = BlackBoxTuner(model, PRESETS["sst2"], cfg).fit(train, dev)
    c = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=100, **{**SMALL, "seed": 7})).fit(train, dev)
    assert a.z.tobytes() == b.z.tobytes() and a.embeds.tobytes() == b.embeds.tobytes()
    assert not np.array_equal(a.z, c.z)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


class Stop(Exception):
    pass


def test_resume_from_a_checkpoint_ends_with_the_same_prompt(model, splits):
    train, dev = splits
    cfg = TuneConfig(budget=120, checkpoint_every=3, **SMALL)
    whole = BlackBoxTuner(model, PRESETS["sst2"], cfg).fit(train, dev)

    saved = []

    def interrupt(event):
        if event.generation == 8:
            raise Stop

    with pytest.raises(Stop):
        BlackBoxTuner(model, PRESETS["sst2"], cfg).fit(
            train, dev, on_event=interrupt, on_checkpoint=lambda s: saved.append(checkpoint.dumps(s)))
    tuner = BlackBoxTuner(model, PRESETS["sst2"], cfg)
    state = tuner.load_state(saved[-1])  # checkpoint.npz's bytes: no pickle
    assert state.generation == 6
    resumed = tuner.fit(train, dev, state=state)
    assert resumed.z.tobytes() == whole.z.tobytes()


@pytest.mark.parametrize("loss", ["hinge", "perf"])
def test_other_losses_run(model, splits, loss):
    train, dev = splits
    tuner = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=60, loss=loss, diagonal=True, bound=2.0, **SMALL))
    prompt = tuner.fit(train, dev)
    assert np.abs(prompt.z).max() <= 2.0 and tuner.report.api_calls == 60 and tuner.report.generations == 6


def test_the_last_best_z_is_scored_on_dev_before_the_choice(model, splits):
    """With no dev evaluation during the run (eval_every > budget), the final one decides: the kept prompt
    is the best training z, scored once on dev, not the untouched z = 0."""
    train, dev = splits
    tuner = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=60, **{**SMALL, "eval_every": 1000}))
    prompt = tuner.fit(train, dev)
    assert tuner.report.dev_calls == 1
    assert tuner.report.best_dev_metric == prompt.evaluate(model, dev).metric  # the kept prompt's own dev score
    np.testing.assert_array_equal(prompt.z, tuner.state.best_z)
    assert np.abs(prompt.z).max() > 0


def test_the_best_dev_prompt_is_kept_when_another_z_trains_better(model, splits):
    """BBT keeps the prompt with the best dev metric, as the reference does, not the lowest training loss."""
    from dataclasses import replace

    train, dev = splits
    tuner = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=300, **{**SMALL, "eval_every": 20}))
    prompt = tuner.fit(train, dev)
    state = tuner.state
    assert not np.array_equal(state.best_dev_z, state.best_z)  # on this seed the two winners differ
    np.testing.assert_array_equal(prompt.z, state.best_dev_z)
    best_train = replace(prompt, z=state.best_z, embeds=tuner.method.embeds(state.best_z).astype(np.float32))
    assert best_train.evaluate(model, train).ce_loss < prompt.evaluate(model, train).ce_loss
    assert prompt.evaluate(model, dev).metric == tuner.report.best_dev_metric > \
        best_train.evaluate(model, dev).metric


def test_a_checkpoint_continues_only_the_settings_it_was_written_with(model, splits):
    train, dev = splits
    cfg = TuneConfig(budget=40, checkpoint_every=1, **SMALL)
    saved = []
    tuner = BlackBoxTuner(model, PRESETS["sst2"], cfg)
    tuner.fit(train, dev, on_checkpoint=lambda s: saved.append(copy.deepcopy(s)))
    other = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=80, checkpoint_every=1, **SMALL))
    with pytest.raises(RunError, match="other settings"):
        other.fit(train, dev, state=saved[0])
    with pytest.raises(RunError, match="other settings"):
        other.load_state(checkpoint.dumps(saved[0]))


def test_an_engine_is_any_object_with_label_logits(model, splits):
    """A remote service can stand in for ORT: the tuner only calls label_logits."""
    train, _ = splits
    calls = []

    class Counting:
        provider = "test"

        def label_logits(self, prompts, batch):
            calls.append(prompts.shape[0])
            return model.engine.label_logits(prompts, batch)

    other = Model(model.manifest, model.tokenizer, Counting())
    BlackBoxTuner(other, PRESETS["sst2"], TuneConfig(budget=40, **SMALL)).fit(train)
    assert calls.count(10) == 4  # one engine call per generation, C = popsize


# -- CLI -----------------------------------------------------------------------------------------
def tune_args(tiny_model, data_dir, out, *extra):
    return ["tune", "--model", tiny_model, "--task", "sst2", "--data", data_dir / "pool.csv", "--test",
            data_dir / "test.csv", "--out", out, "--prompt-tokens", PROMPT_TOKENS, "--intrinsic-dim", 40,
            "--popsize", 10, "--budget", 200, "--eval-every", 40, "--checkpoint-every", 4, "--no-fallback", *extra]


def test_cli_tune_writes_the_run_and_prints_metrics(tiny_model, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pycma must not litter the working directory
    out = tmp_path / "run"
    result = invoke(tune_args(tiny_model, data_dir, out))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in ("train_loss_initial", "train_loss_final", "best_dev_metric", "test_metric", "metric_name",
                "api_calls", "wall_seconds", "calls_per_second", "provider"):
        assert key in metrics
    assert metrics["api_calls"] == 200 and metrics["provider"] == "CPUExecutionProvider"
    assert metrics["test_rows"] == 60 and metrics["test_metric"] == metrics["test_accuracy"]  # sst2: accuracy
    assert "done:" in result.stderr and "test" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "log.jsonl", "loss.png", "prompt.npz", "run.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["settings"]["tune"]["budget"] == 200
    assert set(run["settings"]["data_fingerprints"]) == {"data", "test"}
    assert len(run["settings"]["model"]["fingerprint"]) == 64
    log = generations(out)
    assert [r["calls"] for r in log] == list(range(10, 201, 10))
    assert sum(r["dev_metric"] is not None for r in log) >= 1 and {"best_loss", "mean_loss", "sigma"} <= set(log[0])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    prompt = TunedPrompt.load(out)
    assert prompt.projection.seed == 42 and prompt.task.name == "sst2"

    # evaluate: the tuned prompt, and the z = 0 baseline
    ev = invoke(["evaluate", "--model", tiny_model, "--prompt", out, "--data", data_dir / "test.csv"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["metric"] == pytest.approx(metrics["test_metric"])
    base = invoke(["evaluate", "--model", tiny_model, "--no-prompt", "--task", "sst2", "--data",
                   data_dir / "test.csv", "--prompt-tokens", PROMPT_TOKENS])
    assert base.exit_code == 0, base.output
    assert json.loads(base.stdout)["rows"] == 60

    # predict: JSONL with a label and probabilities per row, from a file and from stdin
    pr = invoke(["predict", "--model", tiny_model, "--prompt", out, "--input", data_dir / "test.csv"])
    assert pr.exit_code == 0, pr.output
    rows = [json.loads(line) for line in pr.stdout.splitlines()]
    assert len(rows) == 60 and rows[0]["label"] in ("0", "1")
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)
    stdin = invoke(["predict", "--model", tiny_model, "--prompt", out, "--input", "-"],
                   input="a fun film\n{}\n".format("dull and slow"))
    assert stdin.exit_code == 0, stdin.output
    assert [json.loads(x)["text"] for x in stdin.stdout.splitlines()] == ["a fun film", "dull and slow"]


def test_off_a_terminal_tune_and_evaluate_print_status_lines(tiny_model, data_dir, tmp_path, monkeypatch):
    """A progress bar prints nothing until it ends when stderr is a file: status lines come instead."""
    monkeypatch.setattr("bbt_onnx.progress.STATUS_EVERY", 0.0)
    tuned = invoke(tune_args(tiny_model, data_dir, tmp_path / "run"))
    assert tuned.exit_code == 0, tuned.output
    lines = [line for line in tuned.stderr.splitlines() if line.startswith("tuning: ")]
    assert len(lines) >= 20 and lines[-1].startswith("tuning: 200/200, loss ") and " dev " in lines[-1]
    scored = invoke(["evaluate", "--model", tiny_model, "--prompt", tmp_path / "run", "--data", data_dir / "test.csv"])
    assert scored.exit_code == 0 and "scoring: 60/60" in scored.stderr


def test_cli_resume_after_interrupt_matches_an_uninterrupted_run(tiny_model, data_dir, tmp_path, monkeypatch):
    whole = invoke(tune_args(tiny_model, data_dir, tmp_path / "a", "--budget", 120, "-q"))
    assert whole.exit_code == 0, whole.output

    real = RunDir.append_log

    def interrupt(self, row):
        real(self, row)
        if row["generation"] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_log", interrupt)
    cut = invoke(tune_args(tiny_model, data_dir, tmp_path / "b", "--budget", 120, "-q"))
    assert cut.exit_code == 130 and "--resume" in cut.stderr
    monkeypatch.setattr(RunDir, "append_log", real)
    assert "continue it with --resume" in cli_error(tune_args(tiny_model, data_dir, tmp_path / "b", "--budget", 120))
    resumed = invoke(["tune", "--resume", tmp_path / "b", "-q"])
    assert resumed.exit_code == 0, resumed.output
    a, b = TunedPrompt.load(tmp_path / "a"), TunedPrompt.load(tmp_path / "b")
    assert a.z.tobytes() == b.z.tobytes()
    log = [row["generation"] for row in generations(tmp_path / "b")]
    assert log == list(range(1, 13))  # cut at 10, resumed from the checkpoint at 8
    assert json.loads(resumed.stdout)["test_metric"] == json.loads(whole.stdout)["test_metric"]


def test_explicit_splits_and_custom_task(tiny_model, tmp_path):
    rows = [(t, "pos" if y else "neg") for t, y in sentiment_rows(40, seed=5)]
    write_csv(tmp_path / "train.csv", rows[:20])
    write_csv(tmp_path / "dev.csv", rows[20:])
    result = invoke(["tune", "--model", tiny_model, "--template", " {text} It was {mask} .", "--labels",
                     "neg=bad,pos=great", "--train", tmp_path / "train.csv", "--dev", tmp_path / "dev.csv",
                     "--out", tmp_path / "r", "--prompt-tokens", 4, "--intrinsic-dim", 20, "--popsize", 10,
                     "--budget", 40, "-q"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["train_rows"] == 20 and m["dev_rows"] == 20 and m["test_metric"] is None


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def earlier_run(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "-q")).exit_code == 0
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("change,match", [
    (["--data", "EMPTY"], "is empty"),
    (["--data", "BADCOLS"], "no text column"),
    (["--data", "BADLABELS"], "whose label the task does not know"),
    (["--template", " {text} It was ."], "no {mask}"),
    (["--template", " {mask} ."], "no {text}"),
    (["--k-shot", 40], "class '0' has only 60 examples"),
    (["--budget", 5], "smaller than --popsize"),
    (["--task", "imdb"], "unknown task"),
    (["--model", "NOMANIFEST"], "no manifest.json"),
    (["--model", "TAMPERED"], "does not match the sha256"),
    (["--device", "cuda"], "CUDAExecutionProvider"),
    (["--precision", "fp16", "--model", "FP32ONLY"], "no fp16 graph"),
])
def test_bad_tune_input_is_one_line_and_keeps_the_earlier_run(tiny_model, data_dir, tmp_path, earlier_run, change,
                                                               match):
    out, files = earlier_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.csv").write_text("")
    (bad / "cols.csv").write_text("words,label\nx,0\n")
    write_csv(bad / "labels.csv", [("good", "positive")] * 40 + [("bad", "0")] * 40)
    (bad / "nomanifest").mkdir()
    tampered = bad / "tampered"
    import shutil

    shutil.copytree(tiny_model, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    fp32only = bad / "fp32only"
    shutil.copytree(tiny_model, fp32only)
    manifest = json.loads((fp32only / "manifest.json").read_text())
    manifest["graphs"] = {"fp32": manifest["graphs"]["fp32"]}
    (fp32only / "manifest.json").write_text(json.dumps(manifest))
    subst = {"EMPTY": bad / "empty.csv", "BADCOLS": bad / "cols.csv", "BADLABELS": bad / "labels.csv",
             "NOMANIFEST": bad / "nomanifest", "TAMPERED": tampered, "FP32ONLY": fp32only}
    args = tune_args(tiny_model, data_dir, out, "--force", *[subst.get(c, c) for c in change])
    line = cli_error(args)
    assert match in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_existing_run_needs_force_or_resume(tiny_model, data_dir, earlier_run):
    out, _ = earlier_run
    line = cli_error(tune_args(tiny_model, data_dir, out))
    assert "--force" in line and "--resume" not in line  # a finished run has nothing to resume


def test_resume_rejects_new_settings_and_missing_checkpoints(tiny_model, data_dir, earlier_run, tmp_path):
    out, _ = earlier_run
    assert "drop --budget" in cli_error(["tune", "--resume", out, "--budget", 10])
    (tmp_path / "plain").mkdir()
    assert "no run.json" in cli_error(["tune", "--resume", tmp_path / "plain"])


def test_evaluate_and_predict_mistakes(tiny_model, data_dir, earlier_run, tmp_path):
    out, _ = earlier_run
    assert "--no-prompt" in cli_error(["evaluate", "--model", tiny_model, "--data", data_dir / "test.csv"])
    assert "does not exist" in cli_error(["evaluate", "--model", tiny_model, "--prompt", tmp_path / "none",
                                          "--data", data_dir / "test.csv"])
    assert "come from the run" in cli_error(["evaluate", "--model", tiny_model, "--prompt", out, "--task", "sst2",
                                             "--data", data_dir / "test.csv"])
    assert "no text" in cli_error(["predict", "--model", tiny_model, "--prompt", out, "--input", "-"])


def test_budget_smaller_than_popsize_in_the_api():
    with pytest.raises(BBTError, match="smaller than popsize"):
        TuneConfig(budget=10, popsize=20)


def other_model(tiny_model, where):
    """The same graphs under a manifest that says another thing about the model: to the fingerprint, another
    model (where it was exported from is not one of those things)."""
    import shutil

    shutil.copytree(tiny_model, where)
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["embedding_mean"] = 0.123
    (where / "manifest.json").write_text(json.dumps(manifest))
    return where


def test_a_prompt_is_refused_by_another_model(tiny_model, data_dir, earlier_run, tmp_path):
    out, _ = earlier_run
    other = other_model(tiny_model, tmp_path / "other")
    for args in (["evaluate", "--data", data_dir / "test.csv"], ["predict", "--input", data_dir / "test.csv"]):
        assert "tuned on another model" in cli_error([args[0], "--model", other, "--prompt", out, *args[1:]])
    prompt = TunedPrompt.load(out)
    rows = read_examples(data_dir / "test.csv")
    with pytest.raises(PromptError, match="another model"):
        prompt.evaluate(Model.load(other), rows)
    with pytest.raises(PromptError, match="another model"):
        prompt.predict(Model.load(other), rows)
    assert prompt.evaluate(Model.load(tiny_model), rows).rows == 60  # its own model takes it


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke(tune_args(tiny_model, data_dir, out, "--budget", 40, "-q")).exit_code == 0
    run = json.loads((out / "run.json").read_text())
    run["status"] = "running"
    run["settings"]["tune"]["budget"] = 80  # run.json edited after the checkpoint was written
    (out / "run.json").write_text(json.dumps(run))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "other settings" in cli_error(["tune", "--resume", out])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_max_length_reaches_the_encoder_and_travels_with_the_prompt(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    tuned = invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "--max-length", 20, "-q"))
    assert tuned.exit_code == 0, tuned.output
    assert json.loads((out / "run.json").read_text())["settings"]["tune"]["max_length"] == 20
    prompt = TunedPrompt.load(out)
    assert prompt.max_length == 20
    rows = read_examples(data_dir / "test.csv")
    model = Model.load(tiny_model)
    enc = prompt.encoder(model).encode(rows)
    assert enc.input_ids.shape[1] == 20 and enc.truncated > 0
    ev = json.loads(invoke(["evaluate", "--model", tiny_model, "--prompt", out, "--data", data_dir / "test.csv",
                            "-q"]).stdout)
    assert ev["truncated_rows"] == enc.truncated
    assert json.loads(tuned.stdout)["test_metric"] == pytest.approx(ev["metric"])


def test_prompts_and_checkpoints_from_before_bbtv2_still_load(model, splits, tmp_path):
    """A prompt.npz without method, layer scales or max length is a BBT prompt; a checkpoint holding one
    CMA-ES (not a list) resumes."""
    import io

    from bbt_onnx.methods import new_es
    from bbt_onnx.seeding import seeds
    from bbt_onnx.tuning.tuner import TunerState

    train, dev = splits
    cfg = TuneConfig(budget=40, **SMALL)
    prompt = BlackBoxTuner(model, PRESETS["sst2"], cfg).fit(train, dev)
    path = prompt.save(tmp_path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    for key in ("method", "layer_std", "max_length"):
        meta.pop(key)
    buf = io.BytesIO()
    np.savez(buf, **{**arrays, "meta": np.array(json.dumps(meta))})
    path.write_bytes(buf.getvalue())
    old = TunedPrompt.load(tmp_path)
    assert old.method == "bbt" and not old.deep and old.max_length is None
    assert old.evaluate(model, dev).metric == pytest.approx(prompt.evaluate(model, dev).metric)

    state = TunerState(cfg, new_es(cfg, seeds(cfg.seed)["cma"]))  # as checkpoints held it
    resumed = BlackBoxTuner(model, PRESETS["sst2"], cfg).fit(train, dev, state=state)
    assert resumed.z.tobytes() == prompt.z.tobytes()


# -- the Python API: what anyone passes first -----------------------------------------------------------------
def test_plain_strings_are_rows_and_results_are_typed(model, splits, data_dir):
    """predict and logits take plain strings (one, or a list); evaluate returns an Evaluation, as fit returns a
    TunedPrompt and predict Predictions; the few-shot sampler is public."""
    from bbt_onnx import Evaluation, Example, generator, k_shot_split

    train, dev = splits
    prompt = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=20, **SMALL)).fit(train, dev)
    texts = ["a fine film", "a dull film"]
    by_text = prompt.predict(model, texts)
    assert [p.label for p in by_text] == [p.label for p in prompt.predict(model, [Example(t) for t in texts])]
    assert prompt.predict(model, "a fine film") == prompt.predict(model, [Example("a fine film")])
    assert prompt.logits(model, texts).shape == (2, 2)
    result = prompt.evaluate(model, dev)
    assert isinstance(result, Evaluation) and result.rows == len(dev) and 0 <= result.accuracy <= 1
    assert result.to_json()["metric_name"] == "accuracy"

    pool = read_examples(data_dir / "pool.csv")
    a, a_dev = k_shot_split(pool, ["0", "1"], 4, generator(7, "sampling"))
    b, _ = k_shot_split(pool, ["0", "1"], 4, generator(7, "sampling"))
    assert a == b and len(a) == len(a_dev) == 8


def test_the_tuner_takes_its_steps_in_order_and_any_rows(model, splits):
    """start, step and result take Example rows as fit does (the automatic start chosen on dev, as fit chooses
    it); a step before start is a RunError."""
    train, dev = splits
    tuner = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=20, **SMALL))
    with pytest.raises(RunError, match="start"):
        tuner.step(train, dev)
    tuner.start(train, dev=dev)
    while not tuner.finished():
        tuner.step(train, dev)
    stepped = tuner.result(train, dev)
    fitter = BlackBoxTuner(model, PRESETS["sst2"], TuneConfig(budget=20, **SMALL))
    assert stepped.z.tobytes() == fitter.fit(train, dev).z.tobytes()
    assert tuner.start_scores == fitter.start_scores and len(tuner.start_scores) > 1


def test_no_dev_tunes_on_every_drawn_row_and_says_nothing_checks_it(tiny_model, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["tune", "--model", tiny_model, "--task", "sst2", "--data", data_dir / "pool.csv", "--k-shot", 8, "--test",
            data_dir / "test.csv", "--prompt-tokens", PROMPT_TOKENS, "--intrinsic-dim", 20, "--popsize", 6,
            "--budget", 24, "--no-dev"]
    result = invoke([*args, "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    assert "no dev set" in result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["settings"]["data"]["no_dev"] is True
    assert record["metrics"]["train_rows"] == 32 and record["metrics"]["dev_rows"] == 0
    assert record["choice"]["reason"] == "no dev set to compare with the template"
    report = invoke(["report", tmp_path / "run"])
    assert report.exit_code == 0 and "no dev" in report.stdout  # apart from runs of the same settings with a dev set
    assert "k_shot 8" in report.stdout  # and from runs drawn at another k
    assert "--no-dev has none" in cli_error([*args, "--eval-every", 12, "--out", tmp_path / "other"])
    assert "a train file is used whole" in cli_error(["tune", "--model", tiny_model, "--task", "sst2", "--train",
                                                     data_dir / "pool.csv", "--no-dev", "--out", tmp_path / "x"])
