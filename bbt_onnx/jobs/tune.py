"""The tune job (`bbt-onnx tune`), usable from Python too: tune into a run directory, with resume.

A run never hands back less than the user had: before tuning it scores the plain template in every framing the
model allows (and z = 0), after tuning it compares the tuned prompt (or the seeds' ensemble) with the best of them
on dev (choice.py, in settle.py), and keeps the template when tuning did not earn its place. The job runs in
steps: prepare (every check, nothing written), then under the run's claim the baselines, the search, settle and
the write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..choice import ChoicePolicy
from ..data import DataSpec, load_splits
from ..demos import DemoSpec, as_demonstrations, without_demonstrations
from ..encoding import EncodedSet
from ..engines import EngineSpec, OrtSpec
from ..errors import BBTError, RunError, SettingsError
from ..fileio import check_apart, same_path
from ..methods import method_for
from ..model import Model
from ..prompt import Result, TunedPrompt
from ..provenance import provenance
from ..runs import OWN_FILES, TUNED, RunDir
from ..tasks import Task
from ..tuning.checkpoint import read_states, save_states
from ..tuning.config import TuneConfig, TunerState
from ..tuning.lockstep import LockStep
from ..tuning.tuner import BlackBoxTuner, GenerationEvent
from ..verbalizer import VerbalizerSpec, candidate_words, choose_words, record, worded_task
from .settle import Settled, public, run_metrics, score_baselines, settle

MAX_SEEDS = 64  # seeds in one run's lock-step


@dataclass(frozen=True)
class TuneRequest:
    model_dir: str
    task: Task
    data: DataSpec
    config: TuneConfig
    out: str
    engine: EngineSpec = OrtSpec()  # a server's spec: the token is never written to the run
    seeds: tuple[int, ...] = ()  # seeds run in lock-step on the same rows; () is config.seed alone
    policy: ChoicePolicy = ChoicePolicy()  # how the run chooses between the tuned prompt and the plain template
    task_file: str | None = None  # where the task came from, when a file: read, so never replaced by the run
    demos: DemoSpec = DemoSpec()  # K per class drawn from the pool (a file's are in the task already)
    sweep: dict | None = None  # a sweep's trial: its name, its task's name in the spec and its grid point

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.config.seed,)

    def check(self) -> None:
        self.config.check()
        seeds = self.all_seeds
        if len(seeds) > MAX_SEEDS:  # each seed holds its own strategies in memory and in the checkpoint
            raise SettingsError(f"seeds names {len(seeds)} seeds; a run takes at most {MAX_SEEDS}", "seeds")
        if len(set(seeds)) != len(seeds):
            raise SettingsError(f"seeds {list(seeds)} name a seed twice", "seeds")
        for seed in seeds:
            replace(self.config, seed=seed)  # each seed in range (the config checks itself)

    def settings(self, model: Model) -> dict:
        return {
            "model": {"dir": str(Path(self.model_dir).resolve()), "fingerprint": model.manifest.fingerprint(),
                      **self.engine.record(model.engine)},
            "task": self.task.to_json(),
            "data": self.data.to_json(),
            "tune": self.config.to_json(),
            "policy": self.policy.to_json(),
            "seeds": list(self.all_seeds),
            **({"demos": self.demos.to_json()} if self.demos.given else {}),
            **({"sweep": self.sweep} if self.sweep else {}),
        }

    @classmethod
    def from_settings(cls, settings: dict, out: str, engine: EngineSpec = OrtSpec()) -> "TuneRequest":
        """The request that continues a run on `engine` (a run may move between a server and the process: the
        fingerprint check makes sure the model is the same); an in-process engine keeps the run's graph."""
        try:
            tune = dict(settings["tune"])
            tune.setdefault("max_length", settings.get("max_length"))  # runs from before it moved into "tune"
            tune.setdefault("prompt_init", None)  # runs from before the start was chosen on dev: the reference's
            return cls(model_dir=settings["model"]["dir"], task=Task.from_json(settings["task"]),
                       data=DataSpec(**settings["data"]), config=TuneConfig.from_json(tune), out=out,
                       engine=engine.resumed(settings["model"]), seeds=tuple(int(s) for s in settings.get("seeds", ())),
                       policy=ChoicePolicy.from_settings(settings), demos=DemoSpec.from_json(settings.get("demos")),
                       sweep=settings.get("sweep"))
        except (KeyError, TypeError, ValueError, AttributeError, BBTError) as exc:
            raise RunError(f"{out}/run.json has incomplete or damaged settings ({type(exc).__name__}: {exc}); "
                           "it cannot be resumed") from None


