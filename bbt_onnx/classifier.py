"""A run's result bound to its model, loaded once: `predict(texts)`, `predict_proba(texts)` and `evaluate(rows)`.

The same code paths as `bbt-onnx predict` and `bbt-onnx evaluate` (prompt.py's `label_rows` and `Scoring.evaluate`,
on rows encoded by the result's own encoder), so a classifier's labels, probabilities and scores are the
commands' own, to the bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .data import Example, as_examples, check_labels, read_examples, rows_to_examples
from .engines import EngineSpec, OrtSpec
from .errors import DataError, PromptError
from .model import Model
from .prompt import Evaluation, Prediction, Result, label_rows, load_prompt
from .tasks import Task

Text = Union[str, tuple[str, str], Example]  # a text, a (text, text_b) pair for pair tasks, or an Example row
Texts = Union[str, Sequence[Text]]  # one text alone is one row


def as_rows(texts: Texts) -> list[Example]:
    """Texts as predict reads them from a file: strings, (text, text_b) pairs or Example rows; whitespace around
    each text stripped, empty or oversized texts refused (DataError)."""
    if isinstance(texts, (str, Example)):
        texts = [texts]
    try:
        items = list(texts)
    except TypeError:
        raise DataError(f"texts must be a list of strings or (text, text_b) pairs, got {type(texts).__name__}",
                        "texts") from None
    if not items:
        raise DataError("no texts", "texts")
    rows: list[dict | Example] = []
    for i, item in enumerate(items, start=1):
        if isinstance(item, Example):
            rows.append(item)
        elif isinstance(item, str):
            rows.append({"text": item})
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item):
            rows.append({"text": item[0], "text_b": item[1]})
        else:
            raise DataError(f"text {i} is a {type(item).__name__}; give strings, (text, text_b) pairs of strings "
                            "or Example rows", "texts")
    plain = [r for r in rows if isinstance(r, dict)]
    given = [r for r in rows if isinstance(r, Example)]
    plain_rows = iter(rows_to_examples(plain, ["text", "text_b"], "the texts", need_label=False) if plain else [])
    given_rows = iter(as_examples(given) if given else [])  # their fields' types checked, labels as strings
    return [next(plain_rows) if isinstance(r, dict) else next(given_rows) for r in rows]


class Classifier:
    """A run's result (its tuned prompt, the seeds' ensemble, or the template it kept) with its model, opened once.

    `Classifier.load(model_dir, run)` opens both; `Classifier(model, result)` binds ones already loaded."""

    def __init__(self, model: Model, result: Result, source: str | Path | None = None):
        result.check_model(model)
        if result.deep and not model.engine.deep:
            raise PromptError("this result is a BBTv2 prompt, scored on the deep graph: open the model with "
                              "Model.load(dir, spec, deep=True), or use Classifier.load")
        self.model = model
        self.result = result
        self.source = None if source is None else Path(source).resolve()  # the run (or prompt file) it came from

    @classmethod
    def load(cls, model_dir: str | Path, run: str | Path, engine: EngineSpec = OrtSpec()) -> "Classifier":
        """The result in `run` (a run directory written by tune, or a prompt file) on the model in `model_dir`,
        opened on `engine` (onnxruntime on the CPU by default; the deep graph when the result needs it)."""
        result = load_prompt(run)
        model = Model.load(Path(model_dir).resolve(), engine, deep=result.deep)  # found again after a chdir
        return cls(model, result, run)

    @property
    def task(self) -> Task:
        return self.result.task

    @property
    def labels(self) -> tuple[str, ...]:
        """The label names, in class order: `predict`'s values and `predict_proba`'s columns."""
        return self.result.task.label_keys

    def predictions(self, texts: Texts) -> list[Prediction]:
        """Each text's label and per-label probabilities: `bbt-onnx predict`'s lines."""
        rows = as_rows(texts)
        enc = self.result.encoder(self.model).encode(rows)
        if self.source is None:
            return self.result.predict(self.model, enc)
        return label_rows(self.result, self.model, rows, enc, self.source)

    def predict(self, texts: Texts) -> list[str]:
        """Each text's label name."""
        return [p.label for p in self.predictions(texts)]

    def predict_proba(self, texts: Texts) -> np.ndarray:
        """[N, K] label probabilities (float64), columns in `labels`' order; each row sums to 1."""
        return np.array([[p.probabilities[k] for k in self.labels] for p in self.predictions(texts)], np.float64)

    def evaluate(self, rows: str | Path | Sequence[Example]) -> Evaluation:
        """The task's metric, accuracy and cross-entropy on labelled rows: Example rows, or a labelled CSV, TSV or
        JSONL file (`bbt-onnx evaluate --data`)."""
        if isinstance(rows, (str, Path)):
            source, examples = str(rows), read_examples(rows)
        else:
            source, examples = "the input", as_rows(rows)
            missing = next((i for i, r in enumerate(examples, start=1) if r.label is None), None)
            if missing is not None:
                raise DataError(f"row {missing} has no label; evaluate needs labelled rows", "rows")
        check_labels(examples, self.labels, source)
        enc = self.result.encoder(self.model).encode(examples)
        return self.result.evaluate(self.model, enc)

    def __repr__(self) -> str:
        return (f"Classifier({self.result.origin}, task {self.task.name!r}, labels {list(self.labels)}, "
                f"{self.model.engine.provider})")
