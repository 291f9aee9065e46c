"""Checkpoints without pickle: a tuner's state as numbers, strings and arrays, in one npz file.

A run directory is something users share, so reading a checkpoint must never run code. `checkpoint.npz` holds one
JSON document (the tuner's counters, best-so-far values and settings, and each CMA-ES strategy as a tree of plain
values) and the arrays that tree names; it is read with `allow_pickle=False`, and nothing a file names is imported
or called.

A strategy is restored into a fresh one built from the run's settings (the same options, the same generator):
every attribute pycma changes while it runs (the mean, the step size, the covariance and its eigen decomposition,
the evolution paths, the counters, the best solution so far, the histories its stop criteria read, our
generator's state) is put back, so the continuation is bit for bit the one a run that never stopped would take.
Objects inside the strategy are only pycma's own, from a fixed list (`STATE_CLASSES`); the options, the data
logger, functions and the generator object itself are the fresh strategy's (`KEPT`).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import types
from dataclasses import fields
from typing import Any

import numpy as np

from ..cmaes import cma  # pycma through cmaes.py, without its matplotlib warning
from ..errors import RunError
from ..fileio import NPZ_LIMIT, check_npz, read_bounded
from ..runs import RunDir
from .config import TuneConfig, TunerState

FORMAT = "bbt-onnx checkpoint"
VERSION = 1
DOC = "checkpoint"  # the npz entry holding the JSON document
MISSING = object()
ADDED = ("stale_evals",)  # TunerState fields newer than version 1's first checkpoints


def _state_classes() -> dict[str, type]:
    """pycma's classes a strategy's state may hold, by their qualified names; nothing else is ever created."""
    from cma import (boundary_handler, evolution_strategy, optimization_tools, options_parameters,
                     recombination_weights, sampler, sigma_adaptation, transformations)
    from cma.utilities import utils

    classes = [evolution_strategy.CMAEvolutionStrategy, evolution_strategy._CMASolutionDict_functional,
               evolution_strategy._CMAStopDict, evolution_strategy._StopTolXStagnation, optimization_tools.BestSolution,
               options_parameters.CMAParameters, recombination_weights.RecombinationWeights, sampler.GaussFullSampler,
               sampler.GaussStandardConstant, sigma_adaptation.CMAAdaptSigmaCSA,
               sigma_adaptation.CMAAdaptSigmaTPA, sigma_adaptation._TPAParameters, transformations.DiagonalDecoding,
               transformations.GenoPheno, transformations.RoundIntegerVariables,
               transformations.BoxConstraintsLinQuadTransformation, boundary_handler.BoundNone,
               boundary_handler.BoundTransform, utils.BlancClass, utils.ElapsedWCTime, utils.MoreToWrite,
               utils.SolutionDict]
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


STATE_CLASSES = _state_classes()


def _kept(value) -> bool:
    """What a checkpoint does not store: the fresh strategy's own options, logger, generator object and functions."""
    from cma.logger import CMADataLogger
    from cma.options_parameters import CMAOptions

    from ..methods import GeneratorRandn

    if isinstance(value, (CMAOptions, CMADataLogger, GeneratorRandn, np.random.Generator, type)):
        return True
    return isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)) or \
        (callable(value) and type(value).__module__.startswith("numpy") and not isinstance(value, np.ndarray))


