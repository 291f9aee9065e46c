"""Load on a served model: concurrent clients, each a tuner's engine, bounded in calls and in time.

Reports per-call latency (p50, p99), calls/s, errors and bytes per call, and the API's overhead against the same
call in process on the same graph.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..encoding import EncodedSet
from ..engines.triton import Remote, TritonEngine
from ..errors import BBTError, SettingsError
from ..manifest import Manifest, load_manifest

MAX_CLIENTS = 64


@dataclass
class LoadResult:
    clients: int
    calls: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    calls_per_s: float
    request_bytes: int  # per call: prompts and rows as sent
    response_bytes: int  # per call: the label logits
    wall_s: float
    first_error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def parse_clients(text: str) -> list[int]:
    try:
        counts = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise SettingsError(f"clients {text!r} is not a comma-separated list of integers, e.g. 1,4,8",
                            "clients") from None
    if not counts or any(not 1 <= c <= MAX_CLIENTS for c in counts):
        raise SettingsError(f"clients takes counts in 1..{MAX_CLIENTS}, e.g. 1,4,8; got {text!r}", "clients")
    return counts


def load_test(manifest: Manifest, remote: Remote, prompts: np.ndarray, rows: EncodedSet, clients: int,
              calls_per_client: int, max_seconds: float) -> LoadResult:
    """`clients` threads, each with its own connection, send the same population call until each has made
    `calls_per_client` calls or `max_seconds` have passed, whichever comes first."""
    engines = [TritonEngine(manifest, remote) for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    warm, go = threading.Barrier(clients + 1), threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        try:  # this thread's connection and a first call, outside the timing
            engines[i].label_logits(prompts, rows)
        except BBTError as exc:
            errors.append(str(exc))
        warm.wait()
        go.wait()  # the deadline is set between the two
        for _ in range(calls_per_client):
            if time.perf_counter() > deadline[0]:
                return
            t0 = time.perf_counter()
            try:
                engines[i].label_logits(prompts, rows)
            except BBTError as exc:
                errors.append(str(exc))
                continue
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    warm.wait()
    t0 = time.perf_counter()
    deadline[0] = t0 + max_seconds
    go.wait()
    for t in threads:
        t.join(timeout=max_seconds + 60)
    wall = time.perf_counter() - t0
    done = np.array([x for lat in latencies for x in lat]) * 1000
    sent = sum(e.bytes_sent for e in engines) / max(sum(e.calls for e in engines), 1)
    return LoadResult(clients, len(done), len(errors), float(np.percentile(done, 50)) if len(done) else None,
                      float(np.percentile(done, 99)) if len(done) else None, len(done) / wall if wall else 0.0,
                      int(sent), int(prompts.shape[0] * len(rows) * len(rows.label_ids) * 4), wall,
                      errors[0] if errors else None)


def server_report(model_dir: str, remote: Remote, device: str, batch: int, seq: int, repeat: int,
                  threads: int | None, counts: list[int], calls: int, max_seconds: float,
                  log: Callable[[str], None] = lambda _m: None) -> dict:
    """`bench --server`: a load run per client count on synthetic population calls, then the same call in
    process when the directory has the served graph, for the API's overhead at one client."""
    from ..timing import median_ms, synthetic_inputs
    from ..engines.ort import OrtEngine

    manifest = load_manifest(model_dir, graphs=False)
    prompts, enc = synthetic_inputs(manifest, batch, seq)
    probe = TritonEngine(manifest, remote)
    report = {"server": remote.url, "model": probe.model, "precision": probe.precision, "batch": batch, "seq": seq,
              "load": []}
    for count in counts:
        log(f"{count} client(s) x {calls} calls (at most {max_seconds:g} s)")
        report["load"].append(load_test(manifest, remote, prompts, enc, count, calls, max_seconds).to_json())
    graph = manifest.graphs.get(probe.precision)
    if graph is None or not (manifest.directory / graph.file).is_file():
        report.update(in_process_ms=None, api_overhead=None,
                      in_process_note=f"{model_dir} has no {probe.precision} graph to run in process")
        return report
    log(f"the same call in process ({probe.precision} on {device})")
    engine = OrtEngine(manifest, precision=probe.precision, device=device, threads=threads)  # checks the graph's sha256
    report["in_process_ms"] = median_ms(lambda: engine.label_logits(prompts, enc), max(repeat, calls))
    single = next((r for r in report["load"] if r["clients"] == 1 and r["p50_ms"] is not None), None)
    report["api_overhead"] = None if single is None else single["p50_ms"] / report["in_process_ms"] - 1
    return report


def format_load(report: dict) -> str:
    lines = [f"{report['server']} ({report['model']}, {report['precision']}): {report['batch']} sequences x "
             f"{report['seq']} tokens per call"]
    lines.append(f"{'clients':>7} {'calls':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8} "
                 f"{'KB/call':>8}")
    for r in report["load"]:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        lines.append(f"{r['clients']:>7} {r['calls']:>6} {r['errors']:>6} {p50:>8} {p99:>8} {r['calls_per_s']:>8.2f} "
                     f"{r['request_bytes'] / 1024:>8.0f}")
    if report.get("api_overhead") is not None:
        lines.append(f"in process, same graph: {report['in_process_ms']:.1f} ms per call; API overhead at 1 client: "
                     f"{report['api_overhead']:+.1%}")
    else:
        lines.append(f"API overhead not measured: {report.get('in_process_note') or 'no run with 1 client'}")
    return "\n".join(lines)
