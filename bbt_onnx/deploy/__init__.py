"""`bbt-onnx deploy`: a tuned prompt shipped as one ONNX graph from text to label.

`build.build_classifier(manifest, prompt, precision, inputs)` makes the graph (the tokenizer in front when
onnxruntime-extensions can run it, `front.py`; else token ids in, with the standalone recipe `recipe.py`); `deploy`
is the command's job: the prompt and model checked, the graph built, checked against the runtime's own encoding
and scores on probe rows, and OUT written whole or not at all.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import Example
from ..devices import PRECISIONS, precision_of
from ..encoding import Encoder, load_tokenizer
from ..engines.served import CLASSIFY_SUFFIX, check_name, served_name
from ..errors import ModelError, PromptError, RunError, SettingsError
from ..fileio import (OutputKind, check_replaceable, only_files, sha256_file, write_dir, write_json_atomic,
                      write_text_atomic)
from ..manifest import Manifest, load_manifest
from ..model_repository import REPOSITORY
from ..options import setting
from ..prompt import Blend, PromptEnsemble, Result, load_prompt, prompts_of
from ..runs import RUN_JSON, RunDir, result_file
from .extensions import extensions_library
from .build import INPUTS, Classifier, build_classifier, front_model, onnx_module, save_model
from .recipe import encode as recipe_encode

FORMATS = ("onnx", "triton")
TRITON_BACKENDS = ("onnxruntime", "python")
SCORED_LENGTH = 512  # the longest probe row also scored in the check
CLASSIFIER = "classifier.onnx"
RECIPE = "recipe.json"
ENCODER_SCRIPT = "encode.py"
TOKENIZER = "tokenizer.json"
# rows the built graph is checked on before OUT is written: the runtime's encoding and scores must come out
PROBES = (
    "a gripping, beautifully acted film that never lets go .",
    "the plot is thin and the jokes fall flat",
    "It's a 1999 remake -- 2 hours, 15 minutes; worth $10? no!",
    "café naïve résumé über straße jalapeño Zürich",
    "東京 日本語 привет мир 😀 🎉 👍🏽 🤖 … — “quoted” ‘single’",
    "tabs\tand\nnewlines  and   spaces",
    "don't I'M we'VE O'Neil's 's",
    "<s> </s> <mask> <pad> [CLS] [MASK] <|endoftext|> <|im_start|>",
    "a<mask>b <mask>c d <mask>",
    "trailing punctuation?!...",
    "((nested)) [brackets] {braces} <angles> http://x.y/z?q=1 e-mail@host.com",
    "1234567890 3.14159 1,000,000 2024-01-01",
    "x",
    "a\x04b x\x13\x14y",
)  # no empty text: predict refuses one (the graph gives it the template alone)


def long_probe(tokens: int) -> str:
    """A text longer than `tokens`, with whitespace runs in it, so that truncation is exercised."""
    words = "the film keeps its  nerve until the end ,\nand the cast makes it work .".split(" ")
    return " ".join(words[i % len(words)] for i in range(tokens + 20))


def session(path: Path, threads: int | None = None, extensions: bool = True):
    """An onnxruntime CPU session over a classifier, with onnxruntime-extensions' ops registered (a classifier
    that takes ids needs none)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if extensions:
        opts.register_custom_ops_library(extensions_library())
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class DeployOptions:
    model_dir: str
    prompt: str
    out: Path
    precision: str = setting("fp32", "Which of the model's graphs the classifier is built on.",
                             choices=tuple(PRECISIONS))
    output_format: str = setting("onnx", "onnx: OUT/classifier.onnx, one graph from text to label; triton: OUT is a "
                                 "model repository with the classifier as NAME.classify (texts in, dynamic batching).",
                                 choices=FORMATS, flag="--format")
    backend: str = setting("onnxruntime", "With --format triton: a stock tritonserver's onnxruntime backend (the "
                           "onnxruntime-extensions library named in the config), or python (onnxruntime inside "
                           "Triton's python backend, every request checked first).", choices=TRITON_BACKENDS)
    name: str | None = setting(None, "With --format triton: the served name [default: the model's served name + "
                               "'.classify'].")
    op_library: str | None = setting(None, "With --format triton --backend onnxruntime: where the server finds "
                                     "onnxruntime-extensions' custom-op library [default: its path here].")
    inputs: str = setting("auto", "text: the tokenizer inside the graph (byte-level BPE models); ids: the graph "
                          "takes token ids, with encode.py, recipe.json and tokenizer.json beside it; auto: text "
                          "where onnxruntime-extensions can run the model's tokenizer, else ids.", choices=INPUTS,
                          flag="--input")
    max_length: int | None = setting(None, "Tokens per row at most; a longer text is cut to fit, as predict cuts "
                                     "it [default: the prompt's, as predict: for a model tuned without "
                                     "--max-length its full positions, which a 1 MB text then costs].", minimum=1)
    force: bool = setting(False, "Replace an earlier deploy's --out.")
    force_any: bool = setting(False, "Replace --out even when it does not look like a deploy's output (everything "
                              "in it is deleted).")


    def check(self) -> "DeployOptions":
        if self.output_format not in FORMATS:
            raise SettingsError(f"output_format {self.output_format!r} is not one of {', '.join(FORMATS)}",
                                "output_format")
        if self.backend not in TRITON_BACKENDS:
            raise SettingsError(f"backend {self.backend!r} is not one of {', '.join(TRITON_BACKENDS)}", "backend")
        if self.output_format != "triton" and (self.name or self.op_library or self.backend != "onnxruntime"):
            raise SettingsError("backend, name and op_library describe a model repository: add output_format triton",
                                ("backend", "name", "op_library", "output_format"))
        if self.name is not None:
            check_name(self.name)
        return self


