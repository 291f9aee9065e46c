"""The end of a tune: every seed and the seeds' ensemble scored on dev and test (calibrated and not), the choice
between tuning and the best plain framing on dev, and the run's printed metrics. Also the baselines the choice
compares with, scored before the search starts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .. import losses
from ..baselines import plain_framings
from ..calibration import calibrated
from ..choice import BLEND_WEIGHTS, ChoicePolicy, choose, scored
from ..encoding import EncodedSet
from ..model import Model
from ..prompt import Blend, PromptEnsemble, Result, TunedPrompt
from ..runs import TUNED
from ..tasks import Task
from ..tuning.config import TuneConfig
from ..tuning.tuner import BlackBoxTuner
from ..verbalizer import VerbalizerSpec


@dataclass
class Settled:
    """What the run decided at the end."""

    kept: Result
    tuned: Result
    seeds: list[dict]
    ensemble: dict | None
    choice_json: dict
    blends: list[dict] = field(default_factory=list)  # with --blend: each blend's dev and test scores


def score_baselines(model: Model, task: Task, tuner: BlackBoxTuner, splits, dev, test) -> list[dict]:
    """The plain template in every framing the model allows (each framing its own rows), and the run's z = 0, on
    dev and test, calibrated and not, and on train where the template was not fitted to it (words chosen on train
    were); `dev_metric`, `train_metric` and `test_metric` are the run's own (calibrated when it calibrates). Each
    computes its prior once; `_prompt` is the template as the run would keep it."""
    out, calibrate = [], tuner.config.calibrate
    chose_words = VerbalizerSpec.parse(tuner.config.verbalizer).auto
    for name, framed in plain_framings(task, model.manifest):
        plain = TunedPrompt.template(model.manifest, framed, name)
        prompt = plain.calibrate(model)  # its prior: for the calibrated numbers, and for the run to keep
        fitted = chose_words and bool(framed.extra_words)
        encoded = {split: prompt.encode(model, rows) if rows else None
                   for split, rows in (("dev", splits.dev), ("test", splits.test),
                                       ("train", None if fitted or not splits.dev else splits.train))}
        out.append({"name": name, "framing": framed.framing.to_json(), "prompt_tokens": 0,
                    "_prompt": prompt if calibrate else plain,
                    **split_scores(prompt, model, encoded["dev"], encoded["test"], calibrate, encoded["train"])})
    zero = tuner.method.zero()
    record = {"name": f"z = 0 ({tuner.start_name})", "prompt_tokens": tuner.config.prompt_tokens,
              "dev_metric": None, "test_metric": None}
    prior = tuner.prior(zero) if calibrate and (dev is not None or test is not None) else None
    if dev is not None:
        record["dev_metric"] = metric_of(task, tuner.dev_logits(zero, dev, prior), dev.labels)
    if test is not None:
        record["test_metric"] = metric_of(task, tuner.dev_logits(zero, test, prior), test.labels)
    return out + [record]


def split_scores(result: Result, model: Model, dev: EncodedSet | None, test: EncodedSet | None,
                 calibrate: bool, train: EncodedSet | None = None) -> dict:
    """`result` on encoded dev and test rows (each scored once): the metric uncalibrated and calibrated (its prior
    on the content-free rows divided out: the one it carries, computed only when it carries none), the run's own,
    test accuracy, and the dev logits the run's choice uses; with `train` (a template's), its own metric and logits
    there, which rank it with dev."""
    prior = result.prior(model)
    scores: dict = {}
    if train is not None:
        raw = result.raw_logits(model, train)
        own = calibrated(raw, prior) if calibrate else raw
        scores.update(train_metric=metric_of(result.task, own, train.labels), _train=(own, train.labels))
    for split, enc in (("dev", dev), ("test", test)):
        keys = (f"{split}_metric", f"{split}_metric_uncalibrated", f"{split}_metric_calibrated")
        if enc is None:
            scores.update(dict.fromkeys(keys))
            continue
        raw = result.raw_logits(model, enc)
        cal = calibrated(raw, prior)
        own = cal if calibrate else raw
        scores.update(zip(keys, (metric_of(result.task, own, enc.labels), metric_of(result.task, raw, enc.labels),
                                 metric_of(result.task, cal, enc.labels))))
        scores[f"_{split}_logits"] = own
        if split == "test":
            scores["test_accuracy"] = float(losses.accuracy(own, enc.labels)[0])
    return scores


def metric_of(task: Task, logits, labels) -> float:
    return float(losses.metric(task.metric, logits, labels)[0])


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def settle(model: Model, task: Task, config: TuneConfig, policy: ChoicePolicy, tuners, prompts,
           baselines: list[dict], dev, test, log: Callable[[str], None]) -> Settled:
    """Each seed scored, the seeds' ensemble, and the choice between tuning and the best plain template. `dev` and
    `test` are encoded as the run encodes them (a kept template's scores are its baseline record's)."""
    cfg = config
    seeds, seed_scores = [], []
    for tuner, prompt in zip(tuners, prompts):
        scores = split_scores(prompt, model, None, test, cfg.calibrate)
        seed_scores.append(scores)
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
    tuned_name = tuned.origin if ensemble is not None else "the tuned prompt"
    tuned_test = (ensemble_scores if ensemble is not None else seed_scores[0]).get("_test_logits")
    blends = blend_candidates(tuned_name, tuned_logits, tuned_test, plain, task, dev, test) if policy.blend else []
    ranks_train = policy.baseline_rows == "train+dev"
    choice = choose([scored(tuned_name, tuned_logits, dev.labels, task.metric)] +
                    [scored(b["name"], b["_dev_logits"], dev.labels, task.metric) for b in blends],
                    [scored(b["name"], b["_dev_logits"], dev.labels, task.metric, b.get("_train") if ranks_train
                            else None) for b in plain],
                    dev.labels, task.metric, policy.choose, policy.fallback)
    log(choice.reason)
    blended = next((b for b in blends if b["name"] == choice.best_tuned), None)
    if choice.tuned and blended is not None:
        base = next(b for b in plain if b["name"] == blended["template"])
        kept = Blend((tuned, base["_prompt"]), (1 - blended["weight"], blended["weight"]), blended["name"])
        kept_json = {k: blended[k] for k in ("dev_metric", "test_metric", "test_accuracy")}
    elif choice.tuned:
        kept, kept_json = tuned, {"dev_metric": metric_of(task, tuned_logits, dev.labels),
                                  "test_metric": tuned_json["test_metric"],
                                  "test_accuracy": tuned_json.get("test_accuracy")}
    else:
        base = next(b for b in plain if b["name"] == choice.kept)
        kept = base["_prompt"]  # calibrated when the run calibrates, by the prior its scores used
        kept_json = {k: base.get(k) for k in ("dev_metric", "test_metric", "test_accuracy")}
        log(f"the run hands back {choice.kept}, not the tuned prompt (kept beside it in {TUNED})")
    return Settled(kept, tuned, seeds, ensemble_json, {**choice.to_json(), **kept_json},
                   [public(b) for b in blends])


def blend_candidates(tuned_name: str, tuned_dev: np.ndarray, tuned_test: np.ndarray | None, plain: list[dict],
                     task: Task, dev: EncodedSet, test: EncodedSet | None) -> list[dict]:
    """The tuned side blended with each plain framing at each weight, scored on dev and test from the logits
    both already have (nothing is scored again): what a `Blend` of them reads."""
    out = []
    for base in plain:
        for w in BLEND_WEIGHTS:
            dev_logits = losses.mixed([tuned_dev, base["_dev_logits"]], (1 - w, w))
            record = {"name": f"{tuned_name} + {w:g} x {base['name']}", "template": base["name"], "weight": w,
                      "dev_metric": metric_of(task, dev_logits, dev.labels), "_dev_logits": dev_logits,
                      "test_metric": None, "test_accuracy": None}
            if test is not None and tuned_test is not None and base.get("_test_logits") is not None:
                test_logits = losses.mixed([tuned_test, base["_test_logits"]], (1 - w, w))
                record.update(test_metric=metric_of(task, test_logits, test.labels),
                              test_accuracy=float(losses.accuracy(test_logits, test.labels)[0]))
            out.append(record)
    return out


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
