"""What a run hands back, ready to score text: a tuned prompt (z, the P x H embeddings A z, and what is needed to
use and rebuild them), the plain template kept instead of it, or an ensemble of seeds' prompts; each optionally
calibrated. `load_prompt` reads any of them from a run; evaluate, predict, check and deploy take all three."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import losses
from .calibration import calibrated, content_free_prior
from .data import Example, as_examples
from .encoding import EncodedSet
from .engines.base import score_rows
from .errors import DataError, PromptError, SettingsError
from .fileio import NPZ_LIMIT, check_npz, read_bounded, write_bytes_atomic
from .methods import METHODS
from .runs import PROMPT_NAME, result_file
from .subspace import ProjectionSpec
from .tasks import Task

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


class Scoring:
    """What every result does with rows, on top of its `raw_logits` ([N, K]) and its calibration: logits,
    evaluate, predict, and its prior (computed once, then carried). A subclass has `task`, `calibration`,
    `check_model`, `encoder` and `raw_logits`."""

    def encode(self, model, rows: Sequence[Example | str] | EncodedSet) -> EncodedSet:
        """Rows as this prompt frames them on `model`: Example rows, or plain texts."""
        return rows if isinstance(rows, EncodedSet) else self.encoder(model).encode(as_examples(rows))

    def logits(self, model, rows: Sequence[Example | str] | EncodedSet, batch_rows: int = EVAL_ROWS,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """[N, K] label logits for every row (Example rows or plain texts), in the rows' order, scored in
        length-sorted batches (calibrated log-probabilities when the prompt is calibrated); `on_batch(rows)` hears
        of each batch done."""
        self.check_model(model)
        raw = self.raw_logits(model, self.encode(model, rows), batch_rows, on_batch)
        return raw if self.calibration is None else calibrated(raw, self.calibration).astype(np.float32)

    def evaluate(self, model, rows: Sequence[Example] | EncodedSet, batch_rows: int = EVAL_ROWS,
                 on_batch: Callable[[int], None] | None = None) -> Evaluation:
        """The task's metric, accuracy and cross-entropy on labelled rows."""
        self.check_model(model)
        enc = self.encode(model, rows)
        if (enc.labels < 0).any():
            raise DataError("every row needs a label to be evaluated", "rows")
        logits = self.logits(model, enc, batch_rows, on_batch)
        return Evaluation(self.task.metric, float(losses.metric(self.task.metric, logits, enc.labels)[0]),
                          float(losses.accuracy(logits, enc.labels)[0]),
                          float(losses.cross_entropy(logits, enc.labels)[0]), len(enc), enc.truncated)

    def predict(self, model, rows: Sequence[Example | str] | EncodedSet, batch_rows: int = EVAL_ROWS,
                on_batch: Callable[[int], None] | None = None) -> list[Prediction]:
        logits = self.logits(model, rows, batch_rows, on_batch)
        return predictions(np.exp(losses.log_softmax(logits.astype(np.float64))), self.task.label_keys)

    def prior(self, model) -> tuple[float, ...]:
        """This result's label prior on the content-free rows: the one it carries (computed once, when it was
        calibrated), else computed now (`prior_of`)."""
        return self.calibration if self.calibration is not None else prior_of(self, model)

    def calibrate(self, model) -> "Result":
        """This result with its label prior on the content-free rows (contextual calibration); one that carries
        its prior already is handed back as it is."""
        return self if self.calibration is not None else replace(self, calibration=prior_of(self, model))


def label_rows(result, model, rows: Sequence[Example], enc: EncodedSet, result_path: str | Path,
               log=lambda _m: None, on_batch: Callable[[int], None] | None = None) -> list[Prediction]:
    """Each row's label: through the server's classifier of this very result when `model` is served and the server
    has one (`serve --prompt`), else by scoring the rows with the result."""
    from .engines.triton import served_classifier

    classifier = served_classifier(model.engine, result, result_file(result_path), log)
    if classifier is None:
        return result.predict(model, enc, on_batch=on_batch)
    log(f"labelling through the server's classifier {classifier.model!r}")
    probs = classifier.probabilities([r.text for r in rows], [r.text_b or "" for r in rows])
    if on_batch:
        on_batch(len(enc))
    return predictions(probs, result.task.label_keys)


