"""Losses and metrics over label-word logits [C, N, K] for C candidates at once. Pure numpy."""

from __future__ import annotations

import numpy as np

from .errors import SettingsError

LOSSES = ("ce", "hinge", "perf")
HINGE_MARGIN = 2.0  # the reference's margin for every task


def _as3d(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits[None] if logits.ndim == 2 else logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def class_scores(word_logits: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """[..., W] logits of the readout's words -> [..., K] class scores: each class the log of its words' summed
    exp-logits (so the log of their summed probability, up to the row's normaliser, which every class shares and
    a softmax over classes cancels). `groups` [W] names each word's class; None (one word a class) is the identity."""
    if groups is None:
        return word_logits
    x = np.asarray(word_logits, np.float64)
    k = int(groups.max()) + 1
    out = np.empty((*x.shape[:-1], k), np.float64)
    for c in range(k):
        part = x[..., groups == c]
        top = part.max(axis=-1, keepdims=True)
        out[..., c] = (top + np.log(np.exp(part - top).sum(axis=-1, keepdims=True)))[..., 0]
    return out.astype(np.asarray(word_logits).dtype)


def mixed(logits: list[np.ndarray], weights) -> np.ndarray:
    """The log of the weighted mean of several scorers' class probabilities ([N, K] each): how an ensemble or a
    blend of results reads rows."""
    return np.log(sum(w * np.exp(log_softmax(np.asarray(x, np.float64))) for w, x in zip(weights, logits)))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean CE over the N rows, per candidate: [C]."""
    lp = log_softmax(_as3d(logits))
    n = len(labels)
    return -lp[:, np.arange(n), labels].mean(axis=1)


def hinge(logits: np.ndarray, labels: np.ndarray, margin: float = HINGE_MARGIN) -> np.ndarray:
    """The reference's multi-class hinge: sum over wrong classes of max(0, l_j - l_y + margin), / N."""
    x = _as3d(logits)
    n = len(labels)
    target = x[:, np.arange(n), labels][..., None]
    loss = np.maximum(x - target + margin, 0.0)
    loss[:, np.arange(n), labels] = 0.0
    return loss.sum(axis=(1, 2)) / n


def predictions(logits: np.ndarray) -> np.ndarray:
    return _as3d(logits).argmax(axis=-1)


def accuracy_of(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy of predicted labels, rows on the last axis: any leading axes (candidates, resamples) stay."""
    return (pred == labels).mean(axis=-1)


def f1_of(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary F1 with class 1 positive (sklearn's default), 0 when there are no true or predicted positives;
    rows on the last axis."""
    pred = pred == 1
    true = labels == 1
    tp = (pred & true).sum(axis=-1)
    denom = pred.sum(axis=-1) + true.sum(axis=-1)
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


METRIC_FUNCTIONS = {"accuracy": accuracy_of, "f1": f1_of}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return accuracy_of(predictions(logits), labels)


def f1(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return f1_of(predictions(logits), labels)


def metric_of(name: str, pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The task metric of predicted labels (rows on the last axis), for resampling without new argmaxes."""
    return METRIC_FUNCTIONS[name](pred, labels)


def metric(name: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return metric_of(name, predictions(logits), labels)


def loss(name: str, metric_name: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-candidate loss [C]; `perf` is the negative task metric."""
    if name == "ce":
        return cross_entropy(logits, labels)
    if name == "hinge":
        return hinge(logits, labels)
    if name == "perf":
        return -metric(metric_name, logits, labels)
    raise SettingsError(f"loss {name!r} is not one of {', '.join(LOSSES)}", "loss")