def resume_request(out: str | Path, engine: EngineSpec = OrtSpec()) -> TuneRequest:
    """The request that continues the run in `out` with its own recorded settings, on `engine`."""
    return TuneRequest.from_settings(RunDir.open_existing(out).read_json()["settings"], str(out), engine)


@dataclass
class Hooks:
    """How a job talks to its caller: human messages, the run's start, each generation, and the finished run."""

    log: Callable[[str], None] = lambda _msg: None
    start: Callable[[int, int], None] = lambda _total, _done: None  # (budget of all seeds, calls already done)
    event: Callable[[GenerationEvent], None] = lambda _e: None
    # the run directory, its settings, and whether the run continues from a checkpoint
    begin: Callable[[Path, dict, bool], None] = lambda _dir, _settings, _resumed: None
    tuned: Callable[[], None] = lambda: None  # the search is over (what follows scores and chooses)
    end: Callable[[Path, dict], None] = lambda _dir, _record: None  # the run directory and its run.json
    stopped: Callable[[BaseException], None] = lambda _exc: None  # the run began, then stopped unfinished


@dataclass
class TuneOutcome:
    prompt: Result  # what the run kept: the tuned prompt, the seeds' ensemble, or a plain template
    metrics: dict
    run_dir: Path
    warnings: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # the whole run.json
    tuned: Result | None = None  # what tuning found (the seeds' ensemble for several seeds), kept or not
    seed_prompts: list = field(default_factory=list)  # each seed's tuned prompt

    def summary(self) -> str:
        """One line for a person: the calls, the loss, what the run kept and its scores, where it is."""
        m, choice = self.metrics, self.record.get("choice", {})
        dev = "n/a" if m["dev_metric"] is None else f"{m['dev_metric']:.4f}"
        test = "n/a" if m["test_metric"] is None else f"{m['test_metric']:.4f}"
        tuned = "" if m["kept"] != choice.get("kept") or choice.get("tuned", True) or m["tuned_test_metric"] is None \
            else f" (the tuned prompt: test {m['tuned_test_metric']:.4f})"
        return (f"done: {m['api_calls']} calls in {m['wall_seconds']:.1f}s ({m['calls_per_second']:.1f}/s), train "
                f"loss {m['train_loss_initial']:.4f} -> {m['train_loss_final']:.4f}; kept {m['kept']}: dev "
                f"{m['metric_name']} {dev}, test {test}{tuned}; wrote {self.run_dir}")


@dataclass
class Prepared:
    """Everything a run needs, checked and loaded, before anything on disk changes."""

    request: TuneRequest
    run: RunDir
    model: Model
    splits: object  # data.Splits: the rows, as read
    tuners: list[BlackBoxTuner]
    train: EncodedSet
    dev: EncodedSet | None
    test: EncodedSet | None
    settings: dict
    states: list[TunerState] | None  # every seed's checkpoint, when resuming


