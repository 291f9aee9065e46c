"""`bbt-onnx report RUN...`: what runs measured, as the paper reports it, from their run.json files alone.

Runs are grouped by task and setting (method, framing, prompt length, subspace, budget, calibration, start, readout).
In each group: every baseline, every seed, the tuned seeds' mean ± std, the ensemble, the blend each run ranked
first on dev (with --blend), the words each run chose (with --verbalizer auto), and the result each run kept (after
its choice between tuned and plain). Runs made with different versions are flagged: the same seed gives the same z
only within one environment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import RunError
from ..runs import RUN_JSON, RunDir, read_run_json
from ..stats import Spread, spread
from .sweep import SWEEP_JSON, sweep_runs

SETTING_KEYS = ("method", "prompt_tokens", "intrinsic_dim", "popsize", "budget", "loss", "calibrate",
                "search_calibration", "prompt_init", "verbalizer")


@dataclass(frozen=True)
class Row:
    task: str
    setting: str
    candidate: str  # a baseline, a seed, the ensemble or a result; "words" rows list a run's chosen words in note
    runs: int
    dev: Spread
    test: Spread
    test_uncalibrated: Spread
    test_calibrated: Spread
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    runs: int
    mixed_versions: dict[str, list[str]]  # package -> the versions seen, when they differ
    unfinished: list[str] = field(default_factory=list)  # a sweep's trials without a finished run

    def to_json(self) -> dict:
        return {"runs": self.runs, "rows": [r.to_json() for r in self.rows], "mixed_versions": self.mixed_versions,
                "unfinished": self.unfinished}


def read_run(path: str | Path) -> dict:
    """A finished run's run.json (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).file(RUN_JSON)  # an earlier run a killed force replacement left aside is still the run
    raw = read_run_json(path)
    if raw.get("status") != "complete":
        raise RunError(f"{path} is not a finished run (status {raw.get('status')!r}); finish or resume it first")
    check_shape(raw, path)
    return raw


SCORES = ("dev_metric", "test_metric", "test_metric_uncalibrated", "test_metric_calibrated")
SCALAR = (str, int, float, bool, type(None))


def check_shape(raw: dict, path: Path) -> None:
    """Refuse a run.json whose fields the report reads are not of the shape tune writes (a hand-edited or hostile
    file), as one RunError naming the file and the field ("RUN/run.json: seeds[0] is not an object"). Every field
    the report reads is checked here, so nothing after it meets a wrong type. A field tune may leave out (or write
    as null, where it does) may be missing."""

    def fail(field: str, what: str):
        raise RunError(f"{path}: {field} is not {what}, as `bbt-onnx tune` writes it")

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def obj(value, field: str, null: bool = False) -> dict:
        if value is None and null:
            return {}
        if not isinstance(value, dict):
            fail(field, "an object")
        return value

    def scores(entry: dict, field: str) -> None:
        for key in SCORES:
            if entry.get(key) is not None and not is_number(entry[key]):
                fail(f"{field}.{key}", "a number")

    def entries(name: str) -> list:
        value = raw.get(name, [])
        if not isinstance(value, list):
            fail(name, "a list")
        for i, entry in enumerate(value):
            scores(obj(entry, f"{name}[{i}]"), f"{name}[{i}]")
        return value

    settings = obj(raw.get("settings"), "settings")
    for part in ("task", "tune", "data"):
        obj(settings.get(part, {}), f"settings.{part}")
    task, tune = settings.get("task", {}), settings.get("tune", {})
    if not isinstance(task.get("name", ""), str):
        fail("settings.task.name", "a string")
    for key in ("bos", "chat", "prompt_position"):
        if not isinstance(task.get(key), SCALAR):
            fail(f"settings.task.{key}", "a plain value")
    for key in SETTING_KEYS:
        if not isinstance(tune.get(key), SCALAR):
            fail(f"settings.tune.{key}", "a plain value")
    data = settings.get("data", {})
    seed = data.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
        fail("settings.data.seed", "an integer")
    if not isinstance(data.get("no_dev", False), bool):
        fail("settings.data.no_dev", "true or false")
    if not isinstance(data.get("k_shot", 16), SCALAR):
        fail("settings.data.k_shot", "a plain value")
    obj(raw.get("metrics", {}), "metrics")
    for i, base in enumerate(entries("baselines")):
        if not isinstance(base.get("name"), str):
            fail(f"baselines[{i}].name", "a string")
    for i, blend in enumerate(entries("blends")):
        if not isinstance(blend.get("name"), str):
            fail(f"blends[{i}].name", "a string")
    for i, s in enumerate(entries("seeds")):
        if not isinstance(s.get("seed"), int) or isinstance(s["seed"], bool):
            fail(f"seeds[{i}].seed", "an integer")
    scores(obj(raw.get("ensemble"), "ensemble", null=True), "ensemble")
    choice = obj(raw.get("choice"), "choice", null=True)
    scores(choice, "choice")
    if not isinstance(choice.get("kept", ""), str):
        fail("choice.kept", "a string")
    if not isinstance(choice.get("best_baseline"), (str, type(None))):
        fail("choice.best_baseline", "a string")
    margin = obj(choice.get("dev_margin"), "choice.dev_margin", null=True)
    for key in ("value", "low"):
        if margin.get(key) is not None and not is_number(margin[key]):
            fail(f"choice.dev_margin.{key}", "a number")
    sweep = obj(settings.get("sweep"), "settings.sweep", null=True)
    obj(sweep.get("point"), "settings.sweep.point", null=True)
    if not isinstance(sweep.get("task", ""), str):
        fail("settings.sweep.task", "a string")
    words = obj(settings.get("verbalizer"), "settings.verbalizer", null=True)
    for key, chosen in obj(words.get("words"), "settings.verbalizer.words", null=True).items():
        if not isinstance(chosen, list) or not all(isinstance(w, list) and len(w) == 2 and isinstance(w[0], str)
                                                   and is_number(w[1]) for w in chosen):
            fail(f"settings.verbalizer.words.{key}", "a list of [word, separation] pairs")
    versions = obj(obj(raw.get("provenance", {}), "provenance").get("versions"), "provenance.versions", null=True)
    for name, version in versions.items():
        if not isinstance(version, str):
            fail(f"provenance.versions.{name}", "a string")


