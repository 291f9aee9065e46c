"""`bbt-onnx sweep SPEC`: many ordinary tunes (tasks x a grid of settings), each a trial of an executor that
already exists (a Ray cluster, a Slurm job array), never a scheduler of our own.

A trial is one `tune` with its own run directory under the sweep's folder, so everything that reads runs reads a
sweep's. A trial that starts again (a killed worker, a requeued job, `--resume`) continues from its run's own
checkpoint, so its z equals an uninterrupted run's; a finished trial is not run twice. The spec is checked whole,
every trial's settings built as tune builds them, before any trial starts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..data import load_splits
from ..errors import BBTError, RunError, SettingsError
from ..fileio import JSON_LIMIT, read_text_bounded, write_json_atomic
from ..encoding import Encoder, load_tokenizer
from ..engines import OrtSpec
from ..manifest import load_manifest
from ..methods import method_for
from ..options import setting
from ..progress import Progress
from ..runs import CHECKPOINTS, RUN_JSON, read_run_json
from ..tracking import open_tracker, redact, track
from .tune import Hooks, TuneRequest, tune

SWEEP_JSON = "sweep.json"  # the spec and the trials, written before the first trial starts
RUNS = "runs"  # one run directory per trial
LOGS = "logs"  # one log per trial: its worker, the tune's notes and its progress
PROGRESS_EVERY = 30.0  # seconds between a trial's status lines in its log
SPEC_KEYS = ("model", "tasks", "settings", "grid")
# tune's options a spec may not set: the sweep decides where runs go and resumes them itself
NOT_IN_SPEC = ("out", "resume", "force", "force_any", "trust_checkpoint", "quiet", "model")
MAX_TRIALS = 10_000
MAX_SPEC_VALUES = 100_000  # values in a spec once YAML aliases are expanded
TRIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,250}")  # what trials() makes: a folder name, never a path
EXECUTORS = ("ray", "slurm")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")  # `pkg.SomeError: message`


@dataclass(frozen=True)
class SweepOptions:
    """How the trials run; the spec says what they are."""

    executor: str = setting("ray", "Where the trials run: ray (a local Ray cluster, or the one --address names) or "
                            "slurm (one job array through submitit; submitit's local executor where there is no "
                            "Slurm).", choices=EXECUTORS)
    address: str | None = setting(None, "With ray: join this cluster (auto, or HOST:PORT) instead of starting a "
                                  "local one [default: RAY_ADDRESS when set].")
    cpus_per_trial: int = setting(1, "CPUs each trial holds; the trial's onnxruntime threads default to it.",
                                  minimum=1)
    max_failures: int = setting(2, "Times a trial whose worker died starts again (from its last checkpoint).",
                                minimum=0)
    slurm_partition: str | None = setting(None, "With slurm: the partition to submit to.")
    slurm_minutes: int = setting(60, "With slurm: each job's time limit in minutes (a job that reaches it is "
                                 "requeued and resumes).", minimum=1)

    def check(self) -> "SweepOptions":
        if self.executor not in EXECUTORS:
            raise SettingsError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}", "executor")
        if self.address and self.executor != "ray":
            raise SettingsError("address names a Ray cluster and goes with executor ray", ("address", "executor"))
        if self.slurm_partition and self.executor != "slurm":
            raise SettingsError("slurm_partition goes with executor slurm", ("slurm_partition", "executor"))
        return self

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TrialPlan:
    """One grid point for one task: its name (its run directory's) and tune's options, named as its flags are."""

    name: str
    task: str
    point: dict  # the grid's values for this trial
    options: dict  # the spec's settings, the task's and the point's, in that order of precedence (last wins)


@dataclass(frozen=True)
class SweepSpec:
    model: str
    tasks: dict[str, dict]
    settings: dict = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, where: str = "spec") -> "SweepSpec":
        if not isinstance(raw, dict):
            raise SettingsError(f"{where} is not a mapping with {', '.join(SPEC_KEYS)}", "spec")
        unknown = sorted(set(raw) - set(SPEC_KEYS))
        if unknown:
            raise SettingsError(f"{where} has unknown keys {unknown}; it holds {', '.join(SPEC_KEYS)}", "spec")
        if not isinstance(raw.get("model"), str) or not raw["model"]:
            raise SettingsError(f"{where} names no model (model: a model directory from bbt-onnx export)", "spec")
        tasks = raw.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            raise SettingsError(f"{where} names no tasks (tasks: a mapping of names to their tune settings, e.g. "
                                "mr: {task: sst2, data: mr.csv})", "spec")
        for name, options in tasks.items():
            check_name(str(name), f"{where}: task name")
            options_of(options, f"{where}: tasks.{name}")
        settings = options_of(raw.get("settings") or {}, f"{where}: settings")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise SettingsError(f"{where}: grid is not a mapping of tune settings to lists of values", "spec")
        grid = options_of(grid, f"{where}: grid")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SettingsError(f"{where}: grid.{key} is not a non-empty list of values", "spec")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise SettingsError(f"{where}: grid.{key} names a value twice", "spec")
        spec = cls(raw["model"], {str(k): options_of(v, "") for k, v in tasks.items()}, settings, grid)
        count = len(spec.tasks) * _product_size(spec.grid)
        if count > MAX_TRIALS:
            raise SettingsError(f"{where} makes {count} trials; a sweep runs at most {MAX_TRIALS}", "spec")
        return spec

    def to_json(self) -> dict:
        return {"model": self.model, "tasks": self.tasks, "settings": self.settings, "grid": self.grid}

    def trials(self) -> list[TrialPlan]:
        """Every task with every grid point, in the spec's order: task first, then the grid's keys as written."""
        keys = list(self.grid)
        plans = []
        for task, task_options in self.tasks.items():
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values))
                name = "-".join([task] + [f"{k}={_word(v)}" for k, v in point.items()])
                plans.append(TrialPlan(name, task, point, {**self.settings, **task_options, **point}))
        names = [p.name for p in plans]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SettingsError(f"the spec makes trials of the same name {twice}: give the grid's values apart", "spec")
        return plans


def _product_size(grid: dict) -> int:
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def _word(value) -> str:
    """A grid value as it appears in a trial's name: letters, digits and . _ + only."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9._+]+", "_", text).strip("_")[:40] or "_"


def check_name(name: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", name):
        raise SettingsError(f"{what} {name!r} must be 1 to 64 letters, digits, '.', '_', '+' or '-' (it names "
                            "run directories)", "spec")


def options_of(raw: Any, where: str) -> dict:
    """tune's options named as its flags are, without the dashes (a spec may write `k-shot` or `k_shot`)."""
    if not isinstance(raw, dict):
        raise SettingsError(f"{where} is not a mapping of tune settings", "spec")
    options = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in NOT_IN_SPEC:
            raise SettingsError(f"{where}: {key} is the sweep's to set (each trial's run directory and resume are "
                                "the sweep's; the model is the spec's model)", "spec")
        options[name] = value
    return options


def too_large(tree: Any, limit: int) -> bool:
    """Whether a loaded document holds more than `limit` values, counting each place a shared (aliased) value
    appears; stops counting at the limit, so a cycle or an alias bomb costs at most `limit` steps."""
    stack, seen = [tree], 0
    while stack:
        seen += 1
        if seen > limit:
            return True
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def read_spec(path: str | Path) -> SweepSpec:
    """A spec from YAML (needs PyYAML, which the ray and slurm extras bring) or JSON."""
    path = Path(path)
    try:
        text = read_text_bounded(path, JSON_LIMIT)
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the sweep spec {path}: {exc}", "spec") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SettingsError("a YAML spec needs PyYAML (pip install 'bbt-onnx[ray]'); or write it as JSON",
                                "spec") from None
        try:
            raw = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise SettingsError(f"{path} is not valid YAML: {' '.join(str(exc).split())}", "spec") from None
        if too_large(raw, MAX_SPEC_VALUES):  # aliases (*name) repeat what they name: a small file can hold billions
            raise SettingsError(f"{path} holds more than {MAX_SPEC_VALUES} values once its YAML aliases are "
                                "expanded; write the spec out without repeating aliases", "spec")
    else:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise SettingsError(f"{path} is not valid JSON ({exc}); a .yaml or .yml spec is read as YAML",
                                "spec") from None
    return SweepSpec.from_json(raw, str(path))


# --------------------------------------------------------------------------- the trials
@dataclass(frozen=True)
class Trial:
    """What a worker runs: one tune request, and where the sweep was started (relative paths are from there)."""

    name: str
    request: TuneRequest
    cwd: str
    log: str  # the trial's log file
    track: tuple[str, str | None] | None = None  # the experiment tracker and its store, as tune's track, track_uri
    track_parent: str | None = None  # the sweep's own run in that tracker, which the trial's is nested under


@dataclass(frozen=True)
class TrialResult:
    name: str
    metrics: dict | None  # the finished run's metrics; None when it failed
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Sweep:
    folder: Path
    spec: SweepSpec
    options: SweepOptions
    trials: list[Trial]


def run_dir_state(out: str | Path) -> str:
    """finished, resumable (a checkpoint to continue from) or new (nothing yet, or a start without a checkpoint)."""
    out = Path(out)
    if (out / RUN_JSON).is_file():
        try:
            if read_run_json(out / RUN_JSON).get("status") == "complete":
                return "finished"
        except RunError:
            return "new"
    if any((out / name).is_file() for name in CHECKPOINTS):
        return "resumable"
    return "new"


@contextmanager
def working_dir(path: str):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_trial(trial: Trial) -> dict:
    """The worker's side: one tune into the trial's run directory, continued from its checkpoint when it has one;
    a finished run's metrics are read back, never run twice. Returns the run's metrics."""
    Path(trial.log).parent.mkdir(parents=True, exist_ok=True)
    with open(trial.log, "a", encoding="utf-8") as log, working_dir(trial.cwd):
        def note(message: str) -> None:
            log.write(message + "\n")
            log.flush()

        out = trial.request.out
        state = run_dir_state(out)
        note(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {os.uname().nodename}: {state}")
        if state == "finished":
            return read_run_json(Path(out) / RUN_JSON)["metrics"]
        request = trial.request
        if state == "resumable":
            request = TuneRequest.from_settings(read_run_json(Path(out) / RUN_JSON)["settings"], out, request.engine)
        progress = Progress(False, stream=log, every=PROGRESS_EVERY)
        hooks = Hooks(log=note, start=progress.start, event=progress.update, tuned=progress.close)
        try:
            outcome = tune(request, track(hooks, *trial.track, trial.track_parent) if trial.track else hooks,
                           resume=state == "resumable", force=state == "new", force_any=state == "new")
        finally:
            progress.close()
        note(outcome.summary())
        return outcome.metrics


def check_inputs(trials: list[Trial]) -> None:
    """What tune checks before it writes, for every trial, before the first starts: the settings, the model (its
    manifest, the graph the trial opens, the task and prompt length against it) and every task's rows (each model
    and data read once). A server's graphs are its own: its trials meet it when they start."""
    models, rows, trackers = {}, set(), set()
    for trial in trials:
        request, config = trial.request, trial.request.config
        try:
            request.check()
            if request.model_dir not in models:
                manifest = load_manifest(request.model_dir, graphs=request.engine.needs_graphs)
                models[request.model_dir] = manifest, load_tokenizer(manifest)
            manifest, tokenizer = models[request.model_dir]
            if isinstance(request.engine, OrtSpec):
                manifest.graph(request.engine.precision, method_for(config.method).deep)  # the graph it opens
            Encoder(tokenizer, manifest, request.task, config.prompt_tokens, config.max_length)  # task and P fit
            if trial.track and trial.track not in trackers:
                trackers.add(trial.track)
                open_tracker(*trial.track)  # its package is there (the store itself opens when a trial begins)
            key = json.dumps([request.data.to_json(), request.task.label_keys, request.demos.from_pool], default=str)
            if key not in rows:
                load_splits(request.data, request.task.label_keys, request.demos.from_pool)
                rows.add(key)
        except BBTError as exc:
            raise type(exc)(f"trial {trial.name}: {exc}", exc.arguments) from None


def plan_record(sweep: Sweep) -> dict:
    return {"spec": sweep.spec.to_json(), "options": sweep.options.to_json(), "cwd": sweep.trials[0].cwd,
            "trials": [t.name for t in sweep.trials]}


def read_plan(folder: str | Path) -> dict:
    """A sweep folder's sweep.json, for --resume and for report."""
    path = Path(folder) / SWEEP_JSON
    if not path.is_file():
        raise RunError(f"{folder} has no {SWEEP_JSON}: not a sweep folder written by `bbt-onnx sweep`")
    try:
        raw = json.loads(read_text_bounded(path, JSON_LIMIT))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("trials"), list) or not isinstance(raw.get("spec"), dict) \
            or not isinstance(raw.get("cwd"), str) \
            or not all(isinstance(n, str) and TRIAL_NAME.fullmatch(n) for n in raw["trials"]):
        raise RunError(f"{path} is not a sweep.json written by `bbt-onnx sweep`")
    return raw


def sweep_runs(folder: str | Path) -> tuple[list[Path], list[str]]:
    """A sweep's finished run directories, and the names of its trials that have not finished."""
    plan = read_plan(folder)
    done, missing = [], []
    for name in plan["trials"]:
        out = Path(folder) / RUNS / name
        if run_dir_state(out) == "finished":
            done.append(out)
        else:
            missing.append(name)
    return done, missing


def exception_line(text: str) -> str:
    """A failed trial's cause out of the traceback an executor kept: the last `...Error: message` line, else the
    text's first line (an executor's own words: a job killed, timed out too often)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    return raised[-1] if raised else (lines[0] if lines else "")


def summary_line(result: TrialResult, index: int, total: int) -> str:
    """One line a finished trial: what its run kept and its scores, or why it failed."""
    head = f"[{index}/{total}] {result.name}"
    if result.metrics is None:
        return f"{head}: failed: {' '.join(str(result.error).split())[:300]}"
    m = result.metrics

    def score(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.4f}"

    return (f"{head}: kept {m.get('kept')}, dev {score('dev_metric')}, test {score('test_metric')} "
            f"({m.get('api_calls')} calls, {result.seconds:.1f}s)")


def start_sweep(sweep: Sweep, resume: bool) -> None:
    """Write sweep.json (the plan), before the first trial; a resumed sweep keeps its own."""
    sweep.folder.mkdir(parents=True, exist_ok=True)
    (sweep.folder / LOGS).mkdir(exist_ok=True)
    if not resume:
        write_json_atomic(sweep.folder / SWEEP_JSON, plan_record(sweep))


def track_key(track: tuple[str, str | None]) -> str:
    """How sweep.json names a tracker's store (its URI without credentials)."""
    name, uri = track
    return f"{name} {redact(uri, uri) if uri else 'default'}"


def open_groups(sweep: Sweep) -> dict[tuple, str]:
    """The sweep's own run in each tracker its trials log to (a resumed sweep's again), kept in sweep.json."""
    tracks = list(dict.fromkeys(t.track for t in sweep.trials if t.track))
    if not tracks:
        return {}
    plan = read_plan(sweep.folder)
    known = plan.get("tracking") if isinstance(plan.get("tracking"), dict) else {}
    settings = {"model": sweep.spec.model, "tasks": ",".join(sweep.spec.tasks), "trials": len(sweep.trials),
                "executor": sweep.options.executor, "grid": {k: json.dumps(v) for k, v in sweep.spec.grid.items()}}
    groups = {t: open_tracker(*t).open_group(sweep.folder.name, settings, known.get(track_key(t))) for t in tracks}
    write_json_atomic(sweep.folder / SWEEP_JSON, {**plan, "tracking": {**known, **{track_key(t): g
                                                                                  for t, g in groups.items()}}})
    return groups


def close_groups(groups: dict[tuple, str], counts: dict, status: str, best_effort: bool = False) -> None:
    """The sweep's runs closed with its counts (no status: deleted, for a sweep taken back before a trial began);
    `best_effort` after an error, which stays the one the user sees."""
    for store, group in groups.items():
        try:
            open_tracker(*store).close_group(group, counts, status)
        except Exception:  # noqa: BLE001 - a tracker's own failure
            if not best_effort:
                raise


def check_new_folder(folder: Path) -> None:
    if (folder / SWEEP_JSON).exists():
        raise RunError(f"{folder} holds a sweep already; continue it with resume, or choose another out", "out")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RunError(f"out {folder} exists and is not an empty folder; choose another", "out")


def forget(folder: Path, fresh: bool) -> None:
    """Take back a new sweep that no trial began: all it holds is ours (its folder was empty or absent before)."""
    for entry in folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if fresh:
        folder.rmdir()


Runner = Callable[[Sweep, Callable[[TrialResult], None]], None]  # an executor: run every trial, report each


def run_sweep(sweep: Sweep, runner: Runner, resume: bool = False, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Run every trial not finished yet on `runner`, one line on `log` per finished trial; the summary."""
    if not resume:
        check_new_folder(sweep.folder)
    fresh = not sweep.folder.exists()
    start_sweep(sweep, resume)
    pending = [t for t in sweep.trials if run_dir_state(t.request.out) != "finished"]
    if len(pending) < len(sweep.trials):
        log(f"{len(sweep.trials) - len(pending)} of {len(sweep.trials)} trials finished before; running the other "
            f"{len(pending)}")
    results: list[TrialResult] = []

    def done(result: TrialResult) -> None:
        results.append(result)
        log(summary_line(result, len(results), len(pending)))

    groups: dict[tuple, str] = {}

    def counts() -> dict:
        return {"trials": len(sweep.trials), "ran": len(results),
                "finished": sum(run_dir_state(t.request.out) == "finished" for t in sweep.trials),
                "failed": [r.name for r in results if r.metrics is None],
                "not_run": sorted({t.name for t in pending} - {r.name for r in results})}

    if pending:
        try:
            groups = open_groups(sweep)
            pending = [replace(t, track_parent=groups.get(t.track)) for t in pending]
            runner(Sweep(sweep.folder, sweep.spec, sweep.options, pending), done)
        except BaseException as exc:
            if not resume and not (sweep.folder / RUNS).exists():  # refused before a trial began: nothing to keep
                forget(sweep.folder, fresh)
                close_groups(groups, {}, "", best_effort=True)
            elif groups:
                close_groups(groups, numbers(counts()), "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                             best_effort=True)
            raise
    summary = counts()
    if groups:
        close_groups(groups, numbers(summary), "FAILED" if summary["failed"] or summary["not_run"] else "FINISHED")
    return {"folder": str(sweep.folder), **summary}


def numbers(summary: dict) -> dict[str, int]:
    """A summary's counts (a list counts its names)."""
    return {k: len(v) if isinstance(v, list) else v for k, v in summary.items()}
