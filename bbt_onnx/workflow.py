"""Whole jobs behind the CLI, usable from Python too: tune into a run directory, with resume.

A run never hands back less than the user had: before tuning it scores the plain template in every framing the
model allows (and z = 0), after tuning it compares the tuned prompt (or the seeds' ensemble) with the best of them
on dev (choice.py), and keeps the template when tuning did not earn its place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import losses
from .baselines import plain_framings
from .calibration import calibrated
from .choice import choose, scored
from .data import DataSpec, load_splits
from .encoding import EncodedSet
from .engines import EngineSpec, OrtSpec
from .errors import BBTError, RunError, SettingsError
from .fileio import check_apart
from .lockstep import LockStep
from .methods import method_for
from .model import Model
from .prompt import PromptEnsemble, Result, TunedPrompt, prior_of
from .provenance import provenance
from .runs import TUNED, RunDir
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
    seeds: tuple[int, ...] = ()  # seeds run in lock-step on the same rows; () is config.seed alone

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.config.seed,)

    def check(self) -> None:
        self.config.check()
        seeds = self.all_seeds
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
            "seeds": list(self.all_seeds),
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
                       data=DataSpec(**settings["data"]), config=TuneConfig(**tune), out=out,
                       engine=engine.resumed(settings["model"]), seeds=tuple(int(s) for s in settings.get("seeds", ())))
        except (KeyError, TypeError, ValueError, AttributeError, BBTError) as exc:
            raise RunError(f"{out}/run.json has incomplete or damaged settings ({type(exc).__name__}: {exc}); "
                           "it cannot be resumed") from None


@dataclass
class Hooks:
    """How a job talks to its caller: human messages, the run's start, each generation, and the finished run."""

    log: Callable[[str], None] = lambda _msg: None
    start: Callable[[int, int], None] = lambda _total, _done: None  # (budget of all seeds, calls already done)
    event: Callable[[GenerationEvent], None] = lambda _e: None
    begin: Callable[[str, dict], None] = lambda _name, _settings: None  # the run's name and settings
    tuned: Callable[[], None] = lambda: None  # the search is over (what follows scores and chooses)
    end: Callable[[Path, dict], None] = lambda _dir, _record: None  # the run directory and its run.json


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


