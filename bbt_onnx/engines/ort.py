"""onnxruntime in this process: `OrtEngine` runs one graph of a model directory, and `OrtSpec` names it
(`cpu:fp32`, `ort:cuda:fp16`).

On CPU, rows of similar length go in one call (padding is computed like any token); on CUDA the rows are bound on
the device once per set of rows. Suffix-prompt rows on a decoder exported with the cached pair run their text once
and each call only the tails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from ..contract import GRAPH_OUTPUTS, PROMPT_POS, ROW_INPUTS, TEXT_OUTPUTS, graph_key
from ..devices import DEVICES, PRECISIONS, device_of
from ..encoding import CacheSplit, EncodedSet, cache_split
from ..errors import ModelError, SettingsError
from ..fileio import sha256_file
from ..manifest import MANIFEST_NAME, GraphSpec, Manifest, dim_problems
from .base import PromptScoring, check_prompt_positions, row_groups, row_input

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
KV_CACHE_LIMIT = 4 << 30  # bytes of cached text keys and values an engine may hold


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
        self._plans: dict[int, tuple[np.ndarray, list[Part]]] = {}  # by the rows' identity
        # Suffix prompts on a decoder: the text's keys and values once per set of rows, then only the tails.
        has_pair = not deep and manifest.has_cache_graphs(precision)
        if kv_cache and not has_pair:
            raise ModelError(f"the model has no cached pair of graphs for {graph_key(precision, deep)} (re-export "
                             "a decoder with `bbt-onnx export --kv-cache`; BBTv2's deep graph has none)")
        self.kv_cache = has_pair if kv_cache is None else bool(kv_cache)
        self.kv_cache_limit = kv_cache_limit
        self._text = self._tail = None
        self._cached_bytes = 0
        self.text_runs = 0  # texts run through the text graph (once per set of rows and bucket, then kept)

    def plan_summary(self, batch: EncodedSet) -> dict:
        """How this engine runs a set of rows: its calls, whether through the cached text, and where the rows and
        the cached keys and values live. Planned once per set of rows, as a tune does."""
        parts = self._plan(batch)
        return {"calls": len(parts), "cached_text": parts[0].split is not None,
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
            out[:, part.index] = self._run_tail(part.text_kv, feeds)
        return out

    def _cache_pair(self):
        if self._text is None:
            graphs = self.manifest.graphs
            self._text = self._open(graphs[graph_key(self.precision, part="text")])
            self._tail = self._open(graphs[graph_key(self.precision, part="tail")])
            shape = next(i.shape for i in self._tail.get_inputs() if i.name == "text_kv")
            self._kv_unit = int(np.prod([d for d in shape if isinstance(d, int)])) * 4  # bytes per row and token
        return self._text, self._tail

    def _reserve(self, splits: list[CacheSplit]) -> None:
        """Room for these texts' keys and values within the limit: older cached texts go first; a set of rows that
        alone is over the limit is a clear error."""
        self._cache_pair()
        need = self._kv_unit * sum(split.text_ids.size for split in splits)
        if need > self.kv_cache_limit:
            rows = sum(len(split.text_ids) for split in splits)
            raise SettingsError(f"the cached keys and values of these {rows} rows would take {need / 2**30:.1f} GiB, "
                                f"over the engine's limit of {self.kv_cache_limit / 2**30:.1f} GiB; use fewer "
                                "training rows or a smaller max_length, or tune with a prefix prompt", "max_length")
        if self._cached_bytes + need > self.kv_cache_limit:
            self._plans = {k: v for k, v in self._plans.items() if v[1][0].split is None}
            self._cached_bytes = 0
        self._cached_bytes += need

    def _text_kv(self, split: CacheSplit):
        """Every layer's keys and values for these texts, on the engine's device."""
        text, _ = self._cache_pair()
        self.text_runs += 1
        feeds = {"input_ids": split.text_ids, "attention_mask": split.text_mask}
        if not self.io_binding:
            return text.run(list(TEXT_OUTPUTS), feeds)[0]
        ort = onnxruntime()
        binding = text.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        binding.bind_output(TEXT_OUTPUTS[0], self.device)
        text.run_with_iobinding(binding)
        return binding.get_outputs()[0]  # stays on the device

    def _run_tail(self, text_kv, feeds: dict) -> np.ndarray:
        _, tail = self._cache_pair()
        if not self.io_binding:
            return np.asarray(tail.run(list(GRAPH_OUTPUTS), {"text_kv": text_kv, **feeds})[0], dtype=np.float32)
        ort = onnxruntime()
        binding = tail.io_binding()
        binding.bind_ortvalue_input("text_kv", text_kv)
        for name, value in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(GRAPH_OUTPUTS[0], "cpu")
        tail.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def _plan(self, batch: EncodedSet) -> list["Part"]:
        """How a batch is run: its length buckets, with their rows on the device when binding, or for suffix rows
        on a model with the cached pair, their texts' keys and values. Decided and built once per batch, since
        the training set is scored every generation."""
        key = id(batch.attention_mask)
        hit = self._plans.get(key)
        if hit is None or hit[0] is not batch.attention_mask:
            check_prompt_positions(batch, self.takes_prompt_pos, self.manifest.prompt_start, self.graph)
            whole = cache_split(batch) if self.kv_cache else None
            cached = whole is not None
            if len(self._plans) >= 8:
                self._plans.clear()
                self._cached_bytes = 0
            lengths = batch.prompt_pos if cached else batch.lengths  # a cached text's length is its cost
            groups, subsets = row_groups(batch, lengths, self.max_buckets)
            if cached:
                splits = [whole] if len(subsets) == 1 else [cache_split(sub) for sub in subsets]
                self._reserve(splits)
                parts = [Part(g, sub, split=split, text_kv=self._text_kv(split))
                         for g, sub, split in zip(groups, subsets, splits)]
            else:
                parts = [Part(g, sub, self._bind_rows(sub) if self.io_binding else None)
                         for g, sub in zip(groups, subsets)]
            hit = (batch.attention_mask, parts)
            self._plans[key] = hit
        return hit[1]

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
