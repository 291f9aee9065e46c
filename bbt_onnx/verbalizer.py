"""A wider readout chosen from the model's own answers: `--verbalizer auto[:K]`.

One label word per class reads a sliver of what the model says at the answer position. Following the multi-word
verbalizers of the few-shot literature (AMuLaP), the K further words of each class are chosen on the training rows
from the model's answer distribution over candidate words: the vocabulary's whole words in the tokenizer's merge
order (a byte-pair vocabulary lists its most frequent words first). A word joins the class whose rows give it the
most probability, ranked by how far that mean probability stands above every other class's (the separation);
the user's label word always stays first. The choosing is pure (`choose_words`); scoring the rows is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .errors import SettingsError
from .losses import log_softmax
from .manifest import Manifest
from .tasks import MAX_CLASS_WORDS, Task

LABELS, AUTO = "labels", "auto"
DEFAULT_WORDS = 4  # further words a class, beside its label word
CANDIDATES = 2000  # whole words of the vocabulary the model's answers are read over
SEPARATES = 1e-9  # a mean probability this far above every other class's is a separation, not rounding


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
    """Per class, the chosen candidates' indices and their separation (mean probability on the class's rows less
    the highest other class's), best first."""

    index: tuple[tuple[int, ...], ...]
    separation: tuple[tuple[float, ...], ...]


def choose_words(logits: np.ndarray, labels: np.ndarray, k: int, reserved: set[int] = frozenset()) -> ChosenWords:
    """Up to `k` candidates a class from [N, V] answer logits over V candidates on labelled rows: each candidate
    counts for the class whose rows give it the highest mean probability (softmax over the candidates), ranked by
    that mean less the highest other class's; `reserved` columns (the label words) are never chosen."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    if classes < 2 or any((labels == c).sum() == 0 for c in range(classes)):
        raise SettingsError("choosing words needs training rows of every class", "verbalizer")
    probs = np.exp(log_softmax(np.asarray(logits, np.float64)))
    mean = np.stack([probs[labels == c].mean(axis=0) for c in range(classes)])  # [K, V]
    index, separation = [], []
    for c in range(classes):
        others = np.delete(mean, c, axis=0).max(axis=0)
        margin = mean[c] - others
        margin[list(reserved)] = -np.inf
        order = [int(i) for i in np.argsort(-margin, kind="stable")[:k] if margin[i] > SEPARATES]
        index.append(tuple(order))
        separation.append(tuple(float(margin[i]) for i in order))
    return ChosenWords(tuple(index), tuple(separation))


def worded_task(task: Task, words: list[tuple[str, int]], chosen: ChosenWords) -> Task:
    """The task with the chosen words counting for each class beside its label word."""
    return task.with_extra_words(tuple(tuple(words[i][0] for i in per_class) for per_class in chosen.index))


def record(spec: VerbalizerSpec, words: list[tuple[str, int]], chosen: ChosenWords, task: Task, rows: int) -> dict:
    """What run.json keeps of the choice: how, over what, and each class's words with their separation."""
    return {"spec": str(spec), "candidates": len(words), "rows": rows,
            "words": {key: [[words[i][0], round(s, 6)] for i, s in zip(index, sep)]
                      for key, index, sep in zip(task.label_keys, chosen.index, chosen.separation)}}