def predictions(probs: np.ndarray, keys: Sequence[str]) -> list[Prediction]:
    """[N, K] label probabilities as each row's label and per-label probabilities."""
    return [Prediction(keys[int(p.argmax())], {k: float(v) for k, v in zip(keys, p)}) for p in probs]


@dataclass(frozen=True)
class TunedPrompt(Scoring):
    z: np.ndarray  # [d]
    embeds: np.ndarray  # [P, H] float32, = A.z
    projection: ProjectionSpec
    task: Task
    model_fingerprint: str = ""
    placeholder_ids: tuple[int, ...] | None = None  # None: the model's own, manifest.placeholder_ids[:P]
    max_length: int | None = None  # tokens per row it was tuned with; None: the model's positions
    method: str = "bbt"  # "bbtv2": z is [L, d] and embeds [L, P, H], one prompt per layer's input
    layer_std: tuple[float, ...] = ()  # BBTv2: each layer's projection scale, to rebuild its A
    calibration: tuple[float, ...] | None = None  # log label prior on content-free rows, divided out when scoring
    origin: str = "tuned"  # "tuned", or the plain framing a run kept instead ("template (no BOS)": P = 0)

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

    @classmethod
    def template(cls, manifest, task: Task, name: str = "template") -> "TunedPrompt":
        """The plain template, no prompt slots (P = 0): what a user writes by hand."""
        spec = ProjectionSpec(0, 1, 0, manifest.hidden_size, manifest.embedding_std)
        return replace(cls.zero(spec, task, manifest.fingerprint()), origin=name)

    def zero_prompt(self) -> "TunedPrompt":
        """This prompt's z = 0: its template after its own placeholder tokens."""
        return TunedPrompt.zero(self.projection, self.task, self.model_fingerprint, self.placeholder_ids)

    # -- files ---------------------------------------------------------------
    def meta(self) -> dict:
        return {"projection": self.projection.to_json(), "task": self.task.to_json(),
                "model_fingerprint": self.model_fingerprint, "seed": self.projection.seed,
                "placeholder_ids": None if self.placeholder_ids is None else list(self.placeholder_ids),
                "max_length": self.max_length, "method": self.method, "layer_std": list(self.layer_std),
                "calibration": None if self.calibration is None else list(self.calibration), "origin": self.origin}

    def save(self, path: str | Path) -> Path:
        check_finite(self.z, self.embeds)
        return write_npz(path, {"prompt": self.embeds, "z": self.z}, self.meta())

    @classmethod
    def load(cls, path: str | Path) -> "TunedPrompt":
        prompt = load_prompt(path)
        if not isinstance(prompt, TunedPrompt):
            raise PromptError(f"{path} holds {prompt.origin}, of {len(prompt.members)} parts: load it with "
                              "load_prompt")
        return prompt

    @classmethod
    def from_arrays(cls, meta: dict, embeds: np.ndarray, z: np.ndarray, where: str) -> "TunedPrompt":
        try:
            spec = ProjectionSpec(**meta["projection"])
            task = Task.from_json(meta["task"])
            cal = meta.get("calibration")
            prompt = cls(z.astype(np.float64), embeds.astype(np.float32), spec, task,
                         str(meta.get("model_fingerprint") or ""), as_ids(meta.get("placeholder_ids")),
                         meta.get("max_length"), str(meta.get("method", "bbt")),
                         tuple(float(v) for v in meta.get("layer_std", ())),
                         None if cal is None else tuple(float(v) for v in cal), str(meta.get("origin", "tuned")))
        except Exception as exc:  # noqa: BLE001 - a damaged field can raise almost any type
            raise PromptError(f"{where} is not a bbt-onnx prompt file, or it is damaged ({type(exc).__name__}); "
                              "tune again or restore it") from None
        check_meta(meta, spec.prompt_tokens, where)
        layers = METHODS[prompt.method].prompt_dims(len(prompt.layer_std)) if prompt.method in METHODS else ()
        if prompt.method not in METHODS or embeds.shape != (*layers, spec.prompt_tokens, spec.hidden_size) \
                or z.shape != (*layers, spec.intrinsic_dim) or not (np.isfinite(z).all() and np.isfinite(embeds).all()) \
                or (prompt.calibration is not None and (len(prompt.calibration) != len(task.labels)
                                                        or not np.isfinite(prompt.calibration).all())):
            raise PromptError(f"{where} is damaged: its arrays do not match its own description")
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
        outside = [i for i in self.placeholder_ids or () if not 0 <= i < m.vocab_size]
        if outside:
            raise PromptError(f"this prompt's placeholder id {outside[0]} is outside the model's vocabulary "
                              f"(0..{m.vocab_size - 1}): it was tuned for another model, or its file is damaged")
        if self.max_length is not None and self.max_length > m.max_positions:
            raise PromptError(f"this prompt was tuned with max_length {self.max_length}, more than the model's "
                              f"{m.max_positions} positions: it was tuned for another model, or its file is damaged")

    def encode(self, model, rows: Sequence[Example | str] | EncodedSet) -> EncodedSet:
        """Rows as this prompt frames them on `model`: Example rows, or plain texts."""
        return rows if isinstance(rows, EncodedSet) else self.encoder(model).encode(as_examples(rows))

    def scorer(self, model) -> Callable[[EncodedSet], np.ndarray]:
        """rows -> [1, N, K] raw label logits on the model's engine, as the prompt's method scores it."""
        return METHODS[self.method].scorer(model.engine, self.embeds)

    def raw_logits(self, model, enc: EncodedSet, batch_rows: int = EVAL_ROWS, on_batch=None) -> np.ndarray:
        return score_rows(self.scorer(model), enc, batch_rows, on_batch)


