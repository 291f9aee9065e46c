"""The HTTP gate alone (no tritonserver behind it): what a refused client hears."""

import socket

import pytest

from bbt_onnx.serving.gate import HttpGate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gate():
    gate = HttpGate("127.0.0.1", free_port(), free_port(), 1 << 16, lambda: "serving", token="secret")
    gate.start()
    yield gate
    gate.stop()


def exchange(port: int, head: bytes, body: bytes) -> bytes:
    """Sends a request whose body the gate will refuse unread, then reads the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        try:
            conn.sendall(body)
        except OSError:
            pass
        answer = b""
        while chunk := conn.recv(1 << 16):
            answer += chunk
        return answer


@pytest.mark.parametrize("case,status", [("chunked", b"411"), ("over-limit", b"413"), ("no-token", b"403")])
def test_refusal_is_heard_though_the_body_is_unread(gate, case, status):
    """Closing a connection with unread bytes resets it: the client must still read the refusal, every time."""
    body = b"x" * (1 << 15)
    heads = {"chunked": b"Transfer-Encoding: chunked\r\ntriton-access-token: secret\r\n",
             "over-limit": f"Content-Length: {1 << 30}\r\ntriton-access-token: secret\r\n".encode(),
             "no-token": f"Content-Length: {len(body)}\r\n".encode()}
    head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n" + heads[case] + b"\r\n"
    for _ in range(40):
        answer = exchange(gate.port, head, body)
        assert answer.split(b" ")[1] == status, answer[:80]


@pytest.mark.parametrize("body, why", [
    (b'{"inputs": [{"name": "x", "shape": [1], "shape": [100000], "datatype": "INT64", "data": [1]}]}',
     "names 'shape' twice"),
    (b'{"inputs": [], "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}',
     "names 'inputs' twice"),
    (b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nests too deep"),
    ('{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}'.encode("utf-16"), "not UTF-8"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, "2"]}]}', "another type"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1.5]}]}', "another type"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [true]}]}', "another type"),
])
def test_a_request_two_parsers_could_read_apart_is_refused(body, why):
    """A repeated key (Python's json keeps the last, tritonserver's rapidjson the first), a nesting that exhausts
    the parser, a body that is not UTF-8 (Python reads UTF-16, tritonserver does not) or a value of another type
    than its input's datatype (tritonserver's own answer is a 500) is a 400 naming it, before anything is
    forwarded."""
    from bbt_onnx.serving.gate import Refusal, check_infer

    with pytest.raises(Refusal, match=why) as caught:
        check_infer(body, {}, 1 << 20)
    assert caught.value.status == 400
    check_infer(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}', {}, 1 << 20)
    check_infer(b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2.5]}]}', {}, 1 << 20)


def test_what_is_forwarded_is_the_header_the_gate_read_written_again():
    """The JSON header goes on as the gate wrote it from what it checked (two parsers cannot read it apart), the
    binary data after it as sent, the lengths updated; NaN and Infinity, which Python alone reads, are refused."""
    from bbt_onnx.serving.gate import Refusal, check_infer

    header = b'{ "inputs" : [ {"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}} ] }'
    headers = {"content-length": str(len(header) + 8), "inference-header-content-length": str(len(header))}
    body = check_infer(header + b"\x00" * 8, headers, 1 << 20)
    written = b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}'
    assert body == written + b"\x00" * 8
    assert headers == {"content-length": str(len(written) + 8), "inference-header-content-length": str(len(written))}
    with pytest.raises(Refusal, match="not valid JSON"):
        check_infer(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', {}, 1 << 20)


def answer(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
        return data


@pytest.mark.parametrize("request_bytes", [
    b"POST http://127.0.0.1/v2/models/m/infer HTTP/1.1\r\nHost: a\r\n\r\n",  # an absolute-URL target
    b"POST  /v2/models/m/infer HTTP/1.1\r\nHost: a\r\n\r\n",  # two spaces in the request line
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",  # a space before the colon
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\nhello",
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",  # an obsolete folded line
    b"GET /v2/health/live HTTP/1.1\r\nno colon here\r\n\r\n",
])
def test_a_request_two_http_parsers_could_read_apart_is_a_400(gate, request_bytes):
    """What RFC 9112 tells a server to refuse is refused at the gate, before the token and before any upstream: the
    ways a token holder once aborted tritonserver and smuggled a second request."""
    assert answer(gate.port, request_bytes).startswith(b"HTTP/1.1 400")


def test_a_well_formed_request_is_read_and_forwarded_as_the_gate_writes_it():
    from bbt_onnx.serving.gate import canonical_head, parse_head

    head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\nContent-Length:  12\r\nAccept: x\r\nAccept: y\r\n\r\n"
    method, target, version, headers = parse_head(head)
    assert (method, target, version) == ("POST", "/v2/models/m/infer", "HTTP/1.1")
    assert headers == {"host": "a", "content-length": "12", "accept": "x, y"}
    assert canonical_head(method, target, version, headers) == (
        b"POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 12\r\naccept: x, y\r\n\r\n")


@pytest.fixture
def strict_gate():
    limits = {"head_seconds": 0.5, "body_seconds": 0.5, "idle_seconds": 1.0, "connections": 6, "per_client": 3}
    gate = HttpGate("127.0.0.1", free_port(), free_port(), 1 << 16, lambda: "serving", token="secret",
                    limits=limits)
    gate.start()
    yield gate
    gate.stop()


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """The gate closes the connection within `seconds` (what it sends before closing is read and dropped)."""
    import time

    conn.settimeout(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if not conn.recv(1 << 16):
                return True
    except (socket.timeout, ConnectionError):
        return False
    return False


def test_slow_heads_stalled_bodies_and_idle_connections_are_closed(strict_gate):
    """A head begun and never ended, a body declared and never sent, a connection that waits without a request:
    each is closed once its time is up, without a token, so half-open connections cannot pile up."""
    port = strict_gate.port
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n")  # never ends the head
        assert closed_within(conn, 3)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\ntriton-access-token: secret\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inp")  # declares 100 bytes, sends 5
        assert closed_within(conn, 3)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        assert closed_within(conn, 4)  # idle: nothing sent at all


def test_a_body_on_an_open_endpoint_is_refused_unread(strict_gate):
    answer_ = answer(strict_gate.port, b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    assert answer_.startswith(b"HTTP/1.1 400") and b"takes no body" in answer_


def test_connections_are_capped_per_client(strict_gate):
    """The fourth connection from one address hears 429 at once; one closed makes room again."""
    import time

    held = [socket.create_connection(("127.0.0.1", strict_gate.port)) for _ in range(3)]
    time.sleep(0.2)  # the gate has counted them
    try:
        refused = answer(strict_gate.port, b"")
        assert refused.startswith(b"HTTP/1.1 429")
        held.pop().close()
        time.sleep(0.2)
        assert answer(strict_gate.port, b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                      ).startswith(b"HTTP/1.1 503")  # heard (no tritonserver behind this gate)
    finally:
        for conn in held:
            conn.close()
