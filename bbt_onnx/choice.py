"""Which prompt a run hands back: the tuned one, or the user's own template when tuning did not earn its place.

Every candidate was scored on the same dev rows. The best plain framing is the one that scored highest on the rows
it was never fitted to: train and dev together by default (64 rows at k = 16, where 32 dev rows alone would keep a
lucky template), dev alone for words chosen on train. The tuned side (a seed's prompt, or the seeds' ensemble) is
compared with it by a paired bootstrap of the dev margin. Two rules:
  interval - keep the tuned prompt only when the margin's interval lies above 0 (the default: a few dev rows
             are noisy, and a lucky dev score must not replace a template that works);
  max      - keep whichever scored highest on dev (a tie keeps the template).
Without fallback the tuned side is kept whatever the margin; the report still gives it. Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import losses
from .errors import SettingsError
from .options import setting
from .stats import Margin, paired_margin

RULES = ("interval", "max")
BASELINE_ROWS = ("train+dev", "dev")
BLEND_WEIGHTS = (0.25, 0.5)  # a plain framing's share in a blend with the tuned side
POLICY_KEYS = ("choose", "fallback")  # ChoicePolicy's fields, which older runs recorded among the tune settings


@dataclass(frozen=True)
class ChoicePolicy:
    """How a run chooses what it hands back: run policy, not search settings (a checkpoint does not depend on it)."""

    fallback: bool = setting(True, "Hand back the best plain template instead of the tuned prompt when tuning did "
                             "not earn its place on dev (choose says when).", flag="--fallback/--no-fallback")
    choose: str = setting("interval", "When the tuned prompt replaces the template: interval (its dev margin's "
                          "paired-bootstrap interval lies above 0) or max (it scored higher on dev).", choices=RULES)
    blend: bool = setting(False, "Also weigh blends of the tuned side with each plain framing (their probabilities "
                          f"averaged, the template's weight {' or '.join(str(w) for w in BLEND_WEIGHTS)}) as tuned "
                          "candidates: the best on dev meets the best template as the tuned side would.",
                          flag="--blend/--no-blend")
    baseline_rows: str = setting("train+dev", "Which rows choose the best plain framing: train+dev (a template never "
                                 "saw the training rows, so they are evidence too: twice the rows) or dev.",
                                 choices=BASELINE_ROWS)

    def __post_init__(self):
        if not isinstance(self.fallback, bool):
            raise SettingsError(f"fallback must be true or false, got {self.fallback!r}", "fallback")
        if self.choose not in RULES:
            raise SettingsError(f"choose {self.choose!r} is not one of {', '.join(RULES)}", "choose")
        if not isinstance(self.blend, bool):
            raise SettingsError(f"blend must be true or false, got {self.blend!r}", "blend")
        if self.baseline_rows not in BASELINE_ROWS:
            raise SettingsError(f"baseline_rows {self.baseline_rows!r} is not one of {', '.join(BASELINE_ROWS)}",
                                "baseline_rows")

    def to_json(self) -> dict:
        return {"choose": self.choose, "fallback": self.fallback, "baseline_rows": self.baseline_rows,
                "blend": self.blend}

    @classmethod
    def from_settings(cls, settings: dict) -> "ChoicePolicy":
        """A run's recorded policy: its own entry, or (runs from before it had one) the tune settings' keys; runs
        from before train rows ranked the templates ranked them on dev."""
        doc = settings.get("policy") or settings.get("tune", {})
        return cls(**{"baseline_rows": "dev", **{k: doc[k] for k in (*POLICY_KEYS, "baseline_rows", "blend")
                                                 if k in doc}})


@dataclass(frozen=True)
class Scored:
    """A candidate's dev logits ([N, K], calibrated when the run calibrates), its dev metric, and what ranks it
    among its side (its metric over every row it was not fitted to: dev, or train and dev for a template)."""

    name: str
    logits: np.ndarray
    metric: float
    rank: float
    rows: int  # the rows `rank` was measured on


def scored(name: str, logits: np.ndarray, labels: np.ndarray, metric: str,
           unseen: tuple[np.ndarray, np.ndarray] | None = None) -> Scored:
    """A candidate on dev; `unseen` (logits, labels) of further rows it was never fitted to rank it with dev."""
    value = float(losses.metric(metric, logits, labels)[0])
    if unseen is None:
        return Scored(name, np.asarray(logits, np.float64), value, value, len(labels))
    both = np.concatenate([np.asarray(unseen[0], np.float64), np.asarray(logits, np.float64)])
    labels_both = np.concatenate([unseen[1], labels])
    return Scored(name, np.asarray(logits, np.float64), value, float(losses.metric(metric, both, labels_both)[0]),
                  len(labels_both))


@dataclass(frozen=True)
class Choice:
    kept: str  # the winning candidate's name
    tuned: bool  # the kept candidate is tuned (not a plain framing)
    rule: str
    best_tuned: str
    best_baseline: str
    margin: Margin  # best tuned - best baseline on dev
    reason: str  # one line for the user

    def to_json(self) -> dict:
        return {"kept": self.kept, "tuned": self.tuned, "rule": self.rule, "best_tuned": self.best_tuned,
                "best_baseline": self.best_baseline, "dev_margin": self.margin.to_json(), "reason": self.reason}


def best(candidates: list[Scored]) -> Scored:
    """The highest rank (the dev metric, or a template's over train and dev); the first listed wins a tie."""
    return max(candidates, key=lambda c: c.rank)  # max keeps the first of equal keys


def choose(tuned: list[Scored], baselines: list[Scored], labels: np.ndarray, metric: str, rule: str = "interval",
           fallback: bool = True, seed: int = 0) -> Choice:
    if rule not in RULES:
        raise SettingsError(f"rule {rule!r} is not one of {', '.join(RULES)}", "rule")
    top, base = best(tuned), best(baselines)
    margin = paired_margin(metric, top.logits, base.logits, labels, seed=seed)
    if not fallback:
        keep, why = True, "--no-fallback keeps the tuned prompt"
    elif rule == "max":
        keep = top.metric > base.metric
        why = "it scored higher on dev" if keep else "it scored at least as high on dev"
    else:
        keep = margin.low > 0
        why = ("the dev margin's interval lies above 0" if keep else
               "the dev margin's interval reaches 0 or below")
    kept = top if keep else base
    ranked = f" (the best plain framing over {base.rows} train and dev rows, {base.rank:.4f})" \
        if base.rows > len(labels) else ""
    reason = f"kept {kept.name} ({metric} {kept.metric:.4f} on dev): {why}; {top.name} against {base.name}{ranked}: " \
             f"{margin}"
    return Choice(kept.name, keep, rule, top.name, base.name, margin, reason)
