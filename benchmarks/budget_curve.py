"""Accuracy against calls: one search to the largest budget, what a run of each smaller budget would have kept.

A run of budget B follows the same CMA-ES path as a longer one up to B calls, and keeps its best-dev z at the end,
so one search, stopped to be read at each budget, gives every point: each seed's best-dev prompt, and the seeds'
ensemble, scored on the test rows. Dev is read every `--eval-every` calls (a divisor of every budget, so that no
point sees a dev evaluation its own run would not have made). The start, the words (`--verbalizer`) and the rows are
chosen as `bbt-onnx tune` chooses them (its own `prepare` step), on the same k-shot draw as real_fewshot.py.

usage: python benchmarks/budget_curve.py --task mr|bbc [--setting suffix|suffix-chat] [--data-seed 0]
       [--tune-seeds 0,1,2] [--budgets 50,100,200,400] [--eval-every 50] [--verbalizer labels|auto[:K]]
       [--calibrate] [--prompt-init auto|reference|TEXT] [--test-rows N] [--model-dir models/smollm2] [--data-dir .data]
Prints one JSON line per budget on stdout (seeds' and ensemble's dev and test metric, calls, seconds so far).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_fewshot import CONFIGS, SETTINGS, TASKS  # noqa: E402
from real_data import prepare as prepare_data  # noqa: E402

from bbt_onnx.data import DataSpec  # noqa: E402
from bbt_onnx.engines import OrtSpec  # noqa: E402
from bbt_onnx.jobs.settle import metric_of  # noqa: E402
from bbt_onnx.jobs.tune import Hooks, TuneRequest, prepare  # noqa: E402
from bbt_onnx.prompt import PromptEnsemble  # noqa: E402
from bbt_onnx.tuning.lockstep import LockStep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--setting", choices=SETTINGS, default="suffix")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--tune-seeds", default="0,1,2")
    ap.add_argument("--budgets", default="50,100,200,400")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--verbalizer", default="labels")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--prompt-init", default="auto", help="the start, as tune's --prompt-init")
    ap.add_argument("--test-rows", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    args = ap.parse_args()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    if any(b % args.eval_every for b in budgets):
        sys.exit("every budget must be a multiple of --eval-every")
    data = prepare_data(args.task, args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="bbt-curve-"))
    test = data / "test.csv"
    if args.test_rows:
        with open(test, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[:args.test_rows + 1]
        test = work / "test.csv"
        with open(test, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
    seeds = tuple(int(s) for s in args.tune_seeds.split(","))
    config = replace(CONFIGS["cpu"][args.task], budget=budgets[-1], eval_every=args.eval_every, checkpoint_every=0,
                     calibrate=args.calibrate, verbalizer=args.verbalizer, prompt_init=args.prompt_init,
                     seed=seeds[0])
    request = TuneRequest(str(args.model_dir), replace(TASKS[args.task], framing=SETTINGS[args.setting]),
                          DataSpec(str(data / "pool.csv"), test=str(test), k_shot=16, seed=args.data_seed), config,
                          str(work / "run"), OrtSpec(), seeds)
    job = prepare(request, Hooks(log=lambda m: print(m, file=sys.stderr)), False, False, False, False)
    task = job.request.task
    lock = LockStep(job.tuners)
    lock.start(job.train)
    t0 = time.perf_counter()
    for budget in budgets:
        while not all(t.state.calls >= budget or t.finished() for t in job.tuners):
            lock.step(job.train, job.dev)
        prompts = [t.result(job.train, job.dev) for t in job.tuners]
        ensemble = PromptEnsemble(tuple(replace(p, calibration=None) for p in prompts))
        if args.calibrate:
            ensemble = ensemble.calibrate(job.model)
        line = {"task": args.task, "data_seed": args.data_seed, "budget": budget,
                "calls": [t.state.calls for t in job.tuners], "seconds": round(time.perf_counter() - t0, 1),
                "verbalizer": args.verbalizer, "calibrate": args.calibrate, "start": job.tuners[0].start_name}
        for name, result in [(f"seed {s}", p) for s, p in zip(seeds, prompts)] + [("ensemble", ensemble)]:
            line[name] = {split: metric_of(task, result.logits(job.model, rows), rows.labels)
                          for split, rows in (("dev", job.dev), ("test", job.test))}
        print(json.dumps(line), flush=True)
        print(f"{budget} calls: ensemble test {line['ensemble']['test']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
