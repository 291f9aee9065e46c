"""A model repository for a stock tritonserver (its onnxruntime backend), the production twin of `bbt-onnx serve`.

The repository holds one model: the graph file, unchanged, and a `config.pbtxt` that states the graph contract
(names, types, dynamic dims), GPU instances, an optional TensorRT accelerator, a warm-up request and the
parameters our client checks (the manifest's fingerprint, the request limit). Run tritonserver with
`--disable-auto-complete-config`, so the config is used as written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..contract import PRECISIONS, graph_key
from ..engines.served import DEFAULT_MAX_REQUEST, check_max_request, served_name, served_parameters
from ..errors import SettingsError
from ..fileio import OutputKind, check_replaceable, only_files, write_dir, write_text_atomic
from ..manifest import GraphSpec, Manifest, load_manifest
from ..options import setting

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
WARMUP_SIZES = {"C": 2, "N": 2, "T": 16, "P": 4, "K": 2}  # a small request of every input, all zeros
INSTANCE_KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class RepoOptions:
    model_dir: str
    out: str = setting(None, "Model repository to write.", required=True)
    precision: str | None = setting(None, "Which graph [default: fp16 when exported, else fp32].",
                                    choices=PRECISIONS)
    kind: str = setting("gpu", "Instance kind (KIND_GPU or KIND_CPU).", choices=INSTANCE_KINDS)
    instances: int = setting(1, "Model instances per server.")
    tensorrt: bool = setting(False, "Add onnxruntime's TensorRT accelerator (fp16, engine cache).")
    max_request: int = setting(DEFAULT_MAX_REQUEST, "Largest request the client sends, as prompts x rows x tokens "
                               "(C x N x T).")
    force: bool = setting(False, "Replace an earlier model repository in --out.")
    force_any: bool = setting(False, "Replace --out even when it does not look like a model repository (everything "
                              "in it is deleted).")

    def check(self) -> "RepoOptions":
        if self.kind not in INSTANCE_KINDS:
            raise SettingsError(f"--kind must be one of {', '.join(INSTANCE_KINDS)}, got {self.kind!r}")
        if not (isinstance(self.instances, int) and 1 <= self.instances <= 64):
            raise SettingsError(f"--instances must be in 1..64, got {self.instances}")
        check_max_request(self.max_request)
        if self.tensorrt and self.kind != "gpu":
            raise SettingsError("--tensorrt runs on GPU instances only; drop it or use --kind gpu")
        return self


def pick_precision(manifest: Manifest, wanted: str | None) -> str:
    if wanted:
        manifest.graph(wanted)  # a clear error when the model lacks it
        return wanted
    return "fp16" if "fp16" in manifest.graphs else "fp32"


def _dims(shape) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)


def _tensor(t, indent: str) -> str:
    """One input or output; a scalar (the deep graph's prompt_layer) is served as [1] and reshaped to []."""
    dims = f"{indent}  dims: [ {_dims(t.shape)} ]\n" if t.shape else \
        f"{indent}  dims: [ 1 ]\n{indent}  reshape: {{ shape: [ ] }}\n"
    return f"{indent}{{\n{indent}  name: \"{t.name}\"\n{indent}  data_type: {TRITON_TYPES[t.dtype]}\n{dims}{indent}}}"


def _param(key: str, value: str) -> str:
    return f"parameters {{\n  key: \"{key}\"\n  value {{ string_value: \"{value}\" }}\n}}"


def _warmup(graph: GraphSpec, prompt_tokens: int) -> str:
    """One all-zero request (batch_size 1: the model does not batch), so the first client does not pay for the
    session's set-up."""
    sizes = {**WARMUP_SIZES, "P": min(WARMUP_SIZES["P"], prompt_tokens)}
    items = []
    for t in graph.inputs:
        dims = ", ".join(str(d) if isinstance(d, int) else str(sizes.get(str(d), 2)) for d in t.shape) or "1"
        items.append(f"    inputs {{\n      key: \"{t.name}\"\n      value {{\n        data_type: "
                     f"{TRITON_TYPES[t.dtype]}\n        dims: [ {dims} ]\n        zero_data: true\n      }}\n    }}")
    return "model_warmup [\n  {\n    name: \"population\"\n    batch_size: 1\n" + "\n".join(items) + "\n  }\n]"


def config_text(manifest: Manifest, precision: str, opts: RepoOptions, deep: bool = False) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig message)."""
    graph = manifest.graph(precision, deep)
    kind = "KIND_GPU" if opts.kind == "gpu" else "KIND_CPU"
    parts = [
        f"name: \"{served_name(manifest, deep)}\"",
        "backend: \"onnxruntime\"",
        "max_batch_size: 0",
        "input [\n" + ",\n".join(_tensor(t, "  ") for t in graph.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(t, "  ") for t in graph.outputs) + "\n]",
        f"instance_group [\n  {{\n    count: {opts.instances}\n    kind: {kind}\n  }}\n]",
        "default_model_filename: \"model.onnx\"",
        # rows in one call on a GPU, in 4 length buckets on CPU: as OrtEngine splits them on each device
        *(_param(k, v) for k, v in served_parameters(manifest, precision, opts.max_request,
                                                      1 if opts.kind == "gpu" else 4).items()),
    ]
    if opts.tensorrt:
        cache = "/tmp/bbt-trt-cache"
        parts.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [\n      {\n"
            "        name : \"tensorrt\"\n"
            "        parameters { key: \"precision_mode\" value: \"FP16\" }\n"
            "        parameters { key: \"trt_engine_cache_enable\" value: \"1\" }\n"
            f"        parameters {{ key: \"trt_engine_cache_path\" value: \"{cache}\" }}\n"
            "      }\n    ]\n  }\n}")
    parts.append(_warmup(graph, manifest.prompt_tokens))
    return "\n".join(parts) + "\n"


def looks_like_repo(directory: Path) -> bool:
    """What `triton-repo --force` may replace: model folders of config.pbtxt (onnxruntime) and 1/model.onnx only."""
    try:
        models = list(directory.iterdir())
    except OSError:
        return False
    for model in models:
        if model.is_symlink() or not model.is_dir() or not only_files(model / "1", lambda n: n == "model.onnx") or \
                sorted(p.name for p in model.iterdir()) != ["1", "config.pbtxt"]:
            return False
        try:
            if 'backend: "onnxruntime"' not in (model / "config.pbtxt").read_text(encoding="utf-8"):
                return False
        except (OSError, UnicodeDecodeError):
            return False
    return bool(models)


REPOSITORY = OutputKind("a model repository (`bbt-onnx triton-repo`)", looks_like_repo)


def write_repo(opts: RepoOptions, log=None) -> Path:
    """REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (and REPO/NAME.deep/ when the model has the deep-prompt
    graph), written whole (`write_dir`)."""
    opts.check()
    inputs = [("model directory", Path(opts.model_dir))]
    check_replaceable(opts.out, opts.force, REPOSITORY, opts.force_any, inputs)  # before the model is read
    manifest = load_manifest(opts.model_dir)
    precision = pick_precision(manifest, opts.precision)

    def fill(staging: Path) -> None:
        for deep in (False, True):
            if deep and graph_key(precision, deep) not in manifest.graphs:
                continue
            model = staging / served_name(manifest, deep)
            (model / "1").mkdir(parents=True)
            shutil.copyfile(manifest.directory / manifest.graph(precision, deep).file, model / "1" / "model.onnx")
            write_text_atomic(model / "config.pbtxt", config_text(manifest, precision, opts, deep))

    return write_dir(opts.out, opts.force, fill, REPOSITORY, opts.force_any, inputs, log) / served_name(manifest)