def tune(request: TuneRequest, hooks: Hooks = Hooks(), resume: bool = False, force: bool = False,
         force_any: bool = False, trust_checkpoint: bool = False) -> TuneOutcome:
    """Check every input first, then claim the run directory; score the baselines, tune every seed, choose between
    the tuned prompt and the best plain template on dev, score the test set and write the run. Nothing on disk
    changes until every input and setting has been checked. `force` replaces an earlier run in `request.out` (kept
    until the new one has a checkpoint), `force_any` writes into a directory that holds no run; `trust_checkpoint`
    lets `resume` unpickle an old checkpoint.pkl (which can run code)."""
    request.check()
    check_apart(request.out, [("model directory", request.model_dir)])
    if not resume:
        check_inputs_apart(request)
    run = RunDir.open_existing(request.out) if resume else RunDir.check_new(request.out, force, force_any)
    run.log = hooks.log
    model = Model.load(request.model_dir, request.engine, deep=method_for(request.config.method).deep)
    splits = load_splits(request.data, request.task.label_keys)
    recorded = run.read_json() if resume else {}
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
    settings["start"] = start or {"name": first.start_name, "ids": list(first.encoder.placeholder_ids),
                                  "candidates": first.start_scores}
    states = resume_states(run, settings, request, tuners, model.manifest, trust_checkpoint) if resume else None
    if states is not None:
        for tuner, state in zip(tuners, states):
            tuner.check_state(state)
    cfg, seeds = request.config, request.all_seeds

    with run.claim():
        if resume:
            run.truncate_log(max(s.generation for s in states))
            hooks.log(f"resuming {run.path} at {sum(s.calls for s in states)} calls")
        else:
            run.check_empty(force, force_any)  # again, now that no other tune can be writing it
            run.start(settings)
        hooks.begin(run.path.name, settings)
        baselines = score_baselines(model, request.task, first, splits, dev, test)
        if not resume:
            for b in baselines:
                run.append_log({"generation": 0, "calls": 0, "baseline": b["name"], "dev_metric": b["dev_metric"],
                                "test_metric": b["test_metric"]})
        if dev is not None:
            hooks.log(f"baselines on dev ({request.task.metric}{', calibrated' if cfg.calibrate else ''}): " +
                      ", ".join(f"{b['name']} {b['dev_metric']:.4f}" for b in baselines))
        hooks.log(f"tuning ({cfg.method}): {len(train)} train rows, {len(dev) if dev else 0} dev rows, budget "
                  f"{cfg.budget} calls{f' x {len(seeds)} seeds' if len(seeds) > 1 else ''}, popsize {cfg.popsize}, "
                  f"d={cfg.intrinsic_dim}, P={cfg.prompt_tokens} (start: {first.start_name}), {model.engine.provider}")
        hooks.start(cfg.budget * len(seeds), sum(s.calls for s in states) if states else 0)

        def on_event(event: GenerationEvent) -> None:
            run.append_log(event.to_json())
            hooks.event(event)

        t0 = time.perf_counter()
        prompts = LockStep(tuners).fit(train, dev, on_event=on_event, on_checkpoint=run.save_checkpoint,
                                       states=states)
        wall = time.perf_counter() - t0
        hooks.tuned()
        outcome = settle(model, request, tuners, prompts, baselines, dev, test, hooks)
        baselines = [public(b) for b in baselines]
        metrics = run_metrics(tuners, outcome, wall, len(train), len(dev) if dev else 0, len(test) if test else 0)
        outcome.kept.save(run.path)
        if not outcome.choice_json.get("tuned", True):
            outcome.tuned.save(run.path / TUNED)  # the tuned prompt the template replaced: nothing is lost
        record = {"settings": settings, "metrics": metrics, "warnings": first.warnings, "baselines": baselines,
                  "seeds": outcome.seeds, "ensemble": outcome.ensemble, "choice": outcome.choice_json,
                  "provenance": provenance(model.engine.provider)}
        if not run.finish(settings, metrics, {k: v for k, v in record.items() if k not in ("settings", "metrics")}):
            hooks.log("note: matplotlib is not installed, so no loss.png (pip install 'bbt-onnx[plot]')")
        record = {"status": "complete", **record}
        hooks.end(run.path, record)
    return TuneOutcome(outcome.kept, metrics, run.path, first.warnings, record, outcome.tuned, list(prompts))


@dataclass
class Settled:
    """What the run decided at the end."""

    kept: Result
    tuned: Result
    seeds: list[dict]
    ensemble: dict | None
    choice_json: dict


def score_baselines(model: Model, task: Task, tuner: BlackBoxTuner, splits, dev, test) -> list[dict]:
    """The plain template in every framing the model allows (each framing its own rows), and the run's z = 0, on
    dev and test, calibrated and not; `dev_metric` and `test_metric` are the run's own (calibrated when it
    calibrates)."""
    out = []
    for name, framed in plain_framings(task, model.manifest):
        prompt = TunedPrompt.template(model.manifest, framed, name)
        encoded = {split: prompt.encode(model, rows) if rows else None
                   for split, rows in (("dev", splits.dev), ("test", splits.test))}
        out.append({"name": name, "framing": framed.framing.to_json(), "prompt_tokens": 0, "_prompt": prompt,
                    **split_scores(prompt, model, encoded["dev"], encoded["test"], tuner.config.calibrate)})
    zero = tuner.method.zero()
    record = {"name": f"z = 0 ({tuner.start_name})", "prompt_tokens": tuner.config.prompt_tokens,
              "dev_metric": None, "test_metric": None}
    if dev is not None:
        record["dev_metric"] = metric_of(task, tuner.dev_logits(zero, dev), dev.labels)
    if test is not None:
        record["test_metric"] = metric_of(task, tuner.dev_logits(zero, test), test.labels)
    return out + [record]


