"""What the deployed classifier costs and whether it labels as predict does, measured side by side in one process.

    python benchmarks/deploy_bench.py --model models/smollm2 --prompt runs/demo-mr --data .data/mr/test.csv

1. Parity: `classifier.onnx` (tokenizer, template and prompt in the graph) on every row of --data, in batches of
   64, against the runtime's predictions (`TunedPrompt.predict`, what `bbt-onnx predict` prints): labels equal,
   largest probability difference, accuracy of both; texts/s of both, the classifier's in file order and with
   the texts sorted by length (predict sorts its rows so, and pads less).
2. Overhead: the text classifier against the bare scoring call (the model's graph, fed the prompt and rows
   encoded beforehand, as `OrtEngine` runs it), on 64-row batches and on single texts, in alternating order call
   by call; median wall time per call, the ratio, and texts/s. Also the same classifier built to take ids, the
   in-graph front alone (strings to ids) and the Python encoder (what an application without the front runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bbt_onnx import Model
from bbt_onnx.data import read_examples
from bbt_onnx.deploy import finished_result, session
from bbt_onnx.deploy.build import build_classifier, front_model, save_model
from bbt_onnx.deploy.recipe import encode as recipe_encode
from bbt_onnx.manifest import load_manifest


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="Passes over the batches for the overhead.")
    ap.add_argument("--singles", type=int, default=48, help="Single texts timed, each on both graphs.")
    ap.add_argument("--threads", type=int, help="onnxruntime's intra-op threads [default: every core].")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    manifest = load_manifest(args.model)
    prompt, _ = finished_result(args.prompt)
    members = getattr(prompt, "members", (prompt,))  # an ensemble's prompts, or the one prompt
    if prompt.deep and len(members) > 1:
        sys.exit("this benchmark's bare scoring call takes one BBTv2 prompt, not an ensemble")
    rows = read_examples(args.data)
    texts = [r.text for r in rows]
    pair = prompt.task.uses_text_b
    if pair:
        sys.exit("this benchmark takes single-text tasks")
    tmp = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    text_clf = build_classifier(manifest, prompt, "fp32", "text")
    ids_clf = build_classifier(manifest, prompt, "fp32", "ids")
    for name, clf in (("text", text_clf), ("ids", ids_clf)):
        save_model(clf.model, tmp / f"{name}.onnx")
    save_model(front_model(manifest, text_clf.recipe), tmp / "front.onnx")
    text_sess, ids_sess, front_sess = (session(tmp / f"{n}.onnx", args.threads) for n in ("text", "ids", "front"))
    model = Model.load(args.model, deep=prompt.deep)
    bare_sess = session(manifest.graph_path("fp32", prompt.deep), args.threads, extensions=False)
    bare_inputs = {i.name for i in bare_sess.get_inputs()}
    embeds = np.stack([m.embeds for m in members])  # [S, P, H]: an ensemble's prompts are one call's candidates
    constants = {"prompt_embeds": embeds[0][:1] if prompt.deep else embeds,
                 "label_ids": np.array(model.encoder(prompt.task, prompt.prompt_tokens).label_ids, np.int64)}
    if prompt.deep:
        layer = next(i for i in bare_sess.get_inputs() if i.name == "prompt_layer")
        constants.update(deep_prompts=embeds[0], prompt_layer=np.zeros([1] * len(layer.shape), np.int64))
    tokenizer = model.tokenizer

    # 1. parity with predict on every row
    start = time.perf_counter()
    want = np.array([[p.probabilities[k] for k in prompt.task.label_keys] for p in prompt.predict(model, rows)])
    predict_s = time.perf_counter() - start
    got, start = [], time.perf_counter()
    for i in range(0, len(texts), args.batch):
        got.append(text_sess.run(["probabilities"], {"text": np.array(texts[i:i + args.batch], dtype=object)})[0])
    classifier_s = time.perf_counter() - start
    got = np.concatenate(got)
    # as predict batches: texts of similar length together, so that little padding is computed
    order = np.argsort([len(t) for t in texts], kind="stable")
    start = time.perf_counter()
    for i in range(0, len(texts), args.batch):
        text_sess.run(["probabilities"], {"text": np.array([texts[j] for j in order[i:i + args.batch]], dtype=object)})
    sorted_s = time.perf_counter() - start
    gold = np.array([prompt.task.class_index(r.label) for r in rows])
    parity = {"rows": len(rows), "labels_equal": int((got.argmax(1) == want.argmax(1)).sum()),
              "max_abs_diff": float(np.abs(got - want).max()),
              "accuracy_classifier": float((got.argmax(1) == gold).mean()),
              "accuracy_predict": float((want.argmax(1) == gold).mean()),
              "classifier_texts_per_s": len(rows) / classifier_s, "predict_texts_per_s": len(rows) / predict_s,
              "classifier_sorted_texts_per_s": len(rows) / sorted_s}

    # 2. overhead of the tokenizer and template in the graph, call by call
    batches = [texts[i:i + args.batch] for i in range(0, len(texts) - args.batch + 1, args.batch)]
    singles = [[t] for t in texts[:args.singles]]

    def measure(groups: list[list[str]], repeats: int) -> dict:
        encoded = [recipe_encode(ids_clf.recipe, tokenizer, g) for g in groups]
        bare = [{**{k: v for k, v in e.items() if k in bare_inputs}, **constants} for e in encoded]
        arrays = [np.array(g, dtype=object) for g in groups]
        for g, e, b in zip(arrays[:1], encoded[:1], bare[:1]):  # warm-up
            text_sess.run(None, {"text": g}), ids_sess.run(None, e), front_sess.run(None, {"text": g})
            bare_sess.run(None, b)
        times: dict[str, list[float]] = {k: [] for k in ("bare", "text", "ids", "front", "python")}
        calls = {"bare": lambda g, raw, e, b: bare_sess.run(None, b),
                 "text": lambda g, raw, e, b: text_sess.run(None, {"text": g}),
                 "ids": lambda g, raw, e, b: ids_sess.run(None, e)}
        turn = 0
        for _ in range(repeats):
            for g, raw, e, b in zip(arrays, groups, encoded, bare):
                order = list(calls) if turn % 2 == 0 else list(reversed(calls))  # neither always goes first
                turn += 1
                for name in order:
                    times[name].append(timed(lambda: calls[name](g, raw, e, b)))
                times["front"].append(timed(lambda: front_sess.run(None, {"text": g})))
                times["python"].append(timed(lambda: recipe_encode(ids_clf.recipe, tokenizer, raw)))
        rows_per_call = len(groups[0])
        fastest = {f"{n}_min_s": min(v) for n, v in times.items()}  # least disturbed by other load on the host
        med = {k: statistics.median(times[n]) for k, n in
               (("scoring_graph_s", "bare"), ("text_classifier_s", "text"), ("ids_classifier_s", "ids"),
                ("front_alone_s", "front"), ("python_encoder_s", "python"))}
        return {"calls": len(times["text"]), "rows_per_call": rows_per_call, **med,
                "overhead": med["text_classifier_s"] / med["scoring_graph_s"] - 1,
                "overhead_min": fastest["text_min_s"] / fastest["bare_min_s"] - 1, **fastest,
                "text_classifier_texts_per_s": rows_per_call / med["text_classifier_s"],
                "scoring_graph_texts_per_s": rows_per_call / med["scoring_graph_s"]}

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "threads": args.threads,
        "model": args.model, "prompt": args.prompt, "method": prompt.method, "framing": prompt.task.framing.to_json(),
        "classifier_inputs": text_clf.input_names, "parity": parity,
        "batch": measure(batches, args.repeats), "single": measure(singles, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    p, b, s = report["parity"], report["batch"], report["single"]
    print(f"parity on {p['rows']} rows: labels equal {p['labels_equal']}/{p['rows']}, max |p - p_predict| "
          f"{p['max_abs_diff']:.2e}, accuracy {p['accuracy_classifier']:.4f} (predict {p['accuracy_predict']:.4f}); "
          f"classifier {p['classifier_texts_per_s']:.1f} texts/s in file order, "
          f"{p['classifier_sorted_texts_per_s']:.1f} sorted by length; predict {p['predict_texts_per_s']:.1f} texts/s")
    for name, m in (("64-row batches" if args.batch == 64 else f"{args.batch}-row batches", b), ("single texts", s)):
        print(f"{name}: scoring graph {m['scoring_graph_s'] * 1e3:.1f} ms, text classifier "
              f"{m['text_classifier_s'] * 1e3:.1f} ms ({m['overhead'] * 100:+.1f}%), ids classifier "
              f"{m['ids_classifier_s'] * 1e3:.1f} ms (fastest calls: {m['overhead_min'] * 100:+.1f}%), front alone "
              f"{m['front_alone_s'] * 1e3:.2f} ms, Python encoder {m['python_encoder_s'] * 1e3:.2f} ms; "
              f"{m['text_classifier_texts_per_s']:.1f} texts/s ({m['calls']} calls each)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
