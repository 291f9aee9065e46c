"""Hardening matrix: every mistake a user can make ends in exactly one `error:` line and exit code 2.

The README promises it for every command; this file holds it to that promise, one table row per
mistake. Each row runs the CLI against a shared workspace (copies of the tiny model, a finished good
run, data files, and deliberately damaged variants of each) and checks:

- exit code 2, and no exception escaped (no traceback anywhere);
- stderr is exactly one non-empty line, starting with `error: ` (no progress note before it);
- stdout is empty;
- nothing is lost: every file of the workspace has the sha256 it had, every folder is still there, and no new
  one appeared. In particular a bad setting given with `--force --out GOOD_RUN` never wipes the run, a `--force`
  over what the command did not write deletes nothing, and a crafted checkpoint runs nothing (its payload would
  create a file in the workspace).

After each row the workspace is put back as it was, so one row's damage cannot leak into the next.
A few Python-API cases at the end expect `BBTError` where the CLI rows expect the `error:` line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bbt_onnx import PRESETS, BlackBoxTuner, Model, Task, TuneConfig, TunedPrompt, k_shot_split
from bbt_onnx.cli import cli
from bbt_onnx.data import DataSpec, read_examples
from bbt_onnx.errors import BBTError, DataError, ModelError, PromptError, RunError, SettingsError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.runs import RunDir
from bbt_onnx.synthetic import sentiment_rows, write_csv
from bbt_onnx.tuning.checkpoint import read_states

from conftest import PROMPT_TOKENS, without_graphs

HUGE_ROW_CHARS = 2_000_000
HUGE_ROW_TIMEOUT_S = 60  # the row must be refused (or scored) well within this; a hang fails the case


# -- the workspace ---------------------------------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


class Payload:
    """What a crafted pickle carries: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _edit_manifest(model: Path, **fields) -> None:
    _edit_json(model / "manifest.json", lambda m: {**m, **fields})


def _edit_checkpoint(run: Path, edit) -> None:
    """Rewrite checkpoint.npz with its JSON document changed by `edit` (its arrays as they were)."""
    path = run / "checkpoint.npz"
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    doc = edit(json.loads(str(arrays.pop("checkpoint")[()])))
    buf = io.BytesIO()
    np.savez(buf, checkpoint=np.array(json.dumps(doc)), **arrays)
    path.write_bytes(buf.getvalue())


def _graph_dims(model: Path, hidden: int) -> None:
    """The manifest says hidden size `hidden` everywhere, in its dims and its graph entries alike."""
    def edit(m):
        for g in m["graphs"].values():
            for t in g["inputs"]:
                if t["name"] in ("prompt_embeds", "deep_prompts"):
                    t["shape"][-1] = hidden
        return {**m, "hidden_size": hidden}
    _edit_json(model / "manifest.json", edit)


