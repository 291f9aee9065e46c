"""`bbt-onnx deploy`: one ONNX graph from text to label that runs without bbt-onnx and labels rows as predict does.

Each case deploys a prompt (a tuned run, or a random prompt saved as a run would save it), runs `bbt-onnx predict`
on the same rows, and runs the classifier in a separate interpreter where bbt_onnx, torch, transformers,
tokenizers and onnx cannot be imported: only onnxruntime, onnxruntime-extensions and numpy (plus, for a model
whose tokenizer runs outside the graph, the `tokenizers` package that its encode.py uses).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx import Model, PromptEnsemble, TunedPrompt
from bbt_onnx.data import Example
from bbt_onnx.deploy import PROBES, DeployOptions, deploy, session
from bbt_onnx.deploy.build import build_classifier, save_model
from bbt_onnx.errors import PromptError, SettingsError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.subspace import ProjectionSpec
from bbt_onnx.synthetic import sentiment_rows
from bbt_onnx.tasks import PRESETS, Demonstration, Framing, Task

from conftest import without_graphs
from helpers import cli_error, invoke

TOLERANCE = 1e-5  # fp32 probabilities against predict's
TEMPLATE = " Review: {text}\nSentiment:"
LABELS = (("negative", " bad"), ("positive", " great"))
BLOCKED = ("bbt_onnx", "bbt_onnx_export", "torch", "transformers", "tokenizers", "onnx")


DEMOS = (Demonstration("warm and fine", "positive"), Demonstration("dull , long", "negative"))


def decoder_task(demos=(), **framing) -> Task:
    return Task("review", TEMPLATE, LABELS, framing=Framing(**framing), demonstrations=demos)


# id: (architecture, method, task, the graph's input)
CASES = {
    "roberta-bbt-tuned": ("RobertaForMaskedLM", "tuned", PRESETS["sst2"], "text"),
    "roberta-bbtv2": ("RobertaForMaskedLM", "bbtv2", PRESETS["sst2"], "text"),
    "roberta-pair": ("RobertaForMaskedLM", "bbt", PRESETS["rte"], "text"),
    "gpt2-bbt-suffix": ("GPT2LMHeadModel", "bbt", decoder_task(position="suffix", bos="never"), "text"),
    "gpt2-bbtv2-prefix": ("GPT2LMHeadModel", "bbtv2", decoder_task(bos="always"), "text"),
    "llama-bbt-chat-suffix": ("LlamaForCausalLM", "bbt", decoder_task(chat=True, position="suffix", bos="always"),
                              "text"),
    "llama-bbtv2-chat": ("LlamaForCausalLM", "bbtv2", decoder_task(chat=True), "text"),
    "qwen2-bbt-chat-suffix": ("Qwen2ForCausalLM", "bbt", decoder_task(chat=True, position="suffix", bos="never"),
                              "text"),
    "qwen2-bbtv2-prefix": ("Qwen2ForCausalLM", "bbtv2", decoder_task(), "text"),
    "llama-demos-suffix": ("LlamaForCausalLM", "bbt", decoder_task(DEMOS, position="suffix"), "text"),
    "roberta-demos": ("RobertaForMaskedLM", "bbt", replace(PRESETS["sst2"], demonstrations=(
        Demonstration("warm and fine", "1"), Demonstration("dull , long", "0"))), "text"),
    "llama-words-suffix": ("LlamaForCausalLM", "bbt", replace(decoder_task(position="suffix"), extra_words=(
        (" awful", " dull"), (" fun", " warm", " sharp"))), "text"),
    "bert-bbt": ("BertForMaskedLM", "bbt", PRESETS["sst2"], "ids"),
    "bert-pair": ("BertForMaskedLM", "bbtv2", PRESETS["mrpc"], "ids"),
}

LONG = ("the film keeps its  nerve until the end ,\nand the cast makes it work ; "
        "a slow , dull plot that never moves , but great music . ")
EDGE = ["café naïve résumé über 😀 東京 привет", "It's a 1999 remake -- \"quoted\" (x)! $10?",
        "a <mask> in the text", "don't  stop\n\nme   now", "x", "  padded with spaces  ",
        "<s> </s> <|endoftext|> [CLS]", "3.14159 1,000,000"]


def parity_rows(pair: bool) -> list[dict]:
    texts = [t for t, _ in sentiment_rows(24, seed=5, min_words=2, max_words=30)] + EDGE
    texts += [LONG * 12, (LONG * 30)[:1500], "great " * 300]  # over 128 tokens: truncated
    rows = [{"text": t} for t in texts]
    if pair:
        seconds = [t for t, _ in sentiment_rows(len(texts), seed=6, min_words=1, max_words=20)]
        seconds[-3:] = ["bad " * 200, "fine", LONG * 5]  # both long, one long, and the second longer
        seconds[5] = LONG * 9
        for row, second in zip(rows, seconds):
            row["text_b"] = second
    return rows


def random_prompt(manifest, task: Task, method: str, seed: int = 0, tokens: int = 4) -> TunedPrompt:
    rng = np.random.default_rng(seed)
    layers = (manifest.num_layers,) if method == "bbtv2" else ()
    if layers:  # each layer's prompt at that layer's scale
        scale = np.array(manifest.layer_std)[:, None, None]
        embeds = rng.standard_normal((*layers, tokens, manifest.hidden_size)) * scale
    else:
        embeds = rng.standard_normal((tokens, manifest.hidden_size)) * manifest.embedding_std
    spec = ProjectionSpec(seed, 10, tokens, manifest.hidden_size, manifest.embedding_std)
    return TunedPrompt(np.zeros((*layers, 10)), embeds.astype(np.float32), spec, task, manifest.fingerprint(),
                       method=method, layer_std=tuple(manifest.layer_std) if layers else ())


def isolated(script: str, allow_tokenizers: bool = False) -> dict:
    """Run `script` where only onnxruntime, onnxruntime-extensions and numpy (and maybe tokenizers) import."""
    blocked = tuple(b for b in BLOCKED if not (allow_tokenizers and b == "tokenizers"))
    prelude = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
    """)
    epilogue = f"\nassert not [m for m in sys.modules if m.split('.')[0] in {blocked!r}]\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script) + epilogue], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def classify_isolated(out: Path, rows: list[dict]) -> dict:
    """The README's lines, in an interpreter without bbt-onnx; with --input ids, encode.py first."""
    return classify_isolated_all([(out, rows)])[0]


