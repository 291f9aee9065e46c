"""Model repositories for tritonserver: the production server (`bbt-onnx triton-repo`), and the one `bbt-onnx serve`
runs.

Each model is its graph file and a `config.pbtxt` built through tritonclient's `model_config_pb2` (Triton's own
ModelConfig message): the graph contract (names, types, dims), instances, a warm-up request, and the parameters the
client checks (fingerprint, limits). Two backends:
- `onnxruntime`, a stock tritonserver's: the graph runs in Triton's onnxruntime backend, with CPU thread counts,
  fp32 kept in fp32 on CUDA (TF32 off) and optionally TensorRT at the graph's precision with profile shapes (each
  as the device's and the precision's records say, `devices`);
- `python`: the graph runs in onnxruntime inside Triton's python backend (`model.py` beside it), which checks
  every request against the model's limits first; the tritonserver PyTriton ships has this backend only.
Run tritonserver with `--disable-auto-complete-config`, so the configs are used as written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..contract import GRAPH_OUTPUTS, PREFIX_IDS, PREFIX_KV, PROMPT_POS, ROW_INPUTS, graph_key
from ..devices import DEVICES, INSTANCES, PRECISIONS, REFERENCE_PRECISION
from ..engines.served import (CACHED_SUFFIX, DEFAULT_MAX_REQUEST, check_max_request, check_name, request_limits,
                              served_name, served_parameters)
from ..errors import SettingsError
from ..fileio import check_replaceable, write_dir, write_text_atomic
from ..manifest import GraphSpec, Manifest, TensorSpec, load_manifest
from ..model_repository import BACKENDS, REPOSITORY, SERVICE_MANIFEST, add_model as add_repository_model
from ..options import setting
from .kserve import Service, check_service_name, check_storage_uri, inference_service, to_yaml

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
WARMUP_SIZES = {"C": 2, "N": 2, "T": 16, "P": 4, "K": 2}  # a small request of every input, all zeros
PROFILE = {"C": (1, 20, 64), "N": (1, 32, 256), "K": (1, 2, 16)}  # TensorRT's min, opt and max per dynamic dim
PYTHON_KIND = "KIND_CPU"  # the python backend's instances: its model.py opens its own provider
# triton-repo's default graph: the first of these the model has
REPO_ORDER = tuple(sorted((p.name for p in PRECISIONS.values() if p.repo_rank is not None),
                          key=lambda name: PRECISIONS[name].repo_rank))
GRAPH_FILE = "model.onnx"
MODEL_PY = Path(__file__).with_name("model.py")
CACHED_KV_BYTES = 2 << 30  # the keys and values it keeps (the prefixes, least recently used evicted first)
SERVICE_SETTINGS = ("storage_uri", "min_replicas", "max_replicas", "concurrency")  # what only kserve uses
INT32_MAX = 2**31 - 1  # Kubernetes keeps replicas and the scale target as int32


@dataclass(frozen=True)
class RepoOptions:
    model_dir: str
    out: str = setting(None, "Model repository to write.", required=True)
    name: str | None = setting(None, "The name to serve the model under [default: the export source's last path "
                               "component]; clients name it in the server URL: http://HOST:PORT/NAME.")
    backend: str = setting("onnxruntime", "Triton backend: a stock tritonserver's onnxruntime, or python (the graph "
                           "in onnxruntime inside Triton's python backend, every request checked first).",
                           choices=BACKENDS)
    precision: str | None = setting(None, f"Which graph [default: the first of {', '.join(REPO_ORDER)} the model "
                                    "has].", choices=tuple(PRECISIONS))
    kind: str = setting("gpu", f"Instance kind ({' or '.join(d.triton_kind for d in INSTANCES.values())}).",
                        choices=tuple(INSTANCES))
    instances: int = setting(1, "Model instances per server.")
    threads: int | None = setting(None, "CPU threads per instance [default: 0, onnxruntime's choice; set it when "
                                  "several instances share the cores].", minimum=1)
    tensorrt: bool = setting(False, "Add onnxruntime's TensorRT accelerator at the graph's precision (engine cache, "
                             "profile shapes).")
    max_request: int = setting(DEFAULT_MAX_REQUEST, "Largest request the client sends, as prompts x rows x tokens "
                               "(C x N x T).")
    force: bool = setting(False, "Replace an earlier model repository in --out.")
    force_any: bool = setting(False, "Replace --out even when it does not look like a model repository (everything "
                              "in it is deleted).")
    kserve: str | None = setting(None, f"Also write OUT/{SERVICE_MANIFEST}: a KServe InferenceService of this name "
                                 "serving the repository over gRPC on KServe's stock Triton runtime (needs "
                                 "--storage-uri).")
    storage_uri: str | None = setting(None, "With --kserve: where the cluster finds this repository once uploaded "
                                      "(s3://, gs://, pvc://, https://, ...): the folder OUT's contents go in.")
    min_replicas: int | None = setting(None, "With --kserve: the fewest replicas [default: 1; 0 lets it scale to "
                                       "zero].", minimum=0)
    max_replicas: int | None = setting(None, "With --kserve: the most replicas [default: --min-replicas, at least "
                                       "1].", minimum=1)
    concurrency: int | None = setting(None, "With --kserve: the requests in flight per replica the autoscaler aims "
                                      "at (KServe's scaleTarget on the concurrency metric) [default: --instances, "
                                      "the requests one replica runs at once].", minimum=1)

    def check(self) -> "RepoOptions":
        if self.kind not in INSTANCES:
            raise SettingsError(f"kind must be one of {', '.join(INSTANCES)}, got {self.kind!r}", "kind")
        if self.backend not in BACKENDS:
            raise SettingsError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}", "backend")
        if not (isinstance(self.instances, int) and 1 <= self.instances <= 64):
            raise SettingsError(f"instances must be in 1..64, got {self.instances}", "instances")
        check_max_request(self.max_request)
        if self.tensorrt and (not INSTANCES[self.kind].tensorrt or self.backend != "onnxruntime"):
            kinds = " or ".join(k for k, d in INSTANCES.items() if d.tensorrt)
            raise SettingsError(f"tensorrt runs in onnxruntime on GPU instances only; drop it, or use "
                                f"kind {kinds} with the onnxruntime backend", ("tensorrt", "kind"))
        if self.name is not None:
            check_name(self.name)
        self.check_service()
        return self

    def check_service(self) -> None:
        """The InferenceService's settings: all of them with kserve (storage_uri required), none without."""
        given = [n for n in SERVICE_SETTINGS if getattr(self, n) is not None]
        if self.kserve is None:
            if given:
                raise SettingsError(f"{', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of "
                                    "the InferenceService, which only kserve NAME writes; name the service, or drop "
                                    f"{'it' if len(given) == 1 else 'them'}", tuple(given) + ("kserve",))
            return
        check_service_name(self.kserve)
        if self.storage_uri is None:
            raise SettingsError("kserve writes an InferenceService, which needs storage_uri: where the cluster finds "
                                "this repository once uploaded (s3://BUCKET/PATH, gs://, pvc://, https://, ...)",
                                ("kserve", "storage_uri"))
        check_storage_uri(self.storage_uri)
        if self.backend != "onnxruntime":
            raise SettingsError("kserve serves the repository on KServe's stock Triton runtime, whose image lacks "
                                "the onnxruntime package a python-backend model.py imports; use backend onnxruntime",
                                ("kserve", "backend"))
        for name, least in (("min_replicas", 0), ("max_replicas", 1), ("concurrency", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or
                                      not least <= value <= INT32_MAX):
                raise SettingsError(f"{name} must be a whole number in {least}..{INT32_MAX}, got {value!r}", name)
        service = self.service()
        if service.max_replicas < service.min_replicas:
            raise SettingsError(f"max_replicas ({service.max_replicas}) is below min_replicas "
                                f"({service.min_replicas}); raise it, or lower the other", ("max_replicas",
                                                                                          "min_replicas"))

    def service(self) -> Service | None:
        """What the InferenceService says, its defaults filled in (None without kserve)."""
        if self.kserve is None:
            return None
        low = 1 if self.min_replicas is None else self.min_replicas
        return Service(self.kserve, self.storage_uri, low, max(low, 1) if self.max_replicas is None else
                       self.max_replicas, self.concurrency or self.instances,
                       gpus=1 if INSTANCES[self.kind].accelerator else 0)  # one GPU holds every instance




def pick_precision(manifest: Manifest, wanted: str | None) -> str:
    """`wanted`, or the model's graph of the lowest `repo_rank` (fp16 when exported), else the reference's."""
    if wanted:
        manifest.graph(wanted)  # a clear error when the model lacks it
        return wanted
    return next((p for p in REPO_ORDER if p in manifest.graphs), REFERENCE_PRECISION)


@dataclass(frozen=True)
class Served:
    """One model of a repository: a graph under a name, with how it runs."""

    manifest: Manifest
    graph: GraphSpec
    name: str
    precision: str
    deep: bool = False
    backend: str = "onnxruntime"
    kind: str = "gpu"  # instances' kind, a device's `instance` (triton-repo's kind)
    instances: int = 1
    threads: int | None = None
    tensorrt: bool = False
    max_request: int = DEFAULT_MAX_REQUEST
    device: str = "cpu"  # the python backend's onnxruntime provider
    cached: bool = False  # rows after a shared prefix on the model directory's cached pair (serve's NAME.cached)


def served_models(manifest: Manifest, precision: str, name: str | None = None, cached: bool = False,
                  **how) -> list[Served]:
    """The prompt graph and, when exported, its deep graph beside it as NAME.deep; with `cached` (serve), for a
    decoder with the cached pair, NAME.cached: rows after a shared prefix (demonstrations), whose keys and values
    the server computes once and keeps."""
    base = name or served_name(manifest)
    out = [Served(manifest, manifest.graph(precision), base, precision, **how)]
    if graph_key(precision, deep=True) in manifest.graphs:
        out.append(Served(manifest, manifest.graph(precision, deep=True), f"{base}.deep", precision, deep=True,
                          **how))
    if cached and manifest.has_cache_graphs(REFERENCE_PRECISION) and \
            manifest.graphs[graph_key(REFERENCE_PRECISION, part="tail")].takes(PREFIX_KV):
        out.append(Served(manifest, cached_contract(manifest), f"{base}{CACHED_SUFFIX}", REFERENCE_PRECISION,
                          cached=True, **how))
    return out


def cached_contract(manifest: Manifest) -> GraphSpec:
    """What NAME.cached takes: the rows' own ids (after the prefix), their positions, the prefix's ids, the
    prompts and label ids; the tail graph's record otherwise (its file is not copied: the backend opens the pair)."""
    tail = manifest.graphs[graph_key(REFERENCE_PRECISION, part="tail")]
    full = {t.name: t for t in manifest.graph(REFERENCE_PRECISION).inputs}
    rows = tuple(full[name] for name in ROW_INPUTS[:3]) + (TensorSpec(PROMPT_POS, "int64", ("N",)),)
    return replace(tail, inputs=rows + (TensorSpec(PREFIX_IDS, "int64", ("S_p",)), full["prompt_embeds"],
                                        full["label_ids"]),
                   outputs=tuple(t for t in tail.outputs if t.name in GRAPH_OUTPUTS) +
                   (TensorSpec("prefix_runs", "int64", (1,)),))


def _dims(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def model_config(model: Served):
    """The model's ModelConfig message."""
    from tritonclient.grpc import model_config_pb2 as pb

    layer = next((t for t in model.graph.inputs if t.name == "prompt_layer"), None)
    if layer is not None and not layer.shape and model.backend == "onnxruntime":
        raise SettingsError("this deep graph takes prompt_layer as a scalar, which a stock tritonserver cannot serve; "
                            "re-export the model with `bbt-onnx export --deep`, or use backend python", "backend")
    config = pb.ModelConfig(name=model.name, backend=model.backend, max_batch_size=0)
    for spec in model.graph.inputs:
        config.input.add(name=spec.name, data_type=pb.DataType.Value(TRITON_TYPES[spec.dtype]),
                         dims=_dims(spec) or [1])
    for spec in model.graph.outputs:
        config.output.add(name=spec.name, data_type=pb.DataType.Value(TRITON_TYPES[spec.dtype]), dims=_dims(spec))
    on = INSTANCES[model.kind]
    kind = on.triton_kind if model.backend == "onnxruntime" else PYTHON_KIND
    config.instance_group.add(count=model.instances, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    # as OrtEngine splits rows on that device
    params = {**served_parameters(model.manifest, model.precision, model.max_request, on.row_buckets),
              **request_limits(model.manifest, model.deep, model.max_request)}
    if model.backend == "python":
        provider = DEVICES[model.device]
        params.update(bbt_graph=GRAPH_FILE, bbt_threads=str(model.threads or 0), bbt_device=model.device,
                      bbt_provider=provider.provider, bbt_provider_options=json.dumps(provider.options))
        if model.cached:
            params.update(bbt_mode="cached", bbt_model_dir=str(model.manifest.directory.resolve()),
                          bbt_kv_cache_bytes=str(CACHED_KV_BYTES))
    else:
        config.default_model_filename = GRAPH_FILE
        if on.instance_threads:
            params.update(intra_op_thread_count=str(model.threads or 0), inter_op_thread_count="1")
        gpu = config.optimization.execution_accelerators.gpu_execution_accelerator
        if model.tensorrt:
            trt = gpu.add(name="tensorrt")
            trt.parameters.update(tensorrt_parameters(model))
        if on.accelerator and PRECISIONS[model.precision].tf32_off:  # fp32 means fp32: CUDA's default is TF32
            gpu.add(name=on.accelerator).parameters.update(on.options)
    for key, value in params.items():
        config.parameters[key].string_value = value
    if model.cached:  # its rows need a prefix and real texts: no all-zero warm-up request
        return config
    warm = config.model_warmup.add(name="population", batch_size=1)
    sizes = {**WARMUP_SIZES, "P": min(WARMUP_SIZES["P"], model.manifest.prompt_tokens)}
    for spec in model.graph.inputs:
        data = warm.inputs[spec.name]
        data.data_type = pb.DataType.Value(TRITON_TYPES[spec.dtype])
        data.dims.extend([d if isinstance(d, int) else sizes.get(str(d), 2) for d in spec.shape] or [1])
        data.zero_data = True
    return config


def tensorrt_parameters(model: Served) -> dict[str, str]:
    """TensorRT at the graph's precision, with an engine cache and one optimisation profile over the dims a tune
    sends (T up to the model's positions, P up to the exported prompt)."""
    ranges = {**PROFILE, "T": (1, min(128, model.manifest.max_positions), model.manifest.max_positions),
              "P": (1, model.manifest.prompt_tokens, model.manifest.prompt_tokens)}

    def shapes(which: int) -> str:
        out = []
        for spec in model.graph.inputs:
            dims = [str(d) if isinstance(d, int) else str(ranges.get(str(d), (1, 1, 1))[which]) for d in spec.shape]
            out.append(f"{spec.name}:{'x'.join(dims) or '1'}")
        return ",".join(out)

    return {"precision_mode": PRECISIONS[model.precision].tensorrt_mode, "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": "/tmp/bbt-trt-cache", "trt_profile_min_shapes": shapes(0),
            "trt_profile_opt_shapes": shapes(1), "trt_profile_max_shapes": shapes(2)}


def config_text(model: Served) -> str:
    """config.pbtxt: the ModelConfig in protobuf text format."""
    from google.protobuf import text_format

    return text_format.MessageToString(model_config(model))


def add_model(repository: Path, model: Served) -> None:
    """REPOSITORY/NAME/config.pbtxt and REPOSITORY/NAME/1/model.onnx (and model.py for the python backend)."""
    def fill(version: Path) -> None:
        if not model.cached:  # NAME.cached opens the model directory's cached pair itself
            shutil.copyfile(model.manifest.directory / model.graph.file, version / GRAPH_FILE)

    add_repository_model(repository, model.name, config_text(model), fill,
                         MODEL_PY if model.backend == "python" else None)


def write_repo(opts: RepoOptions, log=None) -> Path:
    """REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (and REPO/NAME.deep/ when the model has the deep-prompt
    graph; with `kserve`, REPO/inferenceservice.yaml beside them), written whole (`write_dir`)."""
    opts.check()
    inputs = [("model directory", Path(opts.model_dir))]
    check_replaceable(opts.out, opts.force, REPOSITORY, opts.force_any, inputs)  # before the model is read
    manifest = load_manifest(opts.model_dir)
    precision = pick_precision(manifest, opts.precision)
    models = served_models(manifest, precision, opts.name, backend=opts.backend, kind=opts.kind,
                           instances=opts.instances, threads=opts.threads, tensorrt=opts.tensorrt,
                           max_request=opts.max_request)
    for model in models:
        model_config(model)  # every refusal before anything is written
    service = opts.service()

    def fill(staging: Path) -> None:
        for model in models:
            add_model(staging, model)
        if service is not None:
            note = MANIFEST_NOTE.format(uri=service.storage_uri, file=SERVICE_MANIFEST)
            write_text_atomic(staging / SERVICE_MANIFEST, to_yaml(inference_service(service), note))

    out = write_dir(opts.out, opts.force, fill, REPOSITORY, opts.force_any, inputs, log)
    if service is not None and log is not None:
        log(f"wrote {out / SERVICE_MANIFEST}: upload {out}'s contents to {service.storage_uri}, then kubectl apply -f "
            f"{out / SERVICE_MANIFEST}")
    return out / models[0].name


MANIFEST_NOTE = """Written by bbt-onnx triton-repo: upload the folder this file is in to {uri}
(this file may go along: tritonserver loads only the model folders), then: kubectl apply -f {file}"""