@pytest.fixture(scope="module")
def ws(tiny_model, tiny_src, data_dir, exports, tmp_path_factory) -> dict[str, Path]:
    """Named paths in one folder: good inputs, a finished good run, and damaged copies of each."""
    root = tmp_path_factory.mktemp("hardening")
    p: dict[str, Path] = {"root": root}

    # models: the good one, a different model of the same shape, and broken model directories
    p["src"] = shutil.copytree(tiny_src, root / "src")
    p["model"] = shutil.copytree(tiny_model, root / "model")
    p["other"] = without_graphs(exports.get("BertForMaskedLM").model, root / "other",  # same hidden size, fp32 only
                                lambda key: key == "fp32")
    p["model_nomanifest"] = shutil.copytree(tiny_model, root / "model_nomanifest",
                                            ignore=shutil.ignore_patterns("manifest.json"))
    p["model_list"] = shutil.copytree(tiny_model, root / "model_list")
    (p["model_list"] / "manifest.json").write_text("[]")
    p["model_versions"] = shutil.copytree(tiny_model, root / "model_versions")
    _edit_json(p["model_versions"] / "manifest.json", lambda m: {**m, "versions": []})
    p["model_tampered"] = shutil.copytree(tiny_model, root / "model_tampered")
    with open(p["model_tampered"] / "model.onnx", "ab") as f:
        f.write(b"\0")
    p["model_plain"] = without_graphs(tiny_model, root / "model_plain", lambda key: not key.startswith("deep"))
    p["model_notok"] = shutil.copytree(tiny_model, root / "model_notok",
                                       ignore=shutil.ignore_patterns("tokenizer.json"))
    # manifests that disagree with their graphs, ids outside the vocabulary, graph files outside the directory
    raw = json.loads((tiny_model / "manifest.json").read_text())
    hidden, vocab = raw["hidden_size"], raw["vocab_size"]

    def model_copy(name: str, **fields) -> Path:
        d = shutil.copytree(tiny_model, root / name, ignore=shutil.ignore_patterns("*.int8.onnx", "*.fp16.onnx"))
        _edit_json(d / "manifest.json", lambda m: {**m, **fields, "graphs": {
            k: v for k, v in m["graphs"].items() if k in ("fp32", "deep-fp32")}})
        return d

    p["model_hidden"] = model_copy("model_hidden", hidden_size=2 * hidden)  # its graph entries still say `hidden`
    p["model_hidden_all"] = model_copy("model_hidden_all")  # entries too: only the graph itself knows
    _graph_dims(p["model_hidden_all"], 2 * hidden)
    p["model_mask_range"] = model_copy("model_mask_range", mask_id=vocab + 5)
    p["model_mask_notoken"] = model_copy("model_mask_notoken", vocab_size=100 * vocab, mask_id=50 * vocab)
    p["model_vocab10"] = model_copy("model_vocab10", vocab_size=10)
    p["model_pad_negative"] = model_copy("model_pad_negative", pad_id=-5)
    p["model_layers"] = model_copy("model_layers", num_layers=raw["num_layers"] + 1,
                                   layer_std=raw["layer_std"] + [1.0])  # the deep graph takes num_layers prompts
    p["model_escape"] = model_copy("model_escape")
    _edit_json(p["model_escape"] / "manifest.json", lambda m: {**m, "graphs": {
        **m["graphs"], "fp32": {**m["graphs"]["fp32"], "file": "../model/model.onnx"}}})
    (p["model_escape"] / "model.onnx").unlink()
    p["model_escape_abs"] = model_copy("model_escape_abs")
    _edit_json(p["model_escape_abs"] / "manifest.json", lambda m: {**m, "graphs": {
        **m["graphs"], "fp32": {**m["graphs"]["fp32"], "file": str(root / "model" / "model.onnx")}}})

    # data files
    p["pool"] = Path(shutil.copy(data_dir / "pool.csv", root / "pool.csv"))
    p["test"] = Path(shutil.copy(data_dir / "test.csv", root / "test.csv"))
    files = {
        "empty": ("empty.csv", b""),
        "notutf8": ("notutf8.csv", b"text,label\n\xff\xfe broken bytes,0\n"),
        "notutf8_txt": ("notutf8.txt", b"\xff\xfe broken bytes\n"),
        "cols": ("cols.csv", b"words,label\nfine film,0\n"),
        "nolabel": ("nolabel.csv", b"text\nfine film\n"),
        "array": ("array.jsonl", b'{"text": "a fine film", "label": "1"}\n[1, 2]\n'),
        "wide": ("wide.csv", b"text,label\na fine film,1\na dull film,0,extra\n"),
        "task_list": ("task_list.json", b"[]"),
        "afile": ("afile.txt", b"a regular file, not a folder\n"),
    }
    for key, (name, content) in files.items():
        p[key] = root / name
        p[key].write_bytes(content)
    p["labels"] = write_csv(root / "labels.csv", [("good", "positive")] * 40 + [("bad", "0")] * 40)
    huge = ("a fun film with great acting " * (HUGE_ROW_CHARS // 29 + 1))[:HUGE_ROW_CHARS]
    p["huge"] = write_csv(root / "huge.csv", [(huge, 1)] + sentiment_rows(4, seed=3))
    p["huge_jsonl"] = root / "huge.jsonl"
    p["huge_jsonl"].write_text("".join(json.dumps({"text": t, "label": str(y)}) + "\n"
                                       for t, y in [(huge, 1)] + sentiment_rows(4, seed=3)))
    p["emptydir"] = root / "emptydir"
    p["emptydir"].mkdir()
    p["notes"] = root / "notes"  # someone's folder: no command wrote it
    p["notes"].mkdir()
    (p["notes"] / "notes.txt").write_text("my notes\n")
    p["labels_txt"] = root / "texts.txt"
    p["labels_txt"].write_text("a fine film\na dull film\n")
    p["test_link"] = root / "test_link.csv"  # another name for test.csv
    p["test_link"].symlink_to(p["test"])

    # the good run, finished, with a checkpoint per generation
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        result = CliRunner().invoke(cli, resolve_all(
            [*TUNE, *DATA, "--out", "@run", "--checkpoint-every", 1, "-q"], {**p, "run": root / "run"}))
    assert result.exit_code == 0, result.output
    p["run"] = root / "run"
    assert (p["run"] / "checkpoint.npz").is_file() and (p["run"] / "prompt.npz").is_file()
    assert not (p["run"] / "checkpoint.pkl").exists()

    # damaged copies of the run; those for --resume look interrupted (status "running")
    def run_copy(name: str, interrupted: bool = True) -> Path:
        d = shutil.copytree(p["run"], root / name)
        if interrupted:
            _edit_json(d / "run.json", lambda r: {"status": "running", "settings": r["settings"]})
        return d

    p["run_list"] = run_copy("run_list")
    (p["run_list"] / "run.json").write_text("[]")
    p["run_badjson"] = run_copy("run_badjson")
    (p["run_badjson"] / "run.json").write_text('{"status": "running", "settings": ')
    p["run_nosettings"] = run_copy("run_nosettings")
    (p["run_nosettings"] / "run.json").write_text('{"status": "running"}')
    p["run_ckpt_dict"] = run_copy("run_ckpt_dict")  # an npz, but not a checkpoint
    buf = io.BytesIO()
    np.savez(buf, generation=np.array(1), calls=np.array(10))
    (p["run_ckpt_dict"] / "checkpoint.npz").write_bytes(buf.getvalue())
    p["run_ckpt_junk"] = run_copy("run_ckpt_junk")
    (p["run_ckpt_junk"] / "checkpoint.npz").write_bytes(np.random.default_rng(0).bytes(512))
    p["run_ckpt_counts"] = run_copy("run_ckpt_counts")  # a well-formed document with impossible values
    _edit_checkpoint(p["run_ckpt_counts"], lambda d: {**d, "state": {**d["state"], "generation": -3}})
    p["run_ckpt_shape"] = run_copy("run_ckpt_shape")  # the mean of another dimension
    _edit_checkpoint(p["run_ckpt_shape"], lambda d: {**d, "strategies": [  # the covariance matrix as the mean
        {**d["strategies"][0], "a": {**d["strategies"][0]["a"], "mean": {
            "t": "array", "k": d["strategies"][0]["a"]["sm"]["a"]["C"]["k"], "id": 10 ** 6}}}]})
    # crafted checkpoints: each would run a shell command creating MARKER if anything in it were executed
    p["marker"] = root / "PWNED"
    p["run_pickle"] = run_copy("run_pickle")  # an old-style pickle checkpoint
    (p["run_pickle"] / "checkpoint.npz").unlink()
    (p["run_pickle"] / "checkpoint.pkl").write_bytes(pickle.dumps(Payload(p["marker"])))
    p["run_npz_object"] = run_copy("run_npz_object")  # an npz whose arrays are pickled objects
    buf = io.BytesIO()
    np.savez(buf, checkpoint=np.array([Payload(p["marker"])], dtype=object),
             a0=np.array([Payload(p["marker"])], dtype=object))
    (p["run_npz_object"] / "checkpoint.npz").write_bytes(buf.getvalue())
    p["run_npz_class"] = run_copy("run_npz_class")  # a document naming a function as a class to build
    _edit_checkpoint(p["run_npz_class"], lambda d: {**d, "strategies": [
        {**d["strategies"][0], "a": {**d["strategies"][0]["a"], "sigma": {
            "t": "object", "c": "posix.system", "id": 10 ** 6, "a": {}}}}]})
    p["run_npz_ckpt_pkl"] = run_copy("run_npz_ckpt_pkl")  # checkpoint.npz holding pickle bytes as its name says npz
    (p["run_npz_ckpt_pkl"] / "checkpoint.npz").write_bytes(pickle.dumps(Payload(p["marker"])))
    p["stub"] = run_copy("stub")  # stopped before its first checkpoint: run.json and log.jsonl only
    for name in ("checkpoint.npz", "prompt.npz", "loss.png"):
        (p["stub"] / name).unlink(missing_ok=True)
    p["run_badlog"] = run_copy("run_badlog")  # a line before the checkpoint is garbage (not a torn last line)
    log = (p["run_badlog"] / "log.jsonl").read_text().splitlines(keepends=True)
    (p["run_badlog"] / "log.jsonl").write_text("".join(["{not json\n", *log[1:]]))
    p["prompt_half"] = run_copy("prompt_half", interrupted=False)
    npz = (p["prompt_half"] / "prompt.npz").read_bytes()
    (p["prompt_half"] / "prompt.npz").write_bytes(npz[:len(npz) // 2])
    return p


@pytest.fixture(scope="module")
def tree(ws) -> Tree:
    """The workspace as it was made, read once."""
    return Tree(ws["root"])


# -- running a row ---------------------------------------------------------------------------------
def resolve(arg, paths: dict[str, Path]) -> str:
    """`@key` -> the workspace path `key`; `@key/rest` -> a path under it; anything else as a string."""
    if isinstance(arg, str) and arg.startswith("@"):
        key, _, rest = arg[1:].partition("/")
        return str(paths[key] / rest if rest else paths[key])
    return str(arg)


def resolve_all(argv, paths) -> list[str]:
    return [resolve(a, paths) for a in argv]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


def changes(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    """What was added, removed or rewritten between two snapshots (bytes compared directly: no hashing)."""
    return sorted(rel for rel in set(before) | set(after) if before.get(rel, 0) != after.get(rel, 0))


def stats(root: Path) -> dict[str, tuple | None]:
    """Every file's (size, mtime, ctime, inode) and every folder (None) under root: a look that reads no bytes."""
    out: dict[str, tuple | None] = {}
    for p in root.rglob("*"):
        st = p.stat()
        out[p.relative_to(root).as_posix()] = None if p.is_dir() else (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                                         st.st_ino)
    return out


REREAD = ("reread",)  # a file put back: its bytes are compared next time, whatever its stat says


class Tree:
    """A folder as it was, read once: later looks stat every file and read only those whose stat moved, so a
    table of a few hundred cases over a 20 MB workspace costs a stat walk per case, not three full reads."""

    def __init__(self, root: Path):
        self.root = root
        self.content = snapshot(root)
        self.stats = stats(root)

    def changes(self) -> list[str]:
        """What was added, removed or rewritten since the folder was read (bytes compared where stats differ)."""
        now = stats(self.root)
        return sorted(rel for rel in set(now) | set(self.stats)
                      if now.get(rel, 0) != self.stats.get(rel, 0) and self._differs(rel, now.get(rel, 0)))

    def _differs(self, rel: str, now) -> bool:
        was = self.content.get(rel, 0)
        if now is None or now == 0 or was is None or was == 0:  # a folder, or there on one side only
            return now != was
        return (self.root / rel).read_bytes() != was

    def put_back(self) -> list[str]:
        """Drop what is new and rewrite what changed or went missing; returns what had changed."""
        changed = self.changes()
        for rel in reversed(changed):  # children before their folders
            path = self.root / rel
            if rel not in self.content:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for rel in changed:
            content, path = self.content.get(rel, 0), self.root / rel
            if content is None:
                if path.is_file() or path.is_symlink():
                    path.unlink()
                path.mkdir(parents=True, exist_ok=True)
            elif content != 0:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                self.stats[rel] = REREAD
        return changed


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    crash: str | None  # an exception that escaped the CLI: "Type: message"


def run_cli(argv: list[str], stdin, timeout: float | None) -> Outcome:
    """In process with click's runner, or (with a timeout) as `python -m bbt_onnx.cli`, killed when late."""
    if timeout is None:
        r = CliRunner().invoke(cli, argv, input=stdin)
        crash = None
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            crash = f"{type(r.exception).__name__}: {''.join(str(r.exception).splitlines()[:1])[:160]}"
        return Outcome(r.exit_code, r.stdout, r.stderr, crash)
    try:
        proc = subprocess.run([sys.executable, "-m", "bbt_onnx.cli", *argv], capture_output=True, timeout=timeout,
                              input=stdin.encode() if isinstance(stdin, str) else stdin)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within {timeout} s (killed)")
    err = proc.stderr.decode(errors="replace")
    crash = err.strip().splitlines()[-1] if "Traceback" in err else None
    return Outcome(proc.returncode, proc.stdout.decode(errors="replace"), err, crash)


# -- the table -------------------------------------------------------------------------------------
SMALL = ["--prompt-tokens", PROMPT_TOKENS, "--intrinsic-dim", 40, "--popsize", 10, "--budget", 20, "--eval-every", 40]
TUNE_NOTASK = ["tune", "--model", "@model", *SMALL]
TUNE = [*TUNE_NOTASK, "--task", "sst2"]
DATA = ["--data", "@pool", "--test", "@test"]
OVER = ["--force", "--out", "@run"]  # every tune row with a bad setting aims it at the good run


def over_run(*bad):
    """tune with good settings, then `bad` (click keeps an option's last value), over the good run."""
    return [*TUNE, *DATA, *OVER, *bad]


EVAL = ["evaluate", "--model", "@model", "--prompt", "@run", "--data", "@test"]
EVAL0 = ["evaluate", "--model", "@model", "--no-prompt", "--task", "sst2", "--data", "@test"]
PREDICT = ["predict", "--model", "@model", "--prompt", "@run", "--input", "@test"]
STDIN = ["predict", "--model", "@model", "--prompt", "@run", "--input", "-"]
BENCH = ["bench", "--model", "@model", "--baseline", "none", "--e2e-budget", 0, "--repeat", 1]
EXPORT = ["export", "--model", "@src", "--out", "@root/new-export"]
BENCH_SERVER = ["bench", "--model", "@model", "--server", "http://127.0.0.1:9"]  # refused before any connection
REPO = ["triton-repo", "--model", "@model", "--kind", "cpu"]
CLIENT = ["client-dir", "--model", "@model"]
CHECK = ["check", "--model", "@model", "--task", "sst2", "--engines", "cpu:fp32"]


def case(id_, argv, match=None, stdin=None, timeout=None):
    return pytest.param(argv, match, stdin, timeout, id=id_)


CASES = [
    # 1. numbers: tune (each over the good run with --force), evaluate, bench
    case("tune-prompt-tokens-0", over_run("--prompt-tokens", 0), "--prompt-tokens"),
    case("tune-prompt-tokens-negative", over_run("--prompt-tokens", -1), "--prompt-tokens"),
    case("tune-prompt-tokens-above-exported", over_run("--prompt-tokens", PROMPT_TOKENS + 1), "--prompt-tokens"),
    case("tune-intrinsic-dim-0", over_run("--intrinsic-dim", 0), "--intrinsic-dim"),
    case("tune-popsize-0", over_run("--popsize", 0), "--popsize"),
    case("tune-popsize-1", over_run("--popsize", 1), "--popsize"),
    case("tune-popsize-2-where-pycma-needs-3", over_run("--popsize", 2, "--intrinsic-dim", 300), "--popsize"),
    case("tune-budget-0", over_run("--budget", 0), "--budget"),
    case("tune-budget-negative", over_run("--budget", -5), "--budget"),
    case("tune-sigma-nan", over_run("--sigma", "nan"), "--sigma"),
    case("tune-sigma-inf", over_run("--sigma", "inf"), "--sigma"),
    case("tune-sigma-0", over_run("--sigma", 0), "--sigma"),
    case("tune-sigma-negative", over_run("--sigma", -1), "--sigma"),
    case("tune-alpha-nan", over_run("--alpha", "nan"), "--alpha"),
    case("tune-alpha-inf", over_run("--alpha", "inf"), "--alpha"),
    case("tune-alpha-0", over_run("--alpha", 0), "--alpha"),
    case("tune-bound-nan", over_run("--bound", "nan"), "--bound"),
    case("tune-bound-negative", over_run("--bound", -1), "--bound"),
    case("tune-eval-every-0", over_run("--eval-every", 0), "--eval-every"),
    case("tune-seed-negative", over_run("--seed", -1), "--seed"),
    case("tune-k-shot-0", over_run("--k-shot", 0), "--k-shot"),
    case("tune-k-shot-abc", over_run("--k-shot", "abc"), "--k-shot"),
    case("tune-threads-0", over_run("--threads", 0), "--threads"),
    case("tune-checkpoint-every-negative", over_run("--checkpoint-every", -1), "--checkpoint-every"),
    case("tune-max-length-0", over_run("--max-length", 0), "--max-length"),
    case("tune-max-length-no-room-for-text", over_run("--max-length", 9), "--max-length"),
    case("evaluate-no-prompt-prompt-tokens-negative", [*EVAL0, "--prompt-tokens", -1], "--prompt-tokens"),
    case("evaluate-no-prompt-prompt-tokens-above-exported", [*EVAL0, "--prompt-tokens", PROMPT_TOKENS + 1],
         "--prompt-tokens"),
    case("evaluate-threads-0", [*EVAL, "--threads", 0], "--threads"),
    case("predict-threads-0", [*PREDICT, "--threads", 0], "--threads"),
    case("bench-batch-0", [*BENCH, "--batch", 0], "--batch"),
    case("bench-batch-negative", [*BENCH, "--batch", -1], "--batch"),
    case("bench-batch-not-a-multiple", [*BENCH, "--batch", 40], "--batch"),
    case("bench-repeat-0", [*BENCH, "--repeat", 0], "--repeat"),
    case("bench-seq-0", [*BENCH, "--seq", 0], "--seq"),
    case("bench-seq-above-positions", [*BENCH, "--seq", 100000], "--seq"),
    case("bench-e2e-dim-0", [*BENCH, "--e2e-dim", 0], "--e2e-dim"),
    case("bench-e2e-budget-negative", [*BENCH, "--e2e-budget", -1], "--e2e-budget"),
    case("bench-threads-0", [*BENCH, "--threads", 0], "--threads"),
    case("export-prompt-tokens-0", [*EXPORT, "--prompt-tokens", 0], "--prompt-tokens"),
    case("export-prompt-tokens-above-positions", [*EXPORT, "--prompt-tokens", 100000], "--prompt-tokens"),
    case("export-opset-0", [*EXPORT, "--opset", 0], "--opset"),

    # 2. click's own usage errors
    case("unknown-command", ["frobnicate"], "frobnicate"),
    case("tune-unknown-option", over_run("--frobnicate"), "--frobnicate"),
    case("tune-missing-value", over_run("--budget"), "--budget"),
    case("tune-device-tpu", over_run("--device", "tpu"), "--device"),
    case("tune-loss-foo", over_run("--loss", "foo"), "--loss"),
    case("tune-random-proj-foo", over_run("--random-proj", "foo"), "--random-proj"),
    case("tune-precision-fp64", over_run("--precision", "fp64"), "--precision"),
    case("tune-popsize-not-an-integer", over_run("--popsize", 2.5), "--popsize"),
    case("evaluate-device-tpu", [*EVAL, "--device", "tpu"], "--device"),
    case("evaluate-missing-data-option", ["evaluate", "--model", "@model", "--prompt", "@run"], "--data"),
    case("predict-unknown-option", [*PREDICT, "--frobnicate"], "--frobnicate"),
    case("bench-batch-not-an-integer", [*BENCH, "--batch", "abc"], "--batch"),
    case("export-missing-model-option", ["export", "--out", "@root/new-export"], "--model"),

    # 3a. tasks
    case("tune-task-unknown", over_run("--task", "imdb"), "imdb"),
    case("tune-no-task", [*TUNE_NOTASK, *DATA, *OVER], "--task"),
    case("tune-labels-only-one", over_run("--labels", "0=bad"), "label"),
    case("tune-labels-empty-word", over_run("--labels", "0= ,1=great"), "label"),
    case("tune-labels-without-equals", over_run("--labels", "bad,great"), "--labels"),
    case("tune-labels-same-word", over_run("--labels", "0=bad,1=bad"), "label"),
    case("tune-labels-name-repeats", over_run("--labels", "0=bad,0=great"), "label"),
    case("tune-template-no-mask", over_run("--template", " {text} ."), "{mask}"),
    case("tune-template-malformed", over_run("--template", " {text} {mask} {"), "template"),
    case("tune-template-unknown-field", over_run("--template", " {text} {mask} {foo}"), "{foo}"),
    case("tune-task-file-missing", [*TUNE_NOTASK, *DATA, *OVER, "--task-file", "@root/none.json"], "none.json"),
    case("tune-task-file-is-a-list", [*TUNE_NOTASK, *DATA, *OVER, "--task-file", "@task_list"], "task_list.json"),
    case("tune-f1-with-three-labels", over_run("--task", "snli", "--metric", "f1"), "f1"),
    case("tune-prompt-init-wrong-length", over_run("--prompt-init", "great"), "--prompt-init"),
    case("tune-bbtv2-without-deep-graph", [*over_run("--method", "bbtv2"), "--model", "@model_plain"], "--deep"),
    case("tune-method-unknown", over_run("--method", "bbtv3"), "--method"),

    # 3b. data files
    case("tune-data-missing", over_run("--data", "@root/none.csv"), "none.csv"),
    case("tune-data-empty", over_run("--data", "@empty"), "empty.csv"),
    case("tune-data-not-utf8", over_run("--data", "@notutf8"), "notutf8.csv"),
    case("tune-data-no-text-column", over_run("--data", "@cols"), "text"),
    case("tune-data-unknown-labels", over_run("--data", "@labels"), "labels"),
    case("tune-data-jsonl-line-is-an-array", over_run("--data", "@array"), "array.jsonl"),
    case("tune-data-csv-row-too-wide", over_run("--data", "@wide"), "wide.csv"),
    case("tune-test-missing", over_run("--test", "@root/none.csv"), "none.csv"),
    case("tune-dev-unknown-labels", over_run("--dev", "@labels"), "labels"),
    case("tune-no-data", [*TUNE, *OVER], "--data"),
    case("evaluate-data-missing", [*EVAL, "--data", "@root/none.csv"], "none.csv"),
    case("evaluate-data-empty", [*EVAL, "--data", "@empty"], "empty.csv"),
    case("evaluate-data-not-utf8", [*EVAL, "--data", "@notutf8"], "notutf8.csv"),
    case("evaluate-data-no-text-column", [*EVAL, "--data", "@cols"], "text"),
    case("evaluate-data-no-label-column", [*EVAL, "--data", "@nolabel"], "label"),
    case("evaluate-data-unknown-labels", [*EVAL, "--data", "@labels"], "labels"),
    case("evaluate-data-jsonl-line-is-an-array", [*EVAL, "--data", "@array"], "array.jsonl"),
    case("evaluate-data-csv-row-too-wide", [*EVAL, "--data", "@wide"], "wide.csv"),
    case("predict-input-missing", [*PREDICT, "--input", "@root/none.csv"], "none.csv"),
    case("predict-input-txt-missing", [*PREDICT, "--input", "@root/none.txt"], "none.txt"),
    case("predict-input-txt-not-utf8", [*PREDICT, "--input", "@notutf8_txt"], "notutf8.txt"),

    # 3c. model directories
    case("tune-model-missing", over_run("--model", "@root/none"), "none"),
    case("tune-model-without-manifest", over_run("--model", "@model_nomanifest"), "manifest.json"),
    case("tune-model-manifest-is-a-list", over_run("--model", "@model_list"), "manifest.json"),
    case("tune-model-manifest-versions-list", over_run("--model", "@model_versions"), "manifest.json"),
    case("tune-model-graph-tampered", over_run("--model", "@model_tampered"), "sha256"),
    case("tune-model-without-tokenizer", over_run("--model", "@model_notok"), "tokenizer.json"),
    case("evaluate-model-missing", [*EVAL, "--model", "@root/none"], "none"),
    case("evaluate-model-manifest-versions-list", [*EVAL, "--model", "@model_versions"], "manifest.json"),
    case("evaluate-model-without-tokenizer", [*EVAL, "--model", "@model_notok"], "tokenizer.json"),
    case("evaluate-precision-not-exported", [*EVAL0, "--model", "@other", "--precision", "int8"], "int8"),
    case("predict-model-graph-tampered", [*PREDICT, "--model", "@model_tampered"], "sha256"),
    case("bench-model-missing", [*BENCH, "--model", "@root/none"], "none"),
    case("bench-model-manifest-versions-list", [*BENCH, "--model", "@model_versions"], "manifest.json"),
    case("bench-precision-not-exported", [*BENCH, "--model", "@other", "--precision", "int8"], "int8"),
    case("export-model-missing", ["export", "--model", "@root/none", "--out", "@root/new-export"], "none"),
    case("export-model-is-not-a-checkpoint", [*EXPORT, "--model", "@model"], "config.json"),
    case("export-gguf-file-missing", [*EXPORT, "--gguf-file", "none.gguf"], "none.gguf"),

    # 3d. run directories and prompts
    case("tune-out-exists-without-force", [*TUNE, *DATA, "--out", "@run"], "--force"),
    case("tune-out-missing", [*TUNE, *DATA], "--out"),
    case("tune-resume-finished-run", ["tune", "--resume", "@run"], "finished run"),
    case("tune-resume-with-new-budget", ["tune", "--resume", "@run", "--budget", 10], "--budget"),
    case("tune-resume-with-out", ["tune", "--resume", "@run", "--out", "@root/elsewhere"], "--out"),
    case("tune-resume-empty-dir", ["tune", "--resume", "@emptydir"], "run.json"),
    case("tune-resume-run-json-is-a-list", ["tune", "--resume", "@run_list"], "run.json"),
    case("tune-resume-run-json-broken", ["tune", "--resume", "@run_badjson"], "run.json"),
    case("tune-resume-run-json-without-settings", ["tune", "--resume", "@run_nosettings"], "run.json"),
    case("tune-resume-checkpoint-is-a-dict", ["tune", "--resume", "@run_ckpt_dict"], "checkpoint.npz"),
    case("tune-resume-checkpoint-random-bytes", ["tune", "--resume", "@run_ckpt_junk"], "checkpoint.npz"),
    case("tune-resume-log-broken", ["tune", "--resume", "@run_badlog"], "log.jsonl"),
    case("evaluate-prompt-truncated", [*EVAL, "--prompt", "@prompt_half"], "prompt.npz"),
    case("evaluate-prompt-empty-dir", [*EVAL, "--prompt", "@emptydir"], "emptydir"),
    case("evaluate-prompt-is-a-text-file", [*EVAL, "--prompt", "@afile"], "afile.txt"),
    case("evaluate-neither-prompt-nor-no-prompt", ["evaluate", "--model", "@model", "--data", "@test"], "--prompt"),
    case("evaluate-prompt-with-task", [*EVAL, "--task", "sst2"], "--task"),
    case("predict-prompt-truncated", [*PREDICT, "--prompt", "@prompt_half"], "prompt.npz"),
    case("predict-prompt-empty-dir", [*PREDICT, "--prompt", "@emptydir"], "emptydir"),

    # 4. writes that cannot happen
    case("predict-output-parent-missing", [*PREDICT, "--output", "@root/nodir/out.jsonl"], "nodir"),
    case("predict-output-parent-is-a-file", [*PREDICT, "--output", "@afile/out.jsonl"], "afile.txt"),
    case("predict-output-is-a-dir", [*PREDICT, "--output", "@emptydir"], "--output"),
    case("tune-out-is-a-file", [*TUNE, *DATA, "--out", "@afile"], "afile.txt"),
    case("tune-out-parent-is-a-file", [*TUNE, *DATA, "--out", "@afile/run"], "afile.txt"),
    case("export-out-exists-without-force", [*EXPORT, "--out", "@model"], "--force"),
    case("export-out-is-a-file", [*EXPORT, "--out", "@afile"], "afile.txt"),
    case("export-out-parent-is-a-file", [*EXPORT, "--out", "@afile/model"], "afile.txt"),

    # 5. predict from stdin
    case("predict-stdin-json-array-line", STDIN, "line 2", stdin='{"text": "a fine film"}\n[1, 2]\n'),
    case("predict-stdin-json-string-line", STDIN, "line 2", stdin='{"text": "a fine film"}\n"text"\n'),
    case("predict-stdin-json-broken-line", STDIN, "json", stdin='{"text": "a fine film"}\n{broken\n'),
    case("predict-stdin-json-without-text", STDIN, "text", stdin='{"words": "a fine film"}\n'),
    case("predict-stdin-not-utf8", STDIN, "stdin", stdin=b"\xff\xfe bad"),
    case("predict-stdin-empty", STDIN, "stdin", stdin=""),

    # 6. a prompt used on a model it was not tuned for (same shapes, other weights)
    case("evaluate-prompt-on-another-model", [*EVAL, "--model", "@other"], "model"),
    case("predict-prompt-on-another-model", [*PREDICT, "--model", "@other"], "model"),

    # 7. flags that would do nothing, or conflict
    case("evaluate-prompt-tokens-with-prompt", [*EVAL, "--prompt-tokens", 4], "--prompt-tokens"),
    case("tune-k-shot-with-train", [*TUNE, *OVER, "--train", "@test", "--k-shot", 4], "--k-shot"),
    case("tune-data-and-train", over_run("--train", "@test"), "--train"),
    case("bench-torch-model-without-baseline", [*BENCH, "--torch-model", "@src"], "--torch-model"),
    case("bench-e2e-dim-without-e2e", [*BENCH, "--e2e-dim", 50], "--e2e-dim"),
    case("tune-eval-every-without-dev", [*TUNE, *OVER, "--train", "@test", "--eval-every", 20], "--eval-every"),
    case("tune-suffix-prompt-on-a-masked-lm", over_run("--prompt-position", "suffix"), "for decoders"),
    case("tune-chat-on-a-masked-lm", over_run("--chat"), "for decoders"),
    case("tune-bos-never-on-a-masked-lm", over_run("--bos", "never"), "for decoders"),
    case("tune-prompt-position-unknown", over_run("--prompt-position", "middle"), "--prompt-position"),
    case("evaluate-framing-with-prompt", [*EVAL, "--prompt-position", "suffix"], "--prompt-position"),
    case("export-kv-cache-on-a-masked-lm", [*EXPORT, "--kv-cache"], "--kv-cache"),
    case("export-int8-levels-without-int8", [*EXPORT, "--int8-levels", "two"], "needs --int8"),
    case("export-int8-levels-on-a-masked-lm", [*EXPORT, "--int8", "--int8-levels", "two"], "decoders"),
    case("bench-suffix-data-without-cached-pair", [*BENCH, "--suffix-data", "@test"], "--kv-cache"),

    # 8. one row of 2,000,000 characters: a clear error naming the row, in seconds, never a hang
    case("evaluate-huge-row-csv", [*EVAL0, "--data", "@huge", "-q"], "row", timeout=HUGE_ROW_TIMEOUT_S),
    case("evaluate-huge-row-jsonl", [*EVAL0, "--data", "@huge_jsonl", "-q"], "row", timeout=HUGE_ROW_TIMEOUT_S),

    # 9. an --out that is, holds or lies inside what the command reads (the model, the source checkpoint, a run's
    # files), even with --force or --force-any
    case("triton-repo-out-is-the-model", [*REPO, "--out", "@model", "--force"], "is the model directory"),
    case("triton-repo-out-is-the-model-force-any", [*REPO, "--out", "@model", "--force-any"], "is the model directory"),
    case("triton-repo-out-holds-the-model", [*REPO, "--out", "@root", "--force-any"], "holds the model directory"),
    case("triton-repo-out-inside-the-model", [*REPO, "--out", "@model/repo"], "inside the model directory"),
    case("client-dir-out-is-the-model", [*CLIENT, "--out", "@model", "--force"], "is the model directory"),
    case("client-dir-out-holds-the-model", [*CLIENT, "--out", "@root", "--force-any"], "holds the model directory"),
    case("client-dir-out-inside-the-model", [*CLIENT, "--out", "@model/client"], "inside the model directory"),
    case("export-out-is-the-source", ["export", "--model", "@src", "--out", "@src", "--force"], "source model"),
    case("export-out-holds-the-source", ["export", "--model", "@src", "--out", "@root", "--force-any"], "holds"),
    case("tune-out-is-the-model", [*TUNE, *DATA, "--out", "@model", "--force"], "is the model directory"),
    case("tune-out-holds-the-model", [*TUNE, *DATA, "--out", "@root", "--force-any"], "holds the model directory"),
    case("tune-out-inside-the-model", [*TUNE, *DATA, "--out", "@model/run"], "inside the model directory"),
    case("tune-out-would-replace-its-test-file", over_run("--test", "@run/log.jsonl"), "log.jsonl"),

    # 10. --force replaces only what the command wrote: a finished run, another model, someone's notes are refused
    case("client-dir-force-over-a-run", [*CLIENT, "--out", "@run", "--force"], "does not look like a client"),
    case("client-dir-force-over-another-model", [*CLIENT, "--out", "@other", "--force"], "does not look like"),
    case("client-dir-force-over-notes", [*CLIENT, "--out", "@notes", "--force"], "--force-any"),
    case("client-dir-out-not-empty-without-force", [*CLIENT, "--out", "@notes"], "--force"),
    case("triton-repo-force-over-a-run", [*REPO, "--out", "@run", "--force"], "does not look like a model repository"),
    case("triton-repo-force-over-another-model", [*REPO, "--out", "@other", "--force"], "does not look like"),
    case("triton-repo-force-over-notes", [*REPO, "--out", "@notes", "--force"], "--force-any"),
    case("export-force-over-notes", [*EXPORT, "--out", "@notes", "--force"], "does not look like a model directory"),
    case("export-force-over-a-run", [*EXPORT, "--out", "@run", "--force"], "does not look like"),
    case("tune-force-over-notes", [*TUNE, *DATA, "--out", "@notes", "--force"], "does not look like a run directory"),
    case("tune-force-over-another-model", [*TUNE, *DATA, "--out", "@other", "--force"], "does not look like a run"),

    # 11. a file written over a file read
    case("predict-output-is-the-input", [*PREDICT, "--output", "@test"], "--output"),
    case("predict-output-is-the-input-through-a-link", [*PREDICT, "--output", "@test_link"], "--output"),
    case("predict-output-is-the-input-by-another-path", [*PREDICT, "--output", "@notes/../test.csv"], "--output"),
    case("predict-output-is-the-text-input", ["predict", "--model", "@model", "--prompt", "@run", "--input",
                                              "@labels_txt", "--output", "@labels_txt"], "--output"),
    case("predict-output-is-the-prompt", [*PREDICT, "--output", "@run/prompt.npz"], "--output"),
    case("predict-output-in-the-model-directory", [*PREDICT, "--output", "@model/labels.jsonl"], "model directory"),

    # 12. runs that cannot be resumed, and checkpoints that must not run anything
    case("tune-resume-stub", ["tune", "--resume", "@stub"], "nothing to resume"),
    case("tune-resume-pickle-checkpoint-untrusted", ["tune", "--resume", "@run_pickle"], "--trust-checkpoint"),
    case("tune-resume-npz-of-pickled-objects", ["tune", "--resume", "@run_npz_object"], "checkpoint.npz"),
    case("tune-resume-npz-naming-a-function", ["tune", "--resume", "@run_npz_class"], "checkpoint.npz"),
    case("tune-resume-npz-holding-pickle-bytes", ["tune", "--resume", "@run_npz_ckpt_pkl"], "checkpoint.npz"),
    case("tune-resume-checkpoint-impossible-counts", ["tune", "--resume", "@run_ckpt_counts"], "checkpoint.npz"),
    case("tune-resume-checkpoint-mean-of-another-shape", ["tune", "--resume", "@run_ckpt_shape"], "checkpoint.npz"),
    case("tune-trust-checkpoint-without-resume", over_run("--trust-checkpoint"), "--trust-checkpoint"),
    case("tune-resume-with-model", ["tune", "--resume", "@run", "--model", "@model"], "drop --model"),
    case("tune-resume-with-force-any", ["tune", "--resume", "@run", "--force-any"], "drop --force-any"),

    # 13. manifests that disagree with their graphs or their vocabulary, graph files from elsewhere
    case("evaluate-manifest-hidden-size-disagrees", [*EVAL0, "--model", "@model_hidden"], "hidden_size"),
    case("tune-manifest-hidden-size-disagrees", over_run("--model", "@model_hidden"), "hidden_size"),
    case("check-manifest-hidden-size-disagrees", [*CHECK, "--model", "@model_hidden"], "hidden_size"),
    case("evaluate-graph-hidden-size-disagrees", [*EVAL0, "--model", "@model_hidden_all"], "hidden_size"),
    case("tune-graph-hidden-size-disagrees", over_run("--model", "@model_hidden_all"), "hidden_size"),
    case("check-graph-hidden-size-disagrees", [*CHECK, "--model", "@model_hidden_all"], "hidden_size"),
    case("check-all-engines-graph-hidden-size-disagrees", ["check", "--model", "@model_hidden_all", "--task", "sst2"],
         "hidden_size"),
    case("bench-graph-hidden-size-disagrees", [*BENCH, "--model", "@model_hidden_all"], "hidden_size"),
    case("tune-bbtv2-manifest-layers-disagree", [*over_run("--method", "bbtv2"), "--model", "@model_layers"],
         "num_layers"),
    case("evaluate-mask-id-outside-the-vocabulary", [*EVAL0, "--model", "@model_mask_range"], "mask_id"),
    case("tune-mask-id-outside-the-vocabulary", over_run("--model", "@model_mask_range"), "mask_id"),
    case("evaluate-mask-id-not-a-token", [*EVAL0, "--model", "@model_mask_notoken"], "mask_id"),
    case("evaluate-vocab-size-10", [*EVAL0, "--model", "@model_vocab10"], "vocabulary"),
    case("tune-vocab-size-10", over_run("--model", "@model_vocab10"), "vocabulary"),
    case("evaluate-pad-id-negative", [*EVAL0, "--model", "@model_pad_negative"], "pad_id"),
    case("predict-pad-id-negative", [*PREDICT, "--model", "@model_pad_negative"], "pad_id"),
    case("evaluate-graph-file-outside-the-model", [*EVAL0, "--model", "@model_escape"], "../model/model.onnx"),
    case("evaluate-graph-file-absolute", [*EVAL0, "--model", "@model_escape_abs"], "not a file name"),
    case("tune-graph-file-outside-the-model", over_run("--model", "@model_escape"), "not a file name"),
    case("check-graph-file-outside-the-model", ["check", "--model", "@model_escape"], "not a file name"),
    case("client-dir-graph-file-outside-the-model", [*CLIENT, "--model", "@model_escape", "--out", "@root/client"],
         "not a file name"),
    case("triton-repo-graph-file-outside-the-model", [*REPO, "--model", "@model_escape", "--out", "@root/repo"],
         "not a file name"),

    # 14. numbers without a bound, or not numbers at all
    case("bench-max-seconds-nan", [*BENCH_SERVER, "--max-seconds", "nan"], "--max-seconds"),
    case("bench-max-seconds-inf", [*BENCH_SERVER, "--max-seconds", "inf"], "--max-seconds"),
    case("bench-server-timeout-nan", [*BENCH_SERVER, "--server-timeout", "nan"], "--server-timeout"),
    case("bench-batch-ten-million", [*BENCH, "--batch", 10_000_000], "--batch"),
    case("bench-batch-times-seq-too-large", [*BENCH, "--batch", 8192, "--seq", 100], "--batch"),
    case("tune-server-timeout-nan", over_run("--server-timeout", "nan"), "--server-timeout"),
    case("check-tolerance-nan", ["check", "--model", "@model", "--fp32-max-diff", "nan"], "--fp32-max-diff"),
    case("tune-max-length-above-positions", over_run("--max-length", 4000), "--max-length"),

]


def problems_of(out: Outcome, changed: list[str], match: str | None) -> list[str]:
    """What breaks the promise, each in a few words."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    found = []
    if out.crash:
        found.append(f"crashed with {out.crash}")
    if out.code != 2:
        found.append(f"exit code {out.code}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        found.append(f"stderr has {len(lines)} line(s): {[line[:100] for line in lines[:5]]}")
    elif match is not None and match.lower() not in lines[0].lower():
        found.append(f"the error line does not mention {match!r}: {lines[0][:200]}")
    if "Traceback" in out.stdout + out.stderr:
        found.append("a traceback was printed")
    if out.stdout:
        found.append(f"stdout is not empty: {out.stdout[:80]!r}")
    if changed:
        found.append(f"files changed: {changed[:6]}")
    return found


@pytest.mark.parametrize("argv,match,stdin,timeout", CASES)
def test_user_mistake_is_one_error_line_and_loses_nothing(ws, tree, argv, match, stdin, timeout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the workspace: pycma and friends must not litter it
    tree.put_back()  # every case starts from the workspace as it was made
    try:
        out = run_cli(resolve_all(argv, ws), stdin, timeout)
    finally:
        changed = tree.put_back()
    found = problems_of(out, changed, match)
    assert not found, "; ".join(found)


def test_the_table_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 70 and len(set(ids)) == len(ids)


# -- the Python API: the same mistakes raise their kind of BBTError ------------------------------------------------
def _prompt_on_other_model(ws):
    TunedPrompt.load(ws["run"]).evaluate(Model.load(ws["other"]), read_examples(ws["test"]))


def _checkpoint_plain_dict(ws):
    state = read_states(RunDir(ws["run_ckpt_dict"]), [_tuner(ws)])[0]
    assert state.generation >= 0  # a checkpoint that is not a TunerState must be refused when it is read


def _tuner(ws) -> BlackBoxTuner:
    """A tuner with the good run's settings."""
    settings = json.loads((ws["run"] / "run.json").read_text())["settings"]
    return BlackBoxTuner(Model.load(ws["model"]), PRESETS["sst2"], TuneConfig(**settings["tune"]))


def _rows(ws, texts=("a fine film", "a dull film")):
    return TunedPrompt.load(ws["run"]).encode(Model.load(ws["model"]), list(texts))


def _crafted_state(ws) -> bytes:
    return (ws["run_npz_class"] / "checkpoint.npz").read_bytes()


def _label_logits(ws, shape):
    """label_logits with prompts of `shape` (None: not numbers at all)."""
    model = Model.load(ws["model"])
    prompts = [[["a", "b"]]] if shape is None else np.zeros(shape, np.float32)
    return model.engine.label_logits(prompts, _rows(ws))


def api(id_, call, kind, match=None):
    return pytest.param(call, kind, match, id=id_)


API_CASES = [
    api("config-popsize-1", lambda ws: TuneConfig(popsize=1).check(), SettingsError),
    api("config-budget-0", lambda ws: TuneConfig(budget=0, popsize=10).check(), SettingsError),
    api("config-sigma-nan", lambda ws: TuneConfig(sigma=float("nan")).check(), SettingsError),
    api("config-alpha-0", lambda ws: TuneConfig(alpha=0.0).check(), SettingsError),
    api("config-alpha-inf", lambda ws: TuneConfig(alpha=float("inf")).check(), SettingsError),
    api("config-bound-nan", lambda ws: TuneConfig(bound=float("nan")).check(), SettingsError),
    api("config-prompt-tokens-0", lambda ws: TuneConfig(prompt_tokens=0).check(), SettingsError),
    api("config-intrinsic-dim-0", lambda ws: TuneConfig(intrinsic_dim=0).check(), SettingsError),
    api("config-seed-negative", lambda ws: TuneConfig(seed=-1).check(), SettingsError),
    api("load-manifest-versions-list", lambda ws: load_manifest(ws["model_versions"]), ModelError),
    api("read-examples-array-line", lambda ws: read_examples(ws["array"]), DataError),
    api("prompt-load-truncated", lambda ws: TunedPrompt.load(ws["prompt_half"]), PromptError),
    api("tuner-prompt-tokens-above-exported", lambda ws: BlackBoxTuner(
        Model.load(ws["model"]), PRESETS["sst2"], TuneConfig(prompt_tokens=PROMPT_TOKENS + 1)), SettingsError),
    api("checkpoint-plain-dict", _checkpoint_plain_dict, RunError),
    api("prompt-on-another-model", _prompt_on_other_model, PromptError),
    # refused when built, in the library's words (arguments, not flags)
    api("config-budget-negative-when-built", lambda ws: TuneConfig(budget=-1), SettingsError,
        "budget must be at least 1"),
    api("config-budget-below-popsize-when-built", lambda ws: TuneConfig(budget=5, popsize=10), SettingsError),
    api("config-diagonal-not-a-bool", lambda ws: TuneConfig(diagonal="yes"), SettingsError),
    api("tuner-max-length-above-positions", lambda ws: BlackBoxTuner(
        Model.load(ws["model"]), PRESETS["sst2"], TuneConfig(prompt_tokens=PROMPT_TOKENS, max_length=4000)),
        SettingsError, "max_length 4000"),
    api("tuner-config-not-a-config", lambda ws: BlackBoxTuner(Model.load(ws["model"]), PRESETS["sst2"], {}),
        SettingsError),
    api("task-labels-plain-words", lambda ws: Task("t", " {text} It was {mask} .", ["bad", "great"]), SettingsError,
        "pairs"),
    api("task-labels-without-a-template", lambda ws: Task(labels=[("0", "bad"), ("1", "great")]), SettingsError),
    api("task-labels-empty", lambda ws: Task("t", " {text} It was {mask} .", []), SettingsError),
    api("task-labels-one", lambda ws: Task("t", " {text} It was {mask} .", {"0": "bad"}), SettingsError),
    api("task-labels-a-string", lambda ws: Task("t", " {text} It was {mask} .", "bad,great"), SettingsError),
    api("task-metric-unknown", lambda ws: Task("t", " {text} {mask}", {"0": "a", "1": "b"}, "auc"), SettingsError),
    api("k-shot-split-k-0", lambda ws: k_shot_split(read_examples(ws["pool"]), ["0", "1"], 0,
                                                    np.random.default_rng(0)), SettingsError),
    api("k-shot-split-too-few-rows", lambda ws: k_shot_split(read_examples(ws["pool"]), ["0", "1"], 1000,
                                                             np.random.default_rng(0)), DataError),
    api("data-spec-no-data", lambda ws: DataSpec().check(), SettingsError),
    # the tuner's steps out of order
    api("tuner-step-before-start", lambda ws: _tuner(ws).step(_rows(ws), None), RunError, "start()"),
    api("tuner-result-before-start", lambda ws: _tuner(ws).result(_rows(ws), None), RunError),
    api("tuner-finished-before-start", lambda ws: _tuner(ws).finished(), RunError),
    api("tuner-start-with-a-string", lambda ws: _tuner(ws).start("a fine film"), DataError),
    api("tuner-start-without-labels", lambda ws: _tuner(ws).start(_rows(ws)), DataError),
    # rows and prompts of the wrong kind
    api("predict-rows-of-numbers", lambda ws: TunedPrompt.load(ws["run"]).predict(Model.load(ws["model"]), [1, 2]),
        DataError),
    api("predict-an-empty-text", lambda ws: TunedPrompt.load(ws["run"]).predict(Model.load(ws["model"]), [""]),
        DataError),
    api("evaluate-texts-without-labels", lambda ws: TunedPrompt.load(ws["run"]).evaluate(
        Model.load(ws["model"]), ["a fine film"]), DataError),
    api("label-logits-prompt-of-two-dims", lambda ws: _label_logits(ws, (3, 32)), PromptError, "prompt_embeds"),
    api("label-logits-prompt-of-another-hidden-size", lambda ws: _label_logits(ws, (1, 4, 7)), PromptError),
    api("label-logits-more-slots-than-exported", lambda ws: _label_logits(ws, (1, PROMPT_TOKENS + 1, 32)),
        PromptError),
    api("label-logits-not-numbers", lambda ws: _label_logits(ws, None), PromptError),
    # checkpoints: nothing in them runs
    api("load-state-naming-a-function", lambda ws: _tuner(ws).load_state(_crafted_state(ws)), RunError,
        "posix.system"),
    api("load-state-of-pickled-objects", lambda ws: _tuner(ws).load_state(
        (ws["run_npz_object"] / "checkpoint.npz").read_bytes()), RunError),
    api("load-state-random-bytes", lambda ws: _tuner(ws).load_state(b"\x00" * 64), RunError),
    api("checkpoint-pickle-untrusted", lambda ws: read_states(RunDir(ws["run_pickle"]), [_tuner(ws)]), RunError,
        "trust_checkpoint"),
]


@pytest.mark.parametrize("call,kind,match", API_CASES)
def test_api_mistake_raises_its_kind_of_bbterror(ws, call, kind, match):
    """Its kind of BBTError, one line, speaking of arguments (never of the CLI's flags); and nothing ran."""
    assert issubclass(kind, BBTError)
    with pytest.raises(kind) as caught:
        call(ws)
    message = str(caught.value)
    assert "\n" not in message and " --" not in message and not message.startswith("--"), message
    assert match is None or match in message, message
    assert not ws["marker"].exists()


# -- the same promise where the filesystem itself refuses: a full disk, a mount point, a run in use ------------------
@contextmanager
def small_filesystem(path: Path, size: str = "4m"):
    """A tmpfs of `size` mounted at `path`, unmounted after; skipped (with the reason) where that cannot be done."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("a small filesystem for this test needs root on Linux (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    tag = f"bbt-test-{os.getpid()}-{abs(hash(str(path)))}"  # its name in the mount table, wherever it moves
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", tag, str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" ")
            if tag in fields[fields.index("-") + 2:fields.index("-") + 3]:
                subprocess.run(["umount", "-l", fields[4].replace("\\040", " ")], capture_output=True)


def fill(disk: Path, room: int) -> None:
    """Fill `disk` until it refuses, then free `room` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - room))


def assert_refused_and_unchanged(root: Path, argv: list, match: str) -> None:
    """What every row of the table asserts, for a case built by hand."""
    before = snapshot(root)
    out = run_cli([str(a) for a in argv], None, None)
    found = problems_of(out, changes(before, snapshot(root)), match)
    assert not found, "; ".join(found)


def tune_into(ws, out, *extra) -> list:
    return resolve_all([*TUNE, *DATA, "--out", str(out), "--checkpoint-every", 1, "-q", *extra], ws)


@pytest.mark.parametrize("room", [0, 24 * 1024], ids=["full", "room-for-run-json-not-the-checkpoint"])
def test_tune_force_on_a_full_disk_keeps_the_earlier_run(ws, tmp_path, monkeypatch, room):
    """The earlier run's files go aside by renames, which need no room, and come back when the new run fails."""
    monkeypatch.chdir(tmp_path)
    with small_filesystem(tmp_path / "disk") as disk:
        assert run_cli(tune_into(ws, disk / "run"), None, None).code == 0
        fill(disk, room)
        assert_refused_and_unchanged(disk, [*tune_into(ws, disk / "run", "--force")], "No space left on device")


def test_tune_on_a_full_disk_leaves_no_stub(ws, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with small_filesystem(tmp_path / "disk") as disk:
        fill(disk, 8 * 1024)
        assert_refused_and_unchanged(disk, tune_into(ws, disk / "run"), "No space left on device")


def test_a_mount_point_in_a_foreign_out_is_refused_and_untouched(ws, tmp_path, monkeypatch):
    """--force over a directory holding someone's mounted filesystem: not a repository, so refused, and nothing
    on either filesystem changes."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "repo"
    assert run_cli(resolve_all([*REPO, "--out", str(out)], ws), None, None).code == 0
    with small_filesystem(out / "data", "1m") as mounted:
        (mounted / "results.csv").write_text("a,b\n1,2\n")
        for command in (REPO, CLIENT):
            assert_refused_and_unchanged(tmp_path, resolve_all([*command, "--out", str(out), "--force"], ws),
                                         "does not look like")


@pytest.mark.parametrize("command", ["triton-repo", "client-dir"])
def test_force_keeps_the_new_directory_when_the_old_one_holds_a_mount_point(ws, tmp_path, monkeypatch, command):
    """The old directory's removal stops at a mount point inside it (a filesystem it must not cross): the new
    directory is in place, the old one's remains are named, and nothing on the mounted filesystem is touched."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = resolve_all([*(REPO if command == "triton-repo" else CLIENT), "--out", str(out)], ws)
    assert run_cli(argv, None, None).code == 0
    written = snapshot(out)
    # a repository's version folder on its own filesystem still looks like a repository; a client directory with a
    # folder in it does not, so that one takes --force-any
    inner = next(out.glob("*/1")) if command == "triton-repo" else out / "sub"
    keep = "model.onnx" if command == "triton-repo" else "keep.txt"
    with small_filesystem(inner, "1m") as mounted:
        (mounted / keep).write_text("on another filesystem\n")
        if command == "client-dir":  # a client directory with a folder in it is not one: --force-any
            argv = [*argv, "--force-any"]
        result = CliRunner().invoke(cli, [*argv, "--force"])
        assert result.exit_code == 0, result.output
        assert snapshot(out) == written  # the new directory, whole
        left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
        assert len(left) == 1 and "could not be removed completely" in result.stderr and str(left[0]) in result.stderr
        assert (left[0] / inner.relative_to(out) / keep).read_text() == "on another filesystem\n"


@pytest.mark.parametrize("refuse", ["unlink", "rmdir"])
def test_force_keeps_the_new_directory_when_removing_the_old_one_fails_midway(ws, tmp_path, monkeypatch, refuse):
    """Where the old directory cannot be removed whole (a read-only folder, a busy mount), the new one is already in
    place: delete-then-rename would lose both. The remains are reported, never silently left."""
    import bbt_onnx.fileio as fileio

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "client"
    assert run_cli(resolve_all([*CLIENT, "--out", str(out)], ws), None, None).code == 0
    real = getattr(os, refuse)

    def refused(path, *args, **kwargs):
        if ".client.old-" in str(path) and (refuse == "rmdir" or Path(path).name == "tokenizer.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fileio.os, refuse, refused)
    result = CliRunner().invoke(cli, resolve_all(["client-dir", "--model", "@other", "--out", str(out), "--force"], ws))
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").read_bytes() == (ws["other"] / "manifest.json").read_bytes()  # the new one
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json"]
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".client.old-")]
    assert len(left) == 1 and str(left[0]) in result.stderr and "Permission denied" in result.stderr


def test_an_out_holding_a_run_in_use_is_refused_even_with_force_any(ws, tmp_path, monkeypatch):
    """A tune is writing a run under --out: neither repository nor client directory may replace it."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    shutil.copytree(ws["run"], runs / "busy")
    with RunDir(runs / "busy").claim():
        for command in (REPO, CLIENT):
            assert_refused_and_unchanged(tmp_path, resolve_all([*command, "--out", str(runs), "--force-any"], ws),
                                         "a tune is writing")


def test_a_crafted_checkpoint_runs_nothing(ws, tmp_path, monkeypatch):
    """Each crafted checkpoint carries a payload that would create a file: resuming from it is refused in one line,
    and the file never appears. The pickle is the proof that the payload works: loaded as pickle, it does."""
    monkeypatch.chdir(tmp_path)
    for name in ("run_pickle", "run_npz_object", "run_npz_class", "run_npz_ckpt_pkl"):
        assert_refused_and_unchanged(ws["root"], ["tune", "--resume", str(ws[name])], "checkpoint")
        assert not ws["marker"].exists()
    pickle.loads((ws["run_pickle"] / "checkpoint.pkl").read_bytes())  # what unpickling does
    assert ws["marker"].exists()
    ws["marker"].unlink()


def test_every_flag_a_rule_names_is_one_of_its_command(tmp_path):
    """An error never tells the user to drop or add a flag that does not exist (--model-dir)."""
    import re

    for name, command in cli.commands.items():
        opts = {o for p in command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        params = {p.name for p in command.params}
        for rule in getattr(command, "rules", ()):
            for field in (*rule.given, *rule.absent, *rule.any_of):
                assert (field[0] if isinstance(field, tuple) else field) in params, (name, rule.message)
            for flag in re.findall(r"--[a-z][a-z0-9-]*", rule.message):
                assert flag in opts, (name, flag)
