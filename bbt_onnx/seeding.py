"""One run seed, independent streams: k-shot sampling, the projection and CMA-ES never share a generator."""

from __future__ import annotations

import numpy as np

STREAMS = ("sampling", "projection", "cma")


def seeds(seed: int) -> dict[str, int]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: int(c.generate_state(1, dtype=np.uint32)[0]) for name, c in zip(STREAMS, children)}


def generator(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(seeds(seed)[stream])
