"""How sure a dev margin is: a paired bootstrap over the rows, and summaries over seeds. Pure numpy.

Thirty-two dev rows are few: a prompt that scores 0.66 on them can be at chance on the test set. Both prompts are
scored on the same rows, so the rows are resampled together (paired) and the margin's spread is what remains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import losses

DRAWS = 2000
LEVEL = 0.95
RESAMPLE_CELLS = 1 << 16  # row indices held at once while resampling


@dataclass(frozen=True)
class Margin:
    """metric(a) - metric(b) on the rows, and its paired-bootstrap interval at `level`."""

    value: float
    low: float
    high: float
    level: float = LEVEL

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:+.4f} ({100 * self.level:.0f}% interval {self.low:+.4f} to {self.high:+.4f})"


def paired_margin(metric: str, logits_a: np.ndarray, logits_b: np.ndarray, labels: np.ndarray,
                  draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> Margin:
    """The margin of a over b ([N, K] logits each, same rows), with rows resampled `draws` times, both prompts
    on the same resample; the seed is fixed, so a run's report reads the same every time."""
    labels = np.asarray(labels)
    pred = losses.predictions(np.stack([np.asarray(logits_a, np.float64), np.asarray(logits_b, np.float64)]))
    value = losses.metric_of(metric, pred, labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    diffs = np.empty(draws)
    block = max(1, RESAMPLE_CELLS // max(n, 1))  # resamples drawn together: one draw's rows each, in order
    for start in range(0, draws, block):
        idx = rng.integers(0, n, (min(block, draws - start), n))
        m = losses.metric_of(metric, pred[:, idx], labels[idx])
        diffs[start:start + len(idx)] = m[0] - m[1]
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Margin(float(value[0] - value[1]), float(low), float(high), level)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over seeds (0 for one seed)."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"


def spread(values) -> Spread:
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return Spread(float("nan"), float("nan"), 0)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return Spread(mean, std, len(values))
