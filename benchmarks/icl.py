"""In-context learning on SmolLM2 with real data: demonstrations as a prefix the rows share, against the plain
template, measured side by side.

For each task and data seed: the k-shot split of `tune` (16 per class for train and for dev), and K demonstrations
per class drawn after them with the same sampling stream (`tune --demos K`). Every framing of the template is
scored with and without the demonstrations, uncalibrated and calibrated, on dev and on the test rows; each test
pass is timed (the best of --repeat passes), and the process's peak memory is read after each (VmHWM, reset before
each pass). Nothing is chosen on test: the records give every configuration's dev and test scores side by side.

usage: python benchmarks/icl.py [--tasks mr,bbc] [--data-seeds 0] [--demos mr=16,bbc=2] [--test-rows N]
       [--position suffix|prefix] [--repeat 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import prepare  # noqa: E402
from real_fewshot import TASKS, ensure_model  # noqa: E402

from bbt_onnx import Model, TunedPrompt, read_examples  # noqa: E402
from bbt_onnx.baselines import plain_framings  # noqa: E402
from bbt_onnx.data import DataSpec, load_splits  # noqa: E402
from bbt_onnx.demos import as_demonstrations  # noqa: E402
from bbt_onnx.engines import OrtSpec  # noqa: E402
from bbt_onnx.tasks import Framing  # noqa: E402


def peak_reset() -> None:
    """Start a new peak of this process's resident memory (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def measure(model: Model, task_name: str, data: Path, data_seed: int, demos: int, position: str,
            test_rows: int, repeat: int) -> list[dict]:
    base = replace(TASKS[task_name], framing=Framing(position=position))
    splits = load_splits(DataSpec(str(data / "pool.csv"), k_shot=16, seed=data_seed), base.label_keys, demos=demos)
    task = replace(base, demonstrations=as_demonstrations(splits.demos))
    test = read_examples(str(data / "test.csv"))[:test_rows or None]
    out = []
    for name, framed in plain_framings(task, model.manifest):
        plain = TunedPrompt.template(model.manifest, framed, name)
        calibrated = plain.calibrate(model)
        record = {"task": task_name, "data_seed": data_seed, "name": name,
                  "demonstrations": len(framed.demonstrations),
                  "prefix_tokens": len(model.encoder(framed, 0).prefix_ids), "position": position,
                  "test_rows": len(test)}
        for label, prompt in (("", plain), ("_calibrated", calibrated)):
            record[f"dev{label}"] = prompt.evaluate(model, splits.dev).metric
            peak_reset()
            seconds = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                record[f"test{label}"] = prompt.evaluate(model, test).metric
                seconds.append(time.perf_counter() - t0)
            record[f"test_seconds{label}"] = min(seconds)
            record[f"peak_mib{label}"] = peak_mib()
        print(json.dumps(record), file=sys.stderr)
        out.append(record)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="mr,bbc")
    ap.add_argument("--data-seeds", default="0")
    ap.add_argument("--demos", default="mr=16,bbc=2", help="demonstrations per class, by task")
    ap.add_argument("--test-rows", type=int, default=0, help="the first N test rows [default: all]")
    ap.add_argument("--position", choices=["suffix", "prefix"], default="suffix")
    ap.add_argument("--repeat", type=int, default=2, help="test passes timed per configuration (the best counts)")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--out", type=Path, help="write the records here as JSON [default: stdout]")
    args = ap.parse_args()
    ensure_model(args.model_dir, "fp32", deep=False)
    model = Model.load(args.model_dir, OrtSpec("cpu", "fp32"))
    per_class = dict(item.split("=") for item in args.demos.split(","))
    records = []
    for name in args.tasks.split(","):
        data = prepare(name, args.data_dir)
        for seed in (int(s) for s in args.data_seeds.split(",")):
            records += measure(model, name, data, seed, int(per_class[name]), args.position, args.test_rows,
                               args.repeat)
    text = json.dumps(records, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