def tune(request: TuneRequest, hooks: Hooks = Hooks(), resume: bool = False, force: bool = False,
         force_any: bool = False, trust_checkpoint: bool = False) -> TuneOutcome:
    """Check every input first, then claim the run directory; score the baselines, tune every seed, choose between
    the tuned prompt and the best plain template on dev, score the test set and write the run. Nothing on disk
    changes until every input and setting has been checked. `force` replaces an earlier run in `request.out` (kept
    until the new one has a checkpoint), `force_any` writes into a directory that holds no run; `trust_checkpoint`
    lets `resume` unpickle an old checkpoint.pkl (which can run code)."""
    job = prepare(request, hooks, resume, force, force_any, trust_checkpoint)
    with job.run.claim():
        if resume:
            job.run.truncate_log(max(s.generation for s in job.states))
            hooks.log(f"resuming {job.run.path} at {sum(s.calls for s in job.states)} calls")
        else:
            job.run.check_empty(force, force_any)  # again, now that no other tune can be writing it
            job.run.start(job.settings)
        hooks.begin(job.run.path, job.settings, resume)
        try:
            baselines = baselines_step(job, hooks, resume)
            prompts, wall = search_step(job, hooks)
            request = job.request  # with the demonstrations drawn
            outcome = settle(job.model, request.task, request.config, request.policy, job.tuners, prompts, baselines,
                             job.dev, job.test, hooks.log)
            metrics, record = write_step(job, outcome, [public(b) for b in baselines], wall, hooks)
        except BaseException as exc:
            hooks.stopped(exc)
            raise
    return TuneOutcome(outcome.kept, metrics, job.run.path, job.tuners[0].warnings, record, outcome.tuned,
                       list(prompts))


def prepare(request: TuneRequest, hooks: Hooks, resume: bool, force: bool, force_any: bool,
            trust_checkpoint: bool) -> Prepared:
    """Settings, the run directory's state, the model, the data, the start, the encoding and the checkpoint, all
    checked; nothing written."""
    request.check()
    check_apart(request.out, [("model directory", request.model_dir)])
    if not resume:
        check_inputs_apart(request)
    run = RunDir.open_existing(request.out) if resume else RunDir.check_new(request.out, force, force_any)
    run.log = hooks.log
    model = Model.load(request.model_dir, request.engine, deep=method_for(request.config.method).deep)
    request, splits = with_demonstrations(request, hooks)
    recorded = run.read_json() if resume else {}
    request, words = (request, recorded.get("settings", {}).get("verbalizer")) if resume else \
        with_verbalizer(request, model, splits.train, hooks)
    if request.task.demonstrations and model.manifest.lm.framings and not (
            request.task.framing.position == "suffix" and model.manifest.has_cache_graphs("fp32")):
        hooks.log("note: every row runs with its demonstrations written out; on a decoder exported with --kv-cache, "
                  "--prompt-position suffix computes them once")
    start = recorded.get("settings", {}).get("start") or {}
    tuners = [BlackBoxTuner(model, request.task, replace(request.config, seed=seed), start.get("ids"))
              for seed in request.all_seeds]
    first = tuners[0]
    if start:
        for tuner in tuners:
            tuner.start_name, tuner.start_scores = start.get("name", "given"), start.get("candidates", [])
    if first.start_pending:  # z = 0 is the same prompt for every seed: one choice, on dev (else train)
        first.choose_start(splits.dev or splits.train)
        for tuner in tuners[1:]:
            tuner.adopt_start(first)
    for w in first.warnings:
        hooks.log(f"warning: {w}")
    train, dev = first.encode(splits.train), first.encode(splits.dev)
    test = first.encode(splits.test) if splits.test else None
    for name, enc in (("train", train), ("dev", dev), ("test", test)):
        if enc is not None and enc.truncated:
            hooks.log(f"note: {enc.truncated} of {len(enc)} {name} rows were cut to fit {first.encoder.max_length} tokens")
    if dev is None:
        hooks.log("note: no dev set; the prompt with the lowest training loss is kept, and nothing compares it with "
                  "the plain template")
    settings = request.settings(model)
    settings["data_fingerprints"] = splits.fingerprints
    if words:
        settings["verbalizer"] = words
    settings["start"] = start or {"name": first.start_name, "ids": list(first.encoder.placeholder_ids),
                                  "candidates": first.start_scores}
    states = resume_states(run, settings, request, tuners, model.manifest, trust_checkpoint) if resume else None
    if states is not None:
        for tuner, state in zip(tuners, states):
            tuner.check_state(state)
    return Prepared(request, run, model, splits, tuners, train, dev, test, settings, states)


