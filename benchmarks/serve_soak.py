"""A soak test of `bbt-onnx serve` on loopback: tuners and hostile requests together, bounded in time and count.

Several tuners (half over HTTP, half over gRPC) run tunes through one server, one after another, for --minutes;
each tune's z is compared with the same tune in process. Meanwhile --hostile requests, drawn from every class of
bad request a token holder can send, are spread over the run. At the end the server gets SIGTERM, and what it
left (processes, shared memory, its workspace) is looked for. The report (JSON on stdout, a summary on stderr):
tunes and tuner errors, z mismatches, hostile requests by class and answer, tracebacks seen in any answer,
tritonserver restarts, and what outlived the server.

usage: python benchmarks/serve_soak.py [--model DIR] [--minutes 10] [--tuners 8] [--hostile 1000] [--half-open 100]
       [--json-out F]
Without --model it exports a tiny random RoBERTa (with its deep graph) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from bbt_onnx import Model, OrtSpec, PRESETS, Remote, TritonSpec, TuneConfig
from bbt_onnx.data import DataSpec
from bbt_onnx.synthetic import sentiment_examples, sentiment_rows, write_csv
from bbt_onnx.jobs.tune import TuneRequest, tune

TOKEN = "soak-token-0123456789"
P = 8


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tiny_model(root: Path) -> Path:
    from bbt_onnx_export import ExportOptions, export_model
    from bbt_onnx_export.tiny import make_tiny

    src = make_tiny(root / "tiny-roberta", layers=3, init_std=0.5)
    export_model(ExportOptions(str(src), root / "model", prompt_tokens=P, deep=True))
    return root / "model"


def children(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


class Hostile:
    """Every class of bad request, one request at a time: (class, status or code, the answer's text)."""

    def __init__(self, http: int, grpc: int, model: Model):
        self.http, self.grpc = http, grpc
        self.pending: list[tuple[float, socket.socket]] = []  # half-open connections, by when they began
        enc = model.encoder(PRESETS["sst2"], P).encode(sentiment_examples(4, seed=0))
        m = model.manifest
        self.good = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "mask_pos": enc.mask_pos,
                     "label_ids": enc.label_ids, "prompt_embeds": np.zeros((2, P, m.hidden_size), np.float32)}
        self.deep = {**self.good, "deep_prompts": np.zeros((m.num_layers, P, m.hidden_size), np.float32),
                     "prompt_layer": np.array([1], np.int64)}
        h = m.hidden_size
        huge = json.dumps({"inputs": [{"name": "input_ids", "shape": [1000000] * 3, "datatype": "INT64",
                                       "data": [1]}]}).encode()
        self.classes = {
            "json-huge-shape": lambda: self.raw(huge),
            "json-not-json": lambda: self.raw(b"{"),
            "json-shape-not-data": lambda: self.raw(json.dumps({"inputs": [{"name": "input_ids", "shape": [4, 4],
                                                                            "datatype": "INT64", "data": [1, 2]}]})
                                                    .encode()),
            "body-over-limit": lambda: self.raw(b"0" * 8_000_000),
            "chunked": lambda: self.raw(b"x", {"Transfer-Encoding": "chunked"}),
            "no-token": lambda: self.raw(b"{}", token=False),
            "unknown-model": lambda: self.send({**self.good}, model="no-such-model"),
            "5000-labels": lambda: self.send({**self.good, "label_ids": np.arange(5000, dtype=np.int64) % 50 + 5}),
            "prompt-too-long": lambda: self.send({**self.good, "prompt_embeds": np.zeros((2, P + 5, h), np.float32)}),
            "mask-past-row": lambda: self.send({**self.good, "mask_pos": self.good["mask_pos"] + 999}),
            "id-past-vocab": lambda: self.send({**self.good, "input_ids": self.good["input_ids"] + 10**7}),
            "nan-prompt": lambda: self.send({**self.good, "prompt_embeds": np.full((2, P, h), np.nan, np.float32)}),
            "over-c-n-t": lambda: self.send({**self.good, "prompt_embeds": np.zeros((200, P, h), np.float32),
                                             "input_ids": np.ones((64, 60), np.int64),
                                             "attention_mask": np.ones((64, 60), np.int64),
                                             "mask_pos": np.ones(64, np.int64)}),
            "prompt-layer-99": lambda: self.send({**self.deep, "prompt_layer": np.array([99], np.int64)},
                                                 model="tiny-roberta.deep"),
            "grpc-huge-shape": lambda: self.grpc_huge(),
            "grpc-over-max-message": lambda: self.send({**self.good, "prompt_embeds": np.zeros((256, P, h * 64),
                                                                                              np.float32)}, "grpc"),
            "grpc-5000-labels": lambda: self.send({**self.good, "label_ids": np.arange(5000, dtype=np.int64) % 50 + 5},
                                                  "grpc"),
            # what two parsers could read apart, and what tritonserver answers with a 500
            "json-shape-twice": lambda: self.raw(b'{"inputs": [{"name": "input_ids", "shape": [1], "shape": '
                                                 b'[1000000, 1000000, 1000000], "datatype": "INT64", "data": [1]}]}'),
            "json-inputs-twice": lambda: self.raw(b'{"inputs": [], "inputs": [{"name": "input_ids", "shape": '
                                                  b'[1000000, 1000000, 1000000], "datatype": "INT64", "data": [1]}]}'),
            "json-deep-nesting": lambda: self.raw(b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
            "json-utf16": lambda: self.raw('{"inputs": [{"name": "mask_pos", "shape": [1], "datatype": "INT64", '
                                           '"data": [0]}]}'.encode("utf-16")),
            "json-string-in-int64": lambda: self.raw(b'{"inputs": [{"name": "mask_pos", "shape": [1], "datatype": '
                                                     b'"INT64", "data": ["0"]}]}'),
            "http-absolute-url": lambda: self.head(b"POST http://x/v2/models/tiny-roberta/infer HTTP/1.1"),
            "http-two-spaces": lambda: self.head(b"POST  /v2/models/tiny-roberta/infer HTTP/1.1"),
            "http-space-before-colon": lambda: self.head(b"POST /v2/models/tiny-roberta/infer HTTP/1.1",
                                                         b"Content-Length : 2"),
            "http-half-open": lambda: self.half_open(),
        }

    def head(self, line: bytes, length: bytes = b"Content-Length: 2") -> tuple[int, str]:
        """A request whose head a strict HTTP/1.1 parser must refuse, sent as raw bytes."""
        request = line + b"\r\nHost: x\r\ntriton-access-token: " + TOKEN.encode() + b"\r\n" + length + b"\r\n\r\n{}"
        try:
            with socket.create_connection(("127.0.0.1", self.http), timeout=30) as conn:
                conn.sendall(request)
                answer = conn.recv(4096).decode(errors="replace")
        except OSError as exc:
            return -1, f"{type(exc).__name__}: {exc}"
        first = answer.split("\r\n", 1)[0].split(" ")
        return (int(first[1]) if len(first) > 1 and first[1].isdigit() else -1), answer.split("\r\n\r\n", 1)[-1]

    def half_open(self) -> tuple[int, str]:
        """A head begun and never finished, without a token, left open: `closed()` checks at the end that the
        gate closed every one by its head timeout."""
        try:
            conn = socket.create_connection(("127.0.0.1", self.http), timeout=30)
            conn.sendall(b"POST /v2/models/tiny-roberta/infer HTTP/1.1\r\nHost: x\r\n")
        except OSError as exc:
            return -1, f"{type(exc).__name__}: {exc}"
        self.pending.append((time.monotonic(), conn))
        return 0, "left half-open"

    def closed(self, within: float) -> dict:
        """Of the half-open connections, how many the gate closed, and how many were still open `within` seconds
        after they began (waiting for those that are younger)."""
        closed = hung = 0
        for began, conn in self.pending:
            time.sleep(max(0.0, began + within - time.monotonic()))
            conn.settimeout(0.5)
            try:
                data = conn.recv(4096)
                closed += 1 if data is not None else 0  # an answer or the end of the stream: closed by the gate
            except socket.timeout:
                hung += 1
            except OSError:
                closed += 1  # reset by the gate
            finally:
                conn.close()
        return {"half_open": len(self.pending), "closed": closed, "still_open": hung}

    def raw(self, body: bytes, headers=None, token=True) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}/v2/models/tiny-roberta/infer", data=body,
                                         method="POST", headers={"Content-Type": "application/json", **(headers or {}),
                                                                 **({"triton-access-token": TOKEN} if token else {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return -1, f"{type(exc).__name__}: {exc}"

    def send(self, feeds, protocol="http", model="tiny-roberta") -> tuple[int, str]:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        module = httpclient if protocol == "http" else grpcclient
        client = module.InferenceServerClient(f"127.0.0.1:{self.http if protocol == 'http' else self.grpc}")
        inputs = []
        for name, value in feeds.items():
            item = module.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
            item.set_data_from_numpy(value)
            inputs.append(item)
        key = ("triton-grpc-protocol-" if protocol == "grpc" else "") + "triton-access-token"
        try:
            client.infer(model, inputs, headers={key: TOKEN})
            return 200, ""
        except Exception as exc:  # noqa: BLE001 - the answer is the point
            status = getattr(exc, "status", lambda: None)()
            return (int(status) if str(status).isdigit() else str(status)), str(exc)
        finally:
            client.close()

    def grpc_huge(self) -> tuple[int, str]:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        item = grpcclient.InferInput("input_ids", [1000000] * 3, "INT64")
        item._raw_content = np.ones(4, np.int64).tobytes()  # the declared shape, with 4 values behind it
        try:
            client.infer("tiny-roberta", [item], headers={"triton-grpc-protocol-triton-access-token": TOKEN})
            return 200, ""
        except Exception as exc:  # noqa: BLE001
            return str(exc.status()), str(exc)
        finally:
            client.close()


HEAD_TIMEOUT = 10.0  # the gate's LIMITS["head_seconds"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def half_open_burst(port: int, pid: int, count: int) -> dict:
    """`count` connections without a token that begin a head and never finish it, all at once: serve's memory
    before and at its highest while they are open, and when the last of them was closed by the gate."""
    before, peak, conns = rss_mib(pid), 0.0, []
    t0 = time.monotonic()
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=HEAD_TIMEOUT * 3)
        conn.sendall(b"POST /v2/models/tiny-roberta/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000")
        conns.append(conn)
    open_ = set(range(count))
    while open_ and time.monotonic() - t0 < HEAD_TIMEOUT * 3:
        peak = max(peak, rss_mib(pid))
        for i in list(open_):
            conns[i].settimeout(0.01)
            try:
                conns[i].recv(4096)
                open_.discard(i)  # answered or closed: the gate let it go
            except socket.timeout:
                pass
            except OSError:
                open_.discard(i)
        time.sleep(0.1)
    for conn in conns:
        conn.close()
    return {"connections": count, "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
            "all_closed": not open_, "seconds_to_close_all": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--tuners", type=int, default=8)
    ap.add_argument("--hostile", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=120)
    ap.add_argument("--half-open", type=int, default=100, help="unauthenticated half-open connections at once, "
                    "before the tuners start: the memory they cost serve and how soon the gate closes them")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bbt-soak-"))
    model_dir = args.model or tiny_model(work)
    write_csv(work / "pool.csv", sentiment_rows(120, seed=1))
    (work / "token").write_text(TOKEN + "\n")
    http, grpc, metrics = free_ports(3)
    serve = subprocess.Popen([sys.executable, "-m", "bbt_onnx.cli", "serve", "--model", str(model_dir), "--http-port",
                              str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--token-file",
                              str(work / "token"), "--max-request", "60000"],
                             stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w"))
    deadline = time.monotonic() + 300
    while "serving" not in (work / "serve.log").read_text():
        if serve.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"serve did not start: {(work / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.5)
    log = (work / "serve.log").read_text()
    workspace = Path(next(line for line in log.splitlines() if "workspace" in line).rsplit("workspace ", 1)[1])
    kids = children(serve.pid)
    burst = half_open_burst(http, serve.pid, args.half_open)

    def request(seed: int, out: Path, remote=None) -> TuneRequest:
        config = TuneConfig(prompt_tokens=P, intrinsic_dim=20, popsize=6, budget=args.budget, eval_every=36,
                            seed=seed, checkpoint_every=0)
        return TuneRequest(str(model_dir), PRESETS["sst2"], DataSpec(str(work / "pool.csv"), k_shot=8, seed=seed),
                           config, str(out), OrtSpec(threads=1) if remote is None else TritonSpec(remote))

    seeds = list(range(args.tuners))
    print(f"in-process z for {len(seeds)} seeds", file=sys.stderr)
    expected = {seed: tune(request(seed, work / f"local-{seed}")).prompt.z for seed in seeds}
    stop_at = time.monotonic() + 60 * args.minutes
    results = {"tunes": 0, "tuner_errors": [], "z_mismatches": 0}
    lock = threading.Lock()

    def tuner(i: int) -> None:
        protocol = "grpc" if i % 2 else "http"
        port = grpc if i % 2 else http
        run = 0
        while time.monotonic() < stop_at:
            seed = seeds[i]
            try:
                z = tune(request(seed, work / f"remote-{i}-{run}",
                                 Remote(f"{protocol}://127.0.0.1:{port}", TOKEN, timeout=120))).prompt.z
                with lock:
                    results["tunes"] += 1
                    results["z_mismatches"] += int(not np.array_equal(z, expected[seed]))
            except Exception as exc:  # noqa: BLE001 - counted, and the soak goes on
                with lock:
                    results["tuner_errors"].append(f"{type(exc).__name__}: {exc}")
            run += 1

    hostile = Hostile(http, grpc, Model.load(model_dir))
    answers, tracebacks = Counter(), []

    def attacker() -> None:
        names = list(hostile.classes)
        rng = random.Random(0)
        start = time.monotonic()
        gap = 0.95 * (stop_at - start) / max(args.hostile, 1)
        for k in range(args.hostile):  # the k-th request near start + k x gap, however long the others took
            time.sleep(max(0.0, start + gap * (k + rng.uniform(-0.4, 0.4)) - time.monotonic()))
            if time.monotonic() > stop_at:
                break
            name = names[k % len(names)] if k < len(names) else rng.choice(names)
            status, text = hostile.classes[name]()
            answers[(name, str(status))] += 1
            if "Traceback" in text or "site-packages" in text:
                tracebacks.append((name, text[:300]))

    threads = [threading.Thread(target=tuner, args=(i,)) for i in range(args.tuners)]
    threads.append(threading.Thread(target=attacker))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    left_open = hostile.closed(within=HEAD_TIMEOUT + 5)
    serve.send_signal(signal.SIGTERM)
    code = serve.wait(timeout=120)
    time.sleep(2)
    log = (work / "serve.log").read_text()
    report = {
        "minutes": wall / 60, "tuners": args.tuners, "tunes": results["tunes"],
        "tuner_errors": len(results["tuner_errors"]), "first_tuner_error": (results["tuner_errors"] or [None])[0],
        "z_mismatches": results["z_mismatches"], "hostile_requests": sum(answers.values()),
        "hostile_answers": {f"{name} -> {status}": n for (name, status), n in sorted(answers.items())},
        "tracebacks_in_answers": len(tracebacks), "first_traceback": (tracebacks or [None])[0],
        "half_open_during_the_run": left_open, "half_open_burst": burst,
        "tritonserver_restarts": log.count("starting it again"), "serve_exit_code": code,
        "processes_left": [p for p in kids if alive(p)], "workspace_left": workspace.exists(),
        "shared_memory_left": [str(p) for p in Path("/dev/shm").glob("bbt-*")],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    print(f"{report['tunes']} tunes, {report['tuner_errors']} tuner errors, {report['z_mismatches']} z mismatches, "
          f"{report['hostile_requests']} hostile requests, {report['tracebacks_in_answers']} tracebacks, "
          f"{report['tritonserver_restarts']} restarts, left after SIGTERM: {len(report['processes_left'])} "
          f"processes, workspace {report['workspace_left']}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
