"""The service's side of LMaaS: serve an exported prompt graph on a real Triton Inference Server (PyTriton).

PyTriton starts tritonserver with its python backend; the bound callable runs the graph with our onnxruntime
engine. Tensor names, dtypes and dynamic shapes are the graph contract's and the model's name comes from the
manifest, so a client sees what a stock tritonserver over `bbt-onnx triton-repo` would show it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..contract import GRAPH_OUTPUTS, graph_key
from ..engines.ort import OrtEngine, OrtSpec
from ..engines.served import DEFAULT_MAX_REQUEST, check_max_request, served_name, served_parameters
from ..errors import ServerError, SettingsError
from ..manifest import TensorSpec, load_manifest
from ..options import setting

# everything but health (and the server's own metadata) needs the token when one is given
TOKEN_ENDPOINTS = ["inference", "model-config", "model-repository", "shared-memory", "statistics", "trace", "logging"]
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass(frozen=True)
class ServeOptions:
    model_dirs: tuple[str, ...]  # every model the one server serves, each under its own name
    engine: OrtSpec = OrtSpec()  # the graph each request runs through, in the server's process
    host: str = setting("127.0.0.1", "Address to bind; one other machines can reach needs --token-file.")
    http_port: int = setting(8000, "HTTP port.")
    grpc_port: int = setting(8001, "gRPC port.")
    metrics_port: int = setting(8002, "Metrics port.")
    token: str | None = None  # every request but health must send it (triton-access-token)
    max_request: int = setting(DEFAULT_MAX_REQUEST, "Largest request, as prompts x rows x tokens (C x N x T).")

    def check(self) -> "ServeOptions":
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not (isinstance(port, int) and 1 <= port <= 65535):
                raise SettingsError(f"{flag} must be in 1..65535, got {port}")
        if len(set(ports.values())) != 3:
            raise SettingsError(f"--http-port, --grpc-port and --metrics-port must differ, got {sorted(ports.values())}")
        check_max_request(self.max_request)
        if not is_loopback(self.host) and not self.token:
            raise SettingsError(f"--host {self.host} is reachable from other machines: pass --token-file, or serve on "
                                "127.0.0.1 (and put TLS and authentication in a gateway in front; see docs/serving.md)")
        return self


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """A port another process holds is one line now, not a tritonserver start-up failure later."""
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise SettingsError(f"cannot listen on {host}:{port} ({flag}): {exc.strerror}; pick another port"
                                    ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_size(feeds: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """C prompts, N rows and T tokens of one request."""
    return int(feeds["prompt_embeds"].shape[0]), *(int(d) for d in feeds["input_ids"].shape)


def wire_shape(spec: TensorSpec) -> tuple[int, ...]:
    """A graph input's served shape: every dim dynamic, and a scalar (the deep graph's prompt_layer) as [1],
    since a served tensor has at least one dim."""
    return (-1,) * len(spec.shape) if spec.shape else (1,)


def make_infer(engine: OrtEngine, inputs: tuple[TensorSpec, ...], max_request: int) -> Callable[[list], list]:
    """PyTriton's callable: each request's tensors through the session (a served [1] back to the graph's
    scalar), refused above the size limit."""
    scalars = {t.name for t in inputs if not t.shape}

    def infer(requests: list) -> list:
        results = []
        for request in requests:
            feeds = {t.name: np.asarray(request[t.name]) for t in inputs}
            feeds.update({name: feeds[name].reshape(()) for name in scalars})
            c, n, t = request_size(feeds)
            if c * n * t > max_request:
                raise ValueError(f"a request of {c} prompts x {n} rows x {t} tokens = {c * n * t} is over the "
                                 f"server's limit of {max_request} (C x N x T)")
            logits = engine.session.run(list(GRAPH_OUTPUTS), feeds)[0]
            results.append({GRAPH_OUTPUTS[0]: np.asarray(logits, np.float32)})
        return results
    return infer


def python_backend_env() -> None:
    """The python backend's stub loads libpython from the library path: make it this interpreter's (with several
    libpython3.x on a machine, the wrong one fails on `_thread.RLock`)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def serve(opts: ServeOptions, log: Callable[[str], None] = lambda _m: None) -> None:
    """Serve until SIGINT or SIGTERM; on either, tritonserver, its backend processes and the workspace go.
    tritonserver's own log (PyTriton prints it) goes to stderr with ours: stdout stays for results."""
    with contextlib.redirect_stdout(sys.stderr):
        _serve(opts, log)