def with_demonstrations(request: TuneRequest, hooks: Hooks) -> tuple[TuneRequest, object]:
    """The rows, and the request whose task holds its demonstrations: drawn from the pool after train and dev, or
    the file's (then train and dev rows equal to one are dropped: a row never sees itself)."""
    splits = load_splits(request.data, request.task.label_keys, request.demos.from_pool)
    if splits.demos:
        request = replace(request, task=replace(request.task, demonstrations=as_demonstrations(splits.demos)))
    elif request.task.demonstrations:
        train = without_demonstrations(splits.train, request.task)
        dev = without_demonstrations(splits.dev, request.task) if splits.dev else splits.dev
        dropped = len(splits.train) - len(train) + (len(splits.dev) - len(dev) if dev else 0)
        if dropped:
            hooks.log(f"note: {dropped} train and dev rows are demonstrations too, and were left out")
        if not train:
            raise SettingsError("every training row is one of the demonstrations", "demos_file")
        splits = replace(splits, train=train, dev=dev or None)
    if request.task.demonstrations:
        hooks.log(f"{len(request.task.demonstrations)} demonstrations before every row")
    return request, splits


def with_verbalizer(request: TuneRequest, model: Model, train, hooks: Hooks) -> tuple[TuneRequest, dict | None]:
    """With `--verbalizer auto[:K]`, the request whose task counts K more words a class, chosen from the plain
    template's answers on the training rows (one pass over them), and the choice's record for run.json."""
    spec = VerbalizerSpec.parse(request.config.verbalizer)
    if not spec.auto:
        return request, None
    task = request.task
    if task.extra_words:
        raise SettingsError("verbalizer auto chooses each class's further words, and the task names its own "
                            "(extra_words); drop one of them", "verbalizer")
    plain = TunedPrompt.template(model.manifest, task)
    enc = plain.encode(model, train)
    words = candidate_words(model.tokenizer, model.manifest)
    ids = [i for _, i in words]
    label_ids = [int(i) for i in enc.label_ids]
    columns = ids + [i for i in label_ids if i not in ids]  # the label words' probability is in the softmax too
    logits = plain.raw_logits(model, replace(enc, label_ids=np.asarray(columns, np.int64), label_groups=None))
    chosen = choose_words(logits, enc.labels, [columns.index(i) for i in label_ids], spec.words)
    worded = worded_task(task, words, chosen)
    hooks.log(f"verbalizer {spec} ({len(words)} candidate words, {len(enc)} train rows): " + "; ".join(
        f"{key}: {', '.join(w.strip() for w in class_words)}" for key, class_words in zip(task.label_keys,
                                                                                           worded.class_words)) +
        f" (train loss {chosen.loss_before:.4f} -> {chosen.loss_after:.4f})")
    return replace(request, task=worded), record(spec, words, chosen, task, len(enc))


def baselines_step(job: Prepared, hooks: Hooks, resume: bool) -> list[dict]:
    """The plain template in every framing and z = 0, scored and logged before the search."""
    task, cfg, dev = job.request.task, job.request.config, job.dev
    baselines = score_baselines(job.model, task, job.tuners[0], job.splits, dev, job.test)
    if not resume:
        for b in baselines:
            job.run.append_log({"generation": 0, "calls": 0, "baseline": b["name"], "dev_metric": b["dev_metric"],
                                "test_metric": b["test_metric"]})
    if dev is not None:
        hooks.log(f"baselines on dev ({task.metric}{', calibrated' if cfg.calibrate else ''}; on train): " +
                  ", ".join(f"{b['name']} {b['dev_metric']:.4f}" + (f" ({b['train_metric']:.4f})"
                                                                     if b.get("train_metric") is not None else "")
                            for b in baselines))
    return baselines


