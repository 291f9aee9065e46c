"""`bbt-onnx check`: one set of rows and prompts scored on several engines, compared with CPU fp32.

Polygraphy compares raw outputs per tensor; a prompt's user cares one level up: do the
engines agree on the predictions, and on the task metric? So the check reports, per
engine, the max abs logit difference, the prediction agreement, the metric and its delta,
and the time per call, and passes or fails each engine by its precision's parity gate
(`devices.Parity`), whose limits the tolerance arguments may override.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from .. import losses
from ..compare import compare_logits
from ..data import Example, check_labels, read_examples
from ..demos import DemoSpec, refuse_with_run
from ..devices import EXACT, ROUNDED, Parity, parity_of
from ..encoding import load_tokenizer
from ..engines import REFERENCE, EngineSpec, all_local_engines
from ..engines.ort import onnxruntime
from ..errors import ModelError, SettingsError
from ..fileio import sha256_file
from ..manifest import Manifest, load_manifest
from ..model import Model
from ..options import setting
from ..prompt import EVAL_ROWS, Result, TunedPrompt, load_run_prompt, template_prompt
from ..tasks import TaskSpec

# rows for a check without --data: plain sentences of several kinds, and a second text for pair templates
SAMPLE_TEXTS = (
    "a gripping , funny and moving film", "the plot is thin and the acting is worse .", "It was fine.",
    "Shares rose after the company reported strong quarterly profits.", "The striker scored twice in the final.",
    "A new chip promises faster phones and longer battery life.", "Leaders met to discuss the border dispute.",
    "I would not watch it again, even for free.", "The service was slow but the food was excellent.",
    "An ambitious story told with patience and care over three hours that never once drag .",
    "The museum reopens next week with a larger collection.", "Rain is expected across the north tomorrow.",
    "Nothing in this album sounds new, yet every song works.", "The bill passed after a long night of debate.",
    "Two small villages share one school and a bus.", "This phone is the best I have owned.",
)
SAMPLE_PAIRS = ("The film was good.", "The company lost money.", "It rained all day.", "The team won.")


@dataclass(frozen=True)
class Tolerances:
    """The user's tolerances, each overriding one limit of its precisions' parity gate (fp32 engines must match
    closely; fp16 and int8 must agree on predictions); None keeps the record's."""

    fp32_max_diff: float | None = setting(None, "fp32 engines: largest max abs logit diff [default: "
                                          f"{EXACT.max_diff:g}].")
    fp32_agreement: float | None = setting(None, "fp32 engines: least prediction agreement [default: "
                                           f"{EXACT.agreement:g}].")
    lowp_agreement: float | None = setting(None, "fp16 and int8: least prediction agreement [default: "
                                           f"{ROUNDED.agreement:g}].")
    lowp_metric_delta: float | None = setting(None, "fp16 and int8: largest change of the task metric (with "
                                              f"labelled rows) [default: {ROUNDED.metric_delta:g}].")

    def check(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SettingsError(f"{name} must be a finite number >= 0, got {value!r}", name)
        for name in ("fp32_agreement", "lowp_agreement"):
            if (getattr(self, name) or 0) > 1:
                raise SettingsError(f"{name} is a fraction of rows: at most 1", name)

    def gate(self, precision: str) -> Parity:
        """The parity gate an engine of `precision` passes: its record's, with the limits given here."""
        base = parity_of(precision)
        given = {limit: getattr(self, f"{base.group}_{limit}", None) for limit in ("max_diff", "agreement",
                                                                                     "metric_delta")}
        return replace(base, **{limit: value for limit, value in given.items() if value is not None})


@dataclass
class EngineResult:
    engine: str
    status: str  # reference | pass | fail | skipped
    max_abs_diff: float | None = None
    argmax_agreement: float | None = None
    metric: float | None = None
    metric_delta: float | None = None
    ms_per_call: float | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    model: str
    task: str
    metric_name: str
    prompts: list[str]
    rows: int
    labelled: bool
    graphs: dict[str, str]  # graph -> "ok" or what is wrong with it
    providers: list[str]
    engines: list[EngineResult]

    @property
    def passed(self) -> bool:
        return all(r.status in ("reference", "pass", "skipped") for r in self.engines) and \
            all(v == "ok" for v in self.graphs.values())

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_graphs(manifest: Manifest) -> dict[str, str]:
    """Every graph of the directory: its file's sha256 against the manifest, and its recorded contract."""
    out = {}
    for key, g in manifest.graphs.items():
        path = manifest.directory / g.file
        if not path.is_file():
            out[key] = f"{g.file} is missing"
        elif sha256_file(path) != g.sha256:
            out[key] = f"{g.file} does not match its sha256 (changed or half-copied)"
        elif not g.keeps_contract([t.name for t in g.inputs], [t.name for t in g.outputs]):
            out[key] = f"{g.file} does not have the bbt-onnx contract's inputs and outputs"
        else:
            out[key] = "ok"
    return out


def sample_rows(uses_text_b: bool) -> list[Example]:
    return [Example(t, SAMPLE_PAIRS[i % len(SAMPLE_PAIRS)] if uses_text_b else None)
            for i, t in enumerate(SAMPLE_TEXTS)]


def random_prompts(base: TunedPrompt, manifest: Manifest, count: int = 3, seed: int = 0) -> list[TunedPrompt]:
    """Prompts at the embedding scale, like those tuning explores, beside z = 0."""
    rng = np.random.default_rng(seed)
    shape = (base.prompt_tokens, manifest.hidden_size)
    return [TunedPrompt(base.z, rng.normal(0.0, manifest.embedding_std, shape).astype(np.float32), base.projection,
                        base.task, base.model_fingerprint, base.placeholder_ids, base.max_length)
            for _ in range(count)]


def failures(precision: str, result: EngineResult, tol: Tolerances, labelled: bool) -> list[str]:
    """Why an engine of this precision fails its gate (empty: it passes)."""
    gate = tol.gate(precision)
    reasons = []
    if gate.max_diff is not None and result.max_abs_diff > gate.max_diff:
        reasons.append(f"max abs diff {result.max_abs_diff:.3g} > {gate.max_diff:g}")
    if result.argmax_agreement < gate.agreement:
        reasons.append(f"agreement {result.argmax_agreement:.2%} < {gate.agreement:.2%}")
    if labelled and gate.metric_delta is not None and abs(result.metric_delta) > gate.metric_delta:
        reasons.append(f"metric delta {result.metric_delta:+.4f} beyond {gate.metric_delta:g}")
    return reasons


def prompt_set(manifest: Manifest, run: str | None, task: TaskSpec = TaskSpec(),
               demos: DemoSpec = DemoSpec()) -> list[tuple[str, Result]]:
    """What check scores: a run's result (tuned, an ensemble or a kept template) and its z = 0; or, without a run,
    the task's template (with `demos`' demonstrations) at z = 0 and three random prompts at the embedding scale."""
    prompt = load_run_prompt(run, run is None, task.given)
    refuse_with_run(demos, prompt)
    if prompt is None:
        zero = template_prompt(manifest, demos.apply(task.resolve()))
        return [("z=0", zero)] + [(f"random{i}", p) for i, p in enumerate(random_prompts(zero, manifest), 1)]
    prompt.check_model(Model(manifest, None, None))
    return [(prompt.origin, prompt), ("z=0", prompt.zero_prompt())]


@dataclass(frozen=True)
class CheckRequest:
    """One check: a model, the prompts (a run's, or a task's template), rows (a file, or built-in sentences), the
    engines (None: every local graph on every provider installed, skipping those that cannot run)."""

    model_dir: str
    run: str | None = None
    task: TaskSpec = TaskSpec()
    demos: DemoSpec = DemoSpec()
    data: str | None = None
    engines: tuple[EngineSpec, ...] | None = None
    tolerances: Tolerances = Tolerances()
    threads: int | None = None


def run_check(request: CheckRequest, log: Callable[[str], None] = lambda _m: None) -> CheckReport:
    """`bbt-onnx check` as a job: inputs checked first, then every engine scored and judged."""
    request.tolerances.check()
    manifest = load_manifest(request.model_dir)
    prompts = prompt_set(manifest, request.run, request.task, request.demos)
    task = prompts[0][1].task
    rows = read_examples(request.data) if request.data else sample_rows(task.uses_text_b)
    if request.data:
        check_labels([r for r in rows if r.label is not None], task.label_keys, request.data)
    specs = [(s, True) for s in request.engines] if request.engines else \
        [(s, False) for s in all_local_engines(request.threads)]
    return check_engines(manifest, load_tokenizer(manifest), prompts, rows, specs, request.tolerances,
                         request.threads, log)


def check_engines(manifest: Manifest, tokenizer, prompts: Sequence[tuple[str, TunedPrompt]], rows: Sequence[Example],
                  engines: Sequence[tuple[EngineSpec, bool]], tolerances: Tolerances = Tolerances(),
                  threads: int | None = None, log: Callable[[str], None] = lambda _m: None) -> CheckReport:
    """Score `rows` with every prompt on every engine (`(spec, named)`: a named engine that cannot open is an
    error, an unnamed one is skipped) and compare each with CPU fp32. The first prompt's metric is reported."""
    tolerances.check()
    deep = any(p.deep for _, p in prompts)
    for spec, named in engines:
        reason = spec.unavailable(manifest, deep)
        if reason and named:
            raise SettingsError(f"engine {spec.name} cannot run here: {reason}")
    graphs = verify_graphs(manifest)
    reference_graph = REFERENCE.local_graph(deep)
    if graphs[reference_graph] != "ok":
        raise ModelError(f"the reference graph ({REFERENCE.name}) is damaged: {graphs[reference_graph]}; "
                         "re-export the model")
    labelled = all(r.label is not None for r in rows)
    first = prompts[0][1]
    reference = Model(manifest, tokenizer, replace(REFERENCE, threads=threads).open(manifest, deep))
    encoded = [p.encoder(reference).encode(rows) for _, p in prompts]
    labels = encoded[0].labels

    def score(engine) -> tuple[np.ndarray, float]:
        model = Model(manifest, tokenizer, engine)
        prompts[0][1].logits(model, encoded[0].take(np.arange(1)))  # warm-up: the first call builds the session's plans
        calls = 0
        t0 = time.perf_counter()
        out = []
        for (_, prompt), enc in zip(prompts, encoded):
            out.append(prompt.logits(model, enc, EVAL_ROWS))
            calls += math.ceil(len(enc) / EVAL_ROWS)
        return np.stack(out), 1000 * (time.perf_counter() - t0) / calls

    def metric(logits: np.ndarray) -> float | None:
        return float(losses.metric(first.task.metric, logits[0], labels)[0]) if labelled else None

    order = [(REFERENCE, False)] + [e for e in engines if e[0] != REFERENCE]
    log(f"reference {REFERENCE.name}: {len(prompts)} prompts x {len(rows)} rows")
    ref_logits, ref_ms = score(reference.engine)
    ref_metric = metric(ref_logits)
    results = []
    for spec, _ in order:
        if spec == REFERENCE:
            results.append(EngineResult(spec.name, "reference", 0.0, 1.0, ref_metric, 0.0 if labelled else None,
                                        ref_ms))
            continue
        reason = spec.unavailable(manifest, deep)
        if reason:
            results.append(EngineResult(spec.name, "skipped", reasons=[reason]))
            continue
        graph = spec.local_graph(deep)
        damage = graphs[graph] if graph else "ok"  # a server checks its own
        if damage != "ok":
            results.append(EngineResult(spec.name, "fail", reasons=[damage]))
            continue
        log(f"scoring on {spec.name}")
        engine = spec.open(manifest, deep)
        logits, ms = score(engine)
        cmp = compare_logits(ref_logits, logits)
        got = metric(logits)
        result = EngineResult(spec.name, "pass", cmp["max_abs_diff"], cmp["argmax_agreement"], got,
                              None if got is None else got - ref_metric, ms)
        result.reasons = failures(engine.precision, result, tolerances, labelled)  # a server's: the one it serves
        result.status = "fail" if result.reasons else "pass"
        results.append(result)
    return CheckReport(str(manifest.directory), first.task.name, first.task.metric, [n for n, _ in prompts], len(rows),
                       labelled, graphs, list(onnxruntime().get_available_providers()), results)


def format_report(report: CheckReport) -> str:
    lines = [f"{report.model}: {len(report.prompts)} prompts ({', '.join(report.prompts)}) x {report.rows} rows, "
             f"task {report.task}" + ("" if report.labelled else " (no labels: no metric)"),
             f"{'engine':<11} {'status':<9} {'max |diff|':>10} {'agree':>7} {report.metric_name:>9} {'delta':>8} "
             f"{'ms/call':>8}"]
    for r in report.engines:
        if r.max_abs_diff is None:  # skipped, or a damaged graph
            lines.append(f"{r.engine:<11} {r.status:<9} {r.reasons[0]}")
            continue
        metric = "-" if r.metric is None else f"{r.metric:.4f}"
        delta = "-" if r.metric_delta is None else f"{r.metric_delta:+.4f}"
        lines.append(f"{r.engine:<11} {r.status:<9} {r.max_abs_diff:>10.3g} {r.argmax_agreement:>7.2%} {metric:>9} "
                     f"{delta:>8} {r.ms_per_call:>8.1f}" + (f"  ({'; '.join(r.reasons)})" if r.reasons else ""))
    bad = {k: v for k, v in report.graphs.items() if v != "ok"}
    lines.append("graphs: " + (", ".join(f"{k}: {v}" for k, v in bad.items()) if bad else
                               f"all {len(report.graphs)} match their sha256 and the contract"))
    lines.append(f"providers installed: {', '.join(report.providers)}")
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)
