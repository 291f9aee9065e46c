"""A tuned prompt: z, the P x H embeddings A.z, and what is needed to use and rebuild them."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import losses
from .data import Example, as_examples
from .encoding import EncodedSet
from .engines.base import score_rows
from .errors import DataError, PromptError, SettingsError
from .fileio import write_bytes_atomic
from .methods import METHODS
from .subspace import ProjectionSpec
from .tasks import Task

PROMPT_NAME = "prompt.npz"
EVAL_ROWS = 64  # rows per engine call when scoring a dev/test set


def as_ids(ids) -> tuple[int, ...] | None:
    return None if ids is None else tuple(int(i) for i in ids)


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Evaluation:
    """A prompt's scores on labelled rows (`TunedPrompt.evaluate`)."""

    metric_name: str
    metric: float
    accuracy: float
    ce_loss: float
    rows: int
    truncated_rows: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TunedPrompt:
    z: np.ndarray  # [d]
    embeds: np.ndarray  # [P, H] float32, = A.z
    projection: ProjectionSpec
    task: Task
    model_fingerprint: str = ""
    placeholder_ids: tuple[int, ...] | None = None  # None: the model's own, manifest.placeholder_ids[:P]
    max_length: int | None = None  # tokens per row it was tuned with; None: the model's positions
    method: str = "bbt"  # "bbtv2": z is [L, d] and embeds [L, P, H], one prompt per layer's input
    layer_std: tuple[float, ...] = ()  # BBTv2: each layer's projection scale, to rebuild its A

    @property
    def deep(self) -> bool:
        """Scored on the deep-prompt graph (BBTv2's prompt on every layer)."""
        return METHODS[self.method].deep

    @property
    def prompt_tokens(self) -> int:
        return int(self.embeds.shape[-2])

    @classmethod
    def zero(cls, spec: ProjectionSpec, task: Task, model_fingerprint: str = "",
             placeholder_ids=None) -> "TunedPrompt":
        """z = 0: the manual template with the placeholder tokens' own embeddings."""
        return cls(np.zeros(spec.intrinsic_dim), np.zeros((spec.prompt_tokens, spec.hidden_size), np.float32),
                   spec, task, model_fingerprint, as_ids(placeholder_ids))

    # -- files ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PROMPT_NAME
        if not (np.isfinite(self.z).all() and np.isfinite(self.embeds).all()):
            raise PromptError("the prompt holds NaN or infinite numbers; it is not saved (check --alpha, --sigma "
                              "and the model's embedding_std)")
        meta = {"projection": self.projection.to_json(), "task": self.task.to_json(),
                "model_fingerprint": self.model_fingerprint, "seed": self.projection.seed,
                "placeholder_ids": None if self.placeholder_ids is None else list(self.placeholder_ids),
                "max_length": self.max_length, "method": self.method, "layer_std": list(self.layer_std)}
        buf = io.BytesIO()
        np.savez(buf, prompt=self.embeds, z=self.z, meta=np.array(json.dumps(meta)))
        write_bytes_atomic(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TunedPrompt":
        path = Path(path)
        if path.is_dir():
            from .runs import RunDir

            path = RunDir(path).file(PROMPT_NAME)  # a run a --force replacement left aside is still the run
        if not path.is_file():
            raise PromptError(f"{path} does not exist: give a run directory written by `bbt-onnx tune`")
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                embeds, z = f["prompt"].astype(np.float32), f["z"].astype(np.float64)
            spec = ProjectionSpec(**meta["projection"])
            task = Task.from_json(meta["task"])
            prompt = cls(z, embeds, spec, task, str(meta.get("model_fingerprint") or ""),
                         as_ids(meta.get("placeholder_ids")), meta.get("max_length"), str(meta.get("method", "bbt")),
                         tuple(float(v) for v in meta.get("layer_std", ())))
        except Exception as exc:  # noqa: BLE001 - a damaged zip or field can raise almost any type
            raise PromptError(f"{path} is not a bbt-onnx prompt file, or it is damaged ({type(exc).__name__}); "
                              "tune again or restore it") from None
        layers = METHODS[prompt.method].prompt_dims(len(prompt.layer_std)) if prompt.method in METHODS else ()
        if prompt.method not in METHODS or embeds.shape != (*layers, spec.prompt_tokens, spec.hidden_size) \
                or z.shape != (*layers, spec.intrinsic_dim) or not (np.isfinite(z).all() and np.isfinite(embeds).all()):
            raise PromptError(f"{path} is damaged: its arrays do not match its own description")
        return prompt

    # -- use -----------------------------------------------------------------
    def encoder(self, model):
        return model.encoder(self.task, self.prompt_tokens, self.max_length, self.placeholder_ids)

    def check_model(self, model) -> None:
        """Refuse a model other than the one this prompt was tuned on: its numbers mean nothing there."""
        m = model.manifest
        if self.embeds.shape[-1] != m.hidden_size:
            raise PromptError(f"this prompt has hidden size {self.embeds.shape[-1]} but the model has "
                              f"{m.hidden_size}: it was tuned for another model")
        if self.embeds.shape[:-2] != METHODS[self.method].prompt_dims(m.num_layers):
            raise PromptError(f"this {self.method} prompt has {self.embeds.shape[0]} layers but the model has "
                              f"{m.num_layers}: it was tuned for another model")
        if self.model_fingerprint and not m.is_model(self.model_fingerprint):
            raise PromptError(f"this prompt was tuned on another model than {m.directory} (manifest fingerprint "
                              f"{self.model_fingerprint[:12]}, this model's {m.fingerprint()[:12]}); use the model "
                              "directory it was tuned on")
        if self.prompt_tokens > m.prompt_tokens:
            raise PromptError(f"this prompt has {self.prompt_tokens} tokens; the model was exported for at most "
                              f"{m.prompt_tokens}")

    def encode(self, model, rows: Sequence[Example | str] | EncodedSet) -> EncodedSet:
        """Rows as this prompt frames them on `model`: Example rows, or plain texts."""
        return rows if isinstance(rows, EncodedSet) else self.encoder(model).encode(as_examples(rows))

    def logits(self, model, rows: Sequence[Example | str] | EncodedSet, batch_rows: int = EVAL_ROWS,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """[N, K] label logits for every row (Example rows or plain texts), in the rows' order, scored in
        length-sorted batches; `on_batch(rows)` hears of each batch done."""
        self.check_model(model)
        return score_rows(self.scorer(model), self.encode(model, rows), batch_rows, on_batch)

    def scorer(self, model) -> Callable[[EncodedSet], np.ndarray]:
        """rows -> [1, N, K] on the model's engine, as the prompt's method scores it."""
        return METHODS[self.method].scorer(model.engine, self.embeds)

    def evaluate(self, model, rows: Sequence[Example] | EncodedSet, batch_rows: int = EVAL_ROWS,
                 on_batch: Callable[[int], None] | None = None) -> Evaluation:
        """The task's metric, accuracy and cross-entropy on labelled rows."""
        self.check_model(model)
        enc = self.encode(model, rows)
        if (enc.labels < 0).any():
            raise DataError("every row needs a label to be evaluated", "rows")
        logits = score_rows(self.scorer(model), enc, batch_rows, on_batch)  # the model was checked above
        return Evaluation(self.task.metric, float(losses.metric(self.task.metric, logits, enc.labels)[0]),
                          float(losses.accuracy(logits, enc.labels)[0]),
                          float(losses.cross_entropy(logits, enc.labels)[0]), len(enc), enc.truncated)

    def predict(self, model, rows: Sequence[Example | str] | EncodedSet, batch_rows: int = EVAL_ROWS,
                on_batch: Callable[[int], None] | None = None) -> list[Prediction]:
        logits = self.logits(model, rows, batch_rows, on_batch)
        probs = np.exp(losses.log_softmax(logits.astype(np.float64)))
        keys = self.task.label_keys
        return [Prediction(keys[int(p.argmax())], {k: float(v) for k, v in zip(keys, p)}) for p in probs]


def load_run_prompt(run: str | Path | None, no_prompt: bool = False, task_given: bool = False,
                    prompt_tokens: int | None = None) -> TunedPrompt | None:
    """The tuned prompt of a run (z = 0 in its place with `no_prompt`), or None when there is no run and the
    template alone is scored; a run brings its own task and prompt length."""
    if run is None:
        if not no_prompt:
            raise SettingsError("give --prompt RUN_DIR, or --no-prompt with a task to score the manual template")
        return None
    if task_given:
        raise SettingsError("--task/--template/--labels/--task-file/--metric/--bos/--chat/--prompt-position come "
                            "from the run with --prompt; drop them")
    if prompt_tokens is not None:
        raise SettingsError("--prompt-tokens comes from the run with --prompt; drop it")
    prompt = TunedPrompt.load(run)
    return TunedPrompt.zero(prompt.projection, prompt.task) if no_prompt else prompt


def template_prompt(manifest, task: Task, prompt_tokens: int | None = None) -> TunedPrompt:
    """z = 0 without a run: the manual template after the model's placeholder tokens (`prompt_tokens` of them,
    0 for the template alone)."""
    if prompt_tokens is not None and prompt_tokens > manifest.prompt_tokens:
        raise SettingsError(f"prompt_tokens {prompt_tokens} is more than the {manifest.prompt_tokens} this model "
                            "was exported for", "prompt_tokens")
    spec = ProjectionSpec(0, 1, manifest.prompt_tokens if prompt_tokens is None else prompt_tokens,
                          manifest.hidden_size, manifest.embedding_std)
    return TunedPrompt.zero(spec, task)
