"""What a candidate costs in one call of the cached pair, by the number of candidates in the call, with and without
demonstrations before the rows: C random prompts on MR's 32 training rows (suffix prompt, P = 10), the text and
the demonstrations computed once, then the tail calls timed (the best of --repeat rounds, the sizes alternating).

usage: python benchmarks/candidates.py [--model-dir models/smollm2] [--against DIR] [--sizes 1,10,30] [--demos 16]
       [--repeat 5]
Prints one JSON object: milliseconds per candidate for each size, with and without the demonstrations, and the
ratio of the largest size's per-candidate time to the middle one's; with --against, the same for a second export
of the model, timed in the same rounds, and each size's ratio of the two.
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
from real_fewshot import TASKS  # noqa: E402

from bbt_onnx import Model  # noqa: E402
from bbt_onnx.data import DataSpec, load_splits  # noqa: E402
from bbt_onnx.demos import as_demonstrations  # noqa: E402
from bbt_onnx.engines import OrtSpec  # noqa: E402
from bbt_onnx.tasks import Framing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    ap.add_argument("--against", type=Path, help="a second export of the same model, timed alongside")
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--sizes", default="1,10,30")
    ap.add_argument("--demos", type=int, default=16, help="demonstrations per class for the rows with them")
    ap.add_argument("--prompt-tokens", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dirs = [args.model_dir] + ([args.against] if args.against else [])
    models = [Model.load(d, OrtSpec("cpu", "fp32")) for d in dirs]
    m = models[0].manifest
    base = replace(TASKS["mr"], framing=Framing(bos="never", position="suffix"))
    splits = load_splits(DataSpec(str(prepare("mr", args.data_dir) / "pool.csv"), k_shot=16, seed=0),
                         base.label_keys, demos=args.demos)
    tasks = {"plain": base, "demos": replace(base, demonstrations=as_demonstrations(splits.demos))}
    rows = {name: models[0].encoder(task, args.prompt_tokens).encode(splits.train) for name, task in tasks.items()}
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    prompts = {c: rng.normal(0, m.embedding_std, (c, args.prompt_tokens, m.hidden_size)).astype(np.float32)
               for c in sizes}
    best = {(i, name, c): float("inf") for i in range(len(models)) for name in rows for c in sizes}
    for model in models:
        for enc in rows.values():
            model.engine.label_logits(prompts[sizes[0]], enc)  # the text and the demonstrations, once
    for _ in range(args.repeat):
        for i, model in enumerate(models):
            for name, enc in rows.items():
                for c in sizes:
                    t0 = time.perf_counter()
                    model.engine.label_logits(prompts[c], enc)
                    best[i, name, c] = min(best[i, name, c], time.perf_counter() - t0)
    out = {"rows": len(splits.train), "prompt_tokens": args.prompt_tokens,
           "prefix_tokens": rows["demos"].prefix_length, "repeat": args.repeat}
    for i, directory in enumerate(dirs):
        report = out.setdefault(str(directory), {})
        for name in rows:
            report[name] = {str(c): 1000 * best[i, name, c] / c for c in sizes}
            report[f"{name}_ratio_{sizes[-1]}_to_{sizes[-2]}"] = best[i, name, sizes[-1]] / sizes[-1] / (
                best[i, name, sizes[-2]] / sizes[-2])
        report["demos_to_plain_at_" + str(sizes[-2])] = best[i, "demos", sizes[-2]] / best[i, "plain", sizes[-2]]
    if args.against:
        out["against_to_first"] = {f"{name} {c}": best[1, name, c] / best[0, name, c] for name in rows
                                   for c in sizes}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
