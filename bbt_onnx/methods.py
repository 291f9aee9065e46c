"""Search methods, one record each in `METHODS`: what differs between BBT and BBTv2 inside the tuner's one loop.

A method says whether it needs the deep-prompt graph, what a whole prompt is (z [d] and [P, H] for BBT, Z [L, d]
and [L, P, H] for BBTv2) and how one is scored on any rows, which CMA-ES instances exist, which of them a
generation asks, and when the search stops (`stop()`, the reasons, as pycma's). Budget accounting, the dev
choice, checkpoints and events stay in the tuner. A new method plugs in as one class in `METHODS`.
"""

from __future__ import annotations

from typing import Callable

from .cmaes import cma
import numpy as np

from .encoding import EncodedSet
from .errors import ModelError, PromptError, SettingsError
from .subspace import ProjectionSpec, build_projection, layer_specs, project


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
    deep = False  # needs the deep-prompt graph
    shares_calls = True  # several runs' candidates can go in one engine call (`candidates`)

    @staticmethod
    def prompt_dims(layers: int) -> tuple[int, ...]:
        """The leading dims of a whole prompt's z and embeddings on a model of `layers` layers: none."""
        return ()

    @staticmethod
    def scorer(engine, embeds: np.ndarray) -> Callable[[EncodedSet], np.ndarray]:
        """rows -> [1, N, K]: a whole prompt ([P, H]) on the engine."""
        return lambda rows: engine.label_logits(embeds[None], rows)

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

    def stop(self, state, config) -> dict[str, str]:
        """Why the search ends now (empty: it goes on): pycma's own criteria, else the budget."""
        reasons = {k: str(v) for k, v in state.es[0].stop().items()}
        if not reasons and state.calls + config.popsize > config.budget:
            reasons["budget"] = str(config.budget)
        return reasons

    def layer(self, state) -> int:
        return 0

    def candidates(self, state, z: np.ndarray, layer: int) -> np.ndarray:
        """[C, P, H]: the candidates as whole plain prompts. Runs of this method on the same rows can put their
        candidates in one engine call (`shares_calls`)."""
        return project(self.a_t[0], z, self.prompt_tokens)

    def score(self, state, z: np.ndarray, layer: int, rows: EncodedSet) -> np.ndarray:
        return self.engine.label_logits(self.candidates(state, z, layer), rows)

    def whole(self, state, z_row: np.ndarray, layer: int) -> np.ndarray:
        return z_row.copy()

    def told(self, state, layer: int) -> None:
        """After tell: nothing else moves."""

    def zero(self) -> np.ndarray:
        return np.zeros(self.specs[0].intrinsic_dim)

    def embeds(self, z: np.ndarray) -> np.ndarray:
        """The prompt a whole z makes: [P, H]."""
        return project(self.a_t[0], z, self.prompt_tokens)[0]

    def z_scorer(self, z: np.ndarray) -> Callable[[EncodedSet], np.ndarray]:
        """rows -> [1, N, K] for a whole z."""
        return self.scorer(self.engine, self.embeds(z))


class BbtV2(Bbt):
    """BBTv2 (Sun et al., EMNLP 2022; the reference's deepbbt.py): a prompt on the input of every layer, one
    CMA-ES per layer. Rounds visit the layers bottom-up; a visit scores the layer's candidates with every other
    layer at its best so far, then keeps that layer's best-ever z."""

    name = "bbtv2"
    deep = True
    shares_calls = False  # a call carries one run's layer prompts: each run scores its own candidates

    @staticmethod
    def prompt_dims(layers: int) -> tuple[int, ...]:
        return (layers,)

    @staticmethod
    def scorer(engine, embeds: np.ndarray) -> Callable[[EncodedSet], np.ndarray]:
        """rows -> [1, N, K]: every layer's prompt ([L, P, H]) on the engine's deep graph."""
        if not engine.deep:
            raise PromptError("this is a BBTv2 prompt: open the model with deep=True (on its deep-prompt graph)")
        return lambda rows: engine.deep_label_logits(embeds[:1], rows, embeds, 0)

    def __init__(self, model, spec: ProjectionSpec):
        m = model.manifest
        if not m.layer_std:
            raise ModelError(f"{m.directory} has no per-layer statistics for BBTv2; re-export the model with "
                             "`bbt-onnx export --deep`")
        if not model.engine.deep:
            raise ModelError("BBTv2 needs an engine that takes deep prompts (open the model with deep=True, on a "
                             "model exported with `bbt-onnx export --deep`)")
        self.engine = model.engine
        self.specs = layer_specs(spec, m.layer_std)
        self.a_t = [build_projection(s) for s in self.specs]
        self.prompt_tokens = spec.prompt_tokens
        self.layers = m.num_layers
        self.prefix: np.ndarray | None = None  # [L, P, H]: every layer's prompt at its best so far

    def rounds(self, config) -> int:
        rounds = config.budget // (config.popsize * self.layers)
        if rounds < 1:
            raise SettingsError(f"budget {config.budget} is less than one BBTv2 round: popsize {config.popsize} "
                                f"x {self.layers} layers = {config.popsize * self.layers} calls", ("budget", "popsize"))
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

    def stop(self, state, config) -> dict[str, str]:
        """The reference never stops early: its rounds end it."""
        return {"budget": str(config.budget)} if state.generation >= self.rounds(config) * self.layers else {}

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



METHODS = {method.name: method for method in (Bbt, BbtV2)}


def method_for(name: str):
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise SettingsError(f"method {name!r} is not one of {', '.join(METHODS)}") from None
