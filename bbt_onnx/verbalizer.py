"""A wider readout chosen from the model's own answers: `--verbalizer auto[:K]`.

One label word per class reads a sliver of what the model says at the answer position. Following the multi-word
verbalizers of the few-shot literature (AMuLaP), up to K further words a class are chosen on the training rows from
the model's answers over candidate words: the vocabulary's whole words in the tokenizer's merge order (a byte-pair
vocabulary lists its most frequent words first). Each class's pool is the words its rows make likelier than the
other classes' rows do; from the pools, words join greedily while they lower the rows' cross-entropy, so that a
word the model says everywhere ("The") never dilutes a class. The user's label word always stays first. The
choosing is pure (`choose_words`); scoring the rows is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .errors import SettingsError
from .losses import cross_entropy, log_softmax
from .manifest import Manifest
from .tasks import MAX_CLASS_WORDS, Task

LABELS, AUTO = "labels", "auto"
DEFAULT_WORDS = 4  # further words a class, beside its label word
CANDIDATES = 2000  # whole words of the vocabulary the model's answers are read over
POOL = 50  # each class's likeliest words the greedy choice tries
SEPARATES = 1e-6  # a word must lower the training loss by more than this (rounding is not a gain)


@dataclass(frozen=True)
class VerbalizerSpec:
    """What `--verbalizer` asks for: the task's label words alone, or K more words a class chosen on train."""

    mode: str = LABELS
    words: int = 0

    @classmethod
    def parse(cls, text: str | None) -> "VerbalizerSpec":
        if text is None or text == LABELS:
            return cls()
        mode, _, k = str(text).partition(":")
        if mode != AUTO:
            raise SettingsError(f"verbalizer {text!r} is neither {LABELS} nor {AUTO}[:K]", "verbalizer")
        if not k:
            return cls(AUTO, DEFAULT_WORDS)
        if not k.isdigit() or not 1 <= int(k) < MAX_CLASS_WORDS:
            raise SettingsError(f"verbalizer {text!r}: K must be a whole number from 1 to {MAX_CLASS_WORDS - 1}",
                                "verbalizer")
        return cls(AUTO, int(k))

    @property
    def auto(self) -> bool:
        return self.mode == AUTO

    def __str__(self) -> str:
        return f"{AUTO}:{self.words}" if self.auto else LABELS


def candidate_words(tokenizer: Tokenizer, manifest: Manifest, limit: int = CANDIDATES) -> list[tuple[str, int]]:
    """(word, id) for the first `limit` tokens that are a whole word as the readout reads one (the model's label
    prefix, then letters only, two or more), in id order; the word tokenizes back to that one id."""
    prefix, special = manifest.label_prefix, set(tokenizer.get_added_tokens_decoder())
    out = []
    for token_id in range(tokenizer.get_vocab_size()):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        word = text[len(prefix):] if text.startswith(prefix) else ""
        if len(word) < 2 or not word.isalpha():
            continue
        if tokenizer.encode(prefix + word, add_special_tokens=False).ids != [token_id]:
            continue
        out.append((word, token_id))
        if len(out) == limit:
            break
    return out


@dataclass(frozen=True)
class ChosenWords:
    """Per class, the chosen candidates' indices, in the order chosen, and what each lowered the training rows'
    cross-entropy by when it joined; the loss with the label words alone and with every chosen word."""

    index: tuple[tuple[int, ...], ...]
    gain: tuple[tuple[float, ...], ...]
    loss_before: float
    loss_after: float


def class_pools(probs: np.ndarray, labels: np.ndarray, classes: int, size: int, reserved) -> list[np.ndarray]:
    """Each class's likely words: the candidates that class's rows give more probability than the others' do,
    ranked by their share of the divergence between the two (P_c log(P_c / P_rest)), each in one class at most."""
    mean = np.stack([probs[labels == c].mean(axis=0) for c in range(classes)])  # [K, V]
    tiny = np.finfo(np.float64).tiny
    share = np.stack([mean[c] * np.log(np.maximum(mean[c], tiny) / np.maximum(np.delete(mean, c, 0).mean(0), tiny))
                      for c in range(classes)])
    share[:, sorted(reserved)] = -np.inf
    owner = share.argmax(axis=0)
    pools = []
    for c in range(classes):
        mine = np.flatnonzero((owner == c) & (share[c] > 0))
        pools.append(mine[np.argsort(-share[c, mine], kind="stable")][:size])
    return pools


def choose_words(logits: np.ndarray, labels: np.ndarray, label_columns: list[int], k: int,
                 reserved: set[int] = frozenset(), pool: int = POOL) -> ChosenWords:
    """Up to `k` further words a class from [N, V] answer logits over V candidates on labelled rows: greedily, the
    word whose joining its class (the class then scores the log-sum-exp of its words' logits) lowers the rows'
    cross-entropy most, among each class's `pool` likeliest words (`class_pools`), until no word lowers it or
    every class has `k`. `label_columns[c]` is class c's label word; it and `reserved` are never chosen."""
    labels = np.asarray(labels)
    x = np.asarray(logits, np.float64)
    classes = len(label_columns)
    if any((labels == c).sum() == 0 for c in range(classes)):
        raise SettingsError("choosing words needs training rows of every class", "verbalizer")
    pools = class_pools(np.exp(log_softmax(x)), labels, classes, pool, set(reserved) | set(label_columns))
    scores = x[:, label_columns]  # [N, K]
    before = current = float(cross_entropy(scores, labels)[0])
    chosen: list[list[int]] = [[] for _ in range(classes)]
    gains: list[list[float]] = [[] for _ in range(classes)]
    while True:
        best = (current - SEPARATES, -1, -1)
        for c in range(classes):
            left = np.array([i for i in pools[c] if i not in chosen[c]], np.int64)
            if len(chosen[c]) >= k or not len(left):
                continue
            trial = np.repeat(scores[None], len(left), axis=0)  # [M, N, K]: one candidate set of scores a word
            trial[:, :, c] = np.logaddexp(scores[:, c][None], x[:, left].T)
            trial_loss = cross_entropy(trial, labels)
            j = int(trial_loss.argmin())
            if trial_loss[j] < best[0]:
                best = (float(trial_loss[j]), c, int(left[j]))
        if best[1] < 0:
            break
        value, c, i = best
        scores[:, c] = np.logaddexp(scores[:, c], x[:, i])
        chosen[c].append(i)
        gains[c].append(current - value)
        current = value
    return ChosenWords(tuple(map(tuple, chosen)), tuple(tuple(g) for g in gains), before, current)


def worded_task(task: Task, words: list[tuple[str, int]], chosen: ChosenWords) -> Task:
    """The task with the chosen words counting for each class beside its label word."""
    return task.with_extra_words(tuple(tuple(words[i][0] for i in per_class) for per_class in chosen.index))


def record(spec: VerbalizerSpec, words: list[tuple[str, int]], chosen: ChosenWords, task: Task, rows: int) -> dict:
    """What run.json keeps of the choice: how, over what, and each class's words with their separation."""
    return {"spec": str(spec), "candidates": len(words), "rows": rows,
            "train_loss": [round(chosen.loss_before, 6), round(chosen.loss_after, 6)],
            "words": {key: [[words[i][0], round(g, 6)] for i, g in zip(index, gain)]
                      for key, index, gain in zip(task.label_keys, chosen.index, chosen.gain)}}