def classify_isolated_all(jobs: list[tuple[Path, list[dict]]]) -> list[dict]:
    """`classify_isolated` for several deployed classifiers in one such interpreter (tokenizers importable only
    when one of them takes ids)."""
    ids = [(out / "encode.py").exists() for out, _ in jobs]
    script = f"""
        import importlib.util, numpy as np, onnxruntime as ort, onnxruntime_extensions
        from pathlib import Path
        jobs = json.loads({json.dumps(json.dumps([[str(out), rows, i] for (out, rows), i in zip(jobs, ids)]))})
        results = []
        for n, (out, rows, ids) in enumerate(jobs):
            out = Path(out)
            opts = ort.SessionOptions()
            opts.register_custom_ops_library(onnxruntime_extensions.get_library_path())
            clf = ort.InferenceSession(str(out / "classifier.onnx"), opts)
            names = [i.name for i in clf.get_inputs()]
            texts = np.array([r["text"] for r in rows], dtype=object)
            seconds = np.array([r.get("text_b", "") for r in rows], dtype=object)
            if ids:  # encode.py beside the classifier, as `from encode import encode` reads it
                spec = importlib.util.spec_from_file_location(f"encode{{n}}", out / "encode.py")
                encode = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(encode)
                from tokenizers import Tokenizer
                recipe = json.load(open(out / "recipe.json"))
                feeds = encode.encode(recipe, Tokenizer.from_file(str(out / "tokenizer.json")), texts,
                                      seconds if "text_b" in recipe["fields"] else None)
            else:
                feeds = {{"text": texts, **({{"text_b": seconds}} if "text_b" in names else {{}})}}
            probabilities, label = clf.run(["probabilities", "label"], feeds)
            meta = clf.get_modelmeta().custom_metadata_map
            results.append({{"probabilities": probabilities.tolist(), "label": label.tolist(), "names": names,
                             "labels": json.loads(meta["labels"]), "meta": meta}})
        print(json.dumps(results))
    """
    return isolated(script, allow_tokenizers=any(ids))


