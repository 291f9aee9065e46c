"""The gates in front of tritonserver: what a client reaches on the public ports.

tritonserver 2.51 sizes a buffer from a JSON request's declared shape before it checks anything, and a 3 KB request
declaring [1000000, 1000000, 1000000] aborts it; it also reads a whole body into memory before a model can refuse
it. So tritonserver listens on loopback ports of its own, and the gates forward to it, refusing first, without
reading them: a body over the server's limit (HTTP: by its Content-Length; gRPC: by the message length), a chunked
body, and an inference request whose declared shapes do not match the data it carries or exceed the limit. While
the models load, and while the server stops or restarts, they answer 503 (gRPC: UNAVAILABLE) with a one-line
reason, so that clients wait and retry rather than being told a model does not exist.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..engines.served import TOKEN_HEADER

ITEM_BYTES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4,
              "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8, "BYTES": 1}
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
OPEN_METADATA = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?(/ready)?$")  # model metadata and readiness
MAX_HEAD = 64 * 1024
FOLDED = re.compile(rb"\r\n[ \t]")  # a header line that continues the one before it
SINGLE_HEADERS = ("content-length", "transfer-encoding", "host", TOKEN_HEADER.lower(),
                  "inference-header-content-length")  # given twice, two readers could each take another
# Limits on what a connection may hold: the time to finish a head once it began, to send a declared body, to stay
# idle between requests; connections at once, overall and from one address
LIMITS = {"head_seconds": 10.0, "body_seconds": 120.0, "idle_seconds": 300.0, "connections": 512, "per_client": 64}
DRAIN = 256 << 20  # a refused body up to this size is read past and dropped, so the client reads the refusal
STATES = ("starting", "serving", "restarting", "stopping")
LIVE = b"\x08\x01"  # a ServerLiveResponse with live = true, as protobuf bytes


class Refusal(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class DuplicateKey(ValueError):
    """A JSON object that names a key twice: two parsers may each read a different value."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: an object whose keys are all different, else DuplicateKey naming the repeated key."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity, which no JSON parser need accept


def check_infer(body: bytes, headers: dict[str, str], max_bytes: int) -> bytes:
    """An inference request's JSON header against the data it carries: every input's declared shape a list of
    counts whose product fits the limit and equals its data (JSON `data`, or `binary_data_size`). Returns the body
    to forward: the header as the gate read it, written out again by the gate (so that tritonserver parses exactly
    what was checked), then the binary data as sent; `headers` get the new lengths."""
    length = headers.get("inference-header-content-length")
    try:
        head = body[:int(length)] if length is not None else body
        # UTF-8 only: Python's json reads UTF-16 and UTF-32 too, tritonserver's parser does not
        request = json.loads(head.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=no_constant)
    except DuplicateKey as exc:  # Python keeps a repeated key's last value, tritonserver's parser its first
        raise Refusal(400, f"the inference request names {str(exc)!r} twice in one object") from None
    except RecursionError:
        raise Refusal(400, "the inference request's JSON nests too deep") from None
    except UnicodeDecodeError:
        raise Refusal(400, "the inference request's header is not UTF-8") from None
    except ValueError:
        raise Refusal(400, "the inference request's header is not valid JSON") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        raise Refusal(400, "the inference request has no list of inputs")
    for item in inputs:
        if not isinstance(item, dict):
            raise Refusal(400, "an input of the inference request is not an object")
        name, shape, dtype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d
                                                  for d in shape):
            raise Refusal(400, f"input {name!r} has no shape of non-negative counts")
        if dtype not in ITEM_BYTES:
            raise Refusal(400, f"input {name!r} has an unknown datatype {dtype!r}")
        count = 1
        for d in shape:
            count *= d
            if count * ITEM_BYTES[dtype] > max_bytes:
                raise Refusal(400, f"input {name!r} of shape {shape} is over the server's limit of {max_bytes} bytes")
        params = item.get("parameters") if isinstance(item.get("parameters"), dict) else {}
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if dtype != "BYTES" and size != count * ITEM_BYTES[dtype]:
                raise Refusal(400, f"input {name!r} of shape {shape} carries {size} bytes, not "
                                   f"{count * ITEM_BYTES[dtype]}")
        else:
            found = flat_count(item.get("data"), count, VALUE_TYPES[dtype])
            if found is None:
                raise Refusal(400, f"input {name!r} of datatype {dtype} carries a value of another type")
            if found != count:
                raise Refusal(400, f"input {name!r} declares shape {shape} but carries another number of values")
    written = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if length is not None:
        headers["inference-header-content-length"] = str(len(written))
    forwarded = written + body[len(head):]
    headers["content-length"] = str(len(forwarded))
    return forwarded


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# what a JSON value of each datatype must be, so that a client's mistake is a 400 here, not tritonserver's 500
VALUE_TYPES = {**dict.fromkeys(("INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64"), _is_int),
               **dict.fromkeys(("FP16", "BF16", "FP32", "FP64"), _is_number),
               "BOOL": lambda v: isinstance(v, bool), "BYTES": lambda v: isinstance(v, str)}


