"""The tuner's side of LMaaS: a Triton server (KServe v2 protocol, HTTP or gRPC) as an engine.

`TritonEngine` has the same methods as the in-process engine, so the tuner cannot tell them apart. It sends the
graph contract's tensors, split into the same length buckets the in-process engine uses, so a server running the
same graph on the same provider returns the same logits. Before the first call it checks that the server serves
the model the local manifest describes (the fingerprint in the model config's parameters). What differs between
HTTP and gRPC lives in two small wire classes.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

import numpy as np

from ..contract import GRAPH_OUTPUTS, PREFIX_IDS, PROMPT_POS, ROW_INPUTS
from ..encoding import EncodedSet, cache_split
from ..errors import ServerError, SettingsError
from ..manifest import Manifest
from .base import PromptScoring, check_prompt_positions, row_groups, row_input
from .served import (BUCKETS_PARAM, CACHED_SUFFIX, CLASSIFY_SUFFIX, DEEP_SUFFIX, FINGERPRINT_PARAM, GRPC_PREFIX,
                     LABELS_PARAM, LIMIT_PARAM, PRECISION_PARAM, PROMPT_PARAM, TOKEN_HEADER, served_name)

WIRE_TYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64}
TRANSIENT_HTTP = {408, 429, 502, 503, 504}
MAX_SHARDS = 64  # concurrent requests one call may become
TRANSIENT_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")


class HttpWire:
    """KServe v2 over HTTP (tritonclient.http): the token as a header, tensors as binary data."""

    protocol = "http"
    port = 8000

    def __init__(self, remote: "Remote"):
        self.remote = remote
        self.module = client_module("tritonclient.http")

    def client(self):
        return self.module.InferenceServerClient(self.remote.address, connection_timeout=self.remote.timeout,
                                                 network_timeout=self.remote.timeout)

    def headers(self) -> dict[str, str]:
        """A fresh dict every call: tritonclient adds its own keys to the one it is given."""
        return {TOKEN_HEADER: self.remote.token} if self.remote.token else {}

    def input(self, name: str, array: np.ndarray, wire: str):
        item = self.module.InferInput(name, list(array.shape), wire)
        item.set_data_from_numpy(array, binary_data=True)
        return item

    def output(self, name: str):
        return self.module.InferRequestedOutput(name, binary_data=True)

    def infer_options(self) -> dict:
        return {}

    def config(self, client, model: str) -> dict:
        return client.get_model_config(model, headers=self.headers())


class GrpcWire(HttpWire):
    """KServe v2 over gRPC (tritonclient.grpc): the token as metadata under tritonserver's restricted-key prefix."""

    protocol = "grpc"
    port = 8001

    def __init__(self, remote: "Remote"):
        self.remote = remote
        self.module = client_module("tritonclient.grpc")

    def client(self):
        return self.module.InferenceServerClient(self.remote.address)

    def headers(self) -> dict[str, str]:
        return {GRPC_PREFIX + TOKEN_HEADER: self.remote.token} if self.remote.token else {}

    def input(self, name: str, array: np.ndarray, wire: str):
        item = self.module.InferInput(name, list(array.shape), wire)
        item.set_data_from_numpy(array)
        return item

    def output(self, name: str):
        return self.module.InferRequestedOutput(name)

    def infer_options(self) -> dict:
        return {"client_timeout": self.remote.timeout}

    def config(self, client, model: str) -> dict:
        from google.protobuf.json_format import MessageToDict

        raw = client.get_model_config(model, headers=self.headers())
        return MessageToDict(raw.config, preserving_proto_field_name=True)


WIRES = {wire.protocol: wire for wire in (HttpWire, GrpcWire)}


def client_module(name: str):
    try:
        return __import__(name, fromlist=["InferenceServerClient"])
    except ImportError:
        raise SettingsError("scoring on a server needs tritonclient: pip install 'bbt-onnx[client]'") from None


