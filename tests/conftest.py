"""Shared fixtures: one tiny random model per architecture, exported once for the whole run with every variant
(fp16, int8, deep, and for decoders the cached pair and a chat template), and synthetic sentiment data.

No hub anywhere: the tokenizers are trained on text written here and the weights are random.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from bbt_onnx.synthetic import sentiment_rows, write_csv

if os.environ.get("PYTEST_XDIST_WORKER"):  # a parallel run: one core per worker, so no worker's threads starve another's
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % len(_cores)]})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# the family records import torch: only once its threads are bound to this worker's core (above)
from bbt_onnx_export.families import FAMILIES  # noqa: E402

PROMPT_TOKENS = 8
# Two layers: BBTv2's deep graph takes a prompt at the embeddings and at a layer above them, and a round visits
# more than one layer; a third layer took no path the second does not take, and cost a tenth of the suite's time.
LAYERS = 2
# the architectures whose family record holds a tiny recipe, in the records' order: the shared exports' list
RECIPES = {f.architecture: f for f in FAMILIES.values() if f.tiny is not None}
MASKED = tuple(arch for arch, f in RECIPES.items() if f.kind == "masked")
DECODERS = tuple(arch for arch, f in RECIPES.items() if f.kind == "causal")
ARCHS = MASKED + DECODERS
# a chat template for the tiny decoders whose tokenizer brings none (Qwen2's brings its own ChatML one)
CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }} </s>{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant] {% endif %}")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run real-size (slow) tests")


# The test files, slowest first as measured on two cores. `make test` runs each file on one worker and hands the
# files out in collection order (--dist loadfile --no-loadscope-reorder), so longest-first lets the workers finish
# together. Only the order depends on this list: a file missing from it runs after these.
SLOWEST_FIRST = ("test_serve.py", "test_runs.py", "test_tune.py", "test_framing.py", "test_sweep.py", "test_serve_life.py",
                 "test_deploy.py", "test_causal.py", "test_bbtv2.py", "test_deploy_triton.py", "test_hardening.py",
                 "test_export.py", "test_quantize.py", "test_triton.py", "test_seeds.py", "test_never_worse.py",
                 "test_units.py", "test_report.py", "test_runtime_isolation.py", "test_check.py", "test_bench.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class Tiny:
    """A tiny model of one architecture: its save_pretrained source and its exported directory."""

    arch: str
    src: Path
    model: Path

    @property
    def masked(self) -> bool:
        return self.arch in MASKED

    def task_args(self) -> list[str]:
        """CLI flags naming a two-class sentiment task this model can take."""
        if self.masked:
            return ["--task", "sst2"]
        return ["--template", " Review: {text}\nSentiment:", "--labels", "0=bad,1=great"]


class Exports:
    """Each architecture exported once per run, on first use, and shared by every worker of a parallel run (the
    first to need a model exports it under a lock; the others wait for it)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, arch: str) -> Tiny:
        import fcntl

        family = RECIPES[arch]
        tiny = Tiny(arch, self.root / arch / f"tiny-{family.model_type}", self.root / arch / "model")  # tiny-roberta
        with open(self.root / f"{arch}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (tiny.model / "manifest.json").is_file():
                from bbt_onnx_export import ExportOptions, export_model
                from bbt_onnx_export.tiny import make_tiny

                chat = CHAT if family.chat and not family.tiny.own_chat else None
                shutil.rmtree(self.root / arch, ignore_errors=True)
                make_tiny(tiny.src, arch, layers=LAYERS, init_std=0.5, chat_template=chat)
                export_model(ExportOptions(str(tiny.src), tiny.model, prompt_tokens=PROMPT_TOKENS, fp16=True,
                                           int8=True, deep=True, kv_cache=family.kv_cache))
        return tiny


def without_graphs(model: Path, out: Path, keep) -> Path:
    """A copy of a model directory whose manifest lists only the graphs `keep(key)` accepts."""
    shutil.copytree(model, out)
    raw = json.loads((out / "manifest.json").read_text())
    raw["graphs"] = {k: v for k, v in raw["graphs"].items() if keep(k)}
    (out / "manifest.json").write_text(json.dumps(raw, indent=2))
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder for every worker
    return Exports(shared / "exports")


# in a parallel run each worker exports its share first, so that none waits for a model another is exporting: a
# split of the built-in architectures measured on two cores; an architecture it does not name joins the shares in turn
SHARES = (("GPT2LMHeadModel", "BertForMaskedLM"), ("RobertaForMaskedLM", "LlamaForCausalLM", "Qwen2ForCausalLM"))


def share(worker: int) -> list[str]:
    """The architectures worker `worker` exports before its first test."""
    i, n = worker % len(SHARES), len(SHARES)
    unnamed = [arch for arch in ARCHS if not any(arch in named for named in SHARES)]
    return [arch for arch in SHARES[i] if arch in RECIPES] + unnamed[i::n]


@pytest.fixture(scope="session", autouse=True)
def exports_shared_out(exports) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        for arch in share(int(worker.removeprefix("gw"))):
            exports.get(arch)


@pytest.fixture(scope="session")
def stop_later():
    """`stop_later(server.stop)`: a server stopped in the background, so that a module's last test does not wait
    the seconds tritonserver takes to unload its models; the run waits for every stop at its end, and a stop
    that failed fails the run there."""
    threads, failures = [], []

    def run(stop):
        try:
            stop()
        except Exception as exc:  # noqa: BLE001 - reported at the end of the run
            failures.append(f"{stop}: {exc!r}")

    def stop_later(stop) -> None:
        threads.append(threading.Thread(target=run, args=(stop,)))
        threads[-1].start()

    yield stop_later
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and not any(t.is_alive() for t in threads), failures


@pytest.fixture(scope="session")
def roberta(exports) -> Tiny:
    return exports.get("RobertaForMaskedLM")


@pytest.fixture(scope="session")
def tiny_src(roberta) -> Path:
    return roberta.src


@pytest.fixture(scope="session")
def tiny_model(roberta) -> Path:
    return roberta.model


@pytest.fixture(scope="session", params=ARCHS)
def family(request, exports) -> Tiny:
    """Every architecture in turn."""
    return exports.get(request.param)


@pytest.fixture(scope="session", params=DECODERS)
def decoder(request, exports) -> Tiny:
    """Every decoder in turn."""
    return exports.get(request.param)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_csv(d / "pool.csv", sentiment_rows(120, seed=1))
    write_csv(d / "test.csv", sentiment_rows(60, seed=2))
    return d