def flat_count(data, stop: int, fits) -> int | None:
    """How many values a JSON array holds, flattened (counting stops past `stop`); None when a value does not
    `fit` its datatype, -1 when `data` is no array."""
    if not isinstance(data, list):
        return -1
    count, todo = 0, [data]
    while todo and count <= stop:
        for value in todo.pop():
            if isinstance(value, list):
                todo.append(value)
            elif not fits(value):
                return None
            else:
                count += 1
    return count


class HttpGate:
    """HTTP/1.1 in front of tritonserver's HTTP port: bodies bounded before they are read, inference requests'
    shapes checked, keep-alive connections each with their own upstream connection."""

    def __init__(self, host: str, port: int, upstream: int, max_body: int, state: Callable[[], str],
                 token: str | None = None, limits: dict | None = None):
        self.host, self.port, self.upstream, self.max_body, self.state = host, port, upstream, max_body, state
        self.limits = {**LIMITS, **(limits or {})}
        self.open: dict[str, int] = {}  # connections now open, by the client's address
        self.token = token  # checked here first, so that a caller without it has nothing parsed for it
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.base_events.Server | None = None
        self.thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="http-gate", daemon=True)
        self.thread.start()
        self._started.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.loop is not None and self.server is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        if self.thread is not None:
            self.thread.join(timeout=10)

    async def _shutdown(self) -> None:
        """No new connections, the open ones ended, then the loop."""
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.server = self.loop.run_until_complete(asyncio.start_server(self._client, self.host, self.port,
                                                                            limit=MAX_HEAD))
        except OSError as exc:
            self.error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        if sum(self.open.values()) >= self.limits["connections"] or \
                self.open.get(peer, 0) >= self.limits["per_client"]:
            await respond(writer, 429, "too many connections: close some, or retry in a moment", close=True)
            writer.close()
            return
        self.open[peer] = self.open.get(peer, 0) + 1
        try:
            await self._serve(reader, writer)
        finally:
            self.open[peer] -= 1
            if not self.open[peer]:
                del self.open[peer]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:  # a connection may wait idle for its next request, but a head once begun must end soon
                    first = await asyncio.wait_for(reader.readexactly(1), self.limits["idle_seconds"])
                    head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                          self.limits["head_seconds"])
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                        asyncio.TimeoutError):
                    return
                try:
                    method, target, version, headers = parse_head(head)
                except Refusal as refusal:
                    await respond(writer, refusal.status, str(refusal), close=True)
                    await linger(reader, writer)
                    return
                keep = headers.get("connection", "").lower() != "close"
                if not restricted(method, target) and (headers.get("content-length", "0") != "0" or
                                                       "transfer-encoding" in headers):
                    await respond(writer, 400, "this endpoint takes no body", close=True)  # refused unread
                    await linger(reader, writer)
                    return
                if self.token and restricted(method, target) and headers.get(TOKEN_HEADER) != self.token:
                    await respond(writer, 403, f"This API is restricted, expecting header '{TOKEN_HEADER}'",
                                  close=True)
                    await linger(reader, writer)
                    return
                try:
                    body = await self._body(reader, headers)
                except asyncio.TimeoutError:  # a body declared and not sent: the connection goes
                    return
                except Refusal as refusal:
                    await respond(writer, refusal.status, str(refusal), close=True)
                    await linger(reader, writer)
                    return
                state = self.state()
                if state != "serving":  # answered here: live while starting or restarting, nothing else
                    if target == "/v2/health/live" and state != "stopping":
                        await respond(writer, 200, "", close=not keep)
                    else:
                        await respond(writer, 503, f"the server is {state}: retry in a moment", close=not keep)
                    if not keep:
                        return
                    continue
                if method == "POST" and INFER_PATH.match(target.split("?")[0]):
                    try:
                        body = check_infer(body, headers, self.max_body)
                    except Refusal as refusal:
                        await respond(writer, refusal.status, str(refusal), close=not keep)
                        if not keep:
                            return
                        continue
                try:
                    if upstream is None:
                        upstream = await asyncio.open_connection("127.0.0.1", self.upstream, limit=MAX_HEAD)
                    closing = await forward(canonical_head(method, target, version, headers), body, upstream, writer)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    if upstream is not None:
                        upstream[1].close()
                    upstream = None
                    await respond(writer, 503, "the server is restarting: retry in a moment", close=not keep)
                    closing = False
                if closing or not keep:
                    return
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()

    async def _body(self, reader, headers: dict[str, str]) -> bytes:
        """The request's body, once its declared length is known to fit; a body over the limit is read past
        (up to a bound, in small pieces, none kept) so that the client hears the answer."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise Refusal(411, "chunked bodies are not accepted: send a Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise Refusal(400, "the Content-Length is not a number") from None
        if length < 0:
            raise Refusal(400, "the Content-Length is negative")
        if length > self.max_body:
            left = length if length <= DRAIN else 0
            while left > 0:
                left -= len(await reader.read(min(left, 1 << 16)) or b"x" * left)
            raise Refusal(413, f"a body of {length} bytes is over the server's limit of {self.max_body}")
        return await asyncio.wait_for(reader.readexactly(length), self.limits["body_seconds"]) if length else b""


def restricted(method: str, target: str) -> bool:
    """Every endpoint but health (the server's and a model's readiness) and metadata needs the token, as
    tritonserver's own restriction has it."""
    path = target.split("?")[0].rstrip("/")
    if path.startswith("/v2/health") or (method == "GET" and (path == "/v2" or OPEN_METADATA.match(path))):
        return False
    return True


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """A request's line and headers, read by h11 (a maintained HTTP/1.1 implementation, strict as RFC 9112 tells a
    server to be: one space apart, no whitespace before a header's colon, one Content-Length), with no folded lines,
    then held to what the gate forwards: an origin-form target, and no header that frames the body (or carries the
    token) given twice. Anything else is a 400, so that the gate and tritonserver never read one request two
    ways."""
    import h11

    if FOLDED.search(head):  # h11 unfolds an obsolete folded line; RFC 9112 lets a server refuse it instead
        raise Refusal(400, "a header line is folded (obsolete line folding)")
    reader = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    reader.receive_data(head if head.endswith(b"\r\n\r\n") else head.rstrip(b"\r\n") + b"\r\n\r\n")
    try:
        event = reader.next_event()
    except h11.RemoteProtocolError as exc:
        raise Refusal(400, f"the request's head is malformed ({exc})") from None
    if not isinstance(event, h11.Request):
        raise Refusal(400, "the request's head is incomplete")
    target = event.target.decode("latin-1")
    if not target.startswith("/"):
        raise Refusal(400, "the request's target is not a path (origin form, /v2/...)")
    headers: dict[str, str] = {}
    for name, value in event.headers.raw_items():
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        if key in headers and key in SINGLE_HEADERS:
            raise Refusal(400, f"the {key} header is given twice")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return event.method.decode("ascii"), target, f"HTTP/{event.http_version.decode('ascii')}", headers


