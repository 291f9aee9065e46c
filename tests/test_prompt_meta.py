"""A crafted prompt.npz whose metadata has the wrong type or range (a string max_length, placeholder ids that are
not token ids or lie outside the model's vocabulary) is one `error:` line for evaluate and deploy, never a
traceback from the encoder or onnxruntime."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from helpers import cli_error, invoke
from test_tune import tune_args


@pytest.fixture(scope="module")
def run(tiny_model, data_dir, tmp_path_factory):
    """A finished run that kept its tuned prompts (two seeds' ensemble), each with its placeholder ids."""
    out = tmp_path_factory.mktemp("meta") / "run"
    result = invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "--seeds", "0,1", "-q"))
    assert result.exit_code == 0, result.output
    return out


def crafted(run, where, key, value):
    """A copy of `run` whose prompt.npz says `key`: `value` in every prompt's metadata."""
    copy = shutil.copytree(run, where)
    with np.load(copy / "prompt.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    for member in meta.get("ensemble", [meta]) if key else []:
        member[key] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps(meta)))
    (copy / "prompt.npz").write_bytes(buf.getvalue())
    return copy


P = 8  # the tests' prompt tokens (conftest.PROMPT_TOKENS)
CASES = [  # (id, key, value, what the line says)
    ("max-length-a-string", "max_length", "12", "its max_length '12' is not a number of tokens"),
    ("max-length-negative", "max_length", -5, "its max_length -5 is not a number of tokens"),
    ("max-length-a-bool", "max_length", True, "its max_length True is not a number of tokens"),
    ("max-length-a-fraction", "max_length", 12.5, "its max_length 12.5 is not a number of tokens"),
    ("max-length-past-the-positions", "max_length", 10 ** 9, "more than the model's"),
    ("placeholders-out-of-vocabulary", "placeholder_ids", [10 ** 6] * P, "placeholder id 1000000 is outside"),
    ("placeholders-past-int64", "placeholder_ids", [10 ** 30] * P, "is outside the model's vocabulary"),
    ("placeholders-negative", "placeholder_ids", [-1] * P, f"placeholder_ids are not {P} token ids"),
    ("placeholders-strings", "placeholder_ids", ["5"] * P, f"placeholder_ids are not {P} token ids"),
    ("placeholders-fractions", "placeholder_ids", [5.5] * P, f"placeholder_ids are not {P} token ids"),
    ("placeholders-too-few", "placeholder_ids", [5] * 3, f"placeholder_ids are not {P} token ids"),
]


@pytest.mark.parametrize("command", ["evaluate", "deploy"])
@pytest.mark.parametrize("key,value,says", [pytest.param(k, v, s, id=i) for i, k, v, s in CASES])
def test_crafted_prompt_metadata_is_one_error_line(command, key, value, says, run, tiny_model, data_dir, tmp_path):
    bad = crafted(run, tmp_path / "run", key, value)
    argv = {"evaluate": ["evaluate", "--model", tiny_model, "--prompt", bad, "--data", data_dir / "test.csv"],
            "deploy": ["deploy", "--model", tiny_model, "--prompt", bad, "--out", tmp_path / "classifier", "-q"]}
    line = cli_error(argv[command])
    assert says in line, line
    assert not (tmp_path / "classifier").exists()


def test_the_uncrafted_prompt_still_evaluates(run, tiny_model, data_dir, tmp_path):
    same = crafted(run, tmp_path / "run", None, None)  # written again as it was
    result = invoke(["evaluate", "--model", tiny_model, "--prompt", same, "--data", data_dir / "test.csv"])
    assert result.exit_code == 0, result.output
