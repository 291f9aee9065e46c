"""onnxruntime in this process: `OrtEngine` runs one graph of a model directory, and `OrtSpec` names it
(`cpu:fp32`, `ort:cuda:fp16`).

On CPU, rows of similar length go in one call (padding is computed like any token); on CUDA the rows are bound on
the device once per set of rows. Suffix-prompt rows on a decoder exported with the cached pair run their text once
and each call only the tails; a prefix the rows share (demonstrations) runs once per engine, its keys and values
kept once, and the texts and tails attend to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from ..contract import GRAPH_OUTPUTS, PREFIX_KV, PROMPT_POS, ROW_INPUTS, TEXT_OUTPUTS, graph_key
from ..devices import DEVICES, PRECISIONS, device_of
from ..encoding import CacheSplit, EncodedSet, cache_split
from ..errors import DataError, ModelError, SettingsError
from ..fileio import sha256_file
from ..manifest import MANIFEST_NAME, GraphSpec, Manifest, dim_problems
from .base import PromptScoring, check_prompt_positions, row_groups, row_input

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
KV_CACHE_LIMIT = 4 << 30  # bytes of cached keys and values (texts and shared prefixes) an engine may hold


def size_text(size: int) -> str:
    """Bytes in words: 1.5 GiB, 12.0 MiB, 800 bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def onnxruntime():
    """The onnxruntime module, or one line naming the extra that brings it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SettingsError("running a graph in this process needs onnxruntime: pip install 'bbt-onnx[cpu]' (or "
                            "'bbt-onnx[gpu]' for CUDA)") from None
    return ort


class OrtEngine(PromptScoring):
    """One onnxruntime session over one graph of a model directory, created once."""

    def __init__(self, manifest: Manifest, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, verify: bool = True, max_buckets: int | None = None, deep: bool = False,
                 kv_cache: bool | None = None, kv_cache_limit: int = KV_CACHE_LIMIT):
        self.on = device_of(device)  # what running on this device changes
        self.manifest = manifest
        self.precision = precision
        self.deep = deep
        self.device = device
        self.provider = self.on.provider
        self.threads = threads
        self.verify = verify
        self.graph = graph_key(precision, deep)
        self.graph_label = f"the {self.graph} graph"
        self.session = self._open(manifest.graph(precision, deep))
        names = [i.name for i in self.session.get_inputs()]
        self.takes_prompt_pos = PROMPT_POS in names
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.prompt_dtype = ORT_TYPES[inputs["prompt_embeds"].type]
        if "prompt_layer" in inputs:  # [1]; a scalar in deep graphs exported before it could be served
            self.LAYER_SHAPE = (1,) * len(inputs["prompt_layer"].shape)
        # the device's calls per set of rows (length buckets on CPU, one large call on a GPU), and whether its rows
        # are bound on it once per batch, so each call uploads only the prompts and downloads only [C, N, K]
        self.max_buckets = max_buckets if max_buckets is not None else self.on.row_buckets
        self.io_binding = self.on.io_binding
        self.row_inputs = ROW_INPUTS + ((PROMPT_POS,) if self.takes_prompt_pos else ())
        self._plans: dict[int, tuple[np.ndarray, object, list[Part]]] = {}  # by the rows' (and prefix's) identity
        # Suffix prompts on a decoder: the text's keys and values once per set of rows, then only the tails.
        has_pair = not deep and manifest.has_cache_graphs(precision)
        if kv_cache and not has_pair:
            raise ModelError(f"the model has no cached pair of graphs for {graph_key(precision, deep)} (re-export "
                             "a decoder with `bbt-onnx export --kv-cache`; BBTv2's deep graph has none)")
        self.kv_cache = has_pair if kv_cache is None else bool(kv_cache)
        self.kv_cache_limit = kv_cache_limit
        self._text = self._tail = None
        self._cached_bytes = 0  # the kept texts' keys and values
        self._prefixes: dict[bytes, object] = {}  # each shared prefix's keys and values (batch 1), by its ids' bytes
        self._prefix_bytes = 0
        self.text_runs = 0  # texts run through the text graph (once per set of rows and bucket, then kept)
        self.prefix_runs = 0  # shared prefixes run through it (once per distinct prefix, then kept)

    def plan_summary(self, batch: EncodedSet) -> dict:
        """How this engine runs a set of rows: its calls, whether through the cached text, and where the rows and
        the cached keys and values live. Planned once per set of rows, as a tune does."""
        parts = self._plan(batch)
        cached = parts[0].split is not None
        return {"calls": len(parts), "cached_text": cached,
                "cached_prefix": cached and batch.prefix_length > 0,  # else a prefix runs with each row
                "rows_on_device": all(p.device_rows is not None for p in parts),
                "text_kv_on_device": any(type(p.text_kv).__name__ == "OrtValue" for p in parts)}

    def _open(self, spec: GraphSpec):
        """One onnxruntime session over one graph, its file checked against the manifest first."""
        ort = onnxruntime()
        path = self.manifest.directory / spec.file
        if self.verify and sha256_file(path) != spec.sha256:
            raise ModelError(f"{path} does not match the sha256 in its manifest: the graph was changed or "
                           "half-copied; re-export the model")
        provider = self.provider
        if self.on.preload_dlls and hasattr(ort, "preload_dlls"):
            try:  # CUDA and cuDNN from the nvidia-* wheels (torch's), when the system has none on its path
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort; the provider check below says what is missing
                pass
        available = ort.get_available_providers()
        if provider not in available:
            raise ModelError(f"device {self.device} needs onnxruntime's {provider}, which this install lacks "
                           f"(available: {', '.join(available)}); install the gpu extra (onnxruntime-gpu) "
                           "in an environment without the CPU onnxruntime", "device")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or cpu_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:  # the device's provider options: on CUDA, TF32 off (fp32 means fp32)
            session = ort.InferenceSession(str(path), sess_options=opts, providers=[(provider, self.on.options)])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"onnxruntime cannot load {path} on {self.device}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
        got = session.get_providers()
        if not got or got[0] != provider:
            raise ModelError(f"onnxruntime fell back to {got} instead of {provider}: check the CUDA and cuDNN "
                           "libraries onnxruntime-gpu needs; refusing to run on CPU silently")
        names = [i.name for i in session.get_inputs()]
        outs = [o.name for o in session.get_outputs()]
        if not spec.keeps_contract(names, outs):
            inputs, outputs = spec.contract()
            raise ModelError(f"{path} has inputs {names} and outputs {outs}, not the bbt-onnx contract "
                             f"{list(inputs)} -> {list(outputs)}; re-export the model")
        problems = dim_problems(self.manifest, str(path), ((i.name, i.shape) for i in session.get_inputs()))
        if problems:
            raise ModelError(f"{problems[0]} in {self.manifest.directory / MANIFEST_NAME}: the manifest does not "
                             "describe this graph; re-export the model")
        return session

    def _score(self, prompts: np.ndarray, batch: EncodedSet, extra: dict) -> np.ndarray:
        try:
            return self._score_parts(prompts, batch, extra)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types, from its C++ side
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(f"onnxruntime could not run {self.graph_label} on {self.device} ({len(batch)} rows x "
                             f"{prompts.shape[0]} prompts): {first}") from None

    def _score_parts(self, prompts: np.ndarray, batch: EncodedSet, extra: dict) -> np.ndarray:
        parts = self._plan(batch)
        if parts[0].split is not None:
            return self._score_cached(prompts, batch, parts)
        if len(parts) == 1:
            return self._run(prompts, parts[0], extra)
        out = np.empty((prompts.shape[0], len(batch), len(batch.label_ids)), np.float32)
        for part in parts:
            out[:, part.index] = self._run(prompts, part, extra)
        return out

    def _score_cached(self, prompts: np.ndarray, batch: EncodedSet, parts: list["Part"]) -> np.ndarray:
        """Suffix prompts: each length bucket's text went through the text graph once (kept with the plan); each
        call runs the tail graph."""
        out = np.empty((prompts.shape[0], len(batch), len(batch.label_ids)), np.float32)
        for part in parts:
            feeds = {"text_mask": part.split.text_mask, "tail_ids": part.split.tail_ids,
                     "mask_pos": part.split.tail_mask_pos, "prompt_embeds": prompts, "label_ids": part.batch.label_ids}
            out[:, part.index] = self._run_tail(part.text_kv, part.prefix_kv, feeds)
        return out

    def _supports_prefix(self) -> bool:
        self._cache_pair()
        return self.takes_prefix

    def _cache_pair(self):
        if self._text is None:
            graphs = self.manifest.graphs
            text = self._open(graphs[graph_key(self.precision, part="text")])
            tail = self._open(graphs[graph_key(self.precision, part="tail")])
            shape = next(i.shape for i in tail.get_inputs() if i.name == "text_kv")
            self._kv_unit = int(np.prod([d for d in shape if isinstance(d, int)])) * 4  # bytes per row and token
            # pairs exported before shared prefixes take none; the others take an empty one for rows without
            self.takes_prefix = all(PREFIX_KV in {i.name for i in g.get_inputs()} for g in (text, tail))
            self._no_prefix = None
            if self.takes_prefix:
                self._no_prefix = np.zeros([0 if axis == 4 else 1 if axis == 2 else d
                                            for axis, d in enumerate(shape)], np.float32)
            self._text, self._tail = text, tail
        return self._text, self._tail

    def _reserve(self, splits: list[CacheSplit], prefix: np.ndarray | None) -> None:
        """Room for these texts' keys and values, and their prefix's when it is not kept yet, within the limit:
        cached texts go first, then the least recently used prefixes; what alone is over the limit is a clear
        error."""
        self._cache_pair()
        need = self._kv_unit * sum(split.text_ids.size for split in splits)
        fresh = 0 if prefix is None or prefix.tobytes() in self._prefixes else self._kv_unit * prefix.size
        if fresh > self.kv_cache_limit:
            raise SettingsError(f"the keys and values of the shared prefix ({prefix.size} tokens) would take "
                                f"{size_text(fresh)}, over the engine's kv_cache_limit of "
                                f"{size_text(self.kv_cache_limit)}; use a shorter prefix (fewer demonstrations)",
                                "kv_cache_limit")
        if need + fresh > self.kv_cache_limit:
            rows = sum(len(split.text_ids) for split in splits)
            with_prefix = f" after a shared prefix of {prefix.size} tokens" if prefix is not None else ""
            raise SettingsError(f"the cached keys and values of these {rows} rows{with_prefix} would take "
                                f"{size_text(need + fresh)}, over the engine's limit of "
                                f"{size_text(self.kv_cache_limit)}; use fewer training rows or a smaller max_length, "
                                "or tune with a prefix prompt", "max_length")
        if self._cached_bytes + self._prefix_bytes + need + fresh > self.kv_cache_limit:
            self._plans = {k: v for k, v in self._plans.items() if v[2][0].split is None}
            self._cached_bytes = 0
        keep = b"" if prefix is None else prefix.tobytes()
        for key in list(self._prefixes):  # no kept text holds a prefix any more: least recently used go first
            if self._prefix_bytes + need + fresh <= self.kv_cache_limit:
                break
            if key != keep:
                del self._prefixes[key]
                self._prefix_bytes -= self._kv_unit * len(key) // 8
        self._cached_bytes += need

    def _prefix_kv(self, prefix: np.ndarray | None):
        """The keys and values of a prefix every row shares, computed once per distinct prefix and kept (batch 1;
        the graphs broadcast it over the rows); an empty one for rows without a prefix, None for a pair that
        takes none."""
        self._cache_pair()
        if prefix is None:
            return self._device(self._no_prefix) if self.takes_prefix else None
        key = prefix.tobytes()
        if key in self._prefixes:
            self._prefixes[key] = self._prefixes.pop(key)  # the most recently used now
        else:
            self.prefix_runs += 1
            ids = prefix.reshape(1, -1)
            self._prefixes[key] = self._run_text(ids, np.ones_like(ids), self._device(self._no_prefix))
            self._prefix_bytes += self._kv_unit * prefix.size
        return self._prefixes[key]

    def _device(self, value: np.ndarray):
        """An input kept for many calls: on the device when binding."""
        if not self.io_binding:
            return value
        return onnxruntime().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)

    def _text_kv(self, split: CacheSplit, prefix_kv):
        """Every layer's keys and values for these texts (after the shared prefix's), on the engine's device."""
        self.text_runs += 1
        return self._run_text(split.text_ids, split.text_mask, prefix_kv)

    def _run_text(self, ids: np.ndarray, mask: np.ndarray, prefix_kv):
        text, _ = self._cache_pair()
        feeds = {"input_ids": ids, "attention_mask": mask}
        kept = {} if prefix_kv is None else {PREFIX_KV: prefix_kv}
        if not self.io_binding:
            return text.run(list(TEXT_OUTPUTS), {**feeds, **kept})[0]
        ort = onnxruntime()
        binding = text.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        for name, value in kept.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(TEXT_OUTPUTS[0], self.device)
        text.run_with_iobinding(binding)
        return binding.get_outputs()[0]  # stays on the device

    def _run_tail(self, text_kv, prefix_kv, feeds: dict) -> np.ndarray:
        _, tail = self._cache_pair()
        kept = {"text_kv": text_kv, **({} if prefix_kv is None else {PREFIX_KV: prefix_kv})}
        if not self.io_binding:
            return np.asarray(tail.run(list(GRAPH_OUTPUTS), {**kept, **feeds})[0], dtype=np.float32)
        ort = onnxruntime()
        binding = tail.io_binding()
        for name, value in kept.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(GRAPH_OUTPUTS[0], "cpu")
        tail.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def _plan(self, batch: EncodedSet) -> list["Part"]:
        """How a batch is run: its length buckets, with their rows on the device when binding, or for suffix rows
        on a model with the cached pair, their texts' keys and values (after their shared prefix's, kept once per
        engine). Rows with a prefix anywhere else run whole. Decided and built once per batch (and prefix), since
        the training set is scored every generation."""
        key = id(batch.attention_mask)
        hit = self._plans.get(key)
        if hit is None or hit[0] is not batch.attention_mask or hit[1] is not batch.prefix_ids:
            prefix = self._check_prefix(batch)
            whole = cache_split(batch) if self.kv_cache else None
            cached = whole is not None
            rows = batch if cached else batch.whole()  # a prefix not cached runs with each row
            check_prompt_positions(rows, self.takes_prompt_pos, self.manifest.prompt_start, self.graph)
            if cached and prefix is not None and not self._supports_prefix():
                raise ModelError("this model's cached pair of graphs was exported before shared prefixes: re-export "
                                 "it with `bbt-onnx export --kv-cache` for rows with a prefix (or open the engine "
                                 "with kv_cache=False, which runs every row whole)", "kv_cache")
            if len(self._plans) >= 8:
                self._plans.clear()
                self._cached_bytes = 0
            lengths = rows.prompt_pos if cached else rows.lengths  # a cached text's length is its cost
            groups, subsets = row_groups(rows, lengths, self.max_buckets)
            if cached:
                splits = [whole] if len(subsets) == 1 else [cache_split(sub) for sub in subsets]
                self._reserve(splits, prefix)
                prefix_kv = self._prefix_kv(prefix)
                parts = [Part(g, sub, split=split, text_kv=self._text_kv(split, prefix_kv), prefix_kv=prefix_kv)
                         for g, sub, split in zip(groups, subsets, splits)]
            else:
                parts = [Part(g, sub, self._bind_rows(sub) if self.io_binding else None)
                         for g, sub in zip(groups, subsets)]
            hit = (batch.attention_mask, batch.prefix_ids, parts)
            self._plans[key] = hit
        return hit[2]

    def _check_prefix(self, batch: EncodedSet) -> np.ndarray | None:
        """The rows' shared prefix as int64 ids (None when they have none or an empty one); rows that with it
        would not fit the model's positions are refused."""
        if not batch.prefix_length:
            return None
        prefix = np.ascontiguousarray(batch.prefix_ids, dtype=np.int64)
        if prefix.ndim != 1:
            raise DataError(f"prefix_ids must be one sequence of ids, got an array of shape {list(prefix.shape)}",
                            "prefix_ids")
        longest = prefix.size + int(batch.lengths.max())
        if longest > self.manifest.max_positions:
            raise SettingsError(f"a shared prefix of {prefix.size} tokens and rows of up to "
                                f"{int(batch.lengths.max())} make {longest} tokens, over the model's "
                                f"{self.manifest.max_positions} positions; use a shorter prefix or a smaller "
                                "max_length", "max_length")
        return prefix

    def _bind_rows(self, batch: EncodedSet) -> dict:
        ort = onnxruntime()
        return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._row_input(batch, name)),
                                                        self.device, 0)
                for name in self.row_inputs}

    def _row_input(self, batch: EncodedSet, name: str) -> np.ndarray:
        return row_input(batch, name, self.manifest.prompt_start)

    def _run(self, prompts: np.ndarray, part: "Part", extra: dict) -> np.ndarray:
        """One session call; `extra` holds the deep graph's per-call inputs."""
        if part.device_rows is None:
            feeds = {name: self._row_input(part.batch, name) for name in self.row_inputs}
            feeds.update(extra, prompt_embeds=prompts)
            return np.asarray(self.session.run(list(GRAPH_OUTPUTS), feeds)[0], dtype=np.float32)
        ort = onnxruntime()
        binding = self.session.io_binding()
        for name, value in part.device_rows.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in {**extra, "prompt_embeds": prompts}.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        binding.bind_output(GRAPH_OUTPUTS[0], "cpu")
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