@dataclass(frozen=True)
class Remote:
    """Where a Triton server listens and how to talk to it: `http://HOST:PORT` or `grpc://HOST:PORT`, with the name
    the model is served under as the path when it is not the export's own (`http://HOST:PORT/NAME`)."""

    url: str
    token: str | None = None
    timeout: float = 60.0  # seconds per request
    retries: int = 3  # extra tries for a transient failure, with exponential backoff
    backoff: float = 0.25  # seconds before the first retry
    shards: int = 1  # concurrent requests a call's candidates are split into, in candidate order

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme.lower()

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or WIRES[self.protocol].port}"

    @property
    def model_name(self) -> str | None:
        """The served name the URL gives, if any."""
        return urlsplit(self.url).path.strip("/") or None

    def check(self) -> "Remote":
        parts = urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            raise SettingsError("the server URL holds a user name or password; give the token in token_file, "
                                "so that it is never written to a run", "token_file")
        name = parts.path.strip("/")
        if parts.scheme.lower() not in WIRES or not parts.hostname or parts.query or parts.fragment or \
                "/" in name or (name and not all(c.isalnum() or c in "._-" for c in name)):
            raise SettingsError(f"server {self.url!r} is not http://HOST:PORT or grpc://HOST:PORT (optionally with "
                                "/NAME, the model's served name)")
        try:
            parts.port
        except ValueError:
            raise SettingsError(f"server {self.url!r} has a bad port") from None
        if not (self.timeout > 0 and np.isfinite(self.timeout)):
            raise SettingsError(f"the server timeout must be a positive number of seconds, got {self.timeout}")
        if not (isinstance(self.retries, int) and 0 <= self.retries <= 20):
            raise SettingsError(f"retries must be an integer in 0..20, got {self.retries}")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or not 1 <= self.shards <= MAX_SHARDS:
            raise SettingsError(f"shards must be a whole number in 1..{MAX_SHARDS}, got {self.shards!r}", "shards")
        return self

    def wire(self) -> HttpWire:
        return WIRES[self.protocol](self)