def _serve(opts: ServeOptions, log: Callable[[str], None]) -> None:
    opts.check()
    check_ports_free(opts.host, {"--http-port": opts.http_port, "--grpc-port": opts.grpc_port,
                                 "--metrics-port": opts.metrics_port})
    precision = opts.engine.precision
    served = {}  # name -> (manifest, engine, graph): each prompt graph, and beside it its deep graph when exported
    for directory in opts.model_dirs:
        manifest = load_manifest(directory)
        for deep in (False, True):
            if deep and graph_key(precision, deep) not in manifest.graphs:
                continue
            name = served_name(manifest, deep)
            if name in served:
                raise SettingsError(f"{directory} would be served as {name!r}, the name of {served[name][0].directory} "
                                    "too; serve them from two servers")
            served[name] = (manifest, opts.engine.open(manifest, deep), manifest.graph(precision, deep))
    try:
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise SettingsError("bbt-onnx serve needs PyTriton: pip install 'bbt-onnx[serve]'") from None
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    python_backend_env()
    config = TritonConfig(http_address=opts.host, grpc_address=opts.host, metrics_address=opts.host,
                          http_port=opts.http_port, grpc_port=opts.grpc_port, metrics_port=opts.metrics_port,
                          log_verbose=0, exit_timeout_secs=5)
    security = TritonSecurityConfig(access_token=opts.token, restricted_endpoints=TOKEN_ENDPOINTS) if opts.token \
        else TritonSecurityConfig()  # PyTriton's default: the admin endpoints behind a random token of its own

    def tensors(specs):
        return [Tensor(name=t.name, dtype=NUMPY_TYPES[t.dtype], shape=wire_shape(t)) for t in specs]

    stop = _Stop()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    triton = Triton(config=config, security_config=security)
    try:
        for name, (manifest, engine, graph) in served.items():
            triton.bind(name, make_infer(engine, graph.inputs, opts.max_request), inputs=tensors(graph.inputs),
                        outputs=tensors(graph.outputs), config=ModelConfig(batching=False))
            _add_parameters(triton, name, served_parameters(manifest, precision, opts.max_request,
                                                            engine.max_buckets))
        names = ", ".join(repr(n) for n in served)
        log(f"starting tritonserver: {names} ({opts.engine.name}), workspace {triton._workspace.path}")
        try:
            triton.run()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - PyTriton's start-up errors: the cause is in tritonserver's log
            raise ServerError(f"tritonserver did not start ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                              "its log is above") from None
        log(f"serving {names}: http://{opts.host}:{opts.http_port}, grpc://{opts.host}:{opts.grpc_port}, metrics "
            f"on {opts.metrics_port}; requests up to {opts.max_request} (C x N x T)"
            f"{'; inference needs the token' if opts.token else ''}. Ctrl-C or SIGTERM stops it.")
        while triton.is_alive():
            time.sleep(0.2)
        raise ServerError("tritonserver or its python backend exited")
    except KeyboardInterrupt:
        log(f"{stop.requested or 'interrupted'}: stopping tritonserver")
    finally:
        triton.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stop:
    """The first SIGINT or SIGTERM interrupts start-up or the serving loop; later ones wait for the clean-up."""

    def __init__(self):
        self.requested: str | None = None

    def handle(self, signum, _frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            raise KeyboardInterrupt


def _add_parameters(triton, name: str, params: dict[str, str]) -> None:
    """Model-config parameters a client reads (fingerprint, request limit). PyTriton 0.7 has no public way to set
    them; its generated config keeps a `backend_parameters` dict, filled here before the model loads."""
    try:
        (model,) = [m for m in triton._model_manager.models if m.model_name == name]
        model._get_triton_model_config().backend_parameters.update(params)
    except (AttributeError, ValueError, TypeError) as exc:
        raise ServerError(f"this PyTriton cannot carry the model's fingerprint ({exc}); install nvidia-pytriton==0.7.0"
                          ) from None
