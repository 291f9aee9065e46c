"""Whole jobs behind the CLI, usable from Python too: tune into a run directory, with resume."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import DataSpec, load_splits
from .errors import BBTError
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
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    max_length: int | None = None

    def settings(self, model: Model) -> dict:
        return {
            "model": {"dir": str(Path(self.model_dir).resolve()), "fingerprint": model.manifest.fingerprint(),
                      "precision": self.precision, "device": self.device},
            "task": self.task.to_json(),
            "data": self.data.to_json(),
            "tune": self.config.to_json(),
            "max_length": self.max_length,
        }

    @classmethod
    def from_settings(cls, settings: dict, out: str, device: str | None = None,
                      threads: int | None = None) -> "TuneRequest":
        try:
            return cls(model_dir=settings["model"]["dir"], task=Task.from_json(settings["task"]),
                       data=DataSpec(**settings["data"]), config=TuneConfig(**settings["tune"]), out=out,
                       device=device or settings["model"]["device"], precision=settings["model"]["precision"],
                       threads=threads, max_length=settings.get("max_length"))
        except (KeyError, TypeError) as exc:
            raise BBTError(f"{out}/run.json has incomplete settings ({exc}); it cannot be resumed") from None


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


def tune(request: TuneRequest, hooks: Hooks = Hooks(), resume: bool = False, force: bool = False) -> TuneOutcome:
    """Check every input first, then tune, checkpoint, score the test set and write the run directory."""
    run = RunDir.open_existing(request.out) if resume else RunDir.check_new(request.out, force)
    model = Model.load(request.model_dir, device=request.device, precision=request.precision,
                       threads=request.threads)
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

    state: TunerState | None = None
    if resume:
        recorded = run.read_json().get("settings", {})
        if recorded.get("model", {}).get("fingerprint") != settings["model"]["fingerprint"]:
            raise BBTError(f"the model in {request.model_dir} is not the one this run started with")
        if recorded.get("data_fingerprints") != splits.fingerprints:
            raise BBTError("the data files changed since this run started; it cannot be resumed")
        state = run.load_checkpoint()
        run.truncate_log(state.generation)
        hooks.log(f"resuming {run.path} at {state.calls} calls (generation {state.generation})")
    else:
        run.start(settings)
    hooks.log(f"tuning: {len(train)} train rows, {len(dev) if dev else 0} dev rows, budget {request.config.budget} "
              f"calls, popsize {request.config.popsize}, d={request.config.intrinsic_dim}, "
              f"P={request.config.prompt_tokens}, {model.engine.provider}")
    hooks.start(request.config.budget, state.calls if state else 0)

    def on_event(event: GenerationEvent) -> None:
        run.append_log(event.to_json())
        hooks.event(event)

    prompt = tuner.fit(train, dev, on_event=on_event, on_checkpoint=run.save_checkpoint, state=state)
    report = tuner.report
    metrics = report.to_json()
    metrics["optimizer_ms_per_generation"] = 1000 * report.optimizer_seconds / max(report.generations, 1)
    metrics["optimizer_share"] = report.optimizer_seconds / report.wall_seconds if report.wall_seconds else 0.0
    metrics["test_metric"] = None
    metrics.update(train_rows=len(train), dev_rows=len(dev) if dev else 0, test_rows=len(test) if test else 0)
    if test is not None:
        t0 = time.perf_counter()
        result = prompt.evaluate(model, test)
        metrics["test_metric"] = result["metric"]
        metrics["test_accuracy"] = result["accuracy"]
        metrics["test_seconds"] = time.perf_counter() - t0
    prompt.save(run.path)
    if not run.finish(settings, metrics, {"warnings": tuner.warnings}):
        hooks.log("note: matplotlib is not installed, so no loss.png (pip install 'bbt-onnx[plot]')")
    return TuneOutcome(prompt, metrics, run.path, tuner.warnings)
