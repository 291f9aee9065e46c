"""A crafted checkpoint.npz whose values pass the format's checks but not pycma's needs (a NaN in the covariance,
a negative population size, a dimension far off the run's) is refused on `tune --resume` with one `error:` line
naming the field, before pycma sees it."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from bbt_onnx.runs import RunDir

from helpers import cli_error, invoke
from test_tune import tune_args


@pytest.fixture(scope="module")
def cut(tiny_model, data_dir, tmp_path_factory):
    """A run interrupted at its third generation, with a checkpoint after each: resuming it runs pycma again."""
    out = tmp_path_factory.mktemp("cut") / "run"
    real = RunDir.append_log

    def interrupt(self, row):
        real(self, row)
        if row["generation"] == 3:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunDir, "append_log", interrupt)
        result = invoke(tune_args(tiny_model, data_dir, out, "--budget", 100, "--checkpoint-every", 1, "-q"))
    assert result.exit_code == 130 and (out / "checkpoint.npz").is_file(), result.output
    return out


def _node(doc: dict, path: str) -> dict:
    node = doc["strategies"][0]
    for part in path.split("."):
        node = node["a"][part]
    return node


def set_array(path: str, change):
    """The strategy's array at `path` (attributes from the strategy down) changed in place by `change`."""
    def edit(doc, arrays):
        key = _node(doc, path)["k"]
        arrays[key] = value = arrays[key].copy()
        change(value)
    return edit


def set_value(path: str, value):
    """The strategy's value at `path` replaced by the JSON node `value`."""
    def edit(doc, arrays):
        *parents, last = path.split(".")
        node = doc["strategies"][0]
        for part in parents:
            node = node["a"][part]
        node["a"][last] = value
    return edit


def nan_first(a):
    a.flat[0] = np.nan


def negative_first(a):
    a.flat[0] = -1.0


FLOAT_NAN = {"t": "float", "v": "nan"}
CASES = [  # (id, edit, the field the line names)
    ("covariance-nan", set_array("sm.C", nan_first), "C holds numbers that are not finite"),
    ("evolution-path-nan", set_array("pc", nan_first), "pc holds numbers that are not finite"),
    ("eigenvalues-nan", set_array("sm.D", nan_first), "D holds numbers that are not finite"),
    ("step-path-nan", set_array("adapt_sigma.ps", nan_first), "adapt_sigma.ps holds numbers that are not finite"),
    ("eigenvalue-negative", set_array("sm.D", negative_first), "sm.D holds numbers that are not positive"),
    ("variance-negative", set_array("sm.C", lambda a: np.fill_diagonal(a, -1.0)), "sm.C has a variance"),
    ("popsize-negative", set_value("sp.popsize", -5), "sp.popsize is not the value"),
    ("dimension-1e6", set_value("N", 10 ** 6), "N is not the value"),
    ("sampler-dimension-1e6", set_value("sm.dimension", 10 ** 6), "sm.dimension is not the value"),
    ("sampler-popsize-negative", set_value("sm._lam", -3), "sm._lam is not the value"),
    ("damping-0", set_value("adapt_sigma.damps", 0), "adapt_sigma.damps is not the value"),
    ("cumulation-nan", set_value("adapt_sigma.cs", FLOAT_NAN), "adapt_sigma.cs is not the value"),
    ("scaling-nan", set_array("sigma_vec.scaling", lambda a: a.fill(np.nan)), "sigma_vec.scaling holds numbers"),
]


@pytest.mark.parametrize("edit,field", [pytest.param(e, f, id=i) for i, e, f in CASES])
def test_a_crafted_checkpoint_value_is_one_error_line_naming_it(cut, tmp_path, edit, field):
    run = shutil.copytree(cut, tmp_path / "run")
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    doc = json.loads(str(arrays.pop("checkpoint")[()]))
    edit(doc, arrays)
    buf = io.BytesIO()
    np.savez(buf, checkpoint=np.array(json.dumps(doc)), **arrays)
    (run / "checkpoint.npz").write_bytes(buf.getvalue())
    line = cli_error(["tune", "--resume", run, "-q"])
    assert "checkpoint.npz is damaged" in line and field in line, line


def test_the_uncrafted_checkpoint_resumes(cut, tmp_path):
    run = shutil.copytree(cut, tmp_path / "run")
    result = invoke(["tune", "--resume", run, "-q"])
    assert result.exit_code == 0, result.output
