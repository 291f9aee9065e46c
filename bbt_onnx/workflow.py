"""Whole jobs behind the CLI, usable from Python too: tune into a run directory, with resume."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import DataSpec, load_splits
from .engines import EngineSpec, OrtSpec
from .errors import BBTError, RunError, SettingsError
from .fileio import check_apart
from .methods import method_for
from .model import Model
from .prompt import TunedPrompt
from .runs import RunDir
from .tasks import Task
from .tuner import BlackBoxTuner, GenerationEvent, TuneConfig, TunerState


@dataclass(frozen=True)
class TuneRequest:
    model_dir: str
    task: Task
    data: DataSpec
    config: TuneConfig
    out: str
    engine: EngineSpec = OrtSpec()  # a server's spec: the token is never written to the run

    def settings(self, model: Model) -> dict:
        return {
            "model": {"dir": str(Path(self.model_dir).resolve()), "fingerprint": model.manifest.fingerprint(),
                      **self.engine.record(model.engine)},
            "task": self.task.to_json(),
            "data": self.data.to_json(),
            "tune": self.config.to_json(),
        }

    @classmethod
    def from_settings(cls, settings: dict, out: str, engine: EngineSpec = OrtSpec()) -> "TuneRequest":
        """The request that continues a run on `engine` (a run may move between a server and the process: the
        fingerprint check makes sure the model is the same); an in-process engine keeps the run's graph."""
        try:
            tune = dict(settings["tune"])
            tune.setdefault("max_length", settings.get("max_length"))  # runs from before it moved into "tune"
            return cls(model_dir=settings["model"]["dir"], task=Task.from_json(settings["task"]),
                       data=DataSpec(**settings["data"]), config=TuneConfig(**tune), out=out,
                       engine=engine.resumed(settings["model"]))
        except (KeyError, TypeError, ValueError, AttributeError, BBTError) as exc:
            raise RunError(f"{out}/run.json has incomplete or damaged settings ({type(exc).__name__}: {exc}); "
                           "it cannot be resumed") from None


@dataclass
class Hooks:
    """How a job talks to its caller: human messages, the run's start, and each generation."""

    log: Callable[[str], None] = lambda _msg: None
    start: Callable[[int, int], None] = lambda _total, _done: None  # (budget, calls already done)
    event: Callable[[GenerationEvent], None] = lambda _e: None


@dataclass
class TuneOutcome:
    prompt: TunedPrompt
    metrics: dict
    run_dir: Path
    warnings: list[str] = field(default_factory=list)


