"""Contextual calibration (Zhao et al., "Calibrate Before Use", ICML 2021): divide out the label prior a prompt
has on its own. Pure functions; the prompt scores the content-free rows.

A template leans towards some label words before it sees any text. Scoring content-free inputs ("N/A", the empty
text, "[MASK]") in the template estimates that lean p_cf, the mean of their label-word probabilities; a row's
probabilities p become p / p_cf, renormalised. Predictions are the paper's (the argmax of W p with W = diag(p_cf)^-1);
the probabilities are the renormalised ratio rather than the paper's softmax of W p, so that they still sum to 1
as a prior correction.

`content_free_prior` is the one place a prior is computed, for whatever scores rows: the tuner's z on dev, a tuned
prompt, a template, an ensemble. A result computes its prior once and carries it (`calibration`).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np

from .data import Example
from .losses import log_softmax
from .tasks import Task

CONTENT_FREE = ("N/A", "", "[MASK]")

Rows = TypeVar("Rows")  # rows as a scorer takes them (an EncodedSet)


def content_free_rows(task: Task) -> list[Example]:
    """The content-free inputs, in every text field the template has."""
    return [Example(text, text if task.uses_text_b else None) for text in CONTENT_FREE]


def log_prior(content_free_logits: np.ndarray) -> np.ndarray:
    """[..., M, K] label logits of the content-free rows -> [..., K]: log of their mean label-word probabilities
    (one prior per leading index: per candidate, when a call scored several)."""
    probs = np.exp(log_softmax(np.asarray(content_free_logits, np.float64)))
    return np.log(probs.mean(axis=-2))


def search_calibrated(logits: np.ndarray, rows: int, mode: str) -> np.ndarray:
    """One call's [C, N(+M), K] label logits -> [C, N, K] scores of the N training rows that the search's loss
    sees: raw (`off`), or calibrated by each candidate's own prior: from the M content-free rows scored after the
    training rows in the same call (`content-free`), or from the training rows themselves (`batch`, Zhou et al.
    2023's batch calibration)."""
    logits = np.asarray(logits)
    train = logits[:, :rows]
    if mode == "off":
        return train
    source = logits[:, rows:] if mode == "content-free" else train
    return calibrated(train, log_prior(source)[:, None, :])


def content_free_prior(score: Callable[[Rows], np.ndarray], task: Task,
                       encode: Callable[[Sequence[Example]], Rows]) -> np.ndarray:
    """[K] the label prior, as log-probabilities, of whatever `score` scores (rows -> [M, K] label logits: the tuner's
    z, a tuned prompt, a template, an ensemble) on the task's content-free rows, framed by `encode` as that scorer
    frames its rows."""
    return log_prior(score(encode(content_free_rows(task))))


def calibrated(logits: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """[..., K] logits -> calibrated log-probabilities (unchanged log-probabilities when there is no prior)."""
    out = log_softmax(np.asarray(logits, np.float64))
    if prior is None:
        return out
    return log_softmax(out - np.asarray(prior, np.float64))
