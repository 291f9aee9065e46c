"""End-to-end tunes on synthetic rows: full CMA-ES and sep-CMA (--diagonal) on one loaded engine.

`bbt-onnx bench` runs one end-to-end tune with full CMA-ES only; this runs the same tune (`bbt_onnx.jobs.bench.end_to_end`:
32 synthetic sentiment rows, 16 per class) once per CMA-ES mode, with rows padded to about --seq-target tokens, and
reports wall time, calls/s and the engine / optimizer / host split. The JSON file is rewritten after each mode, so a
run stopped by a time limit keeps the modes it finished.

usage: python benchmarks/gpu/e2e.py MODEL_DIR [--device cuda] [--precision fp16] [--budget 8000]
       [--popsize 20] [--dim 500] [--seq-target 64] [--modes full,diagonal] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bbt_onnx import Model
from bbt_onnx.jobs.bench import end_to_end, words_for_length
from bbt_onnx.engines import OrtSpec


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
    model = Model.load(args.model_dir, OrtSpec(args.device, args.precision, args.threads))
    load_s = time.perf_counter() - t0
    p = args.prompt_tokens or model.manifest.prompt_tokens
    out = {"model": str(args.model_dir), "device": args.device, "precision": args.precision,
           "provider": model.engine.provider, "load_seconds": load_s, "runs": []}
    words = words_for_length(model, p, args.seq_target, args.seed)
    for mode in args.modes.split(","):
        print(f"e2e {mode}: {args.budget} calls, popsize {args.popsize}, d {args.dim}, {words} words per row, "
              f"{args.precision} on {args.device}", file=sys.stderr)
        run = {"mode": mode, "words_per_row": words, **end_to_end(model, args.budget, args.popsize, args.dim, p, words,
                                                                   args.seed, diagonal=mode == "diagonal")}
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