class Encoder:
    """Values into JSON nodes and named arrays; shared objects stay shared (`ref`)."""

    def __init__(self, arrays: dict[str, np.ndarray], named: dict[str, Any] | None = None):
        self.named = {id(v): k for k, v in (named or {}).items()}  # kept objects known by name, wherever they are
        self.arrays = arrays  # shared by the encoders of one file
        self.seen: dict[int, int] = {}
        self._alive: list = []  # keeps encoded objects alive, so no id is reused while encoding

    def _array(self, value: np.ndarray) -> str:
        if value.dtype.hasobject:
            raise TypeError("an object array cannot be stored without pickle")
        key = f"a{len(self.arrays)}"
        self.arrays[key] = value
        return key

    def encode(self, value) -> Any:
        if value is None or isinstance(value, (bool, str)) or type(value) is int:
            return value
        if type(value) is float:
            return {"t": "float", "v": value.hex()}
        if isinstance(value, np.generic):
            return {"t": "scalar", "k": self._array(np.asarray(value))}
        if type(value) is tuple:
            return {"t": "tuple", "v": [self.encode(v) for v in value]}
        if type(value) is range:
            return {"t": "range", "v": [value.start, value.stop, value.step]}
        if _kept(value):
            return {"t": "keep", "as": self.named[id(value)]} if id(value) in self.named else {"t": "keep"}
        if id(value) in self.seen:
            return {"t": "ref", "id": self.seen[id(value)]}
        self.seen[id(value)] = n = len(self.seen)
        self._alive.append(value)
        if isinstance(value, np.ndarray):
            return {"t": "array", "k": self._array(value), "id": n}
        if type(value) is list:
            return {"t": "list", "v": [self.encode(v) for v in value], "id": n}
        if type(value) is dict:
            return {"t": "dict", "v": self._pairs(value), "id": n}
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if STATE_CLASSES.get(name) is not type(value):
            raise TypeError(f"a {name} cannot be stored in a checkpoint")
        node = {"t": "object", "c": name, "id": n, "a": {k: self.encode(v) for k, v in vars(value).items()}}
        if isinstance(value, list):
            node["items"] = [self.encode(v) for v in value]
        elif isinstance(value, dict):
            node["pairs"] = self._pairs(value)
        return node

    def _pairs(self, value: dict) -> list:
        return [[self.encode(k), self.encode(v)] for k, v in value.items()]


class Decoder:
    """JSON nodes back into values; objects of the fresh strategy at the same place are filled in place."""

    def __init__(self, arrays, named: dict[str, Any] | None = None):
        self.arrays = arrays
        self.named = named or {}
        self.made: dict[int, Any] = {}

    def _array(self, key) -> np.ndarray:
        if not isinstance(key, str) or key == DOC or key not in self.arrays:
            raise ValueError(f"no array {key!r}")
        return np.array(self.arrays[key])  # a writable copy

    def decode(self, node, current=MISSING) -> Any:
        if node is None or isinstance(node, (bool, str, int)):
            return node
        if not isinstance(node, dict):
            raise ValueError(f"unexpected {type(node).__name__}")
        kind = node.get("t")
        if kind == "float":
            return float.fromhex(node["v"])
        if kind == "scalar":
            value = self._array(node["k"])
            if value.ndim != 0:
                raise ValueError("a scalar with dimensions")
            return value[()]
        if kind == "tuple":
            return tuple(self.decode(v, _item(current, i)) for i, v in enumerate(_list(node["v"])))
        if kind == "range":
            start, stop, step = (_int(v) for v in _list(node["v"]))
            return range(start, stop, step)
        if kind == "keep":
            if "as" in node:
                return self.named[node["as"]]
            if current is MISSING:
                raise ValueError("a kept value the fresh strategy does not have")
            return current
        if kind == "ref":
            return self.made[node["id"]]
        n = node.get("id")
        if not isinstance(n, int) or n in self.made:
            raise ValueError("a bad object id")
        if kind == "array":
            self.made[n] = value = self._array(node["k"])
            return value
        if kind == "list":
            self.made[n] = value = []
            value.extend(self.decode(v, _item(current, i)) for i, v in enumerate(_list(node["v"])))
            return value
        if kind == "dict":
            self.made[n] = value = {}
            self._fill(value, node["v"], current)
            return value
        if kind == "object":
            cls = STATE_CLASSES.get(node.get("c"))
            if cls is None:
                raise ValueError(f"class {node.get('c')!r} is not one a strategy holds")
            target = current if type(current) is cls else cls.__new__(cls)
            self.made[n] = target
            old = vars(target)
            attrs = node["a"]
            if not isinstance(attrs, dict):
                raise ValueError("attributes that are not an object")
            values = {str(k): self.decode(v, old.get(k, MISSING)) for k, v in attrs.items()}
            if isinstance(target, list):
                items = [self.decode(v) for v in _list(node.get("items", []))]
                target[:] = items
            elif isinstance(target, dict):
                fresh = dict(target)
                target.clear()
                self._fill(target, node.get("pairs", []), fresh)
            old.clear()
            old.update(values)
            return target
        raise ValueError(f"unknown node {kind!r}")

    def _fill(self, out: dict, pairs, current) -> None:
        for pair in _list(pairs):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("a dict entry that is not a pair")
            key = self.decode(pair[0])
            out[key] = self.decode(pair[1], current.get(key, MISSING) if isinstance(current, dict) else MISSING)


