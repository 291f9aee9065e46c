"""Parity of every exported graph on the GPU against the fp32 graph on CPU, on the same synthetic inputs.

For each graph (fp32, fp16, and the deep ones when present) on each --device, the label logits [C, N, K] of
`bbt_onnx.timing.synthetic_inputs` rows are compared with the CPU fp32 graph's: max and mean abs diff, and how
often the argmax over the K label words agrees. The export's own parity against PyTorch (from the manifest)
is copied alongside.

usage: python benchmarks/gpu/parity.py MODEL_DIR [--device cuda] [--batch 64] [--seq 114] [--labels 8]
       [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bbt_onnx import Model, load_manifest
from bbt_onnx.timing import synthetic_inputs
from bbt_onnx.engines import OrtSpec


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ref_abs_max": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "finite": bool(np.isfinite(got).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--device", default="cuda", help="device(s) to check, comma-separated")
    ap.add_argument("--batch", type=int, default=64, help="sequences (candidates x up to 32 texts)")
    ap.add_argument("--seq", type=int, default=114)
    ap.add_argument("--labels", type=int, default=8, help="label words K (argmax over K)")
    ap.add_argument("--threads", type=int, help="CPU threads for onnxruntime [default: all cores]")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    manifest = load_manifest(args.model_dir)
    prompts, enc = synthetic_inputs(manifest, args.batch, args.seq)
    rng = np.random.default_rng(1)
    low = max(i for i in (manifest.bos_id, manifest.eos_id, manifest.pad_id, manifest.mask_id) if i is not None) + 1
    enc = replace(enc, label_ids=rng.choice(np.arange(low, manifest.vocab_size), args.labels, replace=False))
    out = {"model": str(args.model_dir), "batch": args.batch, "seq": args.seq, "labels": args.labels,
           "reference": "fp32 graph on CPUExecutionProvider", "graphs": []}

    def save():
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=2))

    refs = {}
    for deep in (False, True):
        if not any(g.deep == deep for g in manifest.graphs.values()):
            continue
        t0 = time.perf_counter()
        ref = Model.load(args.model_dir, OrtSpec("cpu", "fp32", args.threads), deep=deep)
        refs[deep] = ref.engine.label_logits(prompts, enc)
        print(f"reference fp32{' deep' if deep else ''} on cpu: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for key, spec in manifest.graphs.items():
        for device in args.device.split(","):
            if device == "cpu" and spec.precision == "fp32":
                continue  # the reference itself
            row = {"graph": key, "precision": spec.precision, "deep": spec.deep, "device": device,
                   "export_parity_vs_torch": spec.parity}
            t0 = time.perf_counter()
            try:
                model = Model.load(args.model_dir, OrtSpec(device, spec.precision, args.threads), deep=spec.deep)
                row["provider"] = model.engine.provider
                row.update(compare(refs[spec.deep], model.engine.label_logits(prompts, enc)))
            except Exception as exc:  # noqa: BLE001 - record and go on to the next graph
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            row["seconds"] = time.perf_counter() - t0
            out["graphs"].append(row)
            save()
            print(json.dumps({k: v for k, v in row.items() if k != "export_parity_vs_torch"}), file=sys.stderr)
    save()
    print(json.dumps(out, indent=2))
    if any("error" in g for g in out["graphs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
