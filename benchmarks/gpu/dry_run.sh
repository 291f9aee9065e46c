#!/usr/bin/env bash
# device_run.sh's plumbing on this CPU machine: the same steps with tiny shapes (a 2-layer RoBERTa, a tiny
# random Llama in SmolLM2's place, CPU provider, a few tune calls), results in /tmp/bbt-gpu-dry/out.
#   usage: bash benchmarks/gpu/dry_run.sh [BUDGET_S]      (default 600; needs benchmarks/gpu/prepare.sh first)
# The ORT GPU pack is unpacked to check the archive, but not imported (it is for Python 3.12 and CUDA).
set -euo pipefail
cd "$(dirname "$0")/../.."
export BBT_GPU_DRY=1 BBT_GPU_WORK=${BBT_GPU_WORK:-/tmp/bbt-gpu-dry}
export BBT_GPU_PYTHON=${BBT_GPU_PYTHON:-$PWD/.venv/bin/python}
export OUT=${OUT:-$BBT_GPU_WORK/out}
rm -rf "$BBT_GPU_WORK"
nice -n 10 bash benchmarks/gpu/device_run.sh "${1:-600}"
# the dry run passes when every step ran and every result file is there
python3 - "$BBT_GPU_WORK/results" "$OUT" <<'PY'
import json, pathlib, sys
res, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
steps = [json.loads(l) for l in (res / "steps.jsonl").read_text().splitlines()]
# `check` is skipped where this checkout has no `bbt-onnx check` command yet
bad = [s for s in steps if s["status"] != "ok" and not (s["step"] == "check" and s["status"] == "skipped")]
want = ["env.json", "build.json", "large_manifest.json", "parity.json", "bench_64.json", "bench_32.json", "e2e.json",
        "fewshot_mr.md", "fewshot_bbc.md"]
missing = [w for w in want if not (res / w).is_file()]
for task in ("mr", "bbc"):  # every few-shot run finished, each method's
    for method in ("bbt", "bbtv2"):
        done = [r for r in res.glob(f"runs/{task}-*-{method}-*/run.json") if json.loads(r.read_text())["status"] == "complete"]
        missing += [] if done else [f"runs/{task}-...-{method}-.../run.json"]
missing += [w for w in ("summary.json", "summary.txt", "results.tar.gz") if not (out / w).is_file()]
print(f"dry run: {len(steps)} steps, {len(bad)} not ok {[s['step'] for s in bad]}, missing {missing}")
sys.exit(1 if bad or missing else 0)
PY