def _list(value) -> list:
    if not isinstance(value, list):
        raise ValueError("a list was expected")
    return value


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("an integer was expected")
    return value


def _item(current, i):
    return current[i] if isinstance(current, (list, tuple)) and i < len(current) else MISSING


# -- a tuner's state ---------------------------------------------------------------------------------------------
def dumps(state) -> bytes:
    """`state` (a TunerState) as the bytes of checkpoint.npz."""
    arrays: dict[str, np.ndarray] = {}
    values = {f.name: getattr(state, f.name) for f in fields(state) if f.name not in ("config", "es")}
    doc = {
        "format": FORMAT, "version": VERSION, "cma": cma.__version__,
        "config": state.config.to_json(),
        "state": {k: Encoder(arrays).encode(v) for k, v in values.items()},
        "strategies": [Encoder(arrays, named(es)).encode(es) for es in state.es],
        "rng": [es.opts["randn"].rng.bit_generator.state for es in state.es],
    }
    buf = io.BytesIO()
    np.savez(buf, **{DOC: np.array(json.dumps(doc))}, **arrays)
    return buf.getvalue()


def dumps_many(states) -> bytes:
    """Several seeds' states (a lock-step run) in one checkpoint.npz: each one's own checkpoint bytes as an array;
    one state is written as `dumps` writes it."""
    if len(states) == 1:
        return dumps(states[0])
    parts = {f"run{i}": np.frombuffer(dumps(state), np.uint8) for i, state in enumerate(states)}
    doc = {"format": FORMAT, "version": VERSION, "runs": len(states)}
    buf = io.BytesIO()
    np.savez(buf, **{DOC: np.array(json.dumps(doc))}, **parts)
    return buf.getvalue()


def loads_many(data: bytes, tuners, source: str = "the checkpoint") -> list:
    """The states `dumps_many` wrote, one per tuner, in order; a checkpoint of another number of seeds is refused."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            doc = json.loads(str(f[DOC][()]))
            runs = doc.get("runs") if isinstance(doc, dict) else None
            parts = [f[f"run{i}"].tobytes() for i in range(runs)] if isinstance(runs, int) and runs > 0 else None
    except Exception as exc:  # noqa: BLE001 - a damaged zip, array or document can raise almost any type
        raise RunError(f"{source} is damaged or not a bbt-onnx checkpoint ({type(exc).__name__}); start the run "
                       "again with force", "force") from None
    if parts is None:
        parts = [data]
    if len(parts) != len(tuners):
        raise RunError(f"{source} holds {len(parts)} seeds' states and this run has {len(tuners)}; it cannot be "
                       "resumed with these settings")
    return [loads(part, tuner, f"{source} (seed {tuner.config.seed})" if len(parts) > 1 else source)
            for part, tuner in zip(parts, tuners)]


def loads(data: bytes, tuner, source: str = "the checkpoint"):
    """The TunerState in checkpoint.npz bytes, its strategies restored into fresh ones `tuner` builds. A file that is
    not one, is damaged, or was written with other settings is a RunError; nothing in it is run."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        doc = json.loads(str(arrays[DOC][()]))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a checkpoint")
    except Exception as exc:  # noqa: BLE001 - a damaged zip, array or document can raise almost any type
        raise RunError(f"{source} is damaged or not a bbt-onnx checkpoint ({type(exc).__name__}); start the run "
                       "again with force", "force") from None
    if doc.get("version") != VERSION:
        raise RunError(f"{source} has checkpoint version {doc.get('version')!r}; this bbt-onnx reads {VERSION}")
    if doc.get("cma") != cma.__version__:
        raise RunError(f"{source} was written with pycma {doc.get('cma')}, and this install has {cma.__version__}; "
                       "resume it where pycma is the same version (CMA-ES would not continue bit for bit)")
    try:
        config = TuneConfig.from_json(doc["config"])
    except Exception as exc:  # noqa: BLE001 - a field missing, unknown or out of range
        raise RunError(f"{source} holds damaged settings ({type(exc).__name__}); start the run again with force",
                       "force") from None
    if config != tuner.config:
        raise RunError("the checkpoint was written with other settings than this run's; it cannot be resumed with "
                       "these")
    state = tuner.new_state()
    try:
        fresh = list(state.es)
        strategies = _list(doc["strategies"])
        rng = _list(doc["rng"])
        if len(strategies) != len(fresh) or len(rng) != len(fresh):
            raise ValueError("another number of strategies")
        for node, es in zip(strategies, fresh):
            if not isinstance(node, dict) or node.get("t") != "object":
                raise ValueError("a strategy that is not an object")
            before, fixed = _shapes(es), _fixed(es)
            if Decoder(arrays, named(es)).decode(node, es) is not es:
                raise ValueError("a strategy of another class")
            _check_strategy(es, before, fixed, config.intrinsic_dim)
        for es, r in zip(fresh, rng):
            es.opts["randn"].rng.bit_generator.state = r
        raw = doc["state"]
        if not isinstance(raw, dict):
            raise ValueError("no state")
        for f in fields(state):
            if f.name in ("config", "es") or (f.name in ADDED and f.name not in raw):
                continue  # a field added since the checkpoint was written keeps its default
            setattr(state, f.name, Decoder(arrays).decode(raw[f.name]))
        _check_state(state, config, len(fresh))
    except Exception as exc:  # noqa: BLE001 - whatever a crafted or damaged document leads to
        raise RunError(f"{source} is damaged ({type(exc).__name__}: {str(exc)[:120]}); start the run again with "
                       "force", "force") from None
    return state