def canonical_head(method: str, target: str, version: str, headers: dict[str, str]) -> bytes:
    """The request as the gate forwards it: written from what it parsed, never the client's bytes."""
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_headers(response: bytes) -> dict[str, str]:
    """tritonserver's response headers, read leniently: it is the server the gate trusts."""
    headers = {}
    for line in response.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return headers


async def forward(head: bytes, body: bytes, upstream, writer) -> bool:
    """One request upstream and its response back; True when the response closes the connection."""
    up_reader, up_writer = upstream
    up_writer.write(head + body)
    await up_writer.drain()
    response = await up_reader.readuntil(b"\r\n\r\n")
    headers = response_headers(response)
    writer.write(response)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await up_reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunk = await up_reader.readexactly(size + 2)
            writer.write(size_line + chunk)
            if size == 0:
                break
    else:
        length = int(headers.get("content-length", "0"))
        if length:
            writer.write(await up_reader.readexactly(length))
    await writer.drain()
    return headers.get("connection", "").lower() == "close"


async def respond(writer, status: int, reason: str, close: bool) -> None:
    body = json.dumps({"error": reason}).encode() if reason else b""
    text = {200: "OK", 400: "Bad Request", 403: "Forbidden", 411: "Length Required", 413: "Payload Too Large",
            429: "Too Many Requests", 503: "Service Unavailable"}
    writer.write(f"HTTP/1.1 {status} {text.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
                 .encode() + body)
    try:
        await writer.drain()
    except ConnectionError:
        pass