class TritonClient:
    """One model on a Triton server, over HTTP or gRPC: a connection per thread, transient failures retried, a
    loading or restarting server waited for, and every failure one line that says what to do."""

    deep = False

    def __init__(self, remote: Remote, model: str):
        self.remote = remote.check()
        self.wire = remote.wire()
        self.model = model
        self.calls = 0  # requests answered
        self.retried = 0  # requests sent again after a transient failure
        self.bytes_sent = 0
        self._jitter = random.Random()  # spreads retries: it never touches what is computed
        self._local = threading.local()  # a connection per thread: tritonclient's HTTP client is bound to one
        self._count = threading.Lock()  # the counters, when shards send from several threads
        self._local.client = self._connect()

    def _counted(self, name: str, amount: int = 1) -> None:
        with self._count:
            setattr(self, name, getattr(self, name) + amount)

    def parameters(self, config: dict) -> dict[str, str]:
        return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

    @property
    def client(self):
        """This thread's connection (tritonclient's HTTP client must stay on the thread that made it)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.wire.client()
        return client

    # -- the protocol ---------------------------------------------------------
    def _connect(self):
        """A client whose server is live and serves this model's name; a model still loading is waited for, within
        the timeout."""
        try:
            client = self.wire.client()
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None
        live = self._retrying(lambda: client.is_server_live(headers=self.wire.headers()))
        if not live:
            raise ServerError(f"the server at {self.remote.url} is up but not live yet; try again in a moment")
        deadline = time.monotonic() + self.remote.timeout
        while True:
            ready = self._retrying(lambda: client.is_model_ready(self.model, headers=self.wire.headers()))
            state = None if ready else self._model_state(client)
            loading = not ready and (state in ("LOADING", "UNLOADING") or (state is None and not self._retrying(
                lambda: client.is_server_ready(headers=self.wire.headers()))))
            if not loading or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if loading:
            raise ServerError(f"the server at {self.remote.url} is not ready within {self.remote.timeout:g} s: "
                              f"{self.model!r} has not loaded; try again later")
        if not ready and state == "UNAVAILABLE":
            raise ServerError(f"the server at {self.remote.url} failed to load {self.model!r}; see its log")
        if not ready and self.deep:
            raise ServerError(f"the server at {self.remote.url} does not serve the deep-prompt graph BBTv2 needs "
                              f"({self.model!r}): export the model with `bbt-onnx export --deep` and serve it again")
        if not ready:
            raise ServerError(f"the server at {self.remote.url} serves no model named {self.model!r} (this model "
                              f"directory's name on a server); check the server URL and model_dir", "model_dir")
        return client

    def _model_state(self, client) -> str | None:
        """The model's state in the server's repository index (LOADING, READY, UNAVAILABLE...; "" when listed
        without one, "absent" when not listed), or None when the index cannot be read."""
        try:
            index = client.get_model_repository_index(headers=self.wire.headers())
        except Exception:  # noqa: BLE001 - no index (restricted, or not offered): nothing more to learn
            return None
        if not isinstance(index, list):  # gRPC: a message
            from google.protobuf.json_format import MessageToDict

            index = MessageToDict(index).get("models", [])
        return next((str(m.get("state", "")) for m in index if m.get("name") == self.model), "absent")

    def _retrying(self, call):
        """`call()`, tried again after a transient failure, up to `retries` times with exponential backoff and
        jitter (so that many clients do not retry in lock-step); a server that says it is starting or restarting
        is waited for within the timeout instead."""
        attempt, waiting_until = 0, None
        while True:
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own and the transport's errors
                if self._starting(exc):
                    waiting_until = waiting_until or time.monotonic() + self.remote.timeout
                    if time.monotonic() < waiting_until:
                        self._counted("retried")
                        time.sleep(min(1.0, self.remote.backoff * 2) * (0.5 + self._jitter.random()))
                        continue
                    raise ServerError(f"the server at {self.remote.url} is not ready within "
                                      f"{self.remote.timeout:g} s: {self._text(exc)[:200]}") from None
                if not self._transient(exc) or attempt >= self.remote.retries:
                    raise self._error(exc) from None
                self._counted("retried")
                time.sleep(self.remote.backoff * 2 ** attempt * (0.5 + self._jitter.random()))
                attempt += 1

    def _starting(self, exc: Exception) -> bool:
        """The server is up but its models are loading, or it is restarting: worth waiting for."""
        low = self._text(exc).lower()
        return "is starting" in low or "is restarting" in low

    def _config(self) -> dict:
        try:
            return self.wire.config(self.client, self.model)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    @staticmethod
    def _transient(exc: Exception) -> bool:
        """Worth a retry: the connection dropped or failed, the deadline passed, or the server said it is busy. A
        refused token and a message over the limit are answers, though gRPC sends them as UNAVAILABLE and
        RESOURCE_EXHAUSTED."""
        if isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException)):
            return True
        low = str(exc).lower()
        if "restricted" in low or "larger than max" in low:
            return False
        status = getattr(exc, "status", None)
        code = status() if callable(status) else None
        if code is None:
            return "timed out" in str(exc).lower() or "Deadline" in str(exc)
        return str(code) in TRANSIENT_GRPC or (str(code).isdigit() and int(code) in TRANSIENT_HTTP)

    def _text(self, exc: Exception) -> str:
        """The failure's own words on one line, the token never among them."""
        message = getattr(exc, "message", None)
        text = " ".join(str((message() if callable(message) else None) or exc).split())
        return text.replace(self.remote.token, "***") if self.remote.token else text

    def _error(self, exc: Exception) -> ServerError:
        """Every failure a user can meet, as one line that says what to do."""
        url = self.remote.url
        status = getattr(exc, "status", None)
        code = str(status() if callable(status) else "")
        text = self._text(exc)
        low = text.lower()
        if "restricted" in low or code in ("401", "403", "StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"):
            hint = "pass token_file" if not self.remote.token else "the token in token_file is not the server's"
            return ServerError(f"the server at {url} refused the request: {hint}", "token_file")
        if "over the server's limit" in low or "larger than max" in low:
            return ServerError(f"the server at {url} refused a request over its limit: {text[:300]}")
        if code in ("400", "StatusCode.INVALID_ARGUMENT"):
            return ServerError(f"the server at {url} refused the request: {text[:300]}")
        if "is stopping" in low:
            return ServerError(f"the server at {url} is stopping")
        if isinstance(exc, TimeoutError) or "timed out" in low or code == "StatusCode.DEADLINE_EXCEEDED":
            return ServerError(f"the server at {url} did not answer within {self.remote.timeout:g} s "
                               f"({self.remote.retries + 1} tries)")
        if isinstance(exc, OSError) or code == "StatusCode.UNAVAILABLE" or "connect" in low:
            return ServerError(f"the server at {url} is down or unreachable ({text[:120]})")
        if "unknown model" in low or "not found" in low or code in ("404", "StatusCode.NOT_FOUND"):
            return ServerError(f"the server at {url} serves no model named {self.model!r}")
        return ServerError(f"the server at {url} failed the request ({code or type(exc).__name__}): {text[:300]}")