def named(es) -> dict[str, Any]:
    """The strategy's own objects a checkpoint refers to by name: its options, our generator, its logger."""
    return {"opts": es.opts, "randn": es.opts["randn"], "logger": es.logger}


def _shapes(es) -> dict[str, tuple]:
    """The shapes of the arrays a fresh strategy holds: a restored one must keep them."""
    out = {}
    for obj, prefix in ((es, ""), (es.sm, "sm."), (es.adapt_sigma, "adapt_sigma.")):
        for k, v in vars(obj).items():
            if isinstance(v, np.ndarray):
                out[prefix + k] = (v.shape, v.dtype)
    return out


# What a run's settings fix and pycma never changes while it runs (sizes, learning rates, damping, weights): a
# restored strategy must hold the fresh one's values, so a crafted popsize, dimension or rate never reaches pycma.
FIXED = ("N", "N_pheno", "sigma0", "gp.N", "sp.N", "sp.popsize", "sp.mu", "sp", "const", "sm.dimension", "sm._lam",
         "sm._mueff", "sm._parameters", "sm.lazy_update_gap", "sm.constant_trace", "sm.condition_limit",
         "sm.quadratic", "adapt_sigma.cs", "adapt_sigma.damps", "adapt_sigma._popsize", "adapt_sigma._lam_mirr",
         "adapt_sigma.max_delta_log_sigma", "adapt_sigma.dampdown_fac", "sigma_vec.dim")
POSITIVE = ("sm.D", "D", "dC", "sigma_vec.scaling")  # pycma takes square roots of, or divides by, these


def _at(es, path: str):
    obj = es
    for part in path.split("."):
        obj = getattr(obj, part, MISSING)
        if obj is MISSING:
            break
    return obj


