"""Engines, and the specs that name and open them: onnxruntime in this process (`cpu:fp32`, `ort:cuda:fp16`) or a
Triton server (`http://HOST:PORT`, `grpc://HOST:PORT`). A new backend plugs in as one spec class in `BACKENDS`
with `claims`, `parse`, `unavailable`, `open`, `record` and `resumed`; nothing outside this package asks which
backend an engine is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..devices import DEVICES, PRECISIONS, REFERENCE_DEVICE, REFERENCE_PRECISION
from ..errors import SettingsError
from ..options import setting
from .base import Engine, PromptScoring, score_rows
from .ort import OrtEngine, OrtSpec
from .served import read_token
from .triton import Remote, TritonEngine, TritonSpec

EngineSpec = Union[OrtSpec, TritonSpec]
BACKENDS = {spec.backend: spec for spec in (OrtSpec, TritonSpec)}
REFERENCE = OrtSpec(REFERENCE_DEVICE, REFERENCE_PRECISION)  # what every other engine is compared with


def parse_engine(text: str, token: str | None = None, threads: int | None = None) -> EngineSpec:
    """An engine named by the backend first (`ort:cpu:fp32`, `triton:http://...`), or by the first backend that
    claims the text; `token` opens a server, `threads` sizes an engine in this process."""
    text = str(text).strip()
    backend = BACKENDS.get(text.split(":", 1)[0].lower())
    if backend is None:
        backend = next(spec for spec in BACKENDS.values() if spec.claims(text))
    return backend.parse(text, token, threads)


def parse_engines(text: str, token: str | None = None, threads: int | None = None) -> list[EngineSpec]:
    specs = [parse_engine(part, token, threads) for part in str(text).split(",") if part.strip()]
    if not specs:
        raise SettingsError("engines names no engine; e.g. cpu:fp32,cpu:int8", "engines")
    if len({s.name for s in specs}) != len(specs):
        raise SettingsError(f"engines names an engine twice: {text}", "engines")
    if token and not any(s.takes_token for s in specs):
        raise SettingsError("token goes with a server URL in engines", ("token", "engines"))
    return specs


def all_local_engines(threads: int | None = None) -> list[OrtSpec]:
    """Every device x precision in this process, CPU fp32 (the reference) first."""
    return [OrtSpec(device, precision, threads) for device in DEVICES for precision in PRECISIONS]


@dataclass(frozen=True)
class EngineOptions:
    """How a command names its engine: onnxruntime here (device, precision, threads), or a server."""

    device: str = setting("cpu", "onnxruntime execution provider.", choices=tuple(DEVICES))
    precision: str = setting("fp32", "Which exported graph.", choices=tuple(PRECISIONS))
    threads: int | None = setting(None, "CPU threads for onnxruntime [default: all cores].", minimum=1)
    server: str | None = setting(None, "Score on a Triton server (`bbt-onnx serve`, or a stock tritonserver over "
                                 "`bbt-onnx triton-repo`): http://HOST:PORT or grpc://HOST:PORT. --model may then be "
                                 "a client directory (`bbt-onnx client-dir`).")
    token_file: str | None = setting(None, "File holding the server's access token (sent as the "
                                     "triton-access-token header).", path=True)
    server_timeout: float = setting(60.0, "Seconds a request to --server may take (a busy server queues "
                                    "requests); a timed-out request is retried up to 3 times.", minimum=0,
                                    open_minimum=True)

    shards: int = setting(1, "With --server: send each call's candidates as N concurrent requests, in candidate "
                          "order, so that the server spreads one population over its instances (triton-repo "
                          "--instances, or several GPUs); the scores are the same for every N.", minimum=1)

    def spec(self) -> EngineSpec:
        if self.server:
            token = read_token(self.token_file) if self.token_file else None
            return TritonSpec(Remote(self.server, token, self.server_timeout, shards=self.shards).check())
        if self.shards != 1:
            raise SettingsError("shards sends a call as several requests and needs server", ("shards", "server"))
        return OrtSpec(self.device, self.precision, self.threads)


__all__ = ["BACKENDS", "Engine", "EngineOptions", "EngineSpec", "OrtEngine", "OrtSpec", "PromptScoring", "REFERENCE",
           "Remote", "TritonEngine", "TritonSpec", "all_local_engines", "parse_engine", "parse_engines", "score_rows"]
