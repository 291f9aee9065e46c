"""Collect what device_run.sh left in its results folder into one summary (JSON file + text on stdout).

usage: python benchmarks/gpu/summarize.py RESULTS_DIR SUMMARY_JSON
"""

from __future__ import annotations

import json
import statistics
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
    rows = [r for r in jsonl(res / "fewshot.jsonl") if "method" in r]  # tuned runs, not the plain-baseline lines
    if rows:
        s["fewshot_rows"] = rows
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
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r.get("setting", "prefix"), r["method"]), []).append(r)
    for (task, setting, method), rs in groups.items():
        acc = [r["tuned"] for r in rs]
        lines.append(f"== fewshot {task} {setting} {method}: tuned {statistics.mean(acc):.3f} over {len(rs)} seed(s) "
                     f"({', '.join(f'{a:.3f}' for a in acc)}), best plain {rs[0]['best_plain']:.3f}, "
                     f"z=0 {rs[0]['zero']:.3f}, "
                     f"tune {statistics.mean(r['tune_seconds'] for r in rs):.1f} s/run")
    for f in sorted(res.glob("fewshot_*.log")):  # per-seed lines of a task cut short by the time limit
        done = [ln for ln in f.read_text(errors="replace").splitlines()
                if (" seed " in ln and " in " in ln) or ": plain " in ln]
        if done and not any(r["task"] == f.stem.split("_", 1)[1] for r in rows):
            lines += [f"   {ln}" for ln in done]
    if check:
        lines.append(f"== check (bbt-onnx check): passed {check.get('passed')}, graphs {check.get('graphs')}")
        for e in check.get("engines") or []:
            lines.append(f"   {e.get('engine')}: {e.get('status')}, max abs {e.get('max_abs_diff')}, argmax "
                         f"{e.get('argmax_agreement')}, {e.get('ms_per_call')} ms/call {e.get('reasons') or ''}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