def _plain(value) -> Any:
    """A value as plain data (pycma's objects as their class and attributes), to compare two strategies' values."""
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return ("dict", [(_plain(k), _plain(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__qualname__, [_plain(v) for v in value],
                _plain(vars(value)) if hasattr(value, "__dict__") else None)
    if type(value).__module__.startswith("cma."):
        return (type(value).__qualname__, _plain(vars(value)))
    return value


def _fixed(es) -> dict[str, Any]:
    """The fresh strategy's values at FIXED, as plain data."""
    return {path: _plain(value) for path in FIXED if (value := _at(es, path)) is not MISSING}


def _check_strategy(es, before: dict[str, tuple], fixed: dict[str, Any], dim: int) -> None:
    """The restored strategy has the fresh one's arrays, shapes and dtypes, the values the run's settings fix, and
    pycma's numbers as pycma needs them: finite, and positive where it takes roots or divides."""
    for path, (shape, dtype) in before.items():
        obj = _at(es, path)
        if not isinstance(obj, np.ndarray) or obj.shape != shape or obj.dtype != dtype:
            raise ValueError(f"{path} is not a {dtype} array of shape {shape}")
    for path, value in fixed.items():
        if _plain(_at(es, path)) != value:
            raise ValueError(f"{path} is not the value this run's settings give it")
    for obj, prefix in ((es, ""), (es.sm, "sm."), (es.adapt_sigma, "adapt_sigma.")):
        for name, value in vars(obj).items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"{prefix}{name} holds numbers that are not finite")
    for path in POSITIVE:
        value = _at(es, path)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not (np.isfinite(value).all()
                                                                               and (value > 0).all()):
            raise ValueError(f"{path} holds numbers that are not positive")
    covariance = getattr(es.sm, "C", None)
    if isinstance(covariance, np.ndarray) and covariance.ndim == 2 and not (np.diag(covariance) > 0).all():
        raise ValueError("sm.C has a variance that is not positive")
    sigma = float(es.sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError("a step size that is not a positive number")
    if np.shape(es.mean) != (dim,) or not np.isfinite(es.mean).all():
        raise ValueError("a mean that is not finite")
    for name in ("countiter", "countevals"):
        value = getattr(es, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} is not a count")


def _check_state(state, config, strategies: int) -> None:
    for name in ("generation", "calls", "dev_calls"):
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} is not a count")
    for name in ("train_loss_initial", "best_loss", "best_dev_metric", "last_dev_metric", "seconds",
                 "engine_seconds", "optimizer_seconds", "host_seconds"):
        if not isinstance(getattr(state, name), float):
            raise ValueError(f"{name} is not a number")
    if not isinstance(state.stop_reason, dict):
        raise ValueError("stop_reason is not a mapping")
    shape = (config.intrinsic_dim,) if strategies == 1 and state.prefix_z is None else (strategies,
                                                                                         config.intrinsic_dim)
    for name in ("best_z", "best_dev_z", "last_dev_z", "prefix_z"):
        value = getattr(state, name)
        if value is None:
            continue
        if not isinstance(value, np.ndarray) or value.dtype != np.float64 or not np.isfinite(value).all():
            raise ValueError(f"{name} is not a finite array")
        if name == "prefix_z" and value.shape != (strategies, config.intrinsic_dim) or \
                name != "prefix_z" and value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}")


def save_states(run: RunDir, states) -> None:
    """Every seed's state (or one) into the run's checkpoint.npz, without pickle."""
    run.save_checkpoint(dumps_many(states if isinstance(states, list) else [states]))


def read_states(run: RunDir, tuners, trust: bool = False) -> list:
    """Every seed's TunerState in the run's checkpoint, restored for `tuners`. checkpoint.npz is data only; an old
    checkpoint.pkl (one seed) is unpickled, which runs whatever code it holds, so only when `trust` says the user
    wrote it."""
    path, legacy = run.checkpoint_file()
    if not legacy:
        try:
            data = check_npz(read_bounded(path, NPZ_LIMIT))
        except OSError as exc:
            raise RunError(f"cannot read {path}: {exc}") from None
        return loads_many(data, tuners, str(path))
    if not trust:
        raise RunError(f"{path} is a pickle checkpoint from an older bbt-onnx; unpickling runs any code it holds, "
                       "so it is read only when you say you trust it (you wrote it yourself): pass "
                       "trust_checkpoint", "trust_checkpoint")
    try:
        state = LegacyUnpickler(io.BytesIO(read_bounded(path, NPZ_LIMIT))).load()
    except Exception as exc:  # noqa: BLE001 - unpickling damaged bytes can raise almost any type
        raise RunError(f"cannot read {path}: it is damaged ({type(exc).__name__}); start the run again "
                       "with force", "force") from None
    if not isinstance(state, TunerState):
        raise RunError(f"{path} is not a bbt-onnx checkpoint (it holds a {type(state).__name__})")
    if len(tuners) != 1:
        raise RunError(f"{path} holds one seed's state and this run has {len(tuners)}")
    return [state]


class LegacyUnpickler(pickle.Unpickler):
    """Old pickles name the tuner's classes by the module they lived in then (`bbt_onnx.tuner`)."""

    MOVED = {"bbt_onnx.tuner": "bbt_onnx.tuning.tuner"}

    def find_class(self, module, name):
        return super().find_class(self.MOVED.get(module, module), name)
