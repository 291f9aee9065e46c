"""Would a blend of the tuned seeds and a plain template pay? Measured on finished runs, chosen on dev only.

For each run: its tuned side (the seeds' ensemble, as tuned.npz or prompt.npz holds it) and each plain framing it
scored among its baselines (read by the label words, or by the run's chosen words). A blend averages the tuned
side's label probabilities with one template's, with the template's weight w (0.25 or 0.5). The blend a run would
choose is the best on dev (the tuned side alone among the candidates; the first listed wins a tie); then, as
`tune` would, the paired-bootstrap interval of its dev margin over the best plain framing (ranked on train and dev)
says whether the run would keep it. Test scores are read for the table only.

usage: python benchmarks/blends.py RUN... [--model-dir models/smollm2]
Prints one JSON line per run: the template the run kept and its test score, the tuned side's, the blend chosen on
dev with its dev and test scores, and whether the interval rule would keep it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from bbt_onnx import Model
from bbt_onnx.choice import choose, scored
from bbt_onnx.data import DataSpec, load_splits
from bbt_onnx.losses import log_softmax
from bbt_onnx.prompt import TunedPrompt, load_prompt
from bbt_onnx.runs import TUNED
from bbt_onnx.tasks import Framing, Task

WEIGHTS = (0.25, 0.5)


def probabilities(result, model, rows) -> tuple[np.ndarray, np.ndarray]:
    enc = result.encode(model, rows)
    return np.exp(log_softmax(result.logits(model, enc).astype(np.float64))), enc.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2"))
    args = ap.parse_args()
    model = Model.load(args.model_dir)
    for run_dir in args.runs:
        run = json.loads((run_dir / "run.json").read_text())
        settings = run["settings"]
        task = Task.from_json(settings["task"])
        splits = load_splits(DataSpec(**settings["data"]), task.label_keys)
        tuned = load_prompt(run_dir / TUNED if (run_dir / TUNED).exists() else run_dir)
        rows = {"train": splits.train, "dev": splits.dev, "test": splits.test}
        tuned_p = {split: probabilities(tuned, model, r) for split, r in rows.items() if split != "train"}
        calibrate = settings["tune"].get("calibrate", False)
        plain = {}
        for base in run["baselines"]:
            if "framing" not in base:
                continue  # z = 0
            framed = replace(task, framing=Framing.from_json(base["framing"]))
            framed = framed if base["name"].endswith("+ words") else framed.with_extra_words()
            template = TunedPrompt.template(model.manifest, framed, base["name"])
            template = template.calibrate(model) if calibrate else template
            plain[base["name"]] = {split: probabilities(template, model, r) for split, r in rows.items()}
        labels = {split: tuned_p[split][1] for split in ("dev", "test")}
        candidates = {"tuned": {s: tuned_p[s][0] for s in labels}}
        for name, scores in plain.items():
            for w in WEIGHTS:
                candidates[f"tuned + {w} x {name}"] = {s: (1 - w) * tuned_p[s][0] + w * scores[s][0] for s in labels}
        metric = task.metric
        side = [scored(name, np.log(p["dev"]), labels["dev"], metric) for name, p in candidates.items()]
        bases = [scored(name, np.log(p["dev"][0]), labels["dev"], metric,
                        None if name.endswith("+ words") else (np.log(p["train"][0]), p["train"][1]))
                 for name, p in plain.items()]
        choice = choose(side, bases, labels["dev"], metric)
        best = choice.best_tuned

        def test_of(name: str) -> float:
            probs = candidates[name]["test"] if name in candidates else plain[name]["test"][0]
            return round(float((probs.argmax(1) == labels["test"]).mean()), 4)

        print(json.dumps({"run": run_dir.name, "kept": run["choice"]["kept"], "kept_test": run["metrics"]["test_metric"],
                          "tuned_test": test_of("tuned"), "best_baseline": choice.best_baseline,
                          "best_baseline_test": test_of(choice.best_baseline), "blend": best,
                          "blend_dev": round(next(c.metric for c in side if c.name == best), 4),
                          "blend_test": test_of(best), "interval_keeps_it": choice.tuned,
                          "margin": choice.margin.to_json()}), flush=True)


if __name__ == "__main__":
    main()