def tune(request: TuneRequest, hooks: Hooks = Hooks(), resume: bool = False, force: bool = False,
         force_any: bool = False, trust_checkpoint: bool = False) -> TuneOutcome:
    """Check every input first, then claim the run directory, tune, checkpoint, score the test set and
    write the run. Nothing on disk changes until every input and setting has been checked. `force` replaces an
    earlier run in `request.out` (kept until the new one has a checkpoint), `force_any` writes into a directory that
    holds no run; `trust_checkpoint` lets `resume` unpickle an old checkpoint.pkl (which can run code)."""
    request.config.check()
    check_apart(request.out, [("model directory", request.model_dir)])
    if not resume:
        check_inputs_apart(request)
    run = RunDir.open_existing(request.out) if resume else RunDir.check_new(request.out, force, force_any)
    run.log = hooks.log
    model = Model.load(request.model_dir, request.engine, deep=method_for(request.config.method).deep)
    splits = load_splits(request.data, request.task.label_keys)
    tuner = BlackBoxTuner(model, request.task, request.config)
    for w in tuner.warnings:
        hooks.log(f"warning: {w}")
    train, dev = tuner.encode(splits.train), tuner.encode(splits.dev)
    test = tuner.encode(splits.test) if splits.test else None
    for name, enc in (("train", train), ("dev", dev), ("test", test)):
        if enc is not None and enc.truncated:
            hooks.log(f"note: {enc.truncated} of {len(enc)} {name} rows were cut to fit {tuner.encoder.max_length} tokens")
    if dev is None:
        hooks.log("note: no dev set; the prompt with the lowest training loss is kept")
    settings = request.settings(model)
    settings["data_fingerprints"] = splits.fingerprints
    state = resume_state(run, settings, request, tuner, model.manifest, trust_checkpoint) if resume else None
    if state is not None:
        tuner.check_state(state)

    with run.claim():
        if resume:
            run.truncate_log(state.generation)
            hooks.log(f"resuming {run.path} at {state.calls} calls (generation {state.generation})")
        else:
            run.check_empty(force, force_any)  # again, now that no other tune can be writing it
            run.start(settings)
        hooks.log(f"tuning ({request.config.method}): {len(train)} train rows, {len(dev) if dev else 0} dev rows, budget "
                  f"{request.config.budget} calls, popsize {request.config.popsize}, d={request.config.intrinsic_dim}, "
                  f"P={request.config.prompt_tokens}, {model.engine.provider}")
        hooks.start(request.config.budget, state.calls if state else 0)

        def on_event(event: GenerationEvent) -> None:
            run.append_log(event.to_json())
            hooks.event(event)

        prompt = tuner.fit(train, dev, on_event=on_event, on_checkpoint=run.save_checkpoint, state=state)
        metrics = fit_metrics(tuner.report, len(train), len(dev) if dev else 0, len(test) if test else 0)
        if test is not None:
            t0 = time.perf_counter()
            result = prompt.evaluate(model, test)
            metrics["test_metric"] = result.metric
            metrics["test_accuracy"] = result.accuracy
            metrics["test_seconds"] = time.perf_counter() - t0
        prompt.save(run.path)
        if not run.finish(settings, metrics, {"warnings": tuner.warnings}):
            hooks.log("note: matplotlib is not installed, so no loss.png (pip install 'bbt-onnx[plot]')")
    return TuneOutcome(prompt, metrics, run.path, tuner.warnings)


def check_inputs_apart(request: TuneRequest) -> None:
    """No file the run reads is one the run writes: a data or task file that is one of --out's run files."""
    from .fileio import same_path
    from .runs import OWN_FILES

    files = [request.data.data, request.data.train, request.data.dev, request.data.test]
    for path in files:
        if path and not str(path).startswith("hf:") and any(same_path(path, Path(request.out) / name)
                                                            for name in OWN_FILES):
            raise SettingsError(f"out {request.out} would replace {path}, which the run reads; name another "
                                "directory", "out")


def resume_state(run: RunDir, settings: dict, request: TuneRequest, tuner: BlackBoxTuner, manifest,
                 trust: bool = False) -> TunerState:
    """The checkpoint of a run that may continue: same model, same data, same settings."""
    recorded = run.read_json()["settings"]
    if not isinstance(recorded.get("model"), dict) or not manifest.is_model(str(recorded["model"].get("fingerprint"))):
        raise RunError(f"the model in {request.model_dir} is not the one this run started with")
    if recorded.get("data_fingerprints") != settings["data_fingerprints"]:
        raise RunError("the data files changed since this run started; it cannot be resumed")
    state = run.load_checkpoint(tuner, trust)
    run.read_log()  # damage before the last line is an error now, not after the claim
    return state


def fit_metrics(report, train_rows: int, dev_rows: int, test_rows: int) -> dict:
    metrics = report.to_json()
    metrics["optimizer_ms_per_generation"] = 1000 * report.optimizer_seconds / max(report.generations, 1)
    metrics["optimizer_share"] = report.optimizer_seconds / report.wall_seconds if report.wall_seconds else 0.0
    metrics["test_metric"] = None
    metrics.update(train_rows=train_rows, dev_rows=dev_rows, test_rows=test_rows)
    return metrics