class Members:
    """What a result made of several (an ensemble's prompts, a blend's results) reads off its first member, the
    task and the prompt's shape, and checks on every one."""

    members: tuple

    @property
    def task(self) -> Task:
        return self.members[0].task

    @property
    def deep(self) -> bool:
        return any(m.deep for m in self.members)

    @property
    def method(self) -> str:
        return self.members[0].method

    @property
    def prompt_tokens(self) -> int:
        return self.members[0].prompt_tokens

    @property
    def model_fingerprint(self) -> str:
        return self.members[0].model_fingerprint

    @property
    def placeholder_ids(self):
        return self.members[0].placeholder_ids

    @property
    def max_length(self) -> int | None:
        return self.members[0].max_length

    def check_model(self, model) -> None:
        for m in self.members:
            m.check_model(model)

    def zero_prompt(self) -> TunedPrompt:
        return self.members[0].zero_prompt()


@dataclass(frozen=True)
class PromptEnsemble(Members, Scoring):
    """Several seeds' prompts for one task, scored together: their label probabilities averaged. Plain prompts
    go to the engine as one call of S candidates per batch; BBTv2 prompts one call each."""

    members: tuple[TunedPrompt, ...]
    calibration: tuple[float, ...] | None = None
    origin: str = "ensemble"

    def __post_init__(self):
        if not self.members:
            raise PromptError("an ensemble needs at least one prompt")
        first = self.members[0]
        for m in self.members[1:]:
            if (m.task, m.method, m.prompt_tokens, m.placeholder_ids, m.max_length, m.model_fingerprint) != \
                    (first.task, first.method, first.prompt_tokens, first.placeholder_ids, first.max_length,
                     first.model_fingerprint):
                raise PromptError("an ensemble's prompts must share the task, method, prompt length, placeholders "
                                  "and model")

    @property
    def projection(self) -> ProjectionSpec:
        return self.members[0].projection

    def encoder(self, model):
        return self.members[0].encoder(model)

    def raw_logits(self, model, enc: EncodedSet, batch_rows: int = EVAL_ROWS, on_batch=None) -> np.ndarray:
        """log of the members' mean label probabilities, [N, K] (`losses.mixed` at equal weights)."""
        if not METHODS[self.method].shares_calls:  # a call carries one member's prompt (BBTv2's layers)
            parts = [m.raw_logits(model, enc, batch_rows) for m in self.members]
            if on_batch:
                on_batch(len(enc))
        else:
            embeds = np.stack([m.embeds for m in self.members])
            out = np.empty((len(self.members), len(enc), enc.classes), np.float64)
            for idx, batch in enc.batches(batch_rows):
                out[:, idx] = model.engine.label_logits(embeds, batch)
                if on_batch:
                    on_batch(len(idx))
            parts = list(out)
        return losses.mixed(parts, [1 / len(parts)] * len(parts)).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        for m in self.members:
            check_finite(m.z, m.embeds)
        return write_npz(path, {"prompt": np.stack([m.embeds for m in self.members]),
                                "z": np.stack([m.z for m in self.members])}, ensemble_meta(self))


