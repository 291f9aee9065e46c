"""The service's side of LMaaS: `bbt-onnx serve`, a real Triton Inference Server for exported prompt graphs.

It writes a python-backend model repository (serving/repository.py: each graph in onnxruntime inside Triton's
python backend, every request checked against the model's limits) into a workspace, runs the tritonserver binary
PyTriton ships on it (serving/tritonserver.py: loopback ports of its own, its own process group, ready only once
every model has loaded), and puts the gates in front (serving/gate.py: bodies bounded before they are read,
inference requests' shapes checked, 503 while starting, restarting or stopping). If tritonserver dies, it is
started again on the same ports while the gates answer 503, which the client's retries ride over. SIGINT or
SIGTERM stops the gates, then tritonserver; the watchdog removes whatever is left, whatever killed the server.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..devices import DEVICES, precision_of
from ..deploy.triton import add_classifier
from ..engines.ort import OrtSpec
from ..engines.served import DEFAULT_MAX_REQUEST, check_max_request, check_name, max_body
from ..errors import ServerError, SettingsError
from ..manifest import load_manifest
from ..options import setting
from .gate import GrpcGate, HttpGate
from .repository import add_model, served_models
from .tritonserver import TritonProcess, Watchdog

# everything but health (and the server's own metadata) needs the token when one is given
TOKEN_ENDPOINTS = ("inference", "model-config", "model-repository", "shared-memory", "statistics", "trace", "logging")
RESTARTS = 5  # tritonserver deaths survived within RESTART_WINDOW before serve gives up
RESTART_WINDOW = 600.0  # seconds: a death older than this no longer counts, so the budget recovers
LOOPBACK = "127.0.0.1"
BACKEND_PROBE = 1.0  # seconds between looks at tritonserver's model backends (a killed one is a death too)


@dataclass(frozen=True)
class ServeOptions:
    model_dirs: tuple[str, ...]  # every model the one server serves, each under its own name
    engine: OrtSpec = OrtSpec()  # the graph each request runs through, and where
    names: tuple[str, ...] = ()  # a name per model directory [default: each export source's last path component]
    prompts: tuple[str, ...] = ()  # finished runs, each served beside its model as NAME.classify
    host: str = setting("127.0.0.1", "Address to bind; one other machines can reach needs --token-file.")
    http_port: int = setting(8000, "HTTP port.")
    grpc_port: int = setting(8001, "gRPC port.")
    metrics_port: int = setting(8002, "Metrics port (Prometheus), on 127.0.0.1 whatever --host is: it has no token.")
    token: str | None = None  # every request but health must send it (triton-access-token)
    max_request: int = setting(DEFAULT_MAX_REQUEST, "Largest request, as prompts x rows x tokens (C x N x T).")
    verbose: bool = setting(False, "Show tritonserver's own log (it goes to a file in the workspace otherwise).")

    @property
    def metrics(self) -> tuple[str, int]:
        """Where tritonserver's metrics listen: loopback only, since that endpoint cannot check the token (scrape it
        from this machine, or through a gateway of your own)."""
        return LOOPBACK, self.metrics_port

    def check(self) -> "ServeOptions":
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not (isinstance(port, int) and 1 <= port <= 65535):
                raise SettingsError(f"{name} must be in 1..65535, got {port}", name)
        if len(set(ports.values())) != 3:
            raise SettingsError(f"http_port, grpc_port and metrics_port must differ, got {sorted(ports.values())}",
                                tuple(ports))
        check_max_request(self.max_request)
        if not is_loopback(self.host) and not self.token:
            raise SettingsError(f"host {self.host} is reachable from other machines: pass token, or serve on "
                                "127.0.0.1 (and put TLS and authentication in a gateway in front; see docs/serving.md)",
                                ("host", "token"))
        if self.names and len(self.names) != len(self.model_dirs):
            raise SettingsError(f"names holds {len(self.names)} for {len(self.model_dirs)} models: give one name per "
                                "model in model_dirs, in the same order", ("names", "model_dirs"))
        for name in self.names:
            check_name(name, "names")
        precision_of(self.engine.precision)
        return self


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """A port another process holds is one line now, not a start-up failure later."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise SettingsError(f"cannot listen on {host}:{port} ({name}): {exc.strerror}; pick another port",
                                    name) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class State:
    """What the gates tell clients: starting, serving, restarting or stopping."""

    def __init__(self):
        self.value = "starting"

    def __call__(self) -> str:
        return self.value


def recent(deaths: list[float], now: float) -> list[float]:
    """The deaths that still count against the restart budget: those within the window, so that a long-lived
    server is not ended by rare deaths spread over days."""
    return [d for d in deaths if now - d < RESTART_WINDOW]


