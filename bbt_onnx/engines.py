"""Engines named by a spec (`cpu:fp32`, `ort:cuda:fp16`): one way for every command and the API to open them.

A spec names a backend, a device and a graph precision. Only onnxruntime (`ort`) exists today;
a remote backend parses and opens through the same two steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import DEVICES, PROVIDERS, OrtEngine
from .errors import ModelError, SettingsError
from .manifest import PRECISIONS, Manifest, graph_key

BACKENDS = ("ort",)


@dataclass(frozen=True)
class EngineSpec:
    device: str
    precision: str
    backend: str = "ort"

    @property
    def name(self) -> str:
        return f"{self.device}:{self.precision}"

    @classmethod
    def parse(cls, text: str) -> "EngineSpec":
        """`cpu:fp32`, `cuda:fp16`, or with the backend first, `ort:cpu:int8`."""
        parts = [p.strip().lower() for p in str(text).split(":")]
        if parts and parts[0] in BACKENDS:
            parts = parts[1:]
        if len(parts) != 2 or parts[0] not in DEVICES or parts[1] not in PRECISIONS:
            raise SettingsError(f"engine {text!r} is not DEVICE:PRECISION (devices: {', '.join(DEVICES)}; "
                                f"precisions: {', '.join(PRECISIONS)}), e.g. cpu:fp32 or ort:cuda:fp16")
        return cls(parts[0], parts[1])

    def unavailable(self, manifest: Manifest, deep: bool = False) -> str | None:
        """Why this engine cannot open for `manifest`, or None when it can."""
        import onnxruntime as ort

        if graph_key(self.precision, deep) not in manifest.graphs:
            return f"the model has no {graph_key(self.precision, deep)} graph"
        if PROVIDERS[self.device] not in ort.get_available_providers():
            return f"onnxruntime's {PROVIDERS[self.device]} is not installed"
        return None

    def open(self, manifest: Manifest, threads: int | None = None, deep: bool = False) -> OrtEngine:
        reason = self.unavailable(manifest, deep)
        if reason:
            raise ModelError(f"engine {self.name} cannot run: {reason}")
        return OrtEngine(manifest, precision=self.precision, device=self.device, threads=threads, deep=deep)


def parse_engines(text: str) -> list[EngineSpec]:
    specs = [EngineSpec.parse(part) for part in str(text).split(",") if part.strip()]
    if not specs:
        raise SettingsError("--engines names no engine; e.g. --engines cpu:fp32,cpu:int8")
    if len(set(specs)) != len(specs):
        raise SettingsError(f"--engines names an engine twice: {text}")
    return specs


# every device x precision, in a stable order: CPU fp32, the reference, first
ALL_ENGINES = tuple(EngineSpec(device, precision) for device in DEVICES for precision in PRECISIONS)
REFERENCE = EngineSpec("cpu", "fp32")
