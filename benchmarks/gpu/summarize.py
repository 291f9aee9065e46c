"""Collect what device_run.sh left in its results folder into one summary (JSON file + text on stdout).

usage: python benchmarks/gpu/summarize.py RESULTS_DIR SUMMARY_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            if line.strip():
                out.append({"unparsed": line[:300]})
    return out


def fewshot_runs(res: Path) -> list[dict]:
    """What each finished few-shot run (results/runs/NAME/run.json, written by real_fewshot.py) kept and scored,
    beside the plain framing best on dev, with its wall time and the time's split."""
    rows = []
    for path in sorted(res.glob("runs/*/run.json")):
        run = load(path) or {}
        if run.get("status") != "complete":
            continue
        m = run.get("metrics") or {}
        plain = [b for b in run.get("baselines") or [] if b.get("dev_metric") is not None]
        best = max(plain, key=lambda b: b["dev_metric"], default={})  # the first of equals, as the choice reads them
        rows.append({"run": path.parent.name, "kept": m.get("kept"), "test": m.get("test_metric"),
                     "tuned_test": m.get("tuned_test_metric"),
                     "seeds_test": [s.get("test_metric") for s in run.get("seeds") or []],
                     "dev_best_plain": best.get("name"), "dev_best_plain_test": best.get("test_metric"),
                     **{k: m.get(k) for k in ("api_calls", "wall_seconds", "engine_seconds", "optimizer_seconds",
                                              "host_seconds")}})
    return rows


def main() -> None:
    res, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    s: dict = {"steps": jsonl(res / "steps.jsonl")}
    env = load(res / "env.json") or {}
    if env:
        s["env"] = {"ok": env.get("ok"), "python": env.get("python", "").split()[0],
                    "onnxruntime": env.get("onnxruntime"), "smoke": env.get("smoke"),
                    "torch": env.get("torch"), "transformers": (env.get("transformers") or {}).get("version"),
                    "numpy": (env.get("numpy") or {}).get("version"), "nvidia_smi": env.get("nvidia_smi")}
    man = load(res / "large_manifest.json")
    if man:
        s["large_model"] = {"layers": man.get("num_layers"), "hidden": man.get("hidden_size"),
                            "heads": man.get("num_heads"), "vocab": man.get("vocab_size"),
                            "graphs": {k: {"fused_ops": g.get("fused_ops"), "parity_vs_torch": g.get("parity")}
                                       for k, g in (man.get("graphs") or {}).items()}}
    par = load(res / "parity.json")
    if par:
        s["parity"] = [{k: g.get(k) for k in ("graph", "device", "max_abs_diff", "mean_abs_diff", "argmax_agreement",
                                              "finite", "error")} for g in par.get("graphs", [])]
    s["bench"] = {}
    for f in sorted(res.glob("bench_*.json")):
        b = load(f)
        if b:
            s["bench"][f.stem] = {"results": b.get("results"), "torch_baseline": b.get("torch_baseline"),
                                  "optimizer_ms_per_generation": b.get("optimizer_ms_per_generation")}
    e2e = load(res / "e2e.json")
    if e2e:
        s["e2e"] = e2e
    check = load(res / "check.json")
    if check:
        s["check"] = {"passed": check.get("passed"), "graphs": check.get("graphs"), "engines": check.get("engines")}
    rows = fewshot_runs(res)
    if rows:
        s["fewshot_runs"] = rows
    out_path.write_text(json.dumps(s, indent=2))

    # the text
    lines = ["== steps"]
    for st in s["steps"]:
        if "step" not in st:
            lines.append(f"(unparsed) {st}")
            continue
        lines.append(f"{st['step']:<16} {st['status']:<8} {st['seconds']:>7} s  {st.get('detail') or ''}"[:220])
    if env:
        o = env.get("onnxruntime") or {}
        t = env.get("torch") or {}
        lines.append(f"== env: ort {o.get('version')} ({o.get('file')}), providers {o.get('available_providers')}, "
                     f"preload {o.get('preload_dlls')}, smoke {env.get('smoke')}; torch {t.get('version')} cuda "
                     f"{t.get('cuda')} gpu {t.get('gpu')}; {env.get('nvidia_smi')}")
    if man:
        for k, g in s["large_model"]["graphs"].items():
            p = g["parity_vs_torch"] or {}
            lines.append(f"== export {k}: fused {g['fused_ops']}, vs torch max abs {p.get('max_abs_diff')}, "
                         f"argmax {p.get('argmax_agreement')}")
    for g in s.get("parity", []):
        error = f", ERROR {g['error']}" if g.get("error") else ""
        lines.append(f"== parity {g['graph']} on {g['device']}: max abs {g['max_abs_diff']}, mean abs "
                     f"{g['mean_abs_diff']}, argmax {g['argmax_agreement']}{error}")
    for name, b in s["bench"].items():
        for r in b["results"] or []:
            torch = (f", torch {r['torch_variant']} {r['torch_ms_per_call']:.2f} ms = {r['ratio_vs_torch']:.2f}x"
                     if r.get("torch_ms_per_call") else f", torch: {b['torch_baseline']}")
            lines.append(f"== {name} {r['precision']} {r['batch']}x{r['seq']}: {r['ms_per_call']:.2f} ms/call, "
                         f"{r['sequences_per_s']:.0f} seq/s, memcpy {r['memcpy_nodes']}{torch}")
        opt = b.get("optimizer_ms_per_generation") or {}
        if opt:
            lines.append(f"   CMA-ES per generation: full {opt.get('full', 0):.2f} ms, "
                         f"diagonal {opt.get('diagonal', 0):.2f} ms")
    for r in (e2e or {}).get("runs", []):
        lines.append(f"== e2e {r['mode']}: {r['budget']} calls, {r['texts']}x{r['seq']} tokens, "
                     f"{r['wall_seconds']:.1f} s ({r['calls_per_second']:.0f} calls/s), engine {r['engine_seconds']:.1f} s, optimizer "
                     f"{r['optimizer_seconds']:.2f} s, host {r['host_seconds']:.2f} s, optimizer+host "
                     f"{r['optimizer_and_host_share']:.1%}")
    for r in rows:
        seeds = ", ".join("n/a" if t is None else f"{t:.3f}" for t in r["seeds_test"])
        split = f"engine {r['engine_seconds'] or 0:.1f} s, optimizer {r['optimizer_seconds'] or 0:.2f} s, host " \
            f"{r['host_seconds'] or 0:.2f} s"
        lines.append(f"== fewshot {r['run']}: kept {r['kept']} test {r['test']:.3f}; tuned {r['tuned_test']:.3f} "
                     f"(seeds {seeds}); dev-best plain {r['dev_best_plain']} test {r['dev_best_plain_test']:.3f}; "
                     f"{r['api_calls']} calls in {r['wall_seconds']:.1f} s ({split})")
    for f in sorted(res.glob("fewshot_*.log")):  # what a task cut short by the time limit had finished
        done = [ln for ln in f.read_text(errors="replace").splitlines() if ": kept " in ln]
        if done and not any(r["run"].startswith(f.stem.split("_", 1)[1] + "-") for r in rows):
            lines += [f"   {ln}" for ln in done]
    if check:
        lines.append(f"== check (bbt-onnx check): passed {check.get('passed')}, graphs {check.get('graphs')}")
        for e in check.get("engines") or []:
            lines.append(f"   {e.get('engine')}: {e.get('status')}, max abs {e.get('max_abs_diff')}, argmax "
                         f"{e.get('argmax_agreement')}, {e.get('ms_per_call')} ms/call {e.get('reasons') or ''}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