class TritonEngine(TritonClient, PromptScoring):
    """A model served by Triton (`bbt-onnx serve`, or a stock tritonserver over `bbt-onnx triton-repo`)."""

    def __init__(self, manifest: Manifest, remote: Remote, deep: bool = False):
        self.manifest = manifest
        self.deep = deep
        base = remote.model_name or served_name(manifest)
        super().__init__(remote, f"{base}{DEEP_SUFFIX}" if deep else base)
        self.graph_label = f"served {self.model!r}"
        self.provider = f"Triton {self.model} at {remote.url}"
        config = self._config()
        params = self.parameters(config)
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
        self._pool: ThreadPoolExecutor | None = None  # the shards' threads, each with its own connection
        self.cached = None if deep else self._cached_model(f"{base}{CACHED_SUFFIX}")

    def _cached_model(self, name: str) -> str | None:
        """serve's model of rows after a shared prefix, when this server has one for this very model: there the
        prefix is computed once per server; elsewhere every row is sent with its prefix written out."""
        try:
            params = self.parameters(self.wire.config(self.client, name))
        except Exception:  # noqa: BLE001 - no such model (a stock tritonserver, an older serve): rows go whole
            return None
        return name if params.get(FINGERPRINT_PARAM) == self.manifest.fingerprint() else None

    # -- the engine (label_logits and deep_label_logits come from PromptScoring) -----------------------
    def _score(self, prompts: np.ndarray, batch: EncodedSet, extra: dict) -> np.ndarray:
        if self.cached and not extra and batch.prefix_length and cache_split(batch) is not None:
            return self._score_cached(prompts, batch)
        batch = batch.whole()  # a prefix the rows share runs with each row: this server caches none
        check_prompt_positions(batch, self.takes_prompt_pos, self.manifest.prompt_start, self.graph_label)
        groups, subsets = row_groups(batch, batch.lengths, self.max_buckets)
        out = np.empty((prompts.shape[0], len(batch), len(batch.label_ids)), np.float32)
        for index, rows in zip(groups, subsets):
            feeds = {name: row_input(rows, name, self.manifest.prompt_start) for name in self.row_inputs}
            feeds.update(extra, prompt_embeds=prompts)
            out[:, index] = self.sharded(feeds)
        return out

    def sharded(self, feeds: dict[str, np.ndarray], model: str | None = None) -> np.ndarray:
        """One call's candidates as `remote.shards` concurrent requests, in candidate order (the server spreads
        them over its instances), put back together: every candidate is scored on the same rows either way."""
        c = feeds["prompt_embeds"].shape[0]
        parts = np.array_split(np.arange(c), min(self.remote.shards, c))
        if len(parts) == 1:
            return self.infer(feeds, model)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.remote.shards, thread_name_prefix="bbt-shard")
        jobs = [self._pool.submit(self._shard, {**feeds, "prompt_embeds": feeds["prompt_embeds"][part]}, model)
                for part in parts]
        return np.concatenate([job.result() for job in jobs])

    def _shard(self, feeds: dict[str, np.ndarray], model: str | None) -> np.ndarray:
        """One shard's request on a pool thread, whose connection is closed there when it is answered (tritonclient's
        HTTP client cannot be closed from another thread, as it would be when the engine is collected)."""
        try:
            return self.infer(feeds, model)
        finally:
            client, self._local.client = getattr(self._local, "client", None), None
            if client is not None:
                client.close()

    def _score_cached(self, prompts: np.ndarray, batch: EncodedSet) -> np.ndarray:
        """Suffix rows after a shared prefix, through NAME.cached: the rows' own ids and the prefix's, in one
        request when it fits the server's limit (the server then plans them as the process would: the same
        scores, bit for bit), else in as many as it takes."""
        c, (n, t) = prompts.shape[0], batch.input_ids.shape
        per = n if self.max_request is None else max(1, min(n, self.max_request // max(c * t, 1)))
        out = np.empty((c, n, len(batch.label_ids)), np.float32)
        for start in range(0, n, per):
            index = np.arange(start, min(n, start + per))
            rows = batch if per >= n else batch.take(index)
            feeds = {name: getattr(rows, name) for name in (*ROW_INPUTS[:3], PROMPT_POS)}
            feeds.update({PREFIX_IDS: np.asarray(batch.prefix_ids, np.int64), "prompt_embeds": prompts,
                          "label_ids": batch.label_ids})
            out[:, index] = self.sharded(feeds, self.cached)
        return out

    def infer(self, feeds: dict[str, np.ndarray], model: str | None = None) -> np.ndarray:
        """One request: the graph's inputs -> [C, N, K] float32 (of `model`, else this engine's), retried on
        transient failures only (a retry sends the same tensors and is never counted as another call)."""
        c, (n, t) = feeds["prompt_embeds"].shape[0], feeds["input_ids"].shape
        if self.max_request is not None and c * n * t > self.max_request:
            raise ServerError(f"a request of {c} prompts x {n} rows x {t} tokens = {c * n * t} is over the "
                              f"server's limit of {self.max_request} (C x N x T); use a smaller popsize, fewer "
                              "rows per call or a shorter max_length, or raise the server's max_request",
                              ("popsize", "max_length", "max_request"))
        inputs = self._inputs(feeds)
        outputs = [self.wire.output(GRAPH_OUTPUTS[0])]
        result = self._retrying(lambda: self.client.infer(model or self.model, inputs, outputs=outputs,
                                                          headers=self.wire.headers(), **self.wire.infer_options()))
        self._counted("calls")
        logits = result.as_numpy(GRAPH_OUTPUTS[0])
        want = (c, n, len(feeds["label_ids"]))
        if logits is None or logits.shape != want:
            raise ServerError(f"the server at {self.remote.url} answered {None if logits is None else logits.shape} "
                              f"label logits for a [{c}, {n}, {want[2]}] request: it does not run a bbt-onnx graph")
        return np.asarray(logits, dtype=np.float32)

    def _inputs(self, feeds: dict[str, np.ndarray]) -> list:
        inputs = []
        for name, value in feeds.items():
            wire = self.wire_types.get(name, "INT64")
            array = np.ascontiguousarray(value, dtype=WIRE_TYPES[wire])
            self._counted("bytes_sent", array.nbytes)
            inputs.append(self.wire.input(name, array, wire))
        return inputs


class ServedClassifier(TritonClient):
    """A run's result served as a text classifier (NAME.classify, `serve --prompt`): texts in, the label
    probabilities out, checked first to be the classifier of this very result (its prompt file's sha256)."""

    def __init__(self, remote: Remote, model: str, prompt_sha256: str, labels: list[str]):
        super().__init__(remote, model)
        config = self._config()
        params = self.parameters(config)
        if params.get(PROMPT_PARAM) != prompt_sha256:
            raise ServerError(f"{model!r} at {remote.url} serves another run's result (prompt sha256 "
                              f"{params.get(PROMPT_PARAM, 'none')[:12]}, this run's {prompt_sha256[:12]})")
        if params.get(LABELS_PARAM) != json.dumps(labels):
            raise ServerError(f"{model!r} at {remote.url} has the labels {params.get(LABELS_PARAM)}, not {labels}")
        self.fields = [t["name"] for t in config.get("input", [])]
        self.max_batch = int(config.get("max_batch_size", 1)) or 1

    def probabilities(self, texts: list[str], texts_b: list[str] | None = None) -> np.ndarray:
        """[N, K] label probabilities, in requests of at most the model's batch size."""
        out = []
        for start in range(0, len(texts), self.max_batch):
            fields = {"text": texts[start:start + self.max_batch]}
            if "text_b" in self.fields:
                fields["text_b"] = (texts_b or [])[start:start + self.max_batch]
            inputs = []
            for name, values in fields.items():
                array = np.array([[v.encode("utf-8")] for v in values], dtype=object)
                self.bytes_sent += sum(len(v[0]) for v in array)
                inputs.append(self.wire.input(name, array, "BYTES"))
            result = self._retrying(lambda: self.client.infer(
                self.model, inputs, outputs=[self.wire.output("probabilities")], headers=self.wire.headers(),
                **self.wire.infer_options()))
            self.calls += 1
            got = result.as_numpy("probabilities")
            if got is None or got.shape[0] != len(fields["text"]):
                raise ServerError(f"the server at {self.remote.url} answered {None if got is None else got.shape} "
                                  f"probabilities for {len(fields['text'])} texts")
            out.append(np.asarray(got, np.float64))
        return np.concatenate(out) if out else np.zeros((0, 0))


def served_classifier(engine, result, prompt_file, log=lambda _m: None) -> ServedClassifier | None:
    """The server's classifier of this very result (NAME.classify, `serve --prompt`), when `engine` is a served
    model's and the server has it; else None, and `log` says why predict scores through the prompt graph."""
    if not isinstance(engine, TritonEngine):
        return None
    from ..fileio import sha256_file

    name = f"{engine.model.removesuffix(DEEP_SUFFIX)}{CLASSIFY_SUFFIX}"
    try:
        return ServedClassifier(engine.remote, name, sha256_file(prompt_file), list(result.task.label_keys))
    except ServerError as exc:
        log(f"not using {name!r}: {exc}; scoring through {engine.model!r} instead")
        return None


@dataclass(frozen=True)
class TritonSpec:
    """An engine on a Triton server; its graph, device and precision are the server's."""

    remote: Remote

    backend: ClassVar[str] = "triton"
    needs_graphs: ClassVar[bool] = False  # a client directory (manifest and tokenizer) is enough
    takes_token: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.remote.url

    @staticmethod
    def claims(text: str) -> bool:
        return "://" in text

    @classmethod
    def parse(cls, text: str, token: str | None = None, threads: int | None = None) -> "TritonSpec":
        """`http://HOST:PORT` or `grpc://HOST:PORT`, optionally `triton:` first; `token` opens it."""
        return cls(Remote(str(text).strip().removeprefix(f"{cls.backend}:"), token).check())

    def local_graph(self, deep: bool = False) -> None:
        return None  # the server runs its own, and checks it

    def unavailable(self, manifest: Manifest, deep: bool = False) -> str | None:
        return None  # the server says what it serves when the engine connects

    def open(self, manifest: Manifest, deep: bool = False) -> TritonEngine:
        return TritonEngine(manifest, self.remote, deep)

    def record(self, engine) -> dict:
        """What a run records of its engine: the server and what it serves; never the token."""
        return {"server": self.remote.url, "precision": engine.precision}

    def resumed(self, record: dict) -> "TritonSpec":
        return self