def split_scores(result: Result, model: Model, dev: EncodedSet | None, test: EncodedSet | None,
                 calibrate: bool) -> dict:
    """`result` on encoded dev and test rows (each scored once): the metric uncalibrated and calibrated (its prior
    on the content-free rows divided out), the run's own, test accuracy, and the dev logits the run's choice uses."""
    plain = replace(result, calibration=None)
    prior = prior_of(plain, model)
    scores: dict = {}
    for split, enc in (("dev", dev), ("test", test)):
        keys = (f"{split}_metric", f"{split}_metric_uncalibrated", f"{split}_metric_calibrated")
        if enc is None:
            scores.update(dict.fromkeys(keys))
            continue
        raw = plain.raw_logits(model, enc)
        cal = calibrated(raw, prior)
        own = cal if calibrate else raw
        scores.update(zip(keys, (metric_of(result.task, own, enc.labels), metric_of(result.task, raw, enc.labels),
                                 metric_of(result.task, cal, enc.labels))))
        if split == "dev":
            scores["_dev_logits"] = own
        else:
            scores["test_accuracy"] = float(losses.accuracy(own, enc.labels)[0])
    return scores


def metric_of(task: Task, logits, labels) -> float:
    return float(losses.metric(task.metric, logits, labels)[0])


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def settle(model: Model, request: TuneRequest, tuners, prompts, baselines: list[dict], dev, test,
           hooks: Hooks) -> Settled:
    """Each seed scored, the seeds' ensemble, and the choice between tuning and the best plain template. `dev` and
    `test` are encoded as the run encodes them (a kept template's scores are its baseline record's)."""
    cfg, task = request.config, request.task
    seeds = []
    for tuner, prompt in zip(tuners, prompts):
        scores = split_scores(prompt, model, None, test, cfg.calibrate)
        seeds.append({"seed": tuner.config.seed, **tuner.report.to_json(), **public(scores),
                      "dev_metric": tuner.report.best_dev_metric})
    ensemble, ensemble_json = None, None
    if len(prompts) > 1:
        ensemble = PromptEnsemble(tuple(replace(p, calibration=None) for p in prompts))
        if cfg.calibrate:
            ensemble = ensemble.calibrate(model)
        ensemble_scores = split_scores(ensemble, model, dev, test, cfg.calibrate)
        ensemble_json = {"seeds": len(prompts), **public(ensemble_scores)}
    tuned = ensemble if ensemble is not None else prompts[0]
    tuned_json = ensemble_json or seeds[0]
    if dev is None:
        return Settled(tuned, tuned, seeds, ensemble_json, {"kept": tuned.origin, "tuned": True,
                                                            "reason": "no dev set to compare with the template",
                                                            "test_metric": tuned_json["test_metric"],
                                                            "test_accuracy": tuned_json.get("test_accuracy")})
    plain = [b for b in baselines if "_dev_logits" in b]
    tuned_logits = ensemble_scores["_dev_logits"] if ensemble is not None else tuned.logits(model, dev)
    choice = choose([scored(tuned.origin if ensemble is not None else "the tuned prompt", tuned_logits, dev.labels,
                            task.metric)],
                    [scored(b["name"], b["_dev_logits"], dev.labels, task.metric) for b in plain],
                    dev.labels, task.metric, cfg.choose, cfg.fallback)
    hooks.log(choice.reason)
    if choice.tuned:
        kept, kept_json = tuned, {"dev_metric": metric_of(task, tuned_logits, dev.labels),
                                  "test_metric": tuned_json["test_metric"],
                                  "test_accuracy": tuned_json.get("test_accuracy")}
    else:
        base = next(b for b in plain if b["name"] == choice.kept)
        kept = base["_prompt"].calibrate(model) if cfg.calibrate else base["_prompt"]
        kept_json = {k: base.get(k) for k in ("dev_metric", "test_metric", "test_accuracy")}
        hooks.log(f"the run hands back {choice.kept}, not the tuned prompt (kept beside it in {TUNED})")
    return Settled(kept, tuned, seeds, ensemble_json, {**choice.to_json(), **kept_json})


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


