"""Hardening matrix: every mistake a user can make ends in exactly one `error:` line and exit code 2.

The README promises it for every command; this file holds it to that promise, one table row per
mistake. Each row runs the CLI against a shared workspace (copies of the tiny model, a finished good
run, data files, and deliberately damaged variants of each) and checks:

- exit code 2, and no exception escaped (no traceback anywhere);
- stderr is exactly one non-empty line, starting with `error: ` (no progress note before it);
- stdout is empty;
- nothing is lost: every file and folder of the workspace is byte for byte what it was, and no new
  one appeared. In particular a bad setting given with `--force --out GOOD_RUN` never wipes the run.

After each row the workspace is put back as it was, so one row's damage cannot leak into the next.
A few Python-API cases at the end expect `BBTError` where the CLI rows expect the `error:` line.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bbt_onnx import PRESETS, BlackBoxTuner, Model, TuneConfig, TunedPrompt
from bbt_onnx.cli import cli
from bbt_onnx.data import read_examples
from bbt_onnx.errors import BBTError, DataError, ModelError, PromptError, RunError, SettingsError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.runs import RunDir
from bbt_onnx.synthetic import sentiment_rows, write_csv

from conftest import PROMPT_TOKENS, without_graphs

HUGE_ROW_CHARS = 2_000_000
HUGE_ROW_TIMEOUT_S = 60  # the row must be refused (or scored) well within this; a hang fails the case


# -- the workspace ---------------------------------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


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

    # the good run, finished, with a checkpoint per generation
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        result = CliRunner().invoke(cli, resolve_all(
            [*TUNE, *DATA, "--out", "@run", "--checkpoint-every", 1, "-q"], {**p, "run": root / "run"}))
    assert result.exit_code == 0, result.output
    p["run"] = root / "run"
    assert (p["run"] / "checkpoint.pkl").is_file() and (p["run"] / "prompt.npz").is_file()

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
    p["run_ckpt_dict"] = run_copy("run_ckpt_dict")
    (p["run_ckpt_dict"] / "checkpoint.pkl").write_bytes(pickle.dumps({"generation": 1, "calls": 10}))
    p["run_ckpt_junk"] = run_copy("run_ckpt_junk")
    (p["run_ckpt_junk"] / "checkpoint.pkl").write_bytes(np.random.default_rng(0).bytes(512))
    p["run_badlog"] = run_copy("run_badlog")  # a line before the checkpoint is garbage (not a torn last line)
    log = (p["run_badlog"] / "log.jsonl").read_text().splitlines(keepends=True)
    (p["run_badlog"] / "log.jsonl").write_text("".join(["{not json\n", *log[1:]]))
    p["prompt_half"] = run_copy("prompt_half", interrupted=False)
    npz = (p["prompt_half"] / "prompt.npz").read_bytes()
    (p["prompt_half"] / "prompt.npz").write_bytes(npz[:len(npz) // 2])
    return p


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


def restore(root: Path, before: dict[str, bytes | None]) -> None:
    """Put the workspace back as `before`: drop what is new, rewrite what changed or went missing."""
    after = snapshot(root)
    for rel in sorted(set(after) - set(before), reverse=True):
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for rel, content in sorted(before.items()):
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif after.get(rel) != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


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
    case("tune-resume-checkpoint-is-a-dict", ["tune", "--resume", "@run_ckpt_dict"], "checkpoint.pkl"),
    case("tune-resume-checkpoint-random-bytes", ["tune", "--resume", "@run_ckpt_junk"], "checkpoint.pkl"),
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
def test_user_mistake_is_one_error_line_and_loses_nothing(ws, argv, match, stdin, timeout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the workspace: pycma and friends must not litter it
    root = ws["root"]
    before = snapshot(root)
    try:
        out = run_cli(resolve_all(argv, ws), stdin, timeout)
    finally:
        after = snapshot(root)
        restore(root, before)
    changed = sorted(rel for rel in set(before) | set(after) if before.get(rel, 0) != after.get(rel, 0))
    found = problems_of(out, changed, match)
    assert not found, "; ".join(found)


def test_the_table_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 70 and len(set(ids)) == len(ids)


# -- the Python API: the same mistakes raise their kind of BBTError ------------------------------------------------
def _prompt_on_other_model(ws):
    TunedPrompt.load(ws["run"]).evaluate(Model.load(ws["other"]), read_examples(ws["test"]))


def _checkpoint_plain_dict(ws):
    state = RunDir(ws["run_ckpt_dict"]).load_checkpoint()
    assert state.generation >= 0  # a checkpoint that is not a TunerState must be refused when it is read


def api(id_, call, kind):
    return pytest.param(call, kind, id=id_)


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
]


@pytest.mark.parametrize("call,kind", API_CASES)
def test_api_mistake_raises_its_kind_of_bbterror(ws, call, kind):
    assert issubclass(kind, BBTError)
    with pytest.raises(kind):
        call(ws)
