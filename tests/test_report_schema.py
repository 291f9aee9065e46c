"""`bbt-onnx report` on a run.json whose fields have the wrong types (a hand-edited file, or one handed over by
someone else): one `error:` line naming the file and the field, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import cli_error, invoke
from test_tune import tune_args


@pytest.fixture(scope="module")
def run(tiny_model, data_dir, tmp_path_factory):
    """One finished run with every part the report reads: baselines, two seeds, their ensemble, the choice."""
    out = tmp_path_factory.mktemp("schema") / "run"
    result = invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "--seeds", "0,1", "-q", "--fallback"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["baselines"] and len(record["seeds"]) == 2 and record["ensemble"]
    assert "low" in record["choice"]["dev_margin"] and record["provenance"]["versions"]
    return out


def put(path: tuple, value):
    """An edit that sets run.json's field at `path` (keys and list indexes) to `value`."""
    def edit(record: dict) -> None:
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


CASES = [  # (id, edit, the field the line names)
    ("baselines-a-number", put(("baselines",), 3), "baselines is not a list"),
    ("baselines-an-object", put(("baselines",), {"name": "template"}), "baselines is not a list"),
    ("baseline-a-number", put(("baselines", 0), 3), "baselines[0] is not an object"),
    ("baseline-name-a-list", put(("baselines", 0, "name"), ["template"]), "baselines[0].name is not a string"),
    ("baseline-metric-an-object", put(("baselines", 0, "test_metric"), {}), "baselines[0].test_metric is not a number"),
    ("seeds-of-numbers", put(("seeds",), [1]), "seeds[0] is not an object"),
    ("seeds-an-object", put(("seeds",), {"seed": 0}), "seeds is not a list"),
    ("seed-without-its-seed", put(("seeds", 1, "seed"), None), "seeds[1].seed is not an integer"),
    ("seed-metric-a-string", put(("seeds", 0, "test_metric"), "0.9"), "seeds[0].test_metric is not a number"),
    ("seed-metric-a-bool", put(("seeds", 0, "dev_metric"), True), "seeds[0].dev_metric is not a number"),
    ("metrics-a-list", put(("metrics",), []), "metrics is not an object"),
    ("ensemble-a-number", put(("ensemble",), 3), "ensemble is not an object"),
    ("ensemble-a-list", put(("ensemble",), [1]), "ensemble is not an object"),
    ("ensemble-metric-a-list", put(("ensemble", "dev_metric"), [1]), "ensemble.dev_metric is not a number"),
    ("choice-a-string", put(("choice",), "x"), "choice is not an object"),
    ("choice-kept-a-number", put(("choice", "kept"), 3), "choice.kept is not a string"),
    ("choice-best-baseline-a-list", put(("choice", "best_baseline"), []), "choice.best_baseline is not a string"),
    ("choice-metric-a-string", put(("choice", "test_metric"), "x"), "choice.test_metric is not a number"),
    ("dev-margin-a-number", put(("choice", "dev_margin"), 3), "choice.dev_margin is not an object"),
    ("dev-margin-value-a-string", put(("choice", "dev_margin", "value"), "x"),
     "choice.dev_margin.value is not a number"),
    ("settings-task-a-number", put(("settings", "task"), 5), "settings.task is not an object"),
    ("settings-task-name-an-object", put(("settings", "task", "name"), {}), "settings.task.name is not a string"),
    ("settings-tune-a-list", put(("settings", "tune"), []), "settings.tune is not an object"),
    ("settings-tune-budget-a-list", put(("settings", "tune", "budget"), [20]), "settings.tune.budget is not a plain"),
    ("settings-data-a-number", put(("settings", "data"), 5), "settings.data is not an object"),
    ("settings-data-seed-a-string", put(("settings", "data", "seed"), "1"), "settings.data.seed is not an integer"),
    ("settings-data-no_dev-a-string", put(("settings", "data", "no_dev"), "yes"),
     "settings.data.no_dev is not true or false"),
    ("settings-data-k_shot-a-list", put(("settings", "data", "k_shot"), [8]), "settings.data.k_shot is not a plain value"),
    ("settings-sweep-a-list", put(("settings", "sweep"), []), "settings.sweep is not an object"),
    ("settings-sweep-point-a-list", put(("settings", "sweep"), {"point": [1]}),
     "settings.sweep.point is not an object"),
    ("settings-sweep-task-a-number", put(("settings", "sweep"), {"task": 3}), "settings.sweep.task is not a string"),
    ("provenance-a-list", put(("provenance",), []), "provenance is not an object"),
    ("provenance-null", put(("provenance",), None), "provenance is not an object"),
    ("versions-a-list", put(("provenance", "versions"), []), "provenance.versions is not an object"),
    ("version-a-list", put(("provenance", "versions", "numpy"), [1]), "provenance.versions.numpy is not a string"),
]


@pytest.mark.parametrize("edit,field", [pytest.param(e, f, id=i) for i, e, f in CASES])
def test_a_wrong_type_in_run_json_is_one_error_line_naming_the_field(run, tmp_path, edit, field):
    bad = shutil.copytree(run, tmp_path / "run")
    record = json.loads((bad / "run.json").read_text())
    edit(record)
    (bad / "run.json").write_text(json.dumps(record))
    line = cli_error(["report", bad])
    assert f"{bad / 'run.json'}: {field}" in line, line
    assert "Traceback" not in line


@pytest.mark.parametrize("edit", [put(("choice", "dev_margin", "low"), None), put(("choice", "dev_margin"), None),
                                  put(("ensemble",), None), put(("choice",), None)],
                         ids=["margin-unmeasured", "no-margin", "no-ensemble", "no-choice"])
def test_fields_tune_may_write_as_null_are_reported(run, tmp_path, edit):
    """NaN is written as null (strict JSON); a null the report can do without is no error."""
    ok = shutil.copytree(run, tmp_path / "run")
    record = json.loads((ok / "run.json").read_text())
    edit(record)
    (ok / "run.json").write_text(json.dumps(record))
    result = invoke(["report", ok])
    assert result.exit_code == 0, result.output