def resume_states(run: RunDir, settings: dict, request: TuneRequest, tuners, manifest,
                  trust: bool = False) -> list[TunerState]:
    """The checkpoint of a run that may continue: same model, same data, same settings; one state per seed."""
    recorded = run.read_json()["settings"]
    if not isinstance(recorded.get("model"), dict) or not manifest.is_model(str(recorded["model"].get("fingerprint"))):
        raise RunError(f"the model in {request.model_dir} is not the one this run started with")
    if recorded.get("data_fingerprints") != settings["data_fingerprints"]:
        raise RunError("the data files changed since this run started; it cannot be resumed")
    states = run.load_checkpoints(tuners, trust)
    run.read_log()  # damage before the last line is an error now, not after the claim
    return states


def run_metrics(tuners, outcome: Settled, wall: float, train_rows: int, dev_rows: int, test_rows: int) -> dict:
    """The printed metrics: one seed's fit as before, or the seeds' totals; then what the run kept."""
    reports = [t.report for t in tuners]
    if len(reports) == 1:
        metrics = fit_metrics(reports[0], train_rows, dev_rows, test_rows)
    else:
        calls, generations = sum(r.api_calls for r in reports), max(r.generations for r in reports)
        optimizer = sum(r.optimizer_seconds for r in reports)
        metrics = {
            "train_loss_initial": sum(r.train_loss_initial for r in reports) / len(reports),
            "train_loss_final": sum(r.train_loss_final for r in reports) / len(reports),
            "best_train_loss": min(r.best_train_loss for r in reports),
            "best_dev_metric": (outcome.ensemble or {}).get("dev_metric"), "metric_name": reports[0].metric_name,
            "api_calls": calls, "dev_calls": sum(r.dev_calls for r in reports), "generations": generations,
            "wall_seconds": wall, "engine_seconds": sum(r.engine_seconds for r in reports),
            "optimizer_seconds": optimizer, "host_seconds": sum(r.host_seconds for r in reports),
            "calls_per_second": calls / wall if wall > 0 else 0.0, "provider": reports[0].provider,
            "stop_reason": "; ".join(f"seed {t.config.seed}: {r.stop_reason}" for t, r in zip(tuners, reports)),
            "optimizer_ms_per_generation": 1000 * optimizer / max(generations, 1) / len(reports),
            "optimizer_share": optimizer / wall if wall > 0 else 0.0,
            "train_rows": train_rows, "dev_rows": dev_rows, "test_rows": test_rows}
    tuned = outcome.ensemble if outcome.ensemble is not None else outcome.seeds[0]
    metrics["tuned_test_metric"] = tuned.get("test_metric")
    metrics["kept"] = outcome.kept.origin
    metrics["dev_metric"] = outcome.choice_json.get("dev_metric", metrics.get("best_dev_metric"))
    metrics["test_metric"] = outcome.choice_json.get("test_metric", tuned.get("test_metric"))
    metrics["test_accuracy"] = outcome.choice_json.get("test_accuracy", tuned.get("test_accuracy"))
    return metrics


def fit_metrics(report, train_rows: int, dev_rows: int, test_rows: int) -> dict:
    metrics = report.to_json()
    metrics["optimizer_ms_per_generation"] = 1000 * report.optimizer_seconds / max(report.generations, 1)
    metrics["optimizer_share"] = report.optimizer_seconds / report.wall_seconds if report.wall_seconds else 0.0
    metrics["test_metric"] = None
    metrics.update(train_rows=train_rows, dev_rows=dev_rows, test_rows=test_rows)
    return metrics