@pytest.fixture(scope="module")
def deployed(exports, data_dir, tmp_path_factory):
    """Each case deployed once: (model dir, run dir, out dir, rows, predict's predictions)."""
    done: dict[str, tuple] = {}

    def get(case: str):
        if case in done:
            return done[case]
        arch, method, task, _ = CASES[case]
        tiny = exports.get(arch)
        root = tmp_path_factory.mktemp(case)
        run = root / "run"
        if method == "tuned":
            r = invoke(["tune", "--model", tiny.model, "--task", "sst2", "--data", data_dir / "pool.csv", "--out", run,
                        "--prompt-tokens", "4", "--intrinsic-dim", "10", "--popsize", "10", "--budget", "20", "-q"])
            assert r.exit_code == 0, r.output
        else:
            random_prompt(load_manifest(tiny.model), task, method).save(run.mkdir() or run / "prompt.npz")
        out = root / "out"
        r = invoke(["deploy", "--model", tiny.model, "--prompt", run, "--out", out, "-q"])
        assert r.exit_code == 0, r.output
        rows = parity_rows(task.uses_text_b)
        (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        r = invoke(["predict", "--model", tiny.model, "--prompt", run, "--input", root / "rows.jsonl", "-q"])
        assert r.exit_code == 0, r.output
        preds = [json.loads(line) for line in r.stdout.splitlines()]
        done[case] = (tiny.model, run, out, rows, preds)
        return done[case]

    return get


@pytest.fixture(scope="module")
def classified(deployed) -> dict[str, dict]:
    """Every case's classifier run without bbt-onnx: the text-input ones in one interpreter that cannot import
    tokenizers either, the id-input ones (encode.py) in another."""
    got = {}
    for takes in ("text", "ids"):
        cases = [c for c in CASES if CASES[c][3] == takes]
        results = classify_isolated_all([(deployed(c)[2], deployed(c)[3]) for c in cases])
        got.update(zip(cases, results))
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_the_classifier_labels_rows_as_predict_does_without_bbt_onnx(deployed, classified, case):
    model, run, out, rows, preds = deployed(case)
    _, _, task, inputs = CASES[case]
    got = classified[case]
    assert got["names"] == (["text", "text_b"] if task.uses_text_b else ["text"]) if inputs == "text" else \
        got["names"][:3] == ["input_ids", "attention_mask", "mask_pos"]
    assert got["labels"] == list(task.label_keys)
    want = np.array([[p["probabilities"][k] for k in task.label_keys] for p in preds])
    assert [got["labels"][i] for i in got["label"]] == [p["label"] for p in preds]
    assert np.abs(np.array(got["probabilities"]) - want).max() < TOLERANCE
    assert len(set(p["label"] for p in preds)) == 2  # the prompt decides: the rows do not all get one label


def ensemble(manifest, method: str, seeds: int) -> PromptEnsemble:
    return PromptEnsemble(tuple(random_prompt(manifest, PRESETS["sst2"], method, seed=s) for s in range(seeds)))


# what a run may keep, as tune writes it to prompt.npz: (build it from the manifest and the model, deep graph)
RESULTS = {
    "bbt-ensemble": (lambda m, model: ensemble(m, "bbt", 3), False),
    "bbtv2-ensemble": (lambda m, model: ensemble(m, "bbtv2", 2), True),
    "calibrated": (lambda m, model: random_prompt(m, PRESETS["sst2"], "bbt", seed=4).calibrate(model), False),
    "calibrated-ensemble": (lambda m, model: ensemble(m, "bbt", 3).calibrate(model), False),
    "template": (lambda m, model: TunedPrompt.template(m, PRESETS["sst2"], "template").calibrate(model), False),
}


@pytest.mark.parametrize("kind", list(RESULTS))
def test_every_kind_of_result_a_run_keeps_deploys_as_predict_scores_it(exports, kind, tmp_path):
    """An ensemble (its members' probabilities averaged: BBT's in one call, BBTv2's through a copy of the graph
    each), a calibrated prompt and a kept plain template: the classifier agrees with predict, and each part counts
    (the first member alone, or the prompt without its calibration, would not)."""
    build, deep = RESULTS[kind]
    tiny = exports.get("RobertaForMaskedLM")
    manifest, model = load_manifest(tiny.model), Model.load(tiny.model, deep=deep)
    result = build(manifest, model)
    result.save((tmp_path / "run").mkdir() or tmp_path / "run" / "prompt.npz")
    summary = deploy(DeployOptions(str(tiny.model), str(tmp_path / "run"), tmp_path / "out"))
    rows = parity_rows(False)[:16]
    got = classify_isolated(tmp_path / "out", rows)
    texts = [r["text"] for r in rows]

    def probabilities(scoring) -> np.ndarray:
        return np.array([[p.probabilities[k] for k in PRESETS["sst2"].label_keys] for p in scoring.predict(model, texts)])

    want = probabilities(result)
    assert np.abs(np.array(got["probabilities"]) - want).max() < TOLERANCE
    assert got["label"] == want.argmax(1).tolist()
    assert summary["result"] == got["meta"]["result"] == result.origin
    simpler = replace(result, calibration=None) if result.calibration is not None else result.members[0]
    assert np.abs(probabilities(simpler) - want).max() > 1e-3


def test_metadata_names_the_task_the_model_and_the_prompt(deployed):
    model, run, out, rows, _ = deployed("roberta-bbt-tuned")
    meta = classify_isolated(out, rows[:1])["meta"]
    prompt = TunedPrompt.load(run)
    assert json.loads(meta["labels"]) == list(prompt.task.label_keys) and meta["template"] == prompt.task.template
    assert json.loads(meta["task"]) == prompt.task.to_json()
    assert meta["model_fingerprint"] == load_manifest(model).fingerprint() == prompt.model_fingerprint
    assert meta["prompt_sha256"] == hashlib.sha256((run / "prompt.npz").read_bytes()).hexdigest()


def test_a_prompt_dropped_from_the_graph_fails_the_parity_check(deployed, tmp_path):
    """The parity test can fail: the same graph with z = 0 (no prompt) is far from predict's probabilities."""
    model, run, out, rows, preds = deployed("gpt2-bbt-suffix")
    manifest, prompt = load_manifest(model), TunedPrompt.load(run)
    broken = replace(prompt, embeds=np.zeros_like(prompt.embeds), z=np.zeros_like(prompt.z))
    save_model(build_classifier(manifest, broken).model, tmp_path / "classifier.onnx")
    got = classify_isolated(tmp_path, rows)
    want = np.array([[p["probabilities"][k] for k in prompt.task.label_keys] for p in preds])
    assert np.abs(np.array(got["probabilities"]) - want).max() > 100 * TOLERANCE


@pytest.mark.parametrize("arch", ["RobertaForMaskedLM", "GPT2LMHeadModel"])
def test_bad_input_has_a_defined_result(exports, arch, tmp_path):
    """No rows, an empty or blank text, a 1 MB text, bytes that are not UTF-8, a NUL: never a crash."""
    tiny = exports.get(arch)
    manifest = load_manifest(tiny.model)
    task = PRESETS["sst2"] if arch.startswith("Roberta") else decoder_task(position="suffix")
    prompt = random_prompt(manifest, task, "bbt", seed=3)
    save_model(build_classifier(manifest, prompt).model, tmp_path / "classifier.onnx")
    clf = session(tmp_path / "classifier.onnx")

    def run(texts):
        return clf.run(["probabilities", "label"], {"text": texts})

    probabilities, label = run(np.array([], dtype=object))
    assert probabilities.shape == (0, 2) and label.shape == (0,)
    model = Model.load(tiny.model)
    huge = ("a long review , " * 70_000)[:999_000]
    texts = ["", "   \n\t ", huge, "good film"]
    # predict refuses an empty text; the runtime's encoder gives it the template alone, as the graph does
    enc = prompt.encoder(model).encode([Example(t.strip()) for t in texts])
    want = np.array([[p.probabilities[k] for k in task.label_keys] for p in prompt.predict(model, enc)])
    probabilities, _ = run(np.array(texts, dtype=object))
    assert np.abs(probabilities - want).max() < TOLERANCE  # empty: the template alone; huge: cut to max length
    raw = np.array(["good film".encode(), b"caf\xe9 \xff\xfe film", b"\xc3("])  # numpy bytes: passed as they are
    probabilities, label = run(raw)
    assert np.allclose(probabilities[0], want[3], atol=TOLERANCE) and np.isfinite(probabilities).all()
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5) and set(label) <= {0, 1}
    cut, _ = run(np.array(["good\x00 never seen", "good"], dtype=object))  # a text ends at its first NUL
    assert np.allclose(cut[0], cut[1], atol=1e-7)