# what deploy writes; `force` replaces only a folder that holds nothing else
OUTPUT = OutputKind("a deployed classifier (`bbt-onnx deploy`)", lambda d: only_files(
    d, lambda n: n in (CLASSIFIER, CLASSIFIER + ".data", RECIPE, ENCODER_SCRIPT, TOKENIZER), (CLASSIFIER,)))


def finished_result(path: str | Path) -> tuple[Result, Path]:
    """What a finished run kept (a tuned prompt, the seeds' ensemble or a plain template), or a prompt file, and its
    file; a run that is still going, or that stopped before its end, is refused: its result is not final."""
    path = Path(path)
    if path.is_dir() and RunDir(path).file(RUN_JSON).is_file():
        run = RunDir(path)
        try:
            run.check_idle()
        except RunError:
            raise RunError(f"{path} is a run that is still going; deploy its result once the tune has finished") \
                from None
        status = run.read_json().get("status")
        if status != "complete":
            raise RunError(f"{path} is a run that has not finished (status {status!r}): its result is not final; "
                           f"finish it with `bbt-onnx tune --resume {path}` first")
    return load_prompt(path), result_file(path)


def with_max_length(result: Result, max_length: int) -> Result:
    if isinstance(result, Blend):
        return replace(result, members=tuple(with_max_length(m, max_length) for m in result.members))
    if isinstance(result, PromptEnsemble):
        return replace(result, members=tuple(replace(m, max_length=max_length) for m in result.members))
    return replace(result, max_length=max_length)


