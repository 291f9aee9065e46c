"""The tuner's side of LMaaS: a Triton server (KServe v2 protocol, HTTP or gRPC) as an engine.

`TritonEngine` has the same method as the in-process engine, so the tuner cannot tell them apart. It sends the
graph contract's tensors, split into the same length buckets the in-process engine uses, so a server running the
same graph on the same provider returns the same logits. Before the first call it checks that the server serves
the model the local manifest describes (the fingerprint in the model config's parameters).
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .encoding import EncodedSet
from .engine import ROW_INPUTS, PromptScoring, check_prompt_positions, row_groups, row_input
from .errors import ServerError, SettingsError
from .manifest import GRAPH_OUTPUTS, MANIFEST_NAME, PROMPT_POS, TOKENIZER_NAME, Manifest

TOKEN_HEADER = "triton-access-token"
GRPC_PREFIX = "triton-grpc-protocol-"  # tritonserver's name for a restricted-protocol key sent as gRPC metadata
FINGERPRINT_PARAM = "bbt_fingerprint"
LIMIT_PARAM = "bbt_max_request"
PRECISION_PARAM = "bbt_precision"
BUCKETS_PARAM = "bbt_row_buckets"  # calls per set of rows the server prefers: 4 length buckets on CPU, 1 on a GPU
DEFAULT_MAX_REQUEST = 1 << 18  # C x N x T per request: e.g. 20 prompts x 32 rows x 409 tokens
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
WIRE_TYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64}
TRANSIENT_HTTP = {408, 429, 502, 503, 504}
TRANSIENT_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class Remote:
    """Where a Triton server listens and how to talk to it: `http://HOST:PORT` or `grpc://HOST:PORT`."""

    url: str
    token: str | None = None
    timeout: float = 60.0  # seconds per request
    retries: int = 3  # extra tries for a transient failure, with exponential backoff
    backoff: float = 0.25  # seconds before the first retry

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme.lower()

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or DEFAULT_PORTS[self.protocol]}"

    def check(self) -> "Remote":
        parts = urlsplit(self.url)
        if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
            raise SettingsError(f"--server {self.url!r} is not http://HOST:PORT or grpc://HOST:PORT")
        try:
            parts.port
        except ValueError:
            raise SettingsError(f"--server {self.url!r} has a bad port") from None
        if not (self.timeout > 0 and np.isfinite(self.timeout)):
            raise SettingsError(f"the server timeout must be a positive number of seconds, got {self.timeout}")
        if not (isinstance(self.retries, int) and 0 <= self.retries <= 20):
            raise SettingsError(f"retries must be an integer in 0..20, got {self.retries}")
        return self

    def headers(self) -> dict[str, str]:
        """The token as Triton expects it: a header over HTTP, metadata with Triton's gRPC prefix over gRPC. A
        fresh dict every call: tritonclient adds its own keys to the one it is given."""
        if not self.token:
            return {}
        return {(GRPC_PREFIX if self.protocol == "grpc" else "") + TOKEN_HEADER: self.token}


def read_token(path: str | Path) -> str:
    """The shared secret in a token file (its first line, without surrounding whitespace)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the token file {path}: {exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise SettingsError(f"the token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise SettingsError(f"the token in {path} holds spaces or control characters; a header cannot carry them")
    return token


def served_name(manifest: Manifest, deep: bool = False) -> str:
    """The model's name on a server: the export source's last path component, in Triton's alphabet; its
    deep-prompt graph (BBTv2) is served beside it as NAME.deep."""
    base = Path(str(manifest.source).rstrip("/")).name or "model"
    name = ("".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip(".-") or "model")[:100]
    return f"{name}.deep" if deep else name


def write_client_dir(model_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """What a user of a remote service holds: the manifest (byte for byte, so its fingerprint is the server's)
    and the tokenizer; no graphs, no weights."""
    from .fileio import write_dir
    from .manifest import load_manifest

    manifest = load_manifest(model_dir)
    if Path(out).resolve() == Path(model_dir).resolve():
        raise SettingsError("--out is the model directory itself; name a new directory")

    def fill(staging: Path) -> None:
        for name in (MANIFEST_NAME, TOKENIZER_NAME):
            shutil.copyfile(manifest.directory / name, staging / name)

    return write_dir(out, force, fill)


def check_max_request(max_request: int) -> None:
    if not (isinstance(max_request, int) and max_request >= 1):
        raise SettingsError(f"--max-request must be a positive integer, got {max_request}")


def served_parameters(manifest: Manifest, precision: str, max_request: int, row_buckets: int) -> dict[str, str]:
    """The model-config parameters a server publishes and `TritonEngine` reads: one set for `bbt-onnx serve` and
    for `triton-repo`."""
    return {FINGERPRINT_PARAM: manifest.fingerprint(), LIMIT_PARAM: str(max_request), PRECISION_PARAM: precision,
            BUCKETS_PARAM: str(row_buckets)}


class TritonEngine(PromptScoring):
    """A model served by Triton (`bbt-onnx serve`, or a stock tritonserver over `bbt-onnx triton-repo`)."""

    LAYER_SHAPE = (1,)  # the graph's scalar prompt_layer: a served tensor has at least one dim

    def __init__(self, manifest: Manifest, remote: Remote, deep: bool = False):
        self.remote = remote.check()
        self.manifest = manifest
        self.deep = deep
        self.model = served_name(manifest, deep)
        self.graph_label = f"served {self.model!r}"
        self.provider = f"Triton {self.model} at {remote.url}"
        self.hidden_size = manifest.hidden_size
        self.calls = 0  # requests answered
        self.retried = 0  # requests sent again after a transient failure
        self._local = threading.local()  # a connection per thread: tritonclient's HTTP client is bound to one
        self._local.client = self._connect()
        config = self._config()
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        served = params.get(FINGERPRINT_PARAM)
        if served is None:
            raise ServerError(f"model {self.model!r} at {remote.url} does not say which model it serves (no "
                              f"{FINGERPRINT_PARAM} parameter): serve it with `bbt-onnx serve` or `bbt-onnx triton-repo`")
        if served != manifest.fingerprint():
            raise ServerError(f"model {self.model!r} at {remote.url} is not the model in {manifest.directory}: its "
                              f"manifest fingerprint is {served[:12]}..., the local one {manifest.fingerprint()[:12]}...")
        self.precision = params.get(PRECISION_PARAM, "?")
        self.max_buckets = int(params[BUCKETS_PARAM]) if params.get(BUCKETS_PARAM, "").isdigit() else 1
        self.max_request = int(params[LIMIT_PARAM]) if params.get(LIMIT_PARAM, "").isdigit() else None
        types = {t["name"]: t["data_type"].removeprefix("TYPE_") for t in config.get("input", [])}
        if "prompt_embeds" not in types or types["prompt_embeds"] not in WIRE_TYPES:
            raise ServerError(f"model {self.model!r} at {remote.url} has no float prompt_embeds input: it is not a "
                              "bbt-onnx prompt graph")
        self.wire_types = types
        self.prompt_dtype = WIRE_TYPES[types["prompt_embeds"]]
        self.takes_prompt_pos = PROMPT_POS in types
        self.row_inputs = ROW_INPUTS + ((PROMPT_POS,) if self.takes_prompt_pos else ())
        self.bytes_sent = 0

    # -- the engine (label_logits and deep_label_logits come from PromptScoring) -----------------------
    def _score(self, prompts: np.ndarray, batch: EncodedSet, extra: dict) -> np.ndarray:
        check_prompt_positions(batch, self.takes_prompt_pos, self.manifest.prompt_start, self.graph_label)
        groups, subsets = row_groups(batch, batch.lengths, self.max_buckets)
        out = np.empty((prompts.shape[0], len(batch), len(batch.label_ids)), np.float32)
        for index, rows in zip(groups, subsets):
            feeds = {name: row_input(rows, name, self.manifest.prompt_start) for name in self.row_inputs}
            feeds.update(extra, prompt_embeds=prompts)
            out[:, index] = self.infer(feeds)
        return out

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One request: the graph's inputs -> [C, N, K] float32, retried on transient failures only (a retry
        sends the same tensors and is never counted as another call)."""
        c, (n, t) = feeds["prompt_embeds"].shape[0], feeds["input_ids"].shape
        if self.max_request is not None and c * n * t > self.max_request:
            raise ServerError(f"a request of {c} prompts x {n} rows x {t} tokens = {c * n * t} is over the "
                              f"server's limit of {self.max_request} (C x N x T); use a smaller --popsize, fewer "
                              "rows per call or a shorter --max-length, or raise the server's --max-request")
        inputs = self._inputs(feeds)
        result = self._retrying(lambda: self._client.infer(self.model, inputs, outputs=self._outputs(),
                                                           headers=self.remote.headers(), **self._timeout_kw()))
        self.calls += 1
        logits = result.as_numpy(GRAPH_OUTPUTS[0])
        want = (c, n, len(feeds["label_ids"]))
        if logits is None or logits.shape != want:
            raise ServerError(f"the server at {self.remote.url} answered {None if logits is None else logits.shape} "
                              f"label logits for a [{c}, {n}, {want[2]}] request: it does not run a bbt-onnx graph")
        return np.asarray(logits, dtype=np.float32)

    # -- the protocol ---------------------------------------------------------
    @property
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _module(self):
        try:
            if self.remote.protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError:
            raise SettingsError("--server needs tritonclient: pip install 'bbt-onnx[client]' (or the serve extra)") from None
        return module

    def _new_client(self):
        module = self._module()
        if self.remote.protocol == "grpc":
            return module.InferenceServerClient(self.remote.address)
        return module.InferenceServerClient(self.remote.address, connection_timeout=self.remote.timeout,
                                            network_timeout=self.remote.timeout)

    def _connect(self):
        """A client whose server is live and serves this model's name."""
        try:
            client = self._new_client()
            live = self._retrying(lambda: client.is_server_live(headers=self.remote.headers()))
        except ServerError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None
        if not live:
            raise ServerError(f"the server at {self.remote.url} is up but not live yet; try again in a moment")
        try:
            ready = client.is_model_ready(self.model, headers=self.remote.headers())
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None
        if not ready and self.deep:
            raise ServerError(f"the server at {self.remote.url} does not serve the deep-prompt graph BBTv2 needs "
                              f"({self.model!r}): export the model with --deep and serve it again")
        if not ready:
            raise ServerError(f"the server at {self.remote.url} serves no model named {self.model!r} (this model "
                              f"directory's name on a server); check --server and --model")
        return client

    def _retrying(self, call):
        """`call()`, tried again after a transient failure, up to `retries` times with exponential backoff."""
        for attempt in range(self.remote.retries + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own and the transport's errors
                if not self._transient(exc) or attempt == self.remote.retries:
                    raise self._error(exc) from None
                self.retried += 1
                time.sleep(self.remote.backoff * 2 ** attempt)

    def _config(self) -> dict:
        try:
            if self.remote.protocol == "grpc":
                from google.protobuf.json_format import MessageToDict

                raw = self._client.get_model_config(self.model, headers=self.remote.headers())
                return MessageToDict(raw.config, preserving_proto_field_name=True)
            return self._client.get_model_config(self.model, headers=self.remote.headers())
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    def _inputs(self, feeds: dict[str, np.ndarray]) -> list:
        module = self._module()
        inputs = []
        for name, value in feeds.items():
            wire = self.wire_types.get(name, "INT64")
            array = np.ascontiguousarray(value, dtype=WIRE_TYPES[wire])
            item = module.InferInput(name, list(array.shape), wire)
            if self.remote.protocol == "grpc":
                item.set_data_from_numpy(array)
            else:
                item.set_data_from_numpy(array, binary_data=True)
            self.bytes_sent += array.nbytes
            inputs.append(item)
        return inputs

    def _outputs(self) -> list:
        module = self._module()
        if self.remote.protocol == "grpc":
            return [module.InferRequestedOutput(GRAPH_OUTPUTS[0])]
        return [module.InferRequestedOutput(GRAPH_OUTPUTS[0], binary_data=True)]

    def _timeout_kw(self) -> dict:
        return {"client_timeout": self.remote.timeout} if self.remote.protocol == "grpc" else {}

    @staticmethod
    def _transient(exc: Exception) -> bool:
        """Worth a retry: the connection or the deadline failed, or the server said it is busy."""
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        status = getattr(exc, "status", None)
        code = status() if callable(status) else None
        if code is None:
            return "timed out" in str(exc).lower() or "Deadline" in str(exc)
        return str(code) in TRANSIENT_GRPC or (str(code).isdigit() and int(code) in TRANSIENT_HTTP)

    def _error(self, exc: Exception) -> ServerError:
        """Every failure a user can meet, as one line that says what to do."""
        url = self.remote.url
        status = getattr(exc, "status", None)
        code = str(status() if callable(status) else "")
        message = getattr(exc, "message", None)
        text = " ".join(str((message() if callable(message) else None) or exc).split())
        low = text.lower()
        if "restricted" in low or code in ("401", "403", "StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"):
            hint = "pass --token-file" if not self.remote.token else "the token in --token-file is not the server's"
            return ServerError(f"the server at {url} refused the request: {hint}")
        if "over the server's limit" in low:
            return ServerError(text[low.index("a request"):][:300] if "a request" in low else text[:300])
        if isinstance(exc, TimeoutError) or "timed out" in low or code == "StatusCode.DEADLINE_EXCEEDED":
            return ServerError(f"the server at {url} did not answer within {self.remote.timeout:g} s "
                               f"({self.remote.retries + 1} tries)")
        if isinstance(exc, OSError) or code == "StatusCode.UNAVAILABLE" or "connect" in low:
            return ServerError(f"the server at {url} is down or unreachable ({text[:120]})")
        if "unknown model" in low or "not found" in low or code in ("404", "StatusCode.NOT_FOUND"):
            return ServerError(f"the server at {url} serves no model named {self.model!r}")
        return ServerError(f"the server at {url} failed the request ({code or type(exc).__name__}): {text[:300]}")