def test_the_in_graph_tokenizer_runs_a_real_tokenizer_with_bytes_outside_its_vocabulary(exports, tmp_path):
    """A byte-level vocabulary without some bytes (SmolLM2's lacks a few control characters): the runtime's
    unknown token, runs of them fused, as the deploy check shows on its probe rows."""
    assert any("\x04" in p for p in PROBES)
    tiny = exports.get("LlamaForCausalLM")
    model = shutil.copytree(tiny.model, tmp_path / "model")
    tj = json.loads((model / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    missing = ["Ą", "ĉ"]  # bytes 0x04 and 0x09 (tab) in the byte-level alphabet
    for token in missing:  # the ids stay (gaps in them crash the op, and are refused), the byte goes
        vocab[token * 3] = vocab.pop(token)
    tj["model"]["merges"] = [m for m in tj["model"]["merges"]
                             if not any(t in (m if isinstance(m, str) else "".join(m)) for t in missing)]
    tj["model"]["unk_token"], tj["model"]["fuse_unk"] = "<unk>", True
    (model / "tokenizer.json").write_text(json.dumps(tj))
    manifest = load_manifest(model)
    prompt = random_prompt(manifest, decoder_task(), "bbt")
    prompt.save(tmp_path / "run.npz")
    summary = deploy(DeployOptions(str(model), str(tmp_path / "run.npz"), tmp_path / "out"))
    assert summary["inputs"] == ["text"] and summary["check"]["max_abs_diff"] < TOLERANCE


# -- mistakes: one error line, OUT untouched ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mistakes(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-mistakes")
    roberta, bert = exports.get("RobertaForMaskedLM"), exports.get("BertForMaskedLM")
    p = {"root": root, "model": roberta.model, "bert": bert.model}
    p["fp32_only"] = without_graphs(roberta.model, root / "fp32-only", lambda key: key == "fp32")
    manifest = load_manifest(roberta.model)
    for name, status in (("run", "complete"), ("going", "running")):
        run = root / name
        run.mkdir()
        random_prompt(manifest, PRESETS["sst2"], "bbt").save(run)
        (run / "run.json").write_text(json.dumps({"status": status, "settings": {}}))
    random_prompt(load_manifest(bert.model), PRESETS["sst2"], "bbt").save(root / "bert-run.npz")
    random_prompt(load_manifest(p["fp32_only"]), PRESETS["sst2"], "bbt").save(root / "fp32-run.npz")
    out = root / "out"
    out.mkdir()
    (out / "classifier.onnx").write_text("an earlier deployment")
    p["out"] = out
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("not a deployment")
    return p


def snapshot(root: Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() if f.is_file() else None for f in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args, match", [
    (["--prompt", "{root}/bert-run.npz", "--out", "{root}/new"], "tuned on another model"),
    (["--prompt", "{root}/going", "--out", "{root}/new"], "has not finished"),
    (["--prompt", "{root}/run", "--out", "{out}"], "not empty; pass --force"),
    (["--prompt", "{root}/run", "--out", "{out}/classifier.onnx/x", "--force"], "is a file"),
    (["--prompt", "{root}/run", "--out", "{root}/notes", "--force"], "does not look like a deployed classifier"),
    (["--prompt", "{root}/run", "--out", "{root}/run", "--force-any"], "run"),
    (["--prompt", "{root}/fp32-run.npz", "--out", "{out}", "--force", "--precision", "int8", "--model",
      "{root}/fp32-only"],
     "no int8 graph"),
    (["--prompt", "{root}/missing", "--out", "{out}", "--force"], "does not exist"),
    (["--prompt", "{root}/run", "--out", "{out}", "--force", "--max-length", "8"], "no room for text"),
    (["--prompt", "{root}/run", "--out", "{out}", "--force", "--max-length", "4000"], "more than the model's"),
])
def test_deploy_mistake_is_one_error_line_and_out_is_untouched(mistakes, args, match):
    root, out = mistakes["root"], mistakes["out"]
    argv = ["deploy", "--model", mistakes["model"]] if "--model" not in args else ["deploy"]
    argv += [a.format(root=root, out=out) for a in args]
    before = snapshot(root)
    assert match in cli_error(argv)
    assert snapshot(root) == before


def test_a_run_that_is_still_going_is_refused(mistakes):
    root = mistakes["root"]
    fd = os.open(root / "run", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a tune holds its run directory
        before = snapshot(root)
        assert "still going" in cli_error(["deploy", "--model", mistakes["model"], "--prompt", root / "run",
                                           "--out", root / "new"])
        assert snapshot(root) == before
    finally:
        os.close(fd)


def test_a_tokenizer_the_graph_cannot_run_is_refused_with_input_text_and_gets_ids_by_default(mistakes, tmp_path):
    bert = load_manifest(mistakes["bert"])
    prompt = random_prompt(bert, PRESETS["sst2"], "bbt")
    with pytest.raises(SettingsError, match="WordPiece.*deploy with ids instead") as caught:
        build_classifier(bert, prompt, inputs="text")
    assert caught.value.arguments == ("inputs",) and "--" not in str(caught.value)
    assert build_classifier(bert, prompt).inputs == "ids"


def test_int8_and_fp16_classifiers_build_from_the_models_graphs(mistakes, tmp_path):
    for precision in ("int8", "fp16"):
        summary = deploy(DeployOptions(str(mistakes["model"]), str(mistakes["root"] / "run"), tmp_path / precision,
                                       precision=precision))
        assert summary["precision"] == precision and (tmp_path / precision / "classifier.onnx").is_file()
        assert summary["check"].get("max_abs_diff", 0) < 1e-2


def test_deploy_refuses_a_model_changed_after_the_prompt_was_tuned(mistakes, tmp_path):
    model = shutil.copytree(mistakes["model"], tmp_path / "model")
    tokenizer = model / "tokenizer.json"  # the fingerprint covers the tokenizer
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    with pytest.raises(PromptError, match="another model"):
        deploy(DeployOptions(str(model), str(mistakes["root"] / "run"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()
