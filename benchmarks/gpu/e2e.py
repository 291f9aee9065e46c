"""End-to-end tunes on synthetic rows: full CMA-ES and sep-CMA (--diagonal) on one loaded engine.

`bbt-onnx bench` runs one end-to-end tune with full CMA-ES only; this runs the same tune (bbt_onnx.bench's
task and rows: 32 synthetic sentiment rows, 16 per class) once per CMA-ES mode, with rows padded to about
--seq-target tokens, and reports wall time, calls/s and the engine / optimizer / host split. The JSON file is
rewritten after each mode, so a run stopped by a time limit keeps the modes it finished.

usage: python benchmarks/gpu/e2e.py MODEL_DIR [--device cuda] [--precision fp16] [--budget 8000]
       [--popsize 20] [--dim 500] [--seq-target 64] [--modes full,diagonal] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bbt_onnx import BlackBoxTuner, Model, TuneConfig
from bbt_onnx.bench import TEXTS_PER_CALL
from bbt_onnx.synthetic import sentiment_examples
from bbt_onnx.tasks import Task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--budget", type=int, default=8000)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--dim", type=int, default=500)
    ap.add_argument("--prompt-tokens", type=int, help="[default: the exported P]")
    ap.add_argument("--seq-target", type=int, default=64, help="padded tokens per row to aim for")
    ap.add_argument("--modes", default="full,diagonal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads for onnxruntime [default: all cores]")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = Model.load(args.model_dir, device=args.device, precision=args.precision, threads=args.threads)
    load_s = time.perf_counter() - t0
    m = model.manifest
    p = args.prompt_tokens or m.prompt_tokens
    if m.kind == "masked":
        task = Task("bench", " . {text} . It was {mask} .", (("0", "bad"), ("1", "great")))
    else:
        task = Task("bench", " Review: {text}\nSentiment:", (("0", " negative"), ("1", " positive")))
    out = {"model": str(args.model_dir), "device": args.device, "precision": args.precision,
           "provider": model.engine.provider, "load_seconds": load_s, "runs": []}

    rows = None
    for words in range(1, 400):  # the fewest words per row that reach --seq-target tokens
        rows = sentiment_examples(TEXTS_PER_CALL, args.seed, min_words=words, max_words=words)
        probe = BlackBoxTuner(model, task, TuneConfig(prompt_tokens=p, intrinsic_dim=args.dim, popsize=args.popsize,
                                                      budget=args.budget, checkpoint_every=0))
        if probe.encode(rows).input_ids.shape[1] >= args.seq_target:
            break
    for mode in args.modes.split(","):
        config = TuneConfig(prompt_tokens=p, intrinsic_dim=args.dim, popsize=args.popsize, budget=args.budget,
                            seed=args.seed, checkpoint_every=0, diagonal=mode == "diagonal")
        tuner = BlackBoxTuner(model, task, config)
        train = tuner.encode(rows)
        print(f"e2e {mode}: {args.budget} calls, popsize {args.popsize}, d {args.dim}, {len(train)} rows x "
              f"{train.input_ids.shape[1]} tokens, {args.precision} on {args.device}", file=sys.stderr)
        tuner.fit(train)
        r = tuner.report
        wall = r.wall_seconds
        run = {"mode": mode, "budget": args.budget, "popsize": args.popsize, "intrinsic_dim": args.dim,
               "prompt_tokens": p, "texts": len(train), "seq": int(train.input_ids.shape[1]),
               "words_per_row": words, "wall_seconds": wall, "calls_per_second": r.calls_per_second,
               "generations": r.generations, "engine_seconds": r.engine_seconds,
               "optimizer_seconds": r.optimizer_seconds, "host_seconds": r.host_seconds,
               "optimizer_and_host_share": (r.optimizer_seconds + r.host_seconds) / wall if wall else 0.0,
               "ms_per_generation": 1000 * wall / max(r.generations, 1),
               "engine_ms_per_generation": 1000 * r.engine_seconds / max(r.generations, 1),
               "optimizer_ms_per_generation": 1000 * r.optimizer_seconds / max(r.generations, 1),
               "train_loss_initial": r.train_loss_initial, "train_loss_final": r.train_loss_final}
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