def serve(opts: ServeOptions, log: Callable[[str], None] = lambda _m: None) -> None:
    """Serve until SIGINT or SIGTERM; then nothing of the server is left: no process, shared memory or folder."""
    opts.check()
    check_ports_free(opts.host, {"http_port": opts.http_port, "grpc_port": opts.grpc_port})
    check_ports_free(LOOPBACK, {"metrics_port": opts.metrics_port})
    models, limit = [], 0
    for i, directory in enumerate(opts.model_dirs):
        manifest = load_manifest(directory)
        reason = opts.engine.unavailable(manifest)
        if reason:
            raise SettingsError(f"cannot serve {directory} on {opts.engine.name}: {reason}")
        limit = max(limit, max_body(manifest, opts.max_request))
        for model in served_models(manifest, opts.engine.precision, opts.names[i] if opts.names else None,
                                   cached=True, backend="python", kind=DEVICES[opts.engine.device].instance,
                                   threads=opts.engine.threads, max_request=opts.max_request,
                                   device=opts.engine.device):
            clash = next((m for m in models if m.name == model.name), None)
            if clash is not None:
                raise SettingsError(f"{directory} would be served as {model.name!r}, the name of "
                                    f"{clash.manifest.directory} too; give each its own name in names", "names")
            models.append(model)
    classifiers = [classifier_for(run, models, opts) for run in opts.prompts]  # built, not yet checked
    if len({c[0].name for c in classifiers}) != len(classifiers):
        raise SettingsError("prompts holds two runs for one model: serve one classifier per model", "prompts")
    workspace = Path(tempfile.mkdtemp(prefix="bbt-serve-"))
    watchdog = Watchdog(workspace)
    state, stop = State(), Stop()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    gates, triton = [], None
    try:
        repository = workspace / "repository"
        for model in models:
            add_model(repository, model)
        for served, write in classifiers:
            log(f"checking {served.name} (the result of a run, as a text classifier) against bbt-onnx predict")
            add_classifier(repository, served, write)
        names = ", ".join(repr(m.name) for m in models + [c[0] for c in classifiers])
        triton = TritonProcess(repository, workspace, free_port(), free_port(), opts.token, TOKEN_ENDPOINTS,
                               log_file=None if opts.verbose else workspace / "tritonserver.log",
                               watchdog=watchdog, metrics=opts.metrics)
        log(f"starting tritonserver: {names} ({opts.engine.name}), workspace {workspace}")
        gates = [HttpGate(opts.host, opts.http_port, triton.http_port, limit, state, opts.token),
                 GrpcGate(opts.host, opts.grpc_port, triton.grpc_port, limit, state)]
        for gate in gates:
            gate.start()  # answering 503 while the models load
        triton.start()
        state.value = "serving"
        log(f"serving {names}: http://{opts.host}:{opts.http_port}, grpc://{opts.host}:{opts.grpc_port}, metrics on "
            f"http://{LOOPBACK}:{opts.metrics_port}; requests up to {opts.max_request} (C x N x T), bodies up to "
            f"{limit} bytes"
            f"{'; every request but health needs the token' if opts.token else ''}. Ctrl-C or SIGTERM stops it.")
        deaths: list[float] = []
        probe = time.monotonic()
        while True:
            time.sleep(0.2)
            dead = frozenset()
            if triton.alive() and time.monotonic() >= probe:  # its model backends, once a second
                probe, dead = time.monotonic() + BACKEND_PROBE, triton.dead_backends()
            if triton.alive() and not dead:
                continue
            cause = (f"tritonserver's model backend died (pid {', '.join(map(str, sorted(dead)))})" if dead else
                     f"tritonserver exited ({triton.exit_cause()}){triton.last_error()}")
            deaths = recent(deaths + [time.monotonic()], time.monotonic())
            if len(deaths) > RESTARTS:
                raise ServerError(f"tritonserver died {len(deaths)} times in {RESTART_WINDOW / 60:.0f} minutes, "
                                  f"the last: {cause}; giving up")
            state.value = "restarting"
            log(f"{cause}; starting it again")
            triton.stop()
            triton = TritonProcess(repository, workspace, triton.http_port, triton.grpc_port, opts.token,
                                   TOKEN_ENDPOINTS, log_file=triton.log_file, watchdog=watchdog,
                                   metrics=triton.metrics)
            triton.start()
            state.value = "serving"
            log("serving again")
    except KeyboardInterrupt:
        log(f"{stop.requested or 'interrupted'}: stopping")
    finally:
        state.value = "stopping"
        for gate in gates:
            gate.stop()
        if triton is not None:
            triton.stop()
        watchdog.close()  # removes the workspace
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def classifier_for(run: str, models: list, opts: ServeOptions):
    """(the classifier model, its writer) for a run's result, beside the served model it was tuned on."""
    from ..deploy import CLASSIFY_SUFFIX, prepare, write_checked
    from ..deploy.triton import ClassifierModel
    from ..prompt import load_prompt

    result = load_prompt(run)
    fingerprint = next(iter(getattr(result, "members", (result,)))).model_fingerprint
    base = next((m for m in models if not m.deep and m.manifest.is_model(fingerprint)), None)
    if base is None:
        raise SettingsError(f"the run {run} in prompts was tuned on none of the models served here; add its model to "
                            "model_dirs", ("prompts", "model_dirs"))
    precision = DEVICES[opts.engine.device].classifier_precision or opts.engine.precision  # it runs on CPU
    clf, prompt = prepare(base.manifest, run, precision)
    served = ClassifierModel(f"{base.name}{CLASSIFY_SUFFIX}", clf, "python", threads=opts.engine.threads)
    return served, lambda folder: write_checked(folder, clf, base.manifest, prompt, precision)


class Stop:
    """The first SIGINT or SIGTERM interrupts start-up or the serving loop; later ones wait for the clean-up."""

    def __init__(self):
        self.requested: str | None = None

    def handle(self, signum, _frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            raise KeyboardInterrupt
