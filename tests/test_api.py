"""The public Python API (`bbt_onnx.tune`, `Run`, `Classifier`): every code block of the README's Python section
runs here as written (only the budgets shrink, each shrink checked to be in the README's text), on the tiny model,
and what it makes is compared with what the CLI makes from the same inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import bbt_onnx
from bbt_onnx import Classifier, DataError, Example, Model, PRESETS, SettingsError, TunedPrompt, read_examples
from bbt_onnx.api import as_data
from bbt_onnx.data import DataSpec
from bbt_onnx.jobs.sweep import working_dir as cwd
from bbt_onnx.synthetic import sentiment_rows, write_csv

from helpers import invoke

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {"prompt_tokens": 4, "intrinsic_dim": 20, "popsize": 6, "eval_every": 12}  # the tests' budgets
TINY_FLAGS = ["--prompt-tokens", 4, "--intrinsic-dim", 20, "--popsize", 6, "--eval-every", 12, "--budget", 48]
# Each README block's one change for the tests: the budget, to the tiny one. Each must be in the README as written.
SHRINK = {
    0: ("TuneConfig(budget=8000, calibrate=True)", "TuneConfig(budget=48, calibrate=True, **TINY)"),
    2: ("TuneConfig(budget=8000)", "TuneConfig(budget=48, **TINY)"),
}
# The CLI's tune with the flags the README's bbt_onnx.tune call names, and the tiny budgets.
CLI_TUNE = ["tune", "--model", "models/roberta-large", "--task", "sst2", "--data", "reviews.csv", "--test", "test.csv",
            "--calibrate", "--seeds", "0,1", "--choose", "interval", *TINY_FLAGS, "-q"]
TEXTS = ["a gripping film", "a dull film", "  the best and the worst  ", "great", "bad bad bad, truly awful"]
PAIRS = [("A man plays a guitar.", "A man makes music."), ("The cat sleeps.", "A dog barks loudly.")]


def python_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Python API\n")
    return text[start:text.index("\n## ", start + 1)]


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", python_section(), flags=re.S)




@pytest.fixture(scope="module")
def work(tiny_model, data_dir, tmp_path_factory) -> Path:
    """A folder with what the README's examples name: the model, data files, a pair task's run (the rte template)."""
    root = tmp_path_factory.mktemp("api")
    (root / "models").mkdir()
    (root / "models" / "roberta-large").symlink_to(tiny_model, target_is_directory=True)
    (root / "reviews.csv").write_bytes((data_dir / "pool.csv").read_bytes())
    (root / "test.csv").write_bytes((data_dir / "test.csv").read_bytes())
    write_csv(root / "train.csv", sentiment_rows(16, seed=11))
    write_csv(root / "dev.csv", sentiment_rows(16, seed=12))
    (root / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (root / "runs" / "rte").mkdir(parents=True)
    TunedPrompt.template(Model.load(tiny_model).manifest, PRESETS["rte"]).save(root / "runs" / "rte")
    return root


@pytest.fixture(scope="module")
def readme(work) -> dict:
    """Every README Python block run in order in one namespace, in `work` (the one tune of the API tests)."""
    blocks = readme_blocks()
    namespace: dict = {"TINY": TINY}
    with cwd(work):
        for i, block in enumerate(blocks):
            if i in SHRINK:
                old, new = SHRINK[i]
                assert block.count(old) == 1, f"README block {i} no longer holds {old!r}"
                block = block.replace(old, new)
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def cli_run(work, readme) -> Path:
    """The same run made by `bbt-onnx tune` (after the README's, so both start from the same state of `work`)."""
    with cwd(work):
        r = invoke([*CLI_TUNE, "--out", "runs/sst2-cli"])
    assert r.exit_code == 0, r.output
    return work / "runs" / "sst2-cli"


def cli_predict(work: Path, run, rows) -> tuple[list[str], np.ndarray]:
    """`bbt-onnx predict` on `rows` (texts or pairs): its labels and probabilities, in its label order."""
    path = work / "input.jsonl"
    path.write_text("".join(json.dumps({"text": r} if isinstance(r, str) else {"text": r[0], "text_b": r[1]}) + "\n"
                            for r in rows))
    r = invoke(["predict", "--model", work / "models" / "roberta-large", "--prompt", run, "--input", path, "-q"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    keys = list(lines[0]["probabilities"])
    return [line["label"] for line in lines], np.array([[line["probabilities"][k] for k in keys] for line in lines])


def cli_evaluate(work: Path, run, data) -> dict:
    r = invoke(["evaluate", "--model", work / "models" / "roberta-large", "--prompt", run, "--data", data, "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# -- the README ---------------------------------------------------------------------------------------------------
def test_the_readme_python_section_is_what_runs_here(readme, work):
    blocks = readme_blocks()
    assert len(blocks) == 3 and "bbt_onnx.tune(" in blocks[0] and "Classifier.load(" in blocks[1]
    for i, (old, _) in SHRINK.items():
        assert old in blocks[i]
    assert "bbt_onnx.workflow" not in python_section() and "bbt_onnx.lockstep" not in python_section()
    # what the README's comments promise, checked on what its code made
    run, clf = readme["run"], readme["clf"]
    assert isinstance(run, bbt_onnx.Run) and run.run_dir == (work / "runs" / "sst2").resolve()
    assert run.kept == run.result.origin and run.kept in ("ensemble", "template")
    assert len(readme["labels"]) == 2 and set(readme["labels"]) <= {"0", "1"} and clf.labels == ("0", "1")
    assert readme["probs"].shape == (2, 2) and readme["probs"].dtype == np.float64
    assert isinstance(readme["scores"], bbt_onnx.Evaluation) and readme["scores"].rows == 2
    assert readme["nli"].labels == PRESETS["rte"].label_keys
    assert isinstance(readme["prompt"], TunedPrompt) and len(readme["preds"]) == 2
    assert isinstance(readme["clf"], Classifier) and readme["clf"].result.z.tobytes() == readme["prompt"].z.tobytes()


def test_every_name_the_readme_imports_is_public():
    imported = set()
    for block in readme_blocks():
        for names in re.findall(r"^from bbt_onnx import (.+)$", block, flags=re.M):
            imported |= {n.strip() for n in names.split(",")}
    assert imported and imported <= set(bbt_onnx.__all__)
    assert {"tune", "Run", "Classifier", "ChoicePolicy"} <= set(bbt_onnx.__all__)


# -- tune ---------------------------------------------------------------------------------------------------------
TIMES = ("wall_seconds", "engine_seconds", "optimizer_seconds", "host_seconds", "calls_per_second",
         "optimizer_ms_per_generation", "optimizer_share")


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMES}


def test_tune_writes_the_run_the_cli_writes(readme, work, cli_run):
    api = work / "runs" / "sst2"
    assert sorted(p.name for p in api.iterdir()) == sorted(p.name for p in cli_run.iterdir())
    for name in ("prompt.npz", "tuned.npz"):
        if (cli_run / name).exists():
            with np.load(api / name) as a, np.load(cli_run / name) as b:
                assert a.files == b.files and all(a[k].tobytes() == b[k].tobytes() for k in a.files), name
    a, b = (json.loads((d / "run.json").read_text()) for d in (api, cli_run))
    assert a["settings"] == b["settings"]
    assert untimed(a["metrics"]) == untimed(b["metrics"])
    assert [untimed(s) for s in a["seeds"]] == [untimed(s) for s in b["seeds"]]
    for key in ("baselines", "ensemble", "choice", "warnings"):
        assert a[key] == b[key], key
    run = readme["run"]
    assert run.metrics == a["metrics"] and run.outcome.record["choice"] == a["choice"]
    assert run.kept == a["metrics"]["kept"] and run.test_metric == a["metrics"]["test_metric"]
    assert run.summary() == run.outcome.summary() and run.summary().startswith("done: ")


def test_tune_takes_a_task_and_data_spec_and_refuses_mistakes_before_writing(work, tmp_path):
    with cwd(work):
        with pytest.raises(SettingsError, match="unknown task"):
            bbt_onnx.tune("models/roberta-large", "sst-2", "reviews.csv", tmp_path / "a")
        with pytest.raises(SettingsError, match="inside the DataSpec"):
            bbt_onnx.tune("models/roberta-large", "sst2", bbt_onnx.DataSpec("reviews.csv"), tmp_path / "b",
                          k_shot=4)
        with pytest.raises(DataError):
            bbt_onnx.tune("models/roberta-large", PRESETS["sst2"], "missing.csv", tmp_path / "c")
        with pytest.raises(SettingsError, match="no_dev go inside the DataSpec"):
            bbt_onnx.tune("models/roberta-large", "sst2", bbt_onnx.DataSpec("reviews.csv"), tmp_path / "d",
                          no_dev=True)
    assert not any(tmp_path.iterdir())  # nothing written
    assert as_data("reviews.csv", None, None, 3, no_dev=True) == DataSpec("reviews.csv", no_dev=True, seed=3)


# -- the classifier -------------------------------------------------------------------------------------------------
def results(work: Path, readme) -> dict[str, Path]:
    """Every kind of result a run hands back, as a file `bbt-onnx predict --prompt` reads: what the run kept, what
    tuning found (the seeds' calibrated ensemble), one seed's prompt, the pair task's template."""
    run = readme["run"]
    out = {"kept": work / "runs" / "sst2", "rte template": work / "runs" / "rte"}
    out["tuned"] = work / "runs" / "sst2" / ("tuned.npz" if (work / "runs" / "sst2" / "tuned.npz").exists()
                                             else "prompt.npz")
    seed = work / "seed0.npz"
    if not seed.exists():
        run.outcome.seed_prompts[0].save(seed)
    out["one seed"] = seed
    return out


@pytest.mark.parametrize("kind", ["kept", "tuned", "one seed", "rte template"])
def test_classifier_predicts_what_the_cli_predicts(readme, work, kind):
    source = results(work, readme)[kind]
    rows = PAIRS if kind == "rte template" else TEXTS
    clf = Classifier.load(work / "models" / "roberta-large", source)
    labels, probs = cli_predict(work, source, rows)
    assert clf.predict(rows) == labels
    mine = clf.predict_proba(rows)
    assert mine.shape == (len(rows), len(clf.labels)) and mine.tobytes() == probs.tobytes()  # to the bit
    assert np.allclose(mine.sum(axis=1), 1.0)
    assert [clf.labels[i] for i in mine.argmax(axis=1)] == labels
    if kind == "tuned":
        assert clf.result.origin == "ensemble" and clf.result.calibration is not None  # seeds=(0, 1), calibrate


def test_classifier_evaluates_what_the_cli_evaluates(readme, work):
    clf = readme["run"].classifier()
    cli = cli_evaluate(work, work / "runs" / "sst2", work / "test.csv")
    by_path = clf.evaluate(work / "test.csv").to_json()
    assert by_path == {k: cli[k] for k in by_path}
    assert clf.evaluate(read_examples(work / "test.csv")).to_json() == by_path


def test_the_kept_result_scores_what_the_run_reported(readme, work):
    """The README's promise: evaluate of a run's result gives the test metric the run printed, to the bit (here a
    calibrated result: the run calibrates)."""
    run = readme["run"]
    assert run.classifier().evaluate(work / "test.csv").metric == run.test_metric


def test_one_text_alone_and_example_rows(readme):
    clf = readme["run"].classifier()
    one = clf.predict("a gripping film")
    assert len(one) == 1 and one == clf.predict(["a gripping film"]) == clf.predict([Example("a gripping film")])
    assert clf.predict(["  a gripping film "]) == clf.predict(["a gripping film"])  # stripped, as read from a file


def test_classifier_refuses_bad_input(readme, work):
    clf, nli = readme["run"].classifier(), readme["nli"]
    for bad in ([], [""], [3], [("a", "b", "c")], 7):
        with pytest.raises(DataError):
            clf.predict(bad)
    with pytest.raises(DataError, match="text_b"):
        nli.predict(["a premise with no hypothesis"])
    with pytest.raises(DataError, match="no label"):
        clf.evaluate(["a gripping film"])
    with pytest.raises(DataError, match="'positive'"):  # the label it does not know
        clf.evaluate([Example("a gripping film", label="positive")])
    with pytest.raises(bbt_onnx.PromptError):
        Classifier.load(work / "models" / "roberta-large", work / "nowhere")