async def linger(reader, writer, seconds: float = 2.0, most: int = 1 << 20) -> None:
    """After a refusal that closes the connection, whatever the client still sends is read and dropped for a
    moment: closing with unread bytes resets the connection, and the client would lose the answer."""
    try:
        writer.write_eof()
        loop = asyncio.get_running_loop()
        end, read = loop.time() + seconds, 0
        while read < most and loop.time() < end:
            data = await asyncio.wait_for(reader.read(1 << 16), end - loop.time())
            if not data:
                return
            read += len(data)
    except (OSError, asyncio.TimeoutError, RuntimeError):
        pass


class Admission:
    """Calls in flight, overall and by client address, within the gate's limits; threads enter at once."""

    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = total, per_client
        self.open: dict[str, int] = {}
        self.lock = threading.Lock()

    def enter(self, client: str) -> bool:
        with self.lock:
            if sum(self.open.values()) >= self.total or self.open.get(client, 0) >= self.per_client:
                return False
            self.open[client] = self.open.get(client, 0) + 1
            return True

    def leave(self, client: str) -> None:
        with self.lock:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]


def peer_address(peer: str) -> str:
    """grpc's peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") without its port: the client's address."""
    return peer.rsplit(":", 1)[0]


class GrpcGate:
    """gRPC in front of tritonserver's gRPC port: messages over the limit refused by length before they are read,
    calls in flight capped overall and per client address, idle connections closed (the HTTP gate's `LIMITS`),
    unary calls forwarded as bytes with their metadata and deadline."""

    def __init__(self, host: str, port: int, upstream: int, max_message: int, state: Callable[[], str],
                 limits: dict | None = None):
        import grpc

        self.grpc, self.state = grpc, state
        limits = {**LIMITS, **(limits or {})}
        self.admission = Admission(limits["connections"], limits["per_client"])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{upstream}", options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        self.server = grpc.server(ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc-gate"), options=[
            ("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0), ("grpc.max_connection_idle_ms", int(limits["idle_seconds"] * 1000))])
        self.server.add_generic_rpc_handlers((self,))
        if not self.server.add_insecure_port(f"{host}:{port}"):
            raise OSError(f"cannot listen on {host}:{port}")

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=2).wait()
        self.channel.close()

    def service(self, details):
        """Every unary method, forwarded; streaming ones (not used by bbt-onnx) are left unimplemented."""
        if details.method.endswith("ModelStreamInfer"):
            return None
        call = self.channel.unary_unary(details.method)
        grpc = self.grpc

        def forward_call(request: bytes, context):
            client = peer_address(context.peer())
            if not self.admission.enter(client):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls at once: retry in a moment")
            try:
                return forward(request, context)
            finally:
                self.admission.leave(client)

        def forward(request: bytes, context):
            state = self.state()
            if state != "serving":
                if details.method.endswith("/ServerLive") and state != "stopping":
                    return LIVE  # the process is alive while its models load
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the server is {state}: retry in a moment")
            metadata = [(k, v) for k, v in context.invocation_metadata()
                        if not k.startswith((":", "grpc-")) and k != "user-agent"]
            remaining = context.time_remaining()  # without a client deadline, a huge number: none then
            try:
                return call(request, metadata=metadata, timeout=remaining if remaining and remaining < 1e6 else None)
            except grpc.RpcError as exc:
                code, text = exc.code(), exc.details() or exc.code().name
                if code == grpc.StatusCode.UNAVAILABLE and "restricted" not in text.lower():
                    text = "the server is restarting: retry in a moment"  # tritonserver unreachable from here
                context.abort(code, text)

        return grpc.unary_unary_rpc_method_handler(forward_call)
