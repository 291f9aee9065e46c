"""What each device and each graph precision means, one record each.

An engine, a server's repository, check, deploy and bench ask these records instead of comparing names, so a fact
(CPU's length buckets, TF32 off for fp32 on CUDA, the tolerances an fp16 graph is held to) is stated once. A new
device or precision is one record here. Imports nothing of the package: everything else may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SettingsError


@dataclass(frozen=True)
class Device:
    """An onnxruntime execution provider, and what running on it changes."""

    name: str  # the engine flag's value (cpu:fp32, --device cuda)
    provider: str  # onnxruntime's execution provider
    provider_options: tuple[tuple[str, str], ...]  # what it is opened with: on CUDA, TF32 off, so fp32 means fp32
    preload_dlls: bool  # CUDA and cuDNN from the nvidia-* wheels, when the system has none on its path
    row_buckets: int  # calls per set of rows: length buckets where padding costs like any token, one call on a GPU
    io_binding: bool  # rows bound on the device once per set of rows; each call moves only prompts and logits
    instance: str  # triton-repo's kind for instances on it
    triton_kind: str  # Triton's instance-group kind (the onnxruntime backend's)
    instance_threads: bool  # Triton's onnxruntime backend: thread counts per instance (several share the cores)
    accelerator: str | None  # Triton's GPU accelerator that takes provider_options for an fp32 graph
    tensorrt: bool  # onnxruntime's TensorRT accelerator can be added to its instances
    classifier_precision: str | None  # serve's classifier runs on CPU: its graph here (None: the engine's)
    bench_precisions: tuple[str, ...]  # bench's graphs when none is named (those exported)
    bench_e2e_budget: int  # bench's end-to-end tune: API calls
    torch_fp16: bool  # bench's PyTorch baseline in half precision, as the fast path here is

    @property
    def options(self) -> dict[str, str]:
        return dict(self.provider_options)


@dataclass(frozen=True)
class Parity:
    """What `check` holds an engine of a precision to against the reference (CPU fp32); None: not gated."""

    group: str  # the check arguments that override it: fp32_* (the exact graph) or lowp_* (rounded graphs)
    agreement: float  # least fraction of rows with the reference's prediction
    max_diff: float | None = None  # largest max abs logit difference
    metric_delta: float | None = None  # largest change of the task metric (labelled rows)


@dataclass(frozen=True)
class Precision:
    """A graph precision, and what each part of the tool expects of it."""

    name: str  # the manifest's graph key (`graph_key`) and the engine flag's value
    parity: Parity  # check, against CPU fp32
    probe_tolerance: float  # deploy: largest probability difference of the classifier from predict, same graph
    batch_dependent: bool  # scores depend on the batch (dynamic int8 scales per batch): deploy probes row by row
    always_exported: bool  # export writes it every time; the others are asked for
    tf32_off: bool  # a stock Triton's CUDA accelerator is told to keep its MatMuls fp32
    tensorrt_mode: str  # onnxruntime's TensorRT precision_mode for this graph
    repo_rank: int | None  # triton-repo's default graph: the lowest rank the model has (None: never by default)


DEVICES: dict[str, Device] = {
    "cpu": Device("cpu", "CPUExecutionProvider", (), preload_dlls=False, row_buckets=4, io_binding=False,
                  instance="cpu", triton_kind="KIND_CPU", instance_threads=True, accelerator=None, tensorrt=False,
                  classifier_precision=None, bench_precisions=("fp32", "int8"), bench_e2e_budget=40,
                  torch_fp16=False),
    # CUDA's default lets fp32 MatMuls run in TF32 (10-bit mantissa): an fp32 graph there drifted 2e-3 from CPU on
    # a 24-layer model (H100). fp32 means fp32; the fp16 graph is the fast path.
    "cuda": Device("cuda", "CUDAExecutionProvider", (("use_tf32", "0"),), preload_dlls=True, row_buckets=1,
                   io_binding=True, instance="gpu", triton_kind="KIND_GPU", instance_threads=False,
                   accelerator="cuda", tensorrt=True, classifier_precision="fp32",
                   bench_precisions=("fp16", "fp32"), bench_e2e_budget=2000, torch_fp16=True),
}

EXACT = Parity("fp32", agreement=1.0, max_diff=1e-3)  # the same graph elsewhere: close logits, same predictions
ROUNDED = Parity("lowp", agreement=0.98, metric_delta=0.01)  # rounded: the predictions and the metric (one point)
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", EXACT, probe_tolerance=1e-4, batch_dependent=False, always_exported=True,
                      tf32_off=True, tensorrt_mode="FP32", repo_rank=1),
    "fp16": Precision("fp16", ROUNDED, probe_tolerance=1e-2, batch_dependent=False, always_exported=False,
                      tf32_off=False, tensorrt_mode="FP16", repo_rank=0),
    "int8": Precision("int8", ROUNDED, probe_tolerance=1e-4, batch_dependent=True, always_exported=False,
                      tf32_off=False, tensorrt_mode="FP32", repo_rank=None),
}

REFERENCE_DEVICE = "cpu"  # what every other engine is compared with: CPU on the fp32 graph
REFERENCE_PRECISION = "fp32"  # also the graph a model's fingerprint hashes
INSTANCES: dict[str, Device] = {d.instance: d for d in DEVICES.values()}  # triton-repo's kinds


def device_of(name: str) -> Device:
    """The record of device `name`; an unknown one is a settings mistake."""
    if name not in DEVICES:
        raise SettingsError(f"device {name!r} is not one of {', '.join(DEVICES)}", "device")
    return DEVICES[name]


def precision_of(name: str) -> Precision:
    """The record of precision `name`; an unknown one is a settings mistake."""
    if name not in PRECISIONS:
        raise SettingsError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}", "precision")
    return PRECISIONS[name]


def parity_of(name: str) -> Parity:
    """The gate of an engine's precision; a server that does not say its own (`?`) is held to the rounded gate."""
    record = PRECISIONS.get(name)
    return record.parity if record is not None else ROUNDED