def setting_of(run: dict) -> str:
    """The setting a run belongs to, in words: what decides its numbers apart from the seed and the data."""
    # runs from before the search could be calibrated searched raw scores; before the readout widened, read labels
    tune = {"search_calibration": "off", "verbalizer": "labels", **run["settings"].get("tune", {})}
    task = run["settings"].get("task", {})
    framing = ", ".join(f"{k} {task[k]}" for k in ("bos", "chat", "prompt_position") if k in task)
    parts = [f"{k} {tune[k]}" for k in SETTING_KEYS if tune.get(k) is not None]
    data = run["settings"].get("data", {})
    if data.get("data") and data.get("k_shot", 16) != 16:  # drawn from a pool: its size decides the numbers too
        parts.append(f"k_shot {data['k_shot']}")
    parts += ["no dev"] if data.get("no_dev") else []  # tuned on every drawn row
    point = sweep_of(run).get("point") or {}  # a sweep's grid may vary any setting: its runs stay apart by it
    shown = set(SETTING_KEYS) | {"bos", "chat", "prompt_position"}
    parts += [f"{k} {v}" for k, v in point.items() if k not in shown]
    return "; ".join(parts + ([framing] if framing else []))


def sweep_of(run: dict) -> dict:
    """A sweep's record of its trial (`check_shape` has checked it), or {} for a run tuned on its own."""
    return run["settings"].get("sweep") or {}


def task_of(run: dict) -> str:
    """The task's name: a sweep's own name for it (two tasks of a sweep may share a preset), else the task's."""
    return str(sweep_of(run).get("task") or run["settings"].get("task", {}).get("name", "?"))


def summarise(paths: list[str | Path]) -> Report:
    """The report over run directories; a sweep's folder stands for its finished runs (its unfinished trials are
    named in the report)."""
    if not paths:
        raise RunError("give at least one run directory or sweep folder")
    run_dirs, unfinished = [], []
    for path in paths:
        if (Path(path) / SWEEP_JSON).is_file():
            done, missing = sweep_runs(path)
            run_dirs += done
            unfinished += [f"{path}: {name}" for name in missing]
        else:
            run_dirs.append(path)
    if not run_dirs:
        raise RunError(f"no finished runs in {', '.join(str(p) for p in paths)}")
    runs = [read_run(p) for p in run_dirs]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((task_of(run), setting_of(run)), []).append(run)
    rows: list[Row] = []
    for (task, setting), members in groups.items():
        rows.extend(group_rows(task, setting, members))
    return Report(rows, len(runs), mixed_versions(runs), unfinished)


