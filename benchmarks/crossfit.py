"""Measured before building: does a two-seed ensemble gain when one seed tunes on the dev rows (and is chosen on
the training rows) instead of both tuning on the same 32 training rows? And does one seed gain from all 64 rows?

For each data seed, k = 16 per class drawn for train and for dev as `tune` draws them (SmolLM2, the `cpu`
configuration of real_fewshot.py, a suffix prompt), then, at equal calls:
  same    seeds 0 and 1 on train, chosen on dev (what `tune --seeds 0,1` does): their ensemble;
  cross   seed 0 on train (chosen on dev) with seed 1 on dev (chosen on train): their ensemble;
  all64   seed 0 on train and dev together, no dev (each seed's last mean);
Test accuracy of each (tuned prompts, no template choice), and the plain template's. Nothing is chosen on test.

usage: python benchmarks/crossfit.py [--task mr|bbc] [--setting suffix|suffix-chat] [--data-seeds 0,1,2]
       [--budget N] [--test-rows N] [--variants same,cross,all64] [--runs runs/crossfit]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import prepare  # noqa: E402
from real_fewshot import CONFIGS, SETTINGS, TASKS, ensure_model  # noqa: E402

from bbt_onnx import ChoicePolicy, tune  # noqa: E402
from bbt_onnx.data import DataSpec, load_splits  # noqa: E402
from bbt_onnx.engines import OrtSpec  # noqa: E402
from bbt_onnx.model import Model  # noqa: E402
from bbt_onnx import losses  # noqa: E402
from bbt_onnx.prompt import PromptEnsemble, TunedPrompt, load_prompt  # noqa: E402
from bbt_onnx.synthetic import write_csv  # noqa: E402


def write_rows(path: Path, rows) -> Path:
    return write_csv(path, [(r.text, r.label) for r in rows], header=("text", "label"))


def accuracy(results, model, rows, keys) -> float:
    """Test accuracy of one result, or of several averaged (each read in its own framing: seeds tuned on other
    rows may start from other placeholder tokens)."""
    results = results if isinstance(results, list) else [results]
    logits = losses.mixed([r.logits(model, rows) for r in results], [1 / len(results)] * len(results))
    labels = np.array([keys.index(r.label) for r in rows])
    return float((logits.argmax(axis=-1) == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="mr")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="suffix")
    ap.add_argument("--data-seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, help="calls a seed [default: the cpu configuration's]")
    ap.add_argument("--test-rows", type=int, default=0, help="score the first N test rows [default: all]")
    ap.add_argument("--variants", default="same,cross,all64")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--runs", type=Path, default=Path("runs/crossfit"))
    args = ap.parse_args()
    ensure_model(args.model_dir, "fp32", deep=False)
    data = prepare(args.task, args.data_dir)
    task = replace(TASKS[args.task], framing=SETTINGS[args.setting])
    keys = list(task.label_keys)
    config = replace(CONFIGS["cpu"][args.task], checkpoint_every=0)
    config = replace(config, budget=args.budget or config.budget)
    model = Model.load(str(args.model_dir), OrtSpec())
    test = load_splits(DataSpec(train=str(data / "test.csv")), keys).train
    test = test[:args.test_rows] if args.test_rows else test
    variants = args.variants.split(",")
    quiet = ChoicePolicy(fallback=False)
    rows = []
    for d in (int(s) for s in args.data_seeds.split(",")):
        work = args.runs / f"{args.task}-{args.setting}-d{d}"
        work.mkdir(parents=True, exist_ok=True)
        splits = load_splits(DataSpec(data=str(data / "pool.csv"), k_shot=16, seed=d), keys)
        train, dev = write_rows(work / "train.csv", splits.train), write_rows(work / "dev.csv", splits.dev)
        both = write_rows(work / "all64.csv", splits.train + splits.dev)
        started = time.perf_counter()

        def run(name, spec, seeds):
            """Each seed's tuned prompt (the run keeps the tuned side: no fallback); a finished run is read back."""
            done = work / name / "run.json"
            if not (done.is_file() and json.loads(done.read_text()).get("status") == "complete"):
                t0 = time.perf_counter()
                tune(str(args.model_dir), task, spec, work / name, config=replace(config, seed=seeds[0]),
                     seeds=seeds, policy=quiet, force=True)
                print(f"d{d} {name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            kept = load_prompt(work / name)
            return list(kept.members) if isinstance(kept, PromptEnsemble) else [kept]

        same = run("same", DataSpec(train=str(train), dev=str(dev)), (0, 1))
        row = {"task": args.task, "setting": args.setting, "data_seed": d,
               "template": accuracy(TunedPrompt.template(model.manifest, task), model, test, keys),
               "seed0_train": accuracy(same[0], model, test, keys),
               "seed1_train": accuracy(same[1], model, test, keys),
               "same": accuracy(same, model, test, keys)}
        if "cross" in variants:
            (swapped,) = run("swapped", DataSpec(train=str(dev), dev=str(train)), (1,))
            row.update(seed1_dev=accuracy(swapped, model, test, keys),
                       cross=accuracy([same[0], swapped], model, test, keys))
        if "all64" in variants:
            (all64,) = run("all64", DataSpec(train=str(both)), (0,))
            row.update(all64=accuracy(all64, model, test, keys))
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for key in [k for k in rows[0] if k not in ("task", "setting", "data_seed", "seconds")]:
        print(f"{key:12s} {np.mean([r[key] for r in rows]):.4f}  " + " ".join(f"{r[key]:.4f}" for r in rows),
              file=sys.stderr)


if __name__ == "__main__":
    main()
