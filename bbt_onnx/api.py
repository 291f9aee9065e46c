"""The tune job from Python with friendly arguments: what `bbt-onnx tune` does (baselines, the search, the choice,
calibration, the run directory), handed back as a `Run` that opens a `Classifier`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .choice import ChoicePolicy
from .classifier import Classifier
from .data import DataSpec
from .demos import DemoSpec
from .engines import EngineSpec, OrtSpec
from .errors import SettingsError
from .jobs.tune import Hooks, TuneOutcome, TuneRequest, tune as tune_job
from .prompt import Result
from .tasks import PRESETS, Task, resolve_task
from .tuning.config import TuneConfig


@dataclass(frozen=True)
class Run:
    """A finished run: what it kept, its metrics (the JSON `bbt-onnx tune` prints), where it is, and the job's whole
    outcome (`outcome.record`: run.json; `outcome.tuned`: what tuning found, kept or not)."""

    run_dir: Path  # absolute, as model_dir: a later change of directory leaves the run found
    result: Result  # what the run kept: the tuned prompt, the seeds' ensemble, or a plain template
    metrics: dict
    model_dir: Path
    engine: EngineSpec = OrtSpec()
    outcome: TuneOutcome | None = field(default=None, repr=False, compare=False)

    @property
    def kept(self) -> str:
        """What the run kept: "tuned", "ensemble", or a plain framing's name such as "template"."""
        return self.metrics["kept"]

    @property
    def dev_metric(self) -> float | None:
        """The kept result's dev metric (None without a dev set)."""
        return self.metrics["dev_metric"]

    @property
    def test_metric(self) -> float | None:
        """The kept result's test metric (None without a test set)."""
        return self.metrics["test_metric"]

    def summary(self) -> str:
        """The line `bbt-onnx tune` ends with: calls, loss, what was kept and its scores, where the run is."""
        return self.outcome.summary() if self.outcome else f"{self.kept}: test {self.test_metric}; {self.run_dir}"

    def classifier(self, engine: EngineSpec | None = None) -> Classifier:
        """The run's result on its model, opened once on `engine` [default: the engine the run tuned on]."""
        return Classifier.load(self.model_dir, self.run_dir, self.engine if engine is None else engine)

    @classmethod
    def of(cls, outcome: TuneOutcome, request: TuneRequest) -> "Run":
        return cls(Path(outcome.run_dir).resolve(), outcome.prompt, outcome.metrics, Path(request.model_dir).resolve(),
                   request.engine, outcome)


def as_task(task: str | Path | Task) -> Task:
    """A Task, a preset's name ("sst2"), or a task JSON file."""
    if isinstance(task, Task):
        return task
    if isinstance(task, Path) or (isinstance(task, str) and task.endswith(".json")):
        return resolve_task(task_file=task)
    if isinstance(task, str):
        return resolve_task(task)
    raise SettingsError(f"task must be a preset name, a task file or a Task, got {type(task).__name__}", "task")


def as_data(data: str | Path | DataSpec, test: str | Path | None, k_shot: int | None, seed: int,
            no_dev: bool = False) -> DataSpec:
    """A DataSpec, or a labelled pool to draw k per class from (with the CLI's defaults: 16 per class, the run's
    seed drawing them; `no_dev`: the dev rows drawn join train)."""
    if isinstance(data, DataSpec):
        if test is not None or k_shot is not None or no_dev:
            raise SettingsError("test, k_shot and no_dev go inside the DataSpec when data is one",
                                ("test", "k_shot", "no_dev"))
        return data
    if not isinstance(data, (str, Path)):
        raise SettingsError(f"data must be a file, hf:NAME or a DataSpec, got {type(data).__name__}", "data")
    return DataSpec(str(data), test=None if test is None else str(test),
                    **({} if k_shot is None else {"k_shot": k_shot}), no_dev=no_dev, seed=seed)


def tune(model_dir: str | Path, task: str | Path | Task, data: str | Path | DataSpec, out: str | Path, *,
         config: TuneConfig = TuneConfig(), seeds: Sequence[int] = (), policy: ChoicePolicy = ChoicePolicy(),
         engine: EngineSpec = OrtSpec(), test: str | Path | None = None, k_shot: int | None = None,
         data_seed: int | None = None, demos: int | DemoSpec | None = None, no_dev: bool = False,
         force: bool = False, log: Callable[[str], None] | None = None, hooks: Hooks | None = None) -> Run:
    """`bbt-onnx tune`: score the plain template in every framing, tune (several `seeds` in lock-step), keep the
    tuned prompt only when it beats the best template on dev (`policy`), score `test`, write the run into `out`.

    `task`: a preset name, a task JSON file or a Task. `data`: a labelled pool (a file or hf:NAME) drawn `k_shot`
    per class (16) for train and again for dev, by `data_seed` [default: the run's seed], the dev rows tuned on too
    with `no_dev` (no dev set: nothing compares the result with the template); or a DataSpec (explicit train, dev
    and test files). `demos`: K demonstrations per class drawn from the pool after train and dev (`tune
    --demos K`), or a DemoSpec (a file's). `force` replaces an earlier run in `out`. `log` hears the messages the
    CLI prints; `hooks` every event. Every input is checked before anything is written (a `BBTError` otherwise)."""
    if seeds:
        config = replace(config, seed=seeds[0])  # as the CLI does; the config checks each seed
    spec = as_data(data, test, k_shot, config.seed if data_seed is None else data_seed, no_dev)
    task_file = None if isinstance(task, Task) or str(task) in PRESETS else str(task)
    demo_spec = demos if isinstance(demos, DemoSpec) else DemoSpec(demos)
    request = TuneRequest(str(model_dir), demo_spec.apply(as_task(task), spec.seed, pool=True), spec, config,
                          str(out), engine, tuple(seeds), policy, task_file, demo_spec)
    hooks = hooks or Hooks()
    if log is not None:
        hooks = replace(hooks, log=log)
    return Run.of(tune_job(request, hooks, force=force), request)