class _Manifested:
    """What TunedPrompt.check_model reads of a model: its manifest."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest


def probe_rows(clf: Classifier) -> list[Example]:
    texts = list(PROBES) + [long_probe(clf.recipe["max_length"])]
    pair = "text_b" in clf.recipe["fields"]
    return [Example(t, texts[-1 - i] if pair else None) for i, t in enumerate(texts)]


def check_encoding(clf: Classifier, manifest: Manifest, prompt: Result, staging: Path,
                   rows: list[Example]) -> None:
    """The graph's rows (or the recipe's) are the runtime's, token for token, on the probe rows."""
    tokenizer = load_tokenizer(manifest)
    enc = Encoder(tokenizer, manifest, prompt.task, prompt.prompt_tokens, prompt.max_length,
                  prompt.placeholder_ids).encode(rows).whole()  # the demonstrations' ids written out in each row
    texts = np.array([r.text for r in rows], dtype=object)
    texts_b = np.array([r.text_b or "" for r in rows], dtype=object)
    if clf.inputs == "text":
        front = staging / ".front.onnx"
        save_model(front_model(manifest, clf.recipe), front)
        feeds = {"text": texts, **({"text_b": texts_b} if "text_b" in clf.recipe["fields"] else {})}
        sess = session(front)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        front.unlink()
    else:
        got = recipe_encode(clf.recipe, tokenizer, texts, texts_b if "text_b" in clf.recipe["fields"] else None)
    want = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "mask_pos": enc.mask_pos,
            "prompt_pos": enc.prompt_pos}
    for name, value in got.items():
        same = value.shape == want[name].shape and np.array_equal(value, want[name])
        if not same:
            bad = next((i for i in range(len(rows)) if value.shape != want[name].shape
                        or not np.array_equal(value[i], want[name][i])), 0)
            raise ModelError(f"the classifier's {name} differ from bbt-onnx's encoding (first on the row "
                             f"{rows[bad].text[:60]!r}); this tokenizer cannot run in the graph: deploy with "
                             "inputs ids", "inputs")


def check_scores(clf: Classifier, path: Path, manifest: Manifest, prompt: Result, precision: str,
                 rows: list[Example]) -> dict:
    """The classifier's probabilities against the runtime's predictions on the same graph, on the probe rows, within
    the precision's probe tolerance: in one batch, or row by row where scores depend on the batch (int8's
    activation scales)."""
    from ..engines.ort import OrtEngine
    from ..model import Model

    try:
        engine = OrtEngine(manifest, precision=precision, deep=prompt.deep, kv_cache=False)
    except ModelError as exc:
        return {"skipped": str(exc)}
    model = Model(manifest, load_tokenizer(manifest), engine)
    sess = session(path, extensions=clf.inputs == "text")
    pair = "text_b" in clf.recipe["fields"]

    def classify(batch: list[Example]) -> np.ndarray:
        if clf.inputs == "text":
            feeds = {"text": np.array([r.text for r in batch], dtype=object)}
            if pair:
                feeds["text_b"] = np.array([r.text_b for r in batch], dtype=object)
        else:
            feeds = recipe_encode(clf.recipe, model.tokenizer, [r.text for r in batch],
                                  [r.text_b for r in batch] if pair else None)
        return sess.run(["probabilities"], feeds)[0]

    def predict(batch: list[Example]) -> np.ndarray:
        return np.array([[p.probabilities[k] for k in clf.labels] for p in prompt.predict(model, batch)])

    record = precision_of(precision)
    batches = [[r] for r in rows] if record.batch_dependent else [rows]
    diff = max(float(np.abs(classify(b) - predict(b)).max()) for b in batches)
    tolerance = record.probe_tolerance
    if not diff <= tolerance:
        raise ModelError(f"the classifier's probabilities differ from bbt-onnx predict's by {diff:.2e} on the probe "
                         f"rows (tolerance {tolerance:g}): a bug in deploy; please report it")
    return {"rows": len(rows), "max_abs_diff": diff}


def prepare(manifest: Manifest, result_path: str | Path, precision: str = "fp32", inputs: str = "auto",
            max_length: int | None = None) -> tuple[Classifier, Result]:
    """The classifier of a finished run's result on this model, built (not yet written or checked); every refusal
    (another model, a run still going, a missing extra) comes here."""
    onnx_module()
    prompt, prompt_file = finished_result(result_path)
    prompt.check_model(_Manifested(manifest))
    if max_length is not None:
        if max_length > manifest.max_positions:  # cut silently to the model's, it would not be what was asked
            raise SettingsError(f"max_length {max_length} is more than the model's {manifest.max_positions} positions; "
                                "leave it out to use them all", "max_length")
        prompt = with_max_length(prompt, max_length)
    if not all(m.model_fingerprint for m in prompts_of(prompt)):
        raise PromptError(f"{prompt_file} does not name the model it was tuned on (no fingerprint); deploy needs a "
                          "prompt written by `bbt-onnx tune`")
    clf = build_classifier(manifest, prompt, precision, inputs, sha256_file(prompt_file))
    if clf.inputs == "text":
        extensions_library()  # the check runs the graph: refused here, before anything is written, when missing
    return clf, prompt


