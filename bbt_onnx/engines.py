"""Engines named by a spec (`cpu:fp32`, `ort:cuda:fp16`, `http://HOST:PORT`): one way for every command and the
API to open them.

An in-process spec names a device and a graph precision for onnxruntime (`ort`); a URL names a Triton server
(`triton`), whose precision is the one it serves. Both parse and open through the same two steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import DEVICES, PROVIDERS, OrtEngine
from .errors import SettingsError
from .manifest import PRECISIONS, Manifest, graph_key
from .remote import Remote, TritonEngine

BACKENDS = ("ort", "triton")


@dataclass(frozen=True)
class EngineSpec:
    device: str
    precision: str
    backend: str = "ort"
    remote: Remote | None = None

    @property
    def name(self) -> str:
        return self.remote.url if self.remote else f"{self.device}:{self.precision}"

    @classmethod
    def parse(cls, text: str, token: str | None = None) -> "EngineSpec":
        """`cpu:fp32`, `cuda:fp16`, with the backend first, `ort:cpu:int8`; or a server, `http://HOST:PORT`,
        `grpc://HOST:PORT` (optionally `triton:` first), which `token` opens."""
        url = str(text).strip().removeprefix("triton:")
        if "://" in url:
            return cls.served(Remote(url, token))
        parts = [p.strip().lower() for p in str(text).split(":")]
        if parts and parts[0] in BACKENDS:
            parts = parts[1:]
        if len(parts) != 2 or parts[0] not in DEVICES or parts[1] not in PRECISIONS:
            raise SettingsError(f"engine {text!r} is not DEVICE:PRECISION (devices: {', '.join(DEVICES)}; "
                                f"precisions: {', '.join(PRECISIONS)}), e.g. cpu:fp32 or ort:cuda:fp16")
        return cls(parts[0], parts[1])

    @classmethod
    def served(cls, remote: Remote) -> "EngineSpec":
        """The model as a Triton server serves it (its graph, device and precision are the server's)."""
        return cls("server", "served", "triton", remote.check())

    def unavailable(self, manifest: Manifest, deep: bool = False) -> str | None:
        """Why this engine cannot open for `manifest`, or None when it can."""
        if self.remote:
            return None  # the server says what it serves when the engine connects
        import onnxruntime as ort

        if graph_key(self.precision, deep) not in manifest.graphs:
            return f"the model has no {graph_key(self.precision, deep)} graph"
        if PROVIDERS[self.device] not in ort.get_available_providers():
            return f"onnxruntime's {PROVIDERS[self.device]} is not installed"
        return None

    def open(self, manifest: Manifest, threads: int | None = None, deep: bool = False) -> OrtEngine | TritonEngine:
        """The engine, or the engine's own one-line error (a missing graph or provider, a refused server)."""
        if self.remote:
            return TritonEngine(manifest, self.remote, deep)
        return OrtEngine(manifest, precision=self.precision, device=self.device, threads=threads, deep=deep)


def parse_engines(text: str, token: str | None = None) -> list[EngineSpec]:
    specs = [EngineSpec.parse(part, token) for part in str(text).split(",") if part.strip()]
    if not specs:
        raise SettingsError("--engines names no engine; e.g. --engines cpu:fp32,cpu:int8")
    if len(set(specs)) != len(specs):
        raise SettingsError(f"--engines names an engine twice: {text}")
    return specs


# every device x precision, in a stable order: CPU fp32, the reference, first
ALL_ENGINES = tuple(EngineSpec(device, precision) for device in DEVICES for precision in PRECISIONS)
REFERENCE = EngineSpec("cpu", "fp32")
