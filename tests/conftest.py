"""Shared fixtures: a tiny random RoBERTa exported once per session, and synthetic sentiment data.

No hub anywhere: the tokenizer is trained on text written here and the weights are random.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bbt_onnx.synthetic import sentiment_rows, write_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PROMPT_TOKENS = 8


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run real-size (slow) tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    from bbt_onnx_export.tiny import make_tiny_roberta

    return make_tiny_roberta(tmp_path_factory.mktemp("src") / "tiny-roberta", init_std=0.5)


@pytest.fixture(scope="session")
def tiny_model(tiny_src, tmp_path_factory) -> Path:
    from bbt_onnx_export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_model(ExportOptions(str(tiny_src), out, prompt_tokens=PROMPT_TOKENS, fp16=True, int8=True))
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_csv(d / "pool.csv", sentiment_rows(120, seed=1))
    write_csv(d / "test.csv", sentiment_rows(60, seed=2))
    return d