def encoder_script() -> str:
    """recipe.py as encode.py: its one import from bbt-onnx replaced by that function's source, so that the file
    runs with numpy and tokenizers alone while the rule itself has one home (`truncation.py`)."""
    import inspect

    from .. import truncation
    from . import recipe

    text = Path(recipe.__file__).read_text(encoding="utf-8")
    line = next(x for x in text.splitlines(keepends=True) if x.startswith("from ..truncation import truncation_plan"))
    return text.replace(line, "\n" + inspect.getsource(truncation.truncation_plan) + "\n")


def write_checked(folder: Path, clf: Classifier, manifest: Manifest, prompt: Result, precision: str) -> dict:
    """classifier.onnx (and, for an ids graph, its recipe, tokenizer and encode.py) in `folder`, then checked there
    against the runtime on the probe rows; the check's report."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLASSIFIER
    save_model(clf.model, path)
    if clf.inputs == "ids":
        write_json_atomic(folder / RECIPE, clf.recipe)
        shutil.copyfile(manifest.tokenizer_path, folder / TOKENIZER)
        write_text_atomic(folder / ENCODER_SCRIPT, encoder_script())
    rows = probe_rows(clf)
    for part, member in zip(clf.parts, prompt.members) if isinstance(prompt, Blend) else [(clf, prompt)]:
        check_encoding(part, manifest, member, folder, rows)
    # a row as long as the model's positions costs seconds in a real model's graph: scored only when short
    scored = rows if clf.recipe["max_length"] <= SCORED_LENGTH else rows[:-1]
    return check_scores(clf, path, manifest, prompt, precision, scored)


def deploy(opts: DeployOptions, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Build, check and write OUT (a folder with classifier.onnx, or a Triton model repository); every refusal
    comes before OUT is touched."""
    from .triton import ClassifierModel, add_classifier

    opts.check()
    out = Path(opts.out)
    kind = REPOSITORY if opts.output_format == "triton" else OUTPUT
    inputs = [("model directory", Path(opts.model_dir)), ("run", Path(opts.prompt))]
    check_replaceable(out, opts.force, kind, opts.force_any, inputs)  # before anything is read
    manifest = load_manifest(opts.model_dir)
    clf, prompt = prepare(manifest, opts.prompt, opts.precision, opts.inputs, opts.max_length)
    for note in clf.notes:
        log(note)
    served = ClassifierModel(opts.name or f"{served_name(manifest)}{CLASSIFY_SUFFIX}", clf, opts.backend,
                             op_library=opts.op_library)
    report: dict = {}

    def fill(staging: Path) -> None:
        if opts.output_format == "triton":
            report.update(add_classifier(staging, served, lambda folder: write_checked(
                folder, clf, manifest, prompt, opts.precision)))
        else:
            report.update(write_checked(staging, clf, manifest, prompt, opts.precision))

    log(f"building the {opts.precision} classifier ({clf.inputs} in) and checking it against bbt-onnx predict")
    write_dir(out, opts.force, fill, kind, opts.force_any, inputs)
    where = out / served.name / "1" / CLASSIFIER if opts.output_format == "triton" else out / CLASSIFIER
    return {"out": str(out), "classifier": str(where), "inputs": clf.input_names,
            **({"triton_model": served.name, "backend": opts.backend} if opts.output_format == "triton" else {}),
            "outputs": ["probabilities", "label"], "labels": list(clf.labels), "precision": opts.precision,
            "method": prompt.method, "result": clf.metadata["result"],
            "tokenizer": "in the graph" if clf.inputs == "text" else f"outside: {ENCODER_SCRIPT} + {RECIPE} + {TOKENIZER}",
            "check": report, "metadata": {k: clf.metadata[k] for k in ("model_fingerprint", "prompt_sha256")}}
