"""Search methods: what differs between BBT and BBTv2 inside the tuner's one loop.

A method says which CMA-ES instances exist, which of them a generation asks, how its
candidates are scored, what a whole prompt is (z [d] for BBT, Z [L, d] for BBTv2) and how
one is scored on any rows. Budget, dev choice, checkpoints and events stay in the tuner.
"""

from __future__ import annotations

from typing import Callable

import cma
import numpy as np

from .encoding import EncodedSet
from .engine import takes_deep_prompts
from .errors import ModelError, SettingsError
from .subspace import ProjectionSpec, build_projection, layer_specs, project

METHODS = ("bbt", "bbtv2")


class GeneratorRandn:
    """pycma's `randn` option backed by our own Generator: seeded, picklable, and the global RNG stays untouched."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape):
        return self.rng.standard_normal(shape)


def new_es(config, cma_seed, maxiter: int | None = None) -> cma.CMAEvolutionStrategy:
    """One CMA-ES over z in R^d: x0 = 0, step sigma, the run's popsize and bound, our own RNG."""
    opts = {
        "popsize": config.popsize,
        "maxiter": config.budget // config.popsize if maxiter is None else maxiter,
        "randn": GeneratorRandn(cma_seed),
        "seed": np.nan,  # ignored with our randn; nan keeps pycma off the global RNG
        "verbose": -9,
        "verb_disp": 0,
        "verb_log": 0,
        "CMA_diagonal": bool(config.diagonal),
    }
    if config.bound > 0:
        opts["bounds"] = [-config.bound, config.bound]
    return cma.CMAEvolutionStrategy(config.intrinsic_dim * [0.0], config.sigma, inopts=opts)


class Bbt:
    """BBT (Sun et al., ICML 2022): one CMA-ES over z; a candidate is a whole prompt A z on the embeddings."""

    name = "bbt"

    def __init__(self, model, spec: ProjectionSpec):
        self.engine = model.engine
        self.specs = [spec]
        self.a_t = [build_projection(spec)]
        self.prompt_tokens = spec.prompt_tokens

    def check(self, config) -> None:
        """Settings this method cannot run with, found before anything runs (config.check did the rest)."""

    def strategies(self, config, cma_seed: int) -> list[cma.CMAEvolutionStrategy]:
        return [new_es(config, cma_seed)]

    def prepare(self, state) -> None:
        """Caches derived from a (possibly resumed) state."""

    def finished(self, state, config) -> bool:
        return state.calls + config.popsize > config.budget or bool(state.es[0].stop())

    def layer(self, state) -> int:
        return 0

    def score(self, state, z: np.ndarray, layer: int, rows: EncodedSet) -> np.ndarray:
        return self.engine.label_logits(project(self.a_t[0], z, self.prompt_tokens), rows)

    def whole(self, state, z_row: np.ndarray, layer: int) -> np.ndarray:
        return z_row.copy()

    def told(self, state, layer: int) -> None:
        """After tell: nothing else moves."""

    def zero(self) -> np.ndarray:
        return np.zeros(self.specs[0].intrinsic_dim)

    def embeds(self, z: np.ndarray) -> np.ndarray:
        """The prompt a whole z makes: [P, H]."""
        return project(self.a_t[0], z, self.prompt_tokens)[0]

    def scorer(self, z: np.ndarray) -> Callable[[EncodedSet], np.ndarray]:
        prompt = self.embeds(z)[None]
        return lambda rows: self.engine.label_logits(prompt, rows)

    def stop_reason(self, state) -> dict:
        return {k: str(v) for k, v in state.es[0].stop().items()}


class BbtV2(Bbt):
    """BBTv2 (Sun et al., EMNLP 2022; the reference's deepbbt.py): a prompt on the input of every layer, one
    CMA-ES per layer. Rounds visit the layers bottom-up; a visit scores the layer's candidates with every other
    layer at its best so far, then keeps that layer's best-ever z."""

    name = "bbtv2"

    def __init__(self, model, spec: ProjectionSpec):
        m = model.manifest
        if not m.layer_std:
            raise ModelError(f"{m.directory} has no per-layer statistics for BBTv2; re-export the model with --deep")
        if not takes_deep_prompts(model.engine):
            raise ModelError("BBTv2 needs an engine that takes deep prompts (open the model with deep=True, and "
                             "export it with --deep)")
        self.engine = model.engine
        self.specs = layer_specs(spec, m.layer_std)
        self.a_t = [build_projection(s) for s in self.specs]
        self.prompt_tokens = spec.prompt_tokens
        self.layers = m.num_layers
        self.prefix: np.ndarray | None = None  # [L, P, H]: every layer's prompt at its best so far

    def rounds(self, config) -> int:
        rounds = config.budget // (config.popsize * self.layers)
        if rounds < 1:
            raise SettingsError(f"--budget {config.budget} is less than one BBTv2 round: --popsize {config.popsize} "
                                f"x {self.layers} layers = {config.popsize * self.layers} calls")
        return rounds

    def check(self, config) -> None:
        self.rounds(config)  # a budget too small for one round

    def strategies(self, config, cma_seed: int) -> list[cma.CMAEvolutionStrategy]:
        rounds = self.rounds(config)
        streams = np.random.SeedSequence(cma_seed).spawn(self.layers)
        return [new_es(config, int(s.generate_state(1, dtype=np.uint32)[0]), maxiter=rounds) for s in streams]

    def prepare(self, state) -> None:
        if state.prefix_z is None:
            state.prefix_z = np.zeros((self.layers, self.specs[0].intrinsic_dim))
        self.prefix = np.stack([project(a, z, self.prompt_tokens)[0] for a, z in zip(self.a_t, state.prefix_z)])

    def finished(self, state, config) -> bool:
        return state.generation >= self.rounds(config) * self.layers  # the reference never stops early

    def layer(self, state) -> int:
        return state.generation % self.layers

    def score(self, state, z: np.ndarray, layer: int, rows: EncodedSet) -> np.ndarray:
        return self.engine.deep_label_logits(project(self.a_t[layer], z, self.prompt_tokens), rows, self.prefix, layer)

    def whole(self, state, z_row: np.ndarray, layer: int) -> np.ndarray:
        full = state.prefix_z.copy()
        full[layer] = z_row
        return full

    def told(self, state, layer: int) -> None:
        best = state.es[layer].result.xbest
        if best is not None:
            state.prefix_z[layer] = best
            self.prefix[layer] = project(self.a_t[layer], best, self.prompt_tokens)[0]

    def zero(self) -> np.ndarray:
        return np.zeros((self.layers, self.specs[0].intrinsic_dim))

    def embeds(self, z: np.ndarray) -> np.ndarray:
        """[L, P, H]."""
        return np.stack([project(a, row, self.prompt_tokens)[0] for a, row in zip(self.a_t, z)])

    def scorer(self, z: np.ndarray) -> Callable[[EncodedSet], np.ndarray]:
        layers = self.embeds(z)
        return lambda rows: self.engine.deep_label_logits(layers[:1], rows, layers, 0)

    def stop_reason(self, state) -> dict:
        return {}


def method_for(name: str):
    if name not in METHODS:
        raise SettingsError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return Bbt if name == "bbt" else BbtV2