MAX_BLEND = 8  # results one blend averages


@dataclass(frozen=True)
class BlendRows:
    """The same rows as each member of a blend encodes them (members may frame and read rows differently)."""

    parts: tuple[EncodedSet, ...]

    @property
    def labels(self) -> np.ndarray:
        return self.parts[0].labels

    @property
    def truncated(self) -> int:
        return max(p.truncated for p in self.parts)

    def __len__(self) -> int:
        return len(self.parts[0])

    def take(self, index: np.ndarray) -> "BlendRows":
        return BlendRows(tuple(p.take(index) for p in self.parts))


class BlendEncoder:
    """Rows into `BlendRows`: each member's encoder in turn."""

    def __init__(self, encoders: list):
        self.encoders = encoders

    def encode(self, rows) -> BlendRows:
        return BlendRows(tuple(e.encode(rows) for e in self.encoders))


@dataclass(frozen=True)
class Blend(Members, Scoring):
    """Results a run scored, averaged: each member's label probabilities (its own framing, readout, prompt and
    calibration) weighted by `weights`, for instance the seeds' ensemble with the plain template. The first member
    is the tuned side; a blend carries no calibration of its own."""

    members: tuple  # TunedPrompt or PromptEnsemble results
    weights: tuple[float, ...]
    origin: str = "blend"

    def __post_init__(self):
        if not 2 <= len(self.members) <= MAX_BLEND or len(self.weights) != len(self.members):
            raise PromptError(f"a blend averages 2 to {MAX_BLEND} results, one weight each")
        if any(isinstance(m, Blend) or not isinstance(m, (TunedPrompt, PromptEnsemble)) for m in self.members):
            raise PromptError("a blend's members are prompts, ensembles or templates")
        if not all(np.isfinite(w) and w > 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-6:
            raise PromptError(f"a blend's weights must be positive and sum to 1, got {list(self.weights)}")
        first = self.members[0]
        for m in self.members[1:]:
            if m.task.label_keys != first.task.label_keys or m.task.metric != first.task.metric or \
                    m.model_fingerprint != first.model_fingerprint:
                raise PromptError("a blend's members must share the labels, the metric and the model")

    calibration = None  # each member divides out its own prior

    def encoder(self, model) -> BlendEncoder:
        return BlendEncoder([m.encoder(model) for m in self.members])

    def encode(self, model, rows) -> BlendRows:
        return rows if isinstance(rows, BlendRows) else self.encoder(model).encode(as_examples(rows))

    def calibrate(self, model) -> "Blend":
        return self  # its members carry their own priors

    def raw_logits(self, model, rows: BlendRows, batch_rows: int = EVAL_ROWS, on_batch=None) -> np.ndarray:
        """log of the members' weighted mean label probabilities, [N, K] (each member calibrated as it is)."""
        rows = self.encode(model, rows)
        out = losses.mixed([m.logits(model, part, batch_rows) for m, part in zip(self.members, rows.parts)],
                           self.weights)
        if on_batch:
            on_batch(len(rows))
        return out.astype(np.float32)

    def save(self, path: str | Path) -> Path:
        arrays, metas = {}, []
        for i, m in enumerate(self.members):
            parts = m.members if isinstance(m, PromptEnsemble) else (m,)
            for p in parts:
                check_finite(p.z, p.embeds)
            arrays[f"prompt{i}"] = np.stack([p.embeds for p in parts])
            arrays[f"z{i}"] = np.stack([p.z for p in parts])
            metas.append(ensemble_meta(m) if isinstance(m, PromptEnsemble) else m.meta())
        meta = {"blend": metas, "weights": list(self.weights), "origin": self.origin}
        return write_npz(path, {"prompt": np.zeros((0,)), "z": np.zeros((0,)), **arrays}, meta)


def prompts_of(result) -> tuple[TunedPrompt, ...]:
    """Every prompt a result holds: itself, an ensemble's members, a blend's members' prompts."""
    if isinstance(result, Blend):
        return tuple(p for m in result.members for p in prompts_of(m))
    return tuple(result.members) if isinstance(result, PromptEnsemble) else (result,)


def ensemble_meta(ensemble: PromptEnsemble) -> dict:
    return {"ensemble": [m.meta() for m in ensemble.members], "origin": ensemble.origin,
            "calibration": None if ensemble.calibration is None else list(ensemble.calibration)}


Result = TunedPrompt | PromptEnsemble | Blend  # what a run hands back


def prior_of(result, model) -> tuple[float, ...]:
    """The label prior `result` has on the content-free rows, as log-probabilities, from its raw logits (whatever
    calibration it carries is not applied): `calibration.content_free_prior`, as the tuner's dev scores have it."""
    prior = content_free_prior(lambda rows: result.raw_logits(model, rows), result.task, result.encoder(model).encode)
    return tuple(float(v) for v in prior)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(meta: dict, prompt_tokens: int, where: str) -> None:
    """A prompt file's token counts and ids are of the types and ranges tune writes: max_length a positive whole
    number of tokens, placeholder_ids one token id (a whole number, not negative) per prompt token. Whether they fit
    a model (its vocabulary, its positions) is `check_model`'s to say."""
    max_length, ids = meta.get("max_length"), meta.get("placeholder_ids")
    if max_length is not None and not (_is_int(max_length) and max_length >= 1):
        raise PromptError(f"{where} is damaged: its max_length {max_length!r:.40} is not a number of tokens; tune "
                          "again or restore it")
    if ids is not None and not (isinstance(ids, list) and len(ids) == prompt_tokens
                                and all(_is_int(i) and i >= 0 for i in ids)):
        raise PromptError(f"{where} is damaged: its placeholder_ids are not {prompt_tokens} token ids; tune again or "
                          "restore it")


def check_finite(z: np.ndarray, embeds: np.ndarray) -> None:
    if not (np.isfinite(z).all() and np.isfinite(embeds).all()):
        raise PromptError("the prompt holds NaN or infinite numbers; it is not saved (check alpha, sigma "
                          "and the model's embedding_std)", ("alpha", "sigma"))


def write_npz(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / PROMPT_NAME
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps(meta)))
    write_bytes_atomic(path, buf.getvalue())
    return path