def group_rows(task: str, setting: str, runs: list[dict]) -> list[Row]:
    def row(candidate: str, entries: list[dict], note: str = "") -> Row:
        def over(key: str) -> Spread:
            return spread(e.get(key) for e in entries)

        return Row(task, setting, candidate, len(entries), over("dev_metric"), over("test_metric"),
                   over("test_metric_uncalibrated"), over("test_metric_calibrated"), note)

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
    blends = [best_on_dev(run["blends"]) for run in runs if run.get("blends")]
    if blends:
        rows.append(row("blend with a template, best on dev", blends,
                        note="; ".join(sorted({b["name"] for b in blends}))))
    for run in runs:
        chosen = run["settings"].get("verbalizer")
        if chosen:
            data = run["settings"].get("data", {}).get("seed")
            rows.append(Row(task, setting, "words" + (f" (data {data})" if len(runs) > 1 else ""), 1, spread([]),
                            spread([]), spread([]), spread([]), note="; ".join(
                                f"{key}: {', '.join(w for w, _ in words)}"
                                for key, words in (chosen.get("words") or {}).items())))
    results = [run.get("choice") or {} for run in runs]
    kept = sorted({r.get("kept", "?") for r in results})
    held = [r for r, run in zip(results, runs) if not_worse(r, run)]
    rows.append(row("result (kept by the run)", results,
                    note=f"kept {', '.join(kept)}; at or above the best-dev template on test in {len(held)} of "
                         f"{len(results)}"))
    for rule in ("max", "interval"):
        under = [kept_under(rule, run) for run in runs]
        if all(u is not None for u in under):
            rows.append(row(f"result if --choose {rule}", under,
                            note=f"tuned kept in {sum(u['tuned'] for u in under)} of {len(under)}"))
    return rows


def best_on_dev(entries: list[dict]) -> dict:
    """The entry with the highest dev metric (the first of equals), as the run's choice ranks its tuned side."""
    return max(entries, key=lambda e: -1.0 if e.get("dev_metric") is None else e["dev_metric"])


def best_baseline(run: dict) -> dict | None:
    name = (run.get("choice") or {}).get("best_baseline")
    return next((b for b in run.get("baselines", []) if b["name"] == name), None)


def not_worse(result: dict, run: dict) -> bool:
    base = best_baseline(run)
    return base is not None and result.get("test_metric") is not None and base.get("test_metric") is not None \
        and result["test_metric"] >= base["test_metric"]


def kept_under(rule: str, run: dict) -> dict | None:
    """What a run would have kept under `rule`, from its recorded dev margin: the tuned side or the best baseline
    (the same numbers the run scored, so both rules are measured on one set of runs)."""
    choice, base = run.get("choice") or {}, best_baseline(run)
    margin = choice.get("dev_margin") or {}
    tuned = run.get("ensemble") or (run.get("seeds") or [None])[0]
    if base is None or tuned is None or margin.get("low") is None or margin.get("value") is None:
        return None  # no margin recorded, or none measured (null: NaN written as JSON)
    keep = margin["value"] > 0 if rule == "max" else margin["low"] > 0
    picked = tuned if keep else base
    return {"tuned": keep, "dev_metric": picked.get("dev_metric"), "test_metric": picked.get("test_metric")}


def mixed_versions(runs: list[dict]) -> dict[str, list[str]]:
    seen: dict[str, set[str]] = {}
    for run in runs:
        for name, version in (run.get("provenance", {}).get("versions") or {}).items():
            seen.setdefault(name, set()).add(str(version))
    return {name: sorted(v) for name, v in seen.items() if len(v) > 1}


def format_markdown(report: Report) -> str:
    """One table per task and setting: each candidate's dev and test metric (mean ± std over runs or seeds), and
    its test metric uncalibrated and calibrated where the run recorded both."""
    lines: list[str] = []
    for task, setting in dict.fromkeys((r.task, r.setting) for r in report.rows):
        lines += [f"{task}: {setting}", "",
                  "| Candidate | Runs | Dev | Test | Test, uncalibrated | Test, calibrated | Note |",
                  "|---|---|---|---|---|---|---|"]
        for r in report.rows:
            if (r.task, r.setting) == (task, setting):
                lines.append(f"| {r.candidate} | {r.runs} | {fmt(r.dev)} | {fmt(r.test)} | {fmt(r.test_uncalibrated)} "
                             f"| {fmt(r.test_calibrated)} | {r.note} |")
        lines.append("")
    if report.mixed_versions:
        mixed = "; ".join(f"{k} {' / '.join(v)}" for k, v in report.mixed_versions.items())
        lines.append(f"Note: these runs were made with different versions ({mixed}); the same seed gives the same z "
                     "only within one environment.")
    if report.unfinished:
        lines.append(f"Not finished, so not in the tables: {', '.join(report.unfinished)}.")
    return "\n".join(lines).rstrip() + "\n"


def fmt(s: Spread) -> str:
    return "n/a" if s.n == 0 else str(s)
