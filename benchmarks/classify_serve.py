"""The served classifier under load: single texts from 1 and from 8 concurrent clients, with and without dynamic
batching, measured side by side on one tritonserver (the 2.51 binary PyTriton ships, python backend).

    python benchmarks/classify_serve.py --model models/smollm2 --prompt runs/demo-bbc --data .data/bbc/test.csv

One repository holds the run's classifier twice: NAME.classify (dynamic batching, as `deploy --format triton`
and `serve --prompt` write it) and NAME.nobatch (the same, batching off). Each client sends one text per request,
back to back (a process each), a bounded number of requests; the settings alternate, so that both meet the same machine. Prints
p50 and p99 latency and texts/s for each, and the ratio of texts/s at 8 clients (batching on / off); --json for
the numbers. The server listens on loopback only and stops at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bbt_onnx.data import read_examples
from bbt_onnx.deploy import prepare, write_checked
from bbt_onnx.deploy.triton import ClassifierModel, add_classifier
from bbt_onnx.engines.served import served_name
from bbt_onnx.manifest import load_manifest
from bbt_onnx.serving.tritonserver import TritonProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client(job: tuple[int, str, list[str]]) -> tuple[list[float], int, float, float]:
    """One client process: single texts back to back; (latencies, errors, start, end)."""
    import tritonclient.http as httpclient

    port, model, texts = job
    conn = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
    latencies, errors = [], 0
    first = time.time()
    for text in texts:
        item = httpclient.InferInput("text", [1, 1], "BYTES")
        item.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        start = time.perf_counter()
        try:
            conn.infer(model, [item])
        except Exception:  # noqa: BLE001 - counted and reported
            errors += 1
            continue
        latencies.append(time.perf_counter() - start)
    conn.close()
    return latencies, errors, first, time.time()


def load(pool, port: int, model: str, texts: list[str], clients: int, per_client: int) -> dict:
    """`clients` processes (no shared interpreter lock), each sending `per_client` single texts back to back."""
    jobs = [(port, model, [texts[(c * per_client + i) % len(texts)] for i in range(per_client)])
            for c in range(clients)]
    done = pool.map(client, jobs, chunksize=1)
    latencies = [x for d in done for x in d[0]]
    wall = max(d[3] for d in done) - min(d[2] for d in done)
    ms = np.array(latencies) * 1e3
    return {"clients": clients, "texts": len(latencies), "errors": sum(d[1] for d in done), "seconds": wall,
            "texts_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True, help="A finished run (or its prompt.npz).")
    ap.add_argument("--data", required=True, help="Texts to send (CSV/TSV/JSONL with a text column).")
    ap.add_argument("--per-client", type=int, default=16, help="Requests each client sends per measurement.")
    ap.add_argument("--rounds", type=int, default=2, help="Alternating rounds of every setting.")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads per instance [0: every core].")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    manifest = load_manifest(args.model)
    texts = [r.text for r in read_examples(args.data)]
    clf, prompt = prepare(manifest, args.prompt)
    work = Path(tempfile.mkdtemp(prefix="bbt-classify-bench-"))
    repo = work / "repository"
    base = served_name(manifest)
    names = {True: f"{base}.classify", False: f"{base}.nobatch"}
    for batching, name in names.items():
        add_classifier(repo, ClassifierModel(name, clf, "python", threads=args.threads or None, batching=batching),
                       lambda folder: write_checked(folder, clf, manifest, prompt, "fp32"))
    http, grpc = free_port(), free_port()
    server = TritonProcess(repo, work, http, grpc, log_file=work / "tritonserver.log")

    def ready() -> bool:
        try:
            return all(urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{n}/ready", timeout=2).status
                       == 200 for n in names.values())
        except OSError:
            return False

    server.start(timeout=300, ready=ready)
    runs: dict[tuple[bool, int], list[dict]] = {}
    pool = multiprocessing.get_context("spawn").Pool(8)
    try:
        for batching in names:  # warm both
            load(pool, http, names[batching], texts, 8, 2)
        for r in range(args.rounds):
            for clients in (1, 8):
                for batching in ((True, False) if r % 2 == 0 else (False, True)):
                    result = load(pool, http, names[batching], texts, clients, args.per_client)
                    runs.setdefault((batching, clients), []).append(result)
                    print(f"round {r + 1}: {clients} client(s), batching {'on' if batching else 'off'}: "
                          f"{result['texts_per_s']:.1f} texts/s", file=sys.stderr)
    finally:
        pool.terminate()
        server.stop()

    def merged(results: list[dict]) -> dict:
        return {"clients": results[0]["clients"], "texts": sum(r["texts"] for r in results),
                "errors": sum(r["errors"] for r in results),
                "texts_per_s": sum(r["texts"] for r in results) / sum(r["seconds"] for r in results),
                "p50_ms": float(np.median([r["p50_ms"] for r in results])),
                "p99_ms": float(max(r["p99_ms"] for r in results))}

    table = {f"{'on' if b else 'off'}-{c}": merged(v) for (b, c), v in sorted(runs.items())}
    report = {"machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
              "model": args.model, "prompt": args.prompt, "classifier_inputs": clf.input_names, "runs": table,
              "batching_gain_at_8": table["on-8"]["texts_per_s"] / table["off-8"]["texts_per_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("| Dynamic batching | Clients | Texts | Errors | p50 ms | p99 ms | Texts/s |\n|---|---|---|---|---|---|---|")
    for key, row in table.items():
        print(f"| {key.split('-')[0]} | {row['clients']} | {row['texts']} | {row['errors']} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['texts_per_s']:.1f} |")
    print(f"\nbatching lifts texts/s at 8 clients {report['batching_gain_at_8']:.2f}x ({report['machine']})")


if __name__ == "__main__":
    main()
