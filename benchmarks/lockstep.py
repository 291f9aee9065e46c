"""Seeds in lock-step against the same seeds one after another: calls/s side by side, in one process, and every
seed's z compared bit for bit.

usage: python benchmarks/lockstep.py --model DIR --data POOL.csv [--task-file F | --task sst2] [--seeds 0,1,2]
       [--budget 60] [--popsize 10] [--prompt-tokens 10] [--intrinsic-dim 100] [--position prefix|suffix]
       [--device cpu|cuda] [--precision fp32|fp16] [--repeat 2]
Prints one JSON object: the search's wall time and calls/s of each way (the best of --repeat), their ratio, and
whether every z matched.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from bbt_onnx import PRESETS, TuneConfig
from bbt_onnx.choice import ChoicePolicy
from bbt_onnx.data import DataSpec
from bbt_onnx.engines import OrtSpec
from bbt_onnx.tasks import load_task_file, make_framing
from bbt_onnx.jobs.tune import TuneRequest, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--task-file")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--popsize", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=10)
    ap.add_argument("--intrinsic-dim", type=int, default=100)
    ap.add_argument("--position", choices=["prefix", "suffix"], default="prefix")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    task = load_task_file(args.task_file) if args.task_file else PRESETS[args.task]
    if args.position == "suffix":
        task = replace(task, framing=make_framing(bos="never", position="suffix", base=task.framing))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    config = TuneConfig(prompt_tokens=args.prompt_tokens, intrinsic_dim=args.intrinsic_dim, popsize=args.popsize,
                        budget=args.budget, eval_every=args.budget, checkpoint_every=0,
                        prompt_init="reference")
    engine = OrtSpec(args.device, args.precision)
    work = Path(tempfile.mkdtemp(prefix="bbt-lockstep-"))

    def request(out: str, seed: int, together: tuple[int, ...] = ()) -> TuneRequest:
        return TuneRequest(args.model, task, DataSpec(args.data, k_shot=16, seed=seeds[0]), replace(config, seed=seed),
                           str(work / out), engine, together,
                           ChoicePolicy(fallback=False))

    best = {"lock-step": float("inf"), "one after another": float("inf")}
    together_z, alone_z = [], []
    for r in range(args.repeat):  # alternating, so that neither way gets the warmer machine
        outcome = tune(request(f"together{r}", seeds[0], seeds), force=True)
        best["lock-step"] = min(best["lock-step"], outcome.metrics["wall_seconds"])
        together_z = [p.z.tobytes() for p in outcome.seed_prompts]
        alone = [tune(request(f"alone{r}-{s}", s), force=True) for s in seeds]
        best["one after another"] = min(best["one after another"], sum(o.metrics["wall_seconds"] for o in alone))
        alone_z = [o.tuned.z.tobytes() for o in alone]
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in best.items()), file=sys.stderr)
    calls = args.budget * len(seeds)
    print(json.dumps({
        "seeds": list(seeds), "calls": calls, "engine": f"{args.device}:{args.precision}",
        "wall_seconds": best, "calls_per_second": {k: calls / v for k, v in best.items()},
        "lockstep_speedup": best["one after another"] / best["lock-step"],
        "z_identical": together_z == alone_z,
        "note": "the search's wall time (its dev scorings included); the baselines each run scores once are not"},
        indent=1))


if __name__ == "__main__":
    main()