def load_prompt(path: str | Path) -> Result:
    """A run's result (a run directory, or a prompt file): a prompt, a kept template, or an ensemble."""
    path = result_file(path)
    if not path.is_file():
        raise PromptError(f"{path} does not exist: give a run directory written by `bbt-onnx tune`")
    try:
        data = check_npz(read_bounded(path, NPZ_LIMIT))
    except OSError as exc:
        raise PromptError(f"cannot read {path}: {exc}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            blend = meta.get("blend") if isinstance(meta, dict) else None
            if blend is not None:
                if not isinstance(blend, list) or not 2 <= len(blend) <= MAX_BLEND:
                    raise ValueError("blend")
                parts = [(f[f"prompt{i}"], f[f"z{i}"]) for i in range(len(blend))]
            else:
                embeds, z = f["prompt"], f["z"]
    except Exception as exc:  # noqa: BLE001 - a damaged zip or field can raise almost any type
        raise PromptError(f"{path} is not a bbt-onnx prompt file, or it is damaged ({type(exc).__name__}); "
                          "tune again or restore it") from None
    if blend is None:
        return result_from(meta, embeds, z, str(path))
    try:
        weights = tuple(float(w) for w in meta["weights"])
        members = []
        for m, (e, v) in zip(blend, parts):
            if not isinstance(m, dict) or (m.get("ensemble") is None and (len(e) != 1 or len(v) != 1)):
                raise ValueError("member")
            members.append(result_from(m, e, v, str(path)) if m.get("ensemble") is not None else
                           result_from(m, e[0], v[0], str(path)))
        return Blend(tuple(members), weights, str(meta.get("origin", "blend")))
    except PromptError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PromptError(f"{path} is damaged: its blend does not match its own description "
                          f"({type(exc).__name__})") from None


def result_from(meta: dict, embeds: np.ndarray, z: np.ndarray, where: str) -> TunedPrompt | PromptEnsemble:
    """A prompt, or an ensemble of prompts, from its arrays and description."""
    members = meta.get("ensemble") if isinstance(meta, dict) else None
    if members is not None and (not isinstance(members, list) or len(members) != len(embeds) or
                                len(members) != len(z) or not members):
        raise PromptError(f"{where} is not a bbt-onnx prompt file, or it is damaged (ensemble); tune again or restore "
                          "it")
    if members is None:
        return TunedPrompt.from_arrays(meta, embeds, z, where)
    prompts = tuple(TunedPrompt.from_arrays(m, e, v, where) for m, e, v in zip(members, embeds, z))
    cal = meta.get("calibration")
    try:
        ensemble = PromptEnsemble(prompts, None if cal is None else tuple(float(v) for v in cal),
                                  str(meta.get("origin", "ensemble")))
    except (PromptError, TypeError, ValueError):
        raise PromptError(f"{where} is damaged: its prompts do not form one ensemble") from None
    if ensemble.calibration is not None and (len(ensemble.calibration) != len(ensemble.task.labels)
                                             or not np.isfinite(ensemble.calibration).all()):
        raise PromptError(f"{where} is damaged: its calibration does not match its labels")
    return ensemble


def load_run_prompt(run: str | Path | None, no_prompt: bool = False, task_given: bool = False,
                    prompt_tokens: int | None = None) -> Result | None:
    """A run's result (its z = 0, after its own placeholder tokens, with `no_prompt`), or None when there is no run
    and the template alone is scored; a run brings its own task and prompt length."""
    if run is None:
        if not no_prompt:
            raise SettingsError("give prompt (a run directory), or no_prompt with a task to score the manual "
                                "template", ("prompt", "no_prompt"))
        return None
    if task_given:
        raise SettingsError("name, template, labels, task_file, metric, bos, chat and prompt_position come from "
                            "the run; drop them",
                            ("name", "template", "labels", "task_file", "metric", "bos", "chat", "prompt_position"))
    if prompt_tokens is not None:
        raise SettingsError("prompt_tokens comes from the run; drop it", "prompt_tokens")
    prompt = load_prompt(run)
    return prompt.zero_prompt() if no_prompt else prompt


def template_prompt(manifest, task: Task, prompt_tokens: int | None = None) -> TunedPrompt:
    """z = 0 without a run: the manual template after the model's placeholder tokens (`prompt_tokens` of them,
    0 for the template alone)."""
    if prompt_tokens is not None and prompt_tokens > manifest.prompt_tokens:
        raise SettingsError(f"prompt_tokens {prompt_tokens} is more than the {manifest.prompt_tokens} this model "
                            "was exported for", "prompt_tokens")
    spec = ProjectionSpec(0, 1, manifest.prompt_tokens if prompt_tokens is None else prompt_tokens,
                          manifest.hidden_size, manifest.embedding_std)
    return TunedPrompt.zero(spec, task)
