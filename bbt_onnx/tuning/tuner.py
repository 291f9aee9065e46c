"""The Black-Box Tuning loop: CMA-ES over z, scored only through engine calls.

Faithful to the reference (txsun1997/Black-Box-Tuning `bbt.py`, `deepbbt.py`): z starts at 0
with step sigma, a generation scores the whole population on the whole training set in one
engine call, the best candidate so far is scored on dev every `eval_every` calls (those
calls are free), and the prompt with the best dev metric wins. BBT and BBTv2 share this one
loop, in steps (start, step, result) like pycma's ask and tell; methods.py holds what differs.
A step is itself ask, score, tell, so that several seeds can share one engine call (lockstep.py).
The tuner prints nothing: it reports events and hands checkpoints to callbacks.

Options beyond the reference, each off or measured: the start (`prompt_init auto`, the cheapest filler of the
prompt slots on dev at z = 0), dev-based early stopping (`patience`) and contextual calibration of the dev scores
(`calibrate`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from .. import losses
from ..baselines import AUTO, init_candidates, init_choice
from ..calibration import calibrated, content_free_prior, content_free_rows, search_calibrated
from ..data import Example, as_examples
from ..encoding import EncodedSet
from ..engines.base import score_rows
from ..errors import DataError, RunError, SettingsError
from ..methods import GeneratorRandn  # noqa: F401 - checkpoints written before methods.py pickled tuner.GeneratorRandn
from ..methods import method_for
from ..model import Model
from ..prompt import TunedPrompt, as_ids
from ..seeding import seeds
from ..subspace import ProjectionSpec
from ..tasks import Task
from .config import TuneConfig, TunerState


DEV_ROWS = 256  # dev rows per engine call


@dataclass(frozen=True)
class GenerationEvent:
    """One line of `log.jsonl`."""

    generation: int
    calls: int
    best_loss: float  # best of this generation
    mean_loss: float
    best_loss_so_far: float
    sigma: float
    dev_metric: float | None
    seconds: float  # wall time since the run began, resumed parts included
    engine_seconds: float  # this generation
    optimizer_seconds: float
    host_seconds: float
    layer: int = 0  # the layer whose prompt this generation searched (BBTv2); 0 for BBT
    seed: int = 0  # the run's seed (one of several, when seeds run in lock-step)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FitReport:
    train_loss_initial: float
    train_loss_final: float
    best_train_loss: float
    best_dev_metric: float | None
    metric_name: str
    api_calls: int
    dev_calls: int
    generations: int
    wall_seconds: float
    engine_seconds: float
    optimizer_seconds: float
    host_seconds: float
    calls_per_second: float
    provider: str
    stop_reason: str

    def to_json(self) -> dict:
        return asdict(self)


class BlackBoxTuner:
    """`BlackBoxTuner(model, task, config).fit(train, dev) -> TunedPrompt`, for BBT and BBTv2 alike: the
    method (methods.py) says what a generation searches; budget, dev choice, checkpoints and events are here."""

    def __init__(self, model: Model, task: Task, config: TuneConfig = TuneConfig(),
                 placeholder_ids: Sequence[int] | None = None):
        """`placeholder_ids`: the prompt slots' tokens when already decided (a resumed run's); otherwise
        `config.prompt_init` decides them, `auto` on the dev rows `fit` (or `choose_start`) is given."""
        if not isinstance(config, TuneConfig):
            raise SettingsError(f"config must be a TuneConfig, got {type(config).__name__}", "config")
        config.check()
        if not isinstance(task, Task):
            raise SettingsError(f"task must be a Task, got {type(task).__name__}", "task")
        self.model = model
        self.task = task
        self.config = config
        m = model.manifest
        if config.max_length is not None and config.max_length > m.max_positions:
            raise SettingsError(f"max_length {config.max_length} is more than the model's {m.max_positions} "
                                "positions; leave it out to use them all", "max_length")
        self.spec = ProjectionSpec(seed=config.seed, intrinsic_dim=config.intrinsic_dim,
                                   prompt_tokens=config.prompt_tokens, hidden_size=m.hidden_size,
                                   embedding_std=m.embedding_std, alpha=config.alpha, sigma=config.sigma,
                                   kind=config.random_proj)
        mode, text = init_choice(config.prompt_init)
        self.start_scores: list[dict] = []  # each start candidate's z = 0 scores on dev (auto)
        self.start_name = "given" if placeholder_ids is not None else mode
        if placeholder_ids is None and mode == "text":
            placeholder_ids = init_candidates(model.tokenizer, model.manifest, task, config.prompt_tokens, text)[0][1]
        self.start_pending = placeholder_ids is None and mode == AUTO
        self._set_placeholders(None if placeholder_ids is None else as_ids(placeholder_ids))
        self.method = method_for(config.method)(model, self.spec)
        self.method.check(config)
        self.report: FitReport | None = None
        self.state: TunerState | None = None

    def _set_placeholders(self, ids: tuple[int, ...] | None) -> None:
        self.placeholder_ids = ids
        self.encoder = self.model.encoder(self.task, self.config.prompt_tokens, self.config.max_length, ids)
        self._content_free: tuple[list[Example], EncodedSet] | None = None  # the content-free rows, encoded once
        self._search: tuple[EncodedSet, EncodedSet] | None = None  # train rows, and what a generation scores

    @property
    def warnings(self) -> list[str]:
        return list(self.encoder.warnings)

    def choose_start(self, rows: Sequence[Example]) -> list[dict]:
        """`prompt_init auto`: score each filler of the prompt slots at z = 0 on `rows` (dev) and keep the best
        (the higher metric, then the lower cross-entropy, then the earlier candidate: the reference's ids first).
        Returns every candidate's scores; the rows' encodings change with the slots, so encode after this."""
        if not self.start_pending:
            return self.start_scores
        examples = as_examples(rows)
        scores, zero = [], self.method.zero()
        for name, ids in init_candidates(self.model.tokenizer, self.model.manifest, self.task,
                                         self.config.prompt_tokens):
            self._set_placeholders(as_ids(ids))
            enc = self.encoder.encode(examples)
            logits = self.dev_logits(zero, enc)
            scores.append({"name": name, "ids": list(ids),
                           "dev_metric": float(losses.metric(self.task.metric, logits, enc.labels)[0]),
                           "dev_ce": float(losses.cross_entropy(logits, enc.labels)[0])})
        best = max(range(len(scores)), key=lambda i: (scores[i]["dev_metric"], -scores[i]["dev_ce"], -i))
        self._set_placeholders(as_ids(scores[best]["ids"]))
        self.start_name, self.start_scores, self.start_pending = scores[best]["name"], scores, False
        return scores

    def adopt_start(self, other: "BlackBoxTuner") -> None:
        """The start another seed's tuner chose on the same rows (z = 0 is the same prompt for every seed)."""
        self._set_placeholders(other.placeholder_ids)
        self.start_name, self.start_scores, self.start_pending = other.start_name, other.start_scores, False

    def dev_logits(self, z: np.ndarray, rows: EncodedSet, prior: np.ndarray | None = None) -> np.ndarray:
        """[N, K] scores of the prompt z on dev rows: calibrated log-probabilities when the run calibrates, by z's
        own prior on the content-free rows (`prior`, from `prior(z)`; computed here when not given)."""
        scorer = self.method.z_scorer(z)
        raw = score_rows(scorer, rows, DEV_ROWS)
        if not self.config.calibrate:
            return raw
        return calibrated(raw, self._prior(scorer) if prior is None else prior)

    def prior(self, z: np.ndarray) -> np.ndarray:
        """[K] the prompt z's label prior on the content-free rows, as log-probabilities: what calibration divides
        out of its dev scores (`calibration.content_free_prior`, as a tuned prompt's `calibration` is computed)."""
        return self._prior(self.method.z_scorer(z))

    def _prior(self, scorer) -> np.ndarray:
        return content_free_prior(lambda rows: score_rows(scorer, rows, DEV_ROWS), self.task,
                                  self._encode_content_free)

    def _encode_content_free(self, rows: list[Example]) -> EncodedSet:
        """The content-free rows, encoded once for the slots the tuner has (`_set_placeholders` forgets them)."""
        if self._content_free is None or self._content_free[0] != rows:
            self._content_free = (list(rows), self.encoder.encode(rows))
        return self._content_free[1]

    def search_rows(self, train: EncodedSet) -> EncodedSet:
        """What a generation's engine call scores: the training rows, then (content-free search calibration) the
        content-free rows, so that every candidate's prior comes from the same call."""
        if self.config.search_calibration != "content-free":
            return train
        if self._search is None or self._search[0] is not train:
            extra = self._encode_content_free(content_free_rows(self.task))
            self._search = (train, train.join(extra, self.model.manifest.pad_id))
        return self._search[1]

    def search_loss(self, logits: np.ndarray, train: EncodedSet) -> np.ndarray:
        """[C] what CMA-ES minimises, from one call's logits on `search_rows(train)`: the loss of the training rows'
        scores, calibrated as `search_calibration` says."""
        return self._loss(search_calibrated(logits, len(train), self.config.search_calibration), train.labels)

    def encode(self, rows: Sequence[Example | str] | EncodedSet | None) -> EncodedSet | None:
        if rows is None or isinstance(rows, EncodedSet):
            return rows
        return self.encoder.encode(as_examples(rows))

    def new_state(self) -> TunerState:
        return TunerState(self.config, self.method.strategies(self.config, seeds(self.config.seed)["cma"]))

    def load_state(self, data: bytes, source: str = "the checkpoint") -> TunerState:
        """A state saved with `checkpoint.dumps` (checkpoint.npz's bytes), restored for this tuner; nothing in
        the bytes is run, and a checkpoint of other settings is refused."""
        from .checkpoint import loads

        return loads(data, self, source)

    def check_state(self, state: TunerState) -> None:
        """A checkpoint continues only the run it came from: its settings must be this tuner's."""
        if not isinstance(state, TunerState):
            raise RunError(f"state must be a TunerState, got {type(state).__name__}")
        if state.config != self.config:
            raise RunError("the checkpoint was written with other settings than this run's; it cannot be resumed "
                           "with these")
        if not isinstance(state.es, list):  # checkpoints written before BBTv2 held one strategy
            state.es = [state.es]

    # -- the loop, step by step: start, step, result --------------------------------------------------------
    def choose_pending_start(self, train, dev=None) -> None:
        """`prompt_init auto` not yet chosen: choose it on dev (else train) when they come as rows; rows that come
        encoded keep the slots they were encoded with."""
        rows = dev if dev is not None else train
        if self.start_pending and rows is not None and not isinstance(rows, EncodedSet):
            self.choose_start(rows)

    def start(self, train: EncodedSet | Sequence[Example], state: TunerState | None = None,
              dev: EncodedSet | Sequence[Example] | None = None) -> TunerState:
        """A new state (or a checkpointed one, checked), with the untuned prompt's train loss; with `prompt_init
        auto`, rows choose the start first, as in `fit` (on `dev` when given)."""
        self.choose_pending_start(train, dev)
        if state is None:
            state = self.new_state()
        self.check_state(state)
        train = self._encoded(train, "train")
        if train is None:
            raise DataError("train has no rows: start() needs the training rows")
        if (train.labels < 0).any():
            raise DataError("every training row needs a label")
        self.state = state
        self._clock = time.perf_counter() - state.seconds  # wall time, resumed parts included
        self.method.prepare(state)
        if state.generation == 0:
            zero = self.method.zero()
            state.train_loss_initial = float(self.search_loss(self.method.z_scorer(zero)(self.search_rows(train)),
                                                              train)[0])
        return state

    def _started(self, step: str) -> TunerState:
        if self.state is None:
            raise RunError(f"{step}() before start(): call tuner.start(train) first (or fit)")
        return self.state

    def finished(self) -> bool:
        return bool(self.stop_reasons(self._started("finished")))

    def stop_reasons(self, state: TunerState) -> dict[str, str]:
        """The method's reasons to stop, and patience's."""
        reasons = self.method.stop(state, self.config)
        if self.config.patience and state.stale_evals >= self.config.patience:
            reasons = {**reasons, "patience": str(self.config.patience)}
        return reasons

    def step(self, train: EncodedSet, dev: EncodedSet | None) -> GenerationEvent:
        """One generation: ask, score every candidate in one engine call, tell; dev when it is due."""
        self._started("step")
        train, dev = self._encoded(train, "train"), self._encoded(dev, "dev")
        ask = self.ask()
        t0 = time.perf_counter()
        logits = self.method.score(self.state, ask.z, ask.layer, self.search_rows(train))
        return self.tell(ask, logits, train, dev, time.perf_counter() - t0)

    def ask(self) -> "Ask":
        """This generation's candidates (pycma's ask), from the strategy of the layer it searches."""
        state = self._started("ask")
        started = time.perf_counter()
        layer = self.method.layer(state)
        z = np.asarray(state.es[layer].ask())
        return Ask(z, layer, time.perf_counter() - started)

    def tell(self, ask: "Ask", logits: np.ndarray, train: EncodedSet, dev: EncodedSet | None,
             engine_seconds: float) -> GenerationEvent:
        """The candidates' logits on `search_rows(train)` ([C, N(+3), K], from one engine call) told to pycma as
        `search_loss`; dev when it is due."""
        state, cfg, method = self._started("tell"), self.config, self.method
        es, z, layer = state.es[ask.layer], ask.z, ask.layer
        t2 = time.perf_counter()
        cand_loss = self.search_loss(logits, train)
        t3 = time.perf_counter()
        es.tell(list(z), cand_loss.tolist())
        t4 = time.perf_counter()

        before = state.calls
        state.calls += len(z)
        state.generation += 1
        i = int(np.argmin(cand_loss))
        if cand_loss[i] < state.best_loss:
            state.best_loss, state.best_z = float(cand_loss[i]), method.whole(state, z[i], layer)
        method.told(state, layer)
        dev_metric = None
        t5 = time.perf_counter()
        if dev is not None and state.calls // cfg.eval_every > before // cfg.eval_every:
            best = state.best_dev_metric
            dev_metric = self._evaluate_dev(state, dev)
            state.stale_evals = 0 if state.best_dev_metric > best else state.stale_evals + 1
        t6 = time.perf_counter()

        engine_s, optimizer_s = engine_seconds + (t6 - t5), ask.seconds + (t4 - t3)  # dev scoring is engine work
        host_s = (t3 - t2) + (t5 - t4)
        state.engine_seconds += engine_s
        state.optimizer_seconds += optimizer_s
        state.host_seconds += host_s
        state.seconds = time.perf_counter() - self._clock
        return GenerationEvent(state.generation, state.calls, float(cand_loss[i]), float(cand_loss.mean()),
                               state.best_loss, float(es.sigma), dev_metric, state.seconds, engine_s, optimizer_s,
                               host_s, layer, cfg.seed)

    def result(self, train: EncodedSet, dev: EncodedSet | None) -> TunedPrompt:
        """The prompt to keep: best dev (the last best z scored first), else best train; and the report."""
        state, cfg = self._started("result"), self.config
        train, dev = self._encoded(train, "train"), self._encoded(dev, "dev")
        if dev is not None and state.best_z is not None and not _same(state.last_dev_z, state.best_z):
            self._evaluate_dev(state, dev)  # the last best may not have met a dev evaluation yet
        state.stop_reason = self.stop_reasons(state)

        final_z = state.best_dev_z if dev is not None else state.best_z
        if final_z is None:
            final_z = self.method.zero()
        prompt = TunedPrompt(np.asarray(final_z, dtype=np.float64), self.method.embeds(final_z).astype(np.float32),
                             self.spec, self.task, self.model.manifest.fingerprint(), as_ids(self.placeholder_ids),
                             cfg.max_length, cfg.method, tuple(s.embedding_std for s in self.method.specs))
        if cfg.calibrate:
            prompt = prompt.calibrate(self.model)
        final_loss = float(self.search_loss(self.method.z_scorer(final_z)(self.search_rows(train)), train)[0])
        state.seconds = time.perf_counter() - self._clock
        self.report = FitReport(
            train_loss_initial=state.train_loss_initial, train_loss_final=final_loss,
            best_train_loss=state.best_loss,
            best_dev_metric=None if dev is None else state.best_dev_metric,
            metric_name=self.task.metric, api_calls=state.calls, dev_calls=state.dev_calls,
            generations=state.generation, wall_seconds=state.seconds, engine_seconds=state.engine_seconds,
            optimizer_seconds=state.optimizer_seconds, host_seconds=state.host_seconds,
            calls_per_second=state.calls / state.seconds if state.seconds > 0 else 0.0,
            provider=self.model.engine.provider,
            stop_reason=", ".join(f"{k}={v}" for k, v in state.stop_reason.items()))
        return prompt

    def fit(self, train: Sequence[Example] | EncodedSet, dev: Sequence[Example] | EncodedSet | None = None,
            on_event: Callable[[GenerationEvent], None] | None = None,
            on_checkpoint: Callable[[TunerState], None] | None = None,
            state: TunerState | None = None) -> TunedPrompt:
        """Tune on `train`, choose by `dev`; pass a checkpointed `state` to resume. With `prompt_init auto` the
        start is chosen on `dev` (else `train`) when they come as rows; rows that come encoded keep the slots they
        were encoded with."""
        self.choose_pending_start(train, dev)
        train_set, dev_set = self.encode(train), self.encode(dev)
        state = self.start(train_set, state)
        every = self.config.checkpoint_every
        while not self.finished():
            event = self.step(train_set, dev_set)
            if on_event:
                on_event(event)
            if on_checkpoint and every and state.generation % every == 0:
                on_checkpoint(state)
        return self.result(train_set, dev_set)

    def _encoded(self, rows, name: str) -> EncodedSet | None:
        """Rows as the steps take them: an EncodedSet, or examples (or plain texts) encoded here."""
        if rows is None or isinstance(rows, EncodedSet):
            return rows
        if isinstance(rows, (str, Example)) or not isinstance(rows, Sequence):
            raise DataError(f"{name} must be a list of Example rows (or an EncodedSet), got {type(rows).__name__}",
                            name)
        return self.encode(rows)

    def _loss(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return losses.loss(self.config.loss, self.task.metric, logits, labels)

    def _evaluate_dev(self, state: TunerState, dev_set: EncodedSet) -> float:
        """Score the best-so-far z on dev (free calls); keep it when it beats the best dev metric."""
        z = state.best_z
        if _same(z, state.last_dev_z):
            return state.last_dev_metric
        logits = self.dev_logits(z, dev_set)
        value = float(losses.metric(self.task.metric, logits, dev_set.labels)[0])
        state.dev_calls += 1
        state.last_dev_z, state.last_dev_metric = z.copy(), value
        if value > state.best_dev_metric:
            state.best_dev_metric, state.best_dev_z = value, z.copy()
        return value


@dataclass(frozen=True)
class Ask:
    """One generation's candidates: z [C, d] for the strategy of `layer`, and the seconds pycma took."""

    z: np.ndarray
    layer: int
    seconds: float


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and np.array_equal(a, b)