def search_step(job: Prepared, hooks: Hooks) -> tuple[list, float]:
    """Every seed's search in lock-step, logged and checkpointed; each seed's prompt and the wall time."""
    cfg, seeds, states, dev = job.request.config, job.request.all_seeds, job.states, job.dev
    hooks.log(f"tuning ({cfg.method}): {len(job.train)} train rows, {len(dev) if dev else 0} dev rows, budget "
              f"{cfg.budget} calls{f' x {len(seeds)} seeds' if len(seeds) > 1 else ''}, popsize {cfg.popsize}, "
              f"d={cfg.intrinsic_dim}, P={cfg.prompt_tokens} (start: {job.tuners[0].start_name}), "
              f"{job.model.engine.provider}")
    hooks.start(cfg.budget * len(seeds), sum(s.calls for s in states) if states else 0)

    def on_event(event: GenerationEvent) -> None:
        job.run.append_log(event.to_json())
        hooks.event(event)

    t0 = time.perf_counter()
    prompts = LockStep(job.tuners).fit(job.train, dev, on_event=on_event,
                                       on_checkpoint=lambda s: save_states(job.run, s), states=states)
    wall = time.perf_counter() - t0
    hooks.tuned()
    return prompts, wall


def write_step(job: Prepared, outcome: Settled, baselines: list[dict], wall: float,
               hooks: Hooks) -> tuple[dict, dict]:
    """What the run kept into prompt.npz (and the tuned prompt into tuned.npz when a template won), run.json and
    the plot; the printed metrics and the whole record."""
    run, settings, dev, test = job.run, job.settings, job.dev, job.test
    metrics = run_metrics(job.tuners, outcome, wall, len(job.train), len(dev) if dev else 0,
                          len(test) if test else 0)
    outcome.kept.save(run.path)
    if not outcome.choice_json.get("tuned", True):
        outcome.tuned.save(run.path / TUNED)  # the tuned prompt the template replaced: nothing is lost
    record = {"settings": settings, "metrics": metrics, "warnings": job.tuners[0].warnings, "baselines": baselines,
              "seeds": outcome.seeds, "ensemble": outcome.ensemble, "choice": outcome.choice_json,
              **({"blends": outcome.blends} if outcome.blends else {}),
              "provenance": provenance(job.model.engine.provider)}
    if not run.finish(settings, metrics, {k: v for k, v in record.items() if k not in ("settings", "metrics")}):
        hooks.log("note: matplotlib is not installed, so no loss.png (pip install 'bbt-onnx[plot]')")
    record = {"status": "complete", **record}
    hooks.end(run.path, record)
    return metrics, record


def check_inputs_apart(request: TuneRequest) -> None:
    """No file the run reads is one the run writes: a data or task file that is one of out's run files."""
    files = [request.data.data, request.data.train, request.data.dev, request.data.test, request.task_file,
             request.demos.demos_file]
    for path in files:
        if path and not str(path).startswith("hf:") and any(same_path(path, Path(request.out) / name)
                                                            for name in OWN_FILES):
            raise SettingsError(f"out {request.out} would replace {path}, which the run reads; name another "
                                "directory", "out")


def resume_states(run: RunDir, settings: dict, request: TuneRequest, tuners, manifest,
                  trust: bool = False) -> list[TunerState]:
    """The checkpoint of a run that may continue: same model, same data, same settings; one state per seed."""
    recorded = run.read_json()["settings"]
    if not isinstance(recorded.get("model"), dict) or not manifest.is_model(str(recorded["model"].get("fingerprint"))):
        raise RunError(f"the model in {request.model_dir} is not the one this run started with")
    if recorded.get("data_fingerprints") != settings["data_fingerprints"]:
        raise RunError("the data files changed since this run started; it cannot be resumed")
    states = read_states(run, tuners, trust)
    run.read_log()  # damage before the last line is an error now, not after the claim
    return states


