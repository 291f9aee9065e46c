"""The contract between export and runtime: `manifest.json` beside the graphs.

The runtime learns every dimension, special id and the embedding scale from here, and
never from model weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .contract import PARTS, PREFIX_KV, PROMPT_POS, contract, graph_key, optional_inputs
from .devices import PRECISIONS, REFERENCE_PRECISION
from .errors import ModelError
from .fileio import JSON_LIMIT, only_files, read_text_bounded, write_json_atomic
from .kinds import KINDS, LmKind

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FINGERPRINT_SKIPS = ("graphs", "versions", "source", "gguf_file", "format_version")  # not what the model is


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One graph file of the model directory and what was measured on it at export."""

    file: str
    precision: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: dict[str, Any] = field(default_factory=dict)
    fused_ops: dict[str, int] = field(default_factory=dict)
    deep: bool = False  # takes deep_prompts [L, P', H] and prompt_layer too (BBTv2)
    part: str = ""  # "text" or "tail": one half of the cached pair for suffix prompts

    def contract(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return contract(self.deep, self.part)

    def keeps_contract(self, inputs: list[str], outputs: list[str]) -> bool:
        want_in, want_out = self.contract()
        optional = (*optional_inputs(self.part), *(() if self.part else (PROMPT_POS,)))
        return sorted(n for n in inputs if n not in optional) == sorted(want_in) and list(outputs) == list(want_out)

    def takes(self, name: str) -> bool:
        """Whether the graph has this input (an optional one may be missing from older exports)."""
        return any(t.name == name for t in self.inputs)


@dataclass(frozen=True)
class Manifest:
    kind: str
    architecture: str
    model_type: str
    source: str
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_positions: int
    prompt_tokens: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    mask_id: int | None
    placeholder_ids: tuple[int, ...]
    embedding_std: float
    embedding_mean: float
    label_prefix: str
    opset: int
    versions: dict[str, str]
    graphs: dict[str, GraphSpec]
    gguf_file: str | None = None
    # BBTv2's projection scale per layer: [0] the word embeddings' std, [i] the clipped std of the hidden
    # states entering layer i, measured at export; empty for models exported before it existed
    layer_std: tuple[float, ...] = ()
    bos_token_id: int | None = None  # the tokenizer's BOS token, added or not (for `bos: always`)
    # the chat template rendered around one user message: before it, and from its end to the assistant's reply
    chat_prefix: str | None = None
    chat_suffix: str | None = None
    format_version: int = FORMAT_VERSION
    directory: Path | None = field(default=None, compare=False)

    # -- derived -------------------------------------------------------------
    @property
    def prompt_start(self) -> int:
        """First prompt slot: right after BOS, or the very first position when the model has none."""
        return 0 if self.bos_id is None else 1

    @property
    def lm(self) -> LmKind:
        """What this model's kind (masked or causal) means at run time."""
        return KINDS[self.kind]

    @property
    def appends_eos(self) -> bool:
        """Masked LMs close the sequence with </s>; causal LMs score the next token instead."""
        return self.lm.closes_with_eos and self.eos_id is not None

    @property
    def special_ids(self) -> set[int]:
        """The ids rows are built from besides text: BOS, EOS, padding and the mask."""
        return {i for i in (self.bos_id, self.eos_id, self.pad_id, self.mask_id) if i is not None}

    def graph(self, precision: str, deep: bool = False) -> GraphSpec:
        key = graph_key(precision, deep)
        if key not in self.graphs:
            have = ", ".join(sorted(self.graphs))
            asked_for = precision not in PRECISIONS or not PRECISIONS[precision].always_exported
            flags = " ".join(f for f, wanted in (("--deep", deep), (f"--{precision}", asked_for)) if wanted)
            hint = f" (re-export with `bbt-onnx export {flags}`)" if flags else ""
            raise ModelError(f"model has no {key} graph{hint}; it has: {have}")
        return self.graphs[key]

    def graph_path(self, precision: str, deep: bool = False) -> Path:
        assert self.directory is not None
        return self.directory / self.graph(precision, deep).file

    def has_cache_graphs(self, precision: str) -> bool:
        return all(graph_key(precision, part=p) in self.graphs for p in PARTS)

    @property
    def has_chat(self) -> bool:
        return self.chat_prefix is not None and self.chat_suffix is not None

    @property
    def tokenizer_path(self) -> Path:
        assert self.directory is not None
        return self.directory / TOKENIZER_NAME

    def fingerprint(self) -> str:
        """Names the exact model a prompt or run was made on: sha256 over its weights and graph contract (the fp32
        graph's sha256), its tokenizer and the manifest's facts about the model, but not which other graphs were
        exported beside it, from where, or with which package versions: re-exporting the same weights with
        --deep or --int8 keeps it."""
        if "_fingerprint" not in self.__dict__:
            facts = {k: v for k, v in self.to_json().items() if k not in FINGERPRINT_SKIPS}
            reference = self.graphs.get(REFERENCE_PRECISION)  # fp32: the weights as exported
            facts["fp32_graph"] = reference.sha256 if reference is not None else None
            assert self.directory is not None
            tokenizer = hashlib.sha256((self.directory / TOKENIZER_NAME).read_bytes()).hexdigest()
            text = json.dumps(facts, sort_keys=True, separators=(",", ":")) + tokenizer
            self.__dict__["_fingerprint"] = hashlib.sha256(text.encode()).hexdigest()
        return self.__dict__["_fingerprint"]

    def legacy_fingerprint(self) -> str:
        """The fingerprint of bbt-onnx before 0.2: sha256 of the manifest file."""
        assert self.directory is not None
        return hashlib.sha256((self.directory / MANIFEST_NAME).read_bytes()).hexdigest()

    def is_model(self, fingerprint: str) -> bool:
        """Whether a prompt or run recorded with `fingerprint` (either kind) was made on this model."""
        return fingerprint in (self.fingerprint(), self.legacy_fingerprint())

    # -- (de)serialisation ---------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        return {"format_version": data.pop("format_version"), **data}

    def write(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_NAME, self.to_json())


def looks_like_model_dir(directory: Path) -> bool:
    """What `export --force` may replace: a directory export wrote (a manifest, a tokenizer, graphs) or a client
    directory, and nothing else."""
    return only_files(Path(directory), lambda n: n in (MANIFEST_NAME, TOKENIZER_NAME) or n.endswith((".onnx", ".data")),
                      (MANIFEST_NAME,))


def plain_name(file: str) -> bool:
    """A graph's file is a plain name inside the model directory: no folder part, never `..`."""
    return bool(file) and file not in (".", "..") and "/" not in file and "\\" not in file and "\0" not in file


def _tensor(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=str(raw["name"]), dtype=str(raw["dtype"]), shape=tuple(raw["shape"]))


def _graph(raw: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        file=str(raw["file"]),
        precision=str(raw["precision"]),
        sha256=str(raw["sha256"]),
        inputs=tuple(_tensor(t) for t in raw["inputs"]),
        outputs=tuple(_tensor(t) for t in raw["outputs"]),
        parity=dict(raw.get("parity", {})),
        fused_ops={str(k): int(v) for k, v in raw.get("fused_ops", {}).items()},
        deep=bool(raw.get("deep", False)),
        part=str(raw.get("part", "")),
    )


def load_manifest(model_dir: str | Path, graphs: bool = True) -> Manifest:
    """Read and check `manifest.json`; every problem becomes a ModelError naming the file. `graphs=False` reads a
    client directory (manifest and tokenizer only) for a model served elsewhere."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist; run `bbt-onnx export` first")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ModelError(f"{directory} has no {MANIFEST_NAME}: it is not a model directory written by `bbt-onnx export`")
    try:
        raw = json.loads(read_text_bounded(path, JSON_LIMIT))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} is not a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"{path} has format_version {version!r}; this bbt-onnx reads {FORMAT_VERSION}: re-export the model")
    try:
        manifest = Manifest(
            kind=str(raw["kind"]),
            architecture=str(raw["architecture"]),
            model_type=str(raw["model_type"]),
            source=str(raw["source"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_layers"]),
            num_heads=int(raw["num_heads"]),
            vocab_size=int(raw["vocab_size"]),
            max_positions=int(raw["max_positions"]),
            prompt_tokens=int(raw["prompt_tokens"]),
            bos_id=None if raw["bos_id"] is None else int(raw["bos_id"]),
            eos_id=None if raw["eos_id"] is None else int(raw["eos_id"]),
            pad_id=int(raw["pad_id"]),
            mask_id=None if raw["mask_id"] is None else int(raw["mask_id"]),
            placeholder_ids=tuple(int(i) for i in raw["placeholder_ids"]),
            embedding_std=float(raw["embedding_std"]),
            embedding_mean=float(raw["embedding_mean"]),
            label_prefix=str(raw["label_prefix"]),
            opset=int(raw["opset"]),
            versions={str(k): str(v) for k, v in raw["versions"].items()},
            graphs={str(k): _graph(v) for k, v in raw["graphs"].items()},
            gguf_file=raw.get("gguf_file"),
            layer_std=tuple(float(v) for v in raw.get("layer_std", ())),
            bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
            chat_prefix=None if raw.get("chat_prefix") is None else str(raw["chat_prefix"]),
            chat_suffix=None if raw.get("chat_suffix") is None else str(raw["chat_suffix"]),
            directory=directory.absolute(),  # a later change of working directory keeps finding its files
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path} is incomplete or malformed ({type(exc).__name__}: {exc}); re-export the model") from None
    _check(manifest, path, graphs)
    return manifest


# the fixed dims of the prompt inputs, by axis: what the manifest's hidden_size and num_layers must say
def fixed_dims(m: Manifest) -> dict[str, dict[int, tuple[str, int]]]:
    return {"prompt_embeds": {2: ("hidden_size", m.hidden_size)},
            "deep_prompts": {0: ("num_layers", m.num_layers), 2: ("hidden_size", m.hidden_size)},
            "text_kv": {0: ("num_layers", m.num_layers)}, PREFIX_KV: {0: ("num_layers", m.num_layers)}}


def dim_problems(m: Manifest, where: str, inputs) -> list[str]:
    """Where a graph's declared inputs (name, shape pairs) disagree with the manifest's dims."""
    problems = []
    for name, shape in inputs:
        for axis, (field_name, want) in fixed_dims(m).get(name, {}).items():
            got = shape[axis] if axis < len(shape) else None
            if isinstance(got, int) and not isinstance(got, bool) and got != want:
                problems.append(f"{where} takes {name} with {got} at axis {axis}, but {field_name} is {want}")
    return problems


def _check(m: Manifest, path: Path, graphs: bool = True) -> None:
    bad_files = sorted(g.file for g in m.graphs.values() if not plain_name(g.file))
    if bad_files:
        raise ModelError(f"{path}: graph file {bad_files[0]!r} is not a file name inside the model directory; "
                         "re-export the model")
    files = [m.directory / g.file for g in m.graphs.values()]  # type: ignore[operator]
    home = m.directory.resolve()  # type: ignore[union-attr]
    away = sorted(f.name for f in files if f.is_symlink() and home not in f.resolve().parents)
    if away:  # a link out of the directory: the graph run would not be the one the manifest was checked with
        raise ModelError(f"{path}: graph file {away[0]!r} is a link out of the model directory; copy the graph "
                         "into it (or re-export the model)")
    if graphs and files and not any(f.is_file() for f in files):
        raise ModelError(f"{m.directory} holds no graph files: a client directory (manifest and tokenizer only) is "
                         "used with server (a URL), where the model is served", "server")
    problems = []
    if m.kind not in KINDS:
        problems.append(f"kind {m.kind!r} is not one of {', '.join(KINDS)}")
    elif m.lm.mask_token and m.mask_id is None:
        problems.append("a masked LM needs mask_id")
    if len(m.placeholder_ids) != m.prompt_tokens:
        problems.append(f"{len(m.placeholder_ids)} placeholder ids for prompt_tokens={m.prompt_tokens}")
    if not m.graphs:
        problems.append("no graphs listed")
    for name, g in m.graphs.items():
        known = g.precision in PRECISIONS and g.part in ("", *PARTS)
        if not known or name != graph_key(g.precision, g.deep, g.part):
            problems.append(f"graph entry {name!r} has precision {g.precision!r}{' (deep)' if g.deep else ''}")
        if graphs and not (m.directory / g.file).is_file():  # type: ignore[operator]
            problems.append(f"graph file {g.file} is missing")
        problems += dim_problems(m, f"graph {name!r}", ((t.name, t.shape) for t in g.inputs))
    for name in ("hidden_size", "num_layers", "num_heads", "vocab_size", "max_positions"):
        if getattr(m, name) < 1:
            problems.append(f"{name} must be at least 1")
    if not 0 <= m.prompt_tokens < m.max_positions:
        problems.append(f"prompt_tokens must be in 0..{m.max_positions - 1} (max_positions {m.max_positions})")
    for name in ("bos_id", "eos_id", "pad_id", "mask_id", "bos_token_id"):
        value = getattr(m, name)
        if value is not None and not 0 <= value < m.vocab_size:
            problems.append(f"{name} {value} is outside the vocabulary (0..{m.vocab_size - 1})")
    outside = [i for i in m.placeholder_ids if not 0 <= i < m.vocab_size]
    if outside:
        problems.append(f"placeholder id {outside[0]} is outside the vocabulary (0..{m.vocab_size - 1})")
    if not (math.isfinite(m.embedding_std) and m.embedding_std > 0):
        problems.append("embedding_std must be a positive number")
    if not math.isfinite(m.embedding_mean):
        problems.append("embedding_mean must be a number")
    if m.layer_std and (len(m.layer_std) != m.num_layers or not all(math.isfinite(v) and v > 0 for v in m.layer_std)):
        problems.append(f"layer_std must hold {m.num_layers} positive numbers")
    if problems:
        raise ModelError(f"{path}: " + "; ".join(problems))
