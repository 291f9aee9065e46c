"""Several seeds tuned in lock-step on the same rows: each generation, every seed asks, all candidates go to the
engine in one call, and each seed is told its own share.

A seed's candidates meet the same rows, projection and CMA-ES as in a run of that seed alone, and an engine
scores each candidate independently of the others in its call, so each seed ends with the z its single-seed run
ends with, bit for bit (the tests check it). What lock-step buys is fewer, larger calls: on a GPU that is not full
with one seed's population, throughput; on CPU, about nothing. BBTv2 carries one run's layer prompts per call, so
its seeds step together but score one call each.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..encoding import EncodedSet
from .tuner import Ask, BlackBoxTuner, GenerationEvent, TunerState


class LockStep:
    """`LockStep(tuners).fit(train, dev) -> [TunedPrompt, ...]`: the tuners (one per seed, same model, task and
    rows) run generation by generation until each has stopped; a finished seed drops out of the calls."""

    def __init__(self, tuners: Sequence[BlackBoxTuner]):
        if not tuners:
            raise ValueError("lock-step needs at least one tuner")
        self.tuners = list(tuners)

    def start(self, train: EncodedSet, states: Sequence[TunerState | None] | None = None) -> list[TunerState]:
        states = states or [None] * len(self.tuners)
        return [t.start(train, s) for t, s in zip(self.tuners, states)]

    def finished(self) -> bool:
        return all(t.finished() for t in self.tuners)

    def step(self, train: EncodedSet, dev: EncodedSet | None) -> list[GenerationEvent]:
        """One generation of every seed still running."""
        active = [t for t in self.tuners if not t.finished()]
        asks = [t.ask() for t in active]
        t0 = time.perf_counter()
        logits = self.score(active, asks, active[0].search_rows(train))  # the seeds' search rows are alike
        share = (time.perf_counter() - t0) / sum(len(a.z) for a in asks)  # engine time, split by candidates
        return [t.tell(a, out, train, dev, share * len(a.z)) for t, a, out in zip(active, asks, logits)]

    @staticmethod
    def score(tuners: Sequence[BlackBoxTuner], asks: Sequence[Ask], train: EncodedSet) -> list[np.ndarray]:
        """Each tuner's [C_i, N, K] logits: one engine call for all when their method shares calls."""
        if len(tuners) == 1 or not all(t.method.shares_calls for t in tuners):
            return [t.method.score(t.state, a.z, a.layer, train) for t, a in zip(tuners, asks)]
        prompts = np.concatenate([t.method.candidates(t.state, a.z, a.layer) for t, a in zip(tuners, asks)])
        logits = tuners[0].model.engine.label_logits(prompts, train)
        bounds = np.cumsum([0] + [len(a.z) for a in asks])
        return [logits[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def fit(self, train: EncodedSet, dev: EncodedSet | None = None,
            on_event: Callable[[GenerationEvent], None] | None = None,
            on_checkpoint: Callable[[list[TunerState]], None] | None = None,
            states: Sequence[TunerState | None] | None = None) -> list:
        """Tune every seed on the encoded `train`, each choosing by `dev`; `on_checkpoint` gets every seed's state
        every `checkpoint_every` generations; pass checkpointed `states` to resume."""
        started = self.start(train, states)
        every = self.tuners[0].config.checkpoint_every
        while not self.finished():
            events = self.step(train, dev)
            for event in events:
                if on_event:
                    on_event(event)
            generation = max(s.generation for s in started)
            if on_checkpoint and every and generation % every == 0:
                on_checkpoint(started)
        return [t.result(train, dev) for t in self.tuners]
