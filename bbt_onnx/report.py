"""`bbt-onnx report RUN...`: what runs measured, as the paper reports it, from their run.json files alone.

Runs are grouped by task and setting (method, framing, prompt length, subspace, budget, calibration, start). In each
group: every baseline, every seed, the tuned seeds' mean ± std, the ensemble, and the result each run kept (after
its choice between tuned and plain). Runs made with different versions are flagged: the same seed gives the same z
only within one environment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import RunError
from .stats import Spread, spread

RUN_JSON = "run.json"
SETTING_KEYS = ("method", "prompt_tokens", "intrinsic_dim", "popsize", "budget", "loss", "calibrate", "prompt_init")


@dataclass(frozen=True)
class Row:
    task: str
    setting: str
    candidate: str
    runs: int
    dev: Spread
    test: Spread
    note: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        out["dev"], out["test"] = asdict(self.dev), asdict(self.test)
        return out


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    runs: int
    mixed_versions: dict[str, list[str]]  # package -> the versions seen, when they differ

    def to_json(self) -> dict:
        return {"runs": self.runs, "rows": [r.to_json() for r in self.rows], "mixed_versions": self.mixed_versions}


def read_run(path: str | Path) -> dict:
    """A finished run's run.json (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_JSON
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict):
        raise RunError(f"{path} is not a run.json written by `bbt-onnx tune`")
    if raw.get("status") != "complete":
        raise RunError(f"{path} is not a finished run (status {raw.get('status')!r}); finish or resume it first")
    return raw


def setting_of(run: dict) -> str:
    """The setting a run belongs to, in words: what decides its numbers apart from the seed and the data."""
    tune = run["settings"].get("tune", {})
    task = run["settings"].get("task", {})
    framing = ", ".join(f"{k} {task[k]}" for k in ("bos", "chat", "prompt_position") if k in task)
    parts = [f"{k} {tune[k]}" for k in SETTING_KEYS if tune.get(k) is not None]
    return "; ".join(parts + ([framing] if framing else []))


def summarise(paths: list[str | Path]) -> Report:
    if not paths:
        raise RunError("give at least one run directory")
    runs = [read_run(p) for p in paths]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        key = (str(run["settings"].get("task", {}).get("name", "?")), setting_of(run))
        groups.setdefault(key, []).append(run)
    rows: list[Row] = []
    for (task, setting), members in groups.items():
        rows.extend(group_rows(task, setting, members))
    return Report(rows, len(runs), mixed_versions(runs))


def group_rows(task: str, setting: str, runs: list[dict]) -> list[Row]:
    def row(candidate: str, entries: list[dict], note: str = "") -> Row:
        return Row(task, setting, candidate, len(entries), spread(e.get("dev_metric") for e in entries),
                   spread(e.get("test_metric") for e in entries), note)

    rows: list[Row] = []
    names = []
    for run in runs:
        names += [b["name"] for b in run.get("baselines", []) if b["name"] not in names]
    for name in names:
        rows.append(row(name, [b for run in runs for b in run.get("baselines", []) if b["name"] == name]))
    seeds = [dict(s, data=run["settings"].get("data", {}).get("seed")) for run in runs for s in run.get("seeds", [])]
    for s in seeds:
        rows.append(row(f"seed {s['seed']}" + (f" (data {s['data']})" if len(runs) > 1 else ""), [s]))
    if len(seeds) > 1:
        rows.append(row("tuned, mean ± std over seeds", seeds))
    ensembles = [run["ensemble"] for run in runs if run.get("ensemble")]
    if ensembles:
        rows.append(row("ensemble of the seeds", ensembles))
    results = [dict(run.get("choice", {}), dev_metric=run.get("choice", {}).get("dev_metric"),
                    test_metric=run.get("metrics", {}).get("test_metric")) for run in runs]
    kept = sorted({r.get("kept", "tuned") for r in results})
    rows.append(row("result (kept by the run)", results, note=", ".join(kept)))
    return rows


def mixed_versions(runs: list[dict]) -> dict[str, list[str]]:
    seen: dict[str, set[str]] = {}
    for run in runs:
        for name, version in (run.get("provenance", {}).get("versions") or {}).items():
            seen.setdefault(name, set()).add(str(version))
    return {name: sorted(v) for name, v in seen.items() if len(v) > 1}


def format_markdown(report: Report) -> str:
    lines = ["| Task | Setting | Candidate | Runs | Dev | Test | Note |", "|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r.task} | {r.setting} | {r.candidate} | {r.runs} | {fmt(r.dev)} | {fmt(r.test)} | "
                     f"{r.note} |")
    if report.mixed_versions:
        mixed = "; ".join(f"{k} {' / '.join(v)}" for k, v in report.mixed_versions.items())
        lines.append("")
        lines.append(f"Note: these runs were made with different versions ({mixed}); the same seed gives the same z "
                     "only within one environment.")
    return "\n".join(lines)


def fmt(s: Spread) -> str:
    return "n/a" if s.n == 0 else str(s)