@dataclass(frozen=True)
class Part:
    """Rows `index` of a batch, run in one call."""

    index: np.ndarray
    batch: EncodedSet
    device_rows: dict | None = None
    split: CacheSplit | None = None  # suffix rows: the texts and tails of the cached pair
    text_kv: object = None  # their keys and values (numpy, or an OrtValue on the device)
    prefix_kv: object = None  # their shared prefix's (kept once by the engine), empty without one; None: not taken


@dataclass(frozen=True)
class OrtSpec:
    """An engine in this process: onnxruntime on a device, over the graph of one precision."""

    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = field(default=None, compare=False)  # CPU threads [default: every core]

    backend: ClassVar[str] = "ort"
    needs_graphs: ClassVar[bool] = True  # the model directory must hold the graphs
    takes_token: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return f"{self.device}:{self.precision}"

    @staticmethod
    def claims(text: str) -> bool:
        return "://" not in text

    @classmethod
    def parse(cls, text: str, token: str | None = None, threads: int | None = None) -> "OrtSpec":
        """`cpu:fp32`, `cuda:fp16`, or with the backend first, `ort:cpu:int8`."""
        parts = [p.strip().lower() for p in str(text).split(":")]
        if parts and parts[0] == cls.backend:
            parts = parts[1:]
        if len(parts) != 2 or parts[0] not in DEVICES or parts[1] not in PRECISIONS:
            raise SettingsError(f"engine {text!r} is not DEVICE:PRECISION (devices: {', '.join(DEVICES)}; "
                                f"precisions: {', '.join(PRECISIONS)}), e.g. cpu:fp32 or ort:cuda:fp16")
        return cls(parts[0], parts[1], threads)

    def local_graph(self, deep: bool = False) -> str:
        """The manifest's key of the graph this engine runs here."""
        return graph_key(self.precision, deep)

    def unavailable(self, manifest: Manifest, deep: bool = False) -> str | None:
        """Why this engine cannot open for `manifest`, or None when it can."""
        if self.local_graph(deep) not in manifest.graphs:
            return f"the model has no {self.local_graph(deep)} graph"
        provider = DEVICES[self.device].provider
        if provider not in onnxruntime().get_available_providers():
            return f"onnxruntime's {provider} is not installed"
        return None

    def open(self, manifest: Manifest, deep: bool = False) -> OrtEngine:
        return OrtEngine(manifest, precision=self.precision, device=self.device, threads=self.threads, deep=deep)

    def record(self, engine) -> dict:
        """What a run records of its engine."""
        return {"precision": self.precision, "device": self.device}

    def resumed(self, record: dict) -> "OrtSpec":
        """This engine continuing a run recorded with `record`: the graph's precision is the run's."""
        return replace(self, precision=record.get("precision") or "fp32")
