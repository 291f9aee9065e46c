"""One population across a server's instances: `tune --server URL --shards N`, side by side in one run.

Writes a python-backend Triton repository of the model with `--instances` instances (one CPU thread each, as
`triton-repo --backend python --kind cpu --threads 1` writes it), starts the tritonserver PyTriton ships on loopback
ports, and tunes the same lock-step seeds through it at each `--shards` value in turn, `--repeat` rounds
alternating. Prints one JSON object: each N's best wall time and calls/s, its ratio to N = 1, and whether every
run's z equals the first's, bit for bit.

usage: python benchmarks/shards.py --model DIR --data POOL.csv [--task-file F | --task sst2] [--shards 1,2,4]
       [--instances 2] [--seeds 0,1,2] [--budget 60] [--popsize 10] [--prompt-tokens 10] [--position prefix|suffix] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bbt_onnx import PRESETS, TuneConfig
from bbt_onnx.choice import ChoicePolicy
from bbt_onnx.data import DataSpec
from bbt_onnx.engines import Remote, TritonSpec
from bbt_onnx.jobs.tune import TuneRequest, tune
from bbt_onnx.manifest import load_manifest
from bbt_onnx.serving.repository import RepoOptions, write_repo
from bbt_onnx.serving.server import free_port
from bbt_onnx.serving.tritonserver import TritonProcess
from bbt_onnx.tasks import load_task_file, make_framing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--task-file")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--popsize", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=10)
    ap.add_argument("--position", choices=["prefix", "suffix"], default="prefix")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    task = load_task_file(args.task_file) if args.task_file else PRESETS[args.task]
    if args.position == "suffix":
        task = replace(task, framing=make_framing(bos="never", position="suffix", base=task.framing))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    config = TuneConfig(prompt_tokens=args.prompt_tokens, intrinsic_dim=100, popsize=args.popsize, budget=args.budget,
                        eval_every=args.budget, checkpoint_every=0, prompt_init="reference", seed=seeds[0])
    work = Path(tempfile.mkdtemp(prefix="bbt-shards-"))
    write_repo(RepoOptions(args.model, str(work / "repo"), backend="python", kind="cpu", precision="fp32",
                           instances=args.instances, threads=1))
    http = free_port()
    grpc = next(p for p in iter(free_port, None) if p != http)
    server = TritonProcess(work / "repo", work, http, grpc, log_file=work / "tritonserver.log")
    print(f"starting tritonserver ({args.instances} instances) on 127.0.0.1:{http}", file=sys.stderr)
    server.start(timeout=600)
    try:
        best: dict[int, float] = {}
        zs: list[np.ndarray] = []
        counts = [int(n) for n in args.shards.split(",")]
        for rnd in range(args.repeat):
            for n in counts:
                spec = TritonSpec(Remote(f"http://127.0.0.1:{http}", shards=n).check())
                request = TuneRequest(args.model, task, DataSpec(args.data, k_shot=16, seed=seeds[0]), config,
                                      str(work / f"run-{n}-{rnd}"), spec, seeds, ChoicePolicy(fallback=False))
                t0 = time.perf_counter()
                outcome = tune(request)
                wall = outcome.metrics["wall_seconds"]
                best[n] = min(best.get(n, float("inf")), wall)
                zs.append(np.stack([p.z for p in outcome.seed_prompts]))
                print(f"round {rnd}, shards {n}: search {wall:.1f} s (job {time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr)
        calls = args.budget * len(seeds)
        print(json.dumps({"instances": args.instances, "seeds": len(seeds), "popsize": args.popsize,
                          "calls": calls, "search_seconds": {n: round(best[n], 2) for n in counts},
                          "calls_per_second": {n: round(calls / best[n], 3) for n in counts},
                          "speedup_over_1": {n: round(best[counts[0]] / best[n], 3) for n in counts},
                          "z_identical": all(np.array_equal(z, zs[0]) for z in zs), "model": load_manifest(args.model).source}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
