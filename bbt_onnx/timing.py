"""What bench, the load test and export's PyTorch baseline share: a median timer and synthetic rows of a given
shape (so every side times the same inputs the same way)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from .encoding import EncodedSet
from .errors import SettingsError
from .manifest import Manifest

TEXTS_PER_CALL = 32  # the reference's few-shot set: 16 per class x 2 classes
MAX_BATCH = 8192  # sequences per timed call: 256 candidates x 32 texts, far above any population
MAX_TOKENS = 1 << 19  # sequences x tokens per timed call (640 x 114 on the GPU runs): its activations must fit


def split_batch(batch: int) -> tuple[int, int]:
    """(candidates, texts) for `batch` sequences: up to 32 texts, the population fills the rest."""
    if batch > MAX_BATCH:
        raise SettingsError(f"batch {batch} is more than {MAX_BATCH} sequences per call", "batch")
    texts = min(batch, TEXTS_PER_CALL)
    if batch % texts:
        raise SettingsError(f"batch {batch} is not a multiple of {texts} texts per call", "batch")
    return batch // texts, texts


def synthetic_inputs(manifest: Manifest, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, EncodedSet]:
    """Random ids shaped like real rows: bos, P placeholders, text, mask (masked LMs), eos; full attention."""
    candidates, texts = split_batch(batch)
    p = manifest.prompt_tokens
    head = 1 + p
    if seq < head + 4:
        raise SettingsError(f"seq {seq} is too short for {p} prompt tokens; use at least {head + 4}", "seq")
    if seq > manifest.max_positions:
        raise SettingsError(f"seq {seq} exceeds the model's {manifest.max_positions} positions", "seq")
    if batch * seq > MAX_TOKENS:
        raise SettingsError(f"batch {batch} x seq {seq} = {batch * seq:,} tokens per call is more than {MAX_TOKENS:,}",
                            ("batch", "seq"))
    rng = np.random.default_rng(seed)
    specials = manifest.special_ids
    low = max(specials) + 1 if specials else 0
    ids = rng.integers(low, manifest.vocab_size, size=(texts, seq), dtype=np.int64)
    start = manifest.prompt_start
    ids[:, start:start + p] = manifest.placeholder_ids
    if manifest.bos_id is not None:
        ids[:, 0] = manifest.bos_id
    mask_pos = np.full(texts, seq - 1, np.int64)
    if manifest.appends_eos:
        ids[:, -1] = manifest.eos_id
    if manifest.lm.mask_token:  # " . It was <mask> ." ends the row: the mask two before the end
        ids[:, -3] = manifest.mask_id
        mask_pos[:] = seq - 3
    enc = EncodedSet(ids, np.ones_like(ids), mask_pos, np.zeros(texts, np.int64),
                     rng.integers(low, manifest.vocab_size, size=2, dtype=np.int64))
    prompts = rng.normal(0, manifest.embedding_std, size=(candidates, p, manifest.hidden_size)).astype(np.float32)
    return prompts, enc


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
