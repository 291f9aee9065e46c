"""`bbt-onnx bench`: engine-call timings per precision, an end-to-end tune, and the optimizer's cost.

Only measurements live here; the PyTorch baseline (which needs torch) is in
`bbt_onnx_export.baseline` and runs in the same process when torch is importable.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..devices import DEVICES, PRECISIONS, REFERENCE_PRECISION, device_of
from ..encoding import EncodedSet
from ..engines.ort import onnxruntime
from ..errors import BBTError, SettingsError
from ..manifest import Manifest, load_manifest
from ..options import setting
from ..tasks import Framing, Task
from ..timing import TEXTS_PER_CALL, median_ms, synthetic_inputs


def example_task(manifest: Manifest, framing: Framing = Framing()) -> Task:
    """A two-class sentiment task of the model's kind, for timings on built-in rows."""
    return Task("bench", manifest.lm.example_template, manifest.lm.example_labels, framing=framing)


@dataclass(frozen=True)
class BenchOptions:
    """`bbt-onnx bench`: engine timings against PyTorch and an end-to-end tune, or a load test of a server."""

    model_dir: str
    device: str = setting("cpu", "onnxruntime execution provider.", choices=tuple(DEVICES))
    precisions: tuple[str, ...] = setting((), "Graphs to time (repeatable) [default: " + ", ".join(
        f"{' and '.join(d.bench_precisions)} on {d.name}" for d in DEVICES.values()) + ", those exported].",
                                          flag="--precision", choices=tuple(PRECISIONS), multiple=True)
    batch: int = setting(64, "Sequences per engine call (candidates x up to 32 texts).", minimum=1)
    seq: int = setting(80, "Tokens per sequence.", minimum=1)
    baseline: str = setting("torch", "Time Hugging Face transformers on the same inputs (eager and SDPA; needs "
                            "torch).", choices=("torch", "none"))
    torch_model: str | None = setting(None, "Checkpoint for the torch baseline [default: the manifest's source].")
    repeat: int = setting(3, "Timed calls per measurement (median).", minimum=1)
    e2e_budget: int | None = setting(None, "API calls of the end-to-end tune (popsize 20, 32 texts); 0 skips it "
                                     "[default: " + ", ".join(f"{d.bench_e2e_budget} on {d.name}"
                                                              for d in DEVICES.values()) + "].", minimum=0)
    e2e_dim: int = setting(500, "d of the end-to-end tune.", minimum=1)
    threads: int | None = setting(None, "CPU threads for onnxruntime [default: all cores].", minimum=1)
    suffix_data: str | None = setting(None, "Rows (CSV/TSV/JSONL) for the suffix-prompt timing of a --kv-cache "
                                      "decoder: 32 drawn at random [default: synthetic reviews].")
    server: str | None = setting(None, "Load-test this Triton server instead (http://HOST:PORT or grpc://HOST:PORT): "
                                 "latency p50/p99, calls/s, errors and bytes per call at each --clients count, and "
                                 "the API overhead against the same call in process.")
    token_file: str | None = setting(None, "The server's access token.", path=True)
    server_timeout: float = setting(300.0, "With --server: seconds a request may take (queued behind the other "
                                    "clients' included).", minimum=0, open_minimum=True)
    clients: str = setting("1,4,8", "With --server: concurrent clients, one run each.")
    calls: int = setting(20, "With --server: calls per client.", minimum=1)
    max_seconds: float = setting(120.0, "With --server: time limit of each run.", minimum=1)

    LOCAL_ONLY = ("precisions", "baseline", "torch_model", "e2e_budget", "e2e_dim", "suffix_data")
    SERVER_ONLY = ("clients", "calls", "max_seconds", "token_file", "server_timeout")


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda _m: None) -> dict:
    """`bbt-onnx bench` as a job: the report a table or JSON is printed from."""
    if opts.server:
        from ..engines import Remote
        from ..engines.served import read_token
        from ..serving.loadtest import parse_clients, server_report

        remote = Remote(opts.server, read_token(opts.token_file) if opts.token_file else None,
                        opts.server_timeout).check()
        return server_report(opts.model_dir, remote, opts.device, opts.batch, opts.seq, opts.repeat, opts.threads,
                             parse_clients(opts.clients), opts.calls, opts.max_seconds, log=log)
    from ..engines import OrtSpec
    from ..model import Model

    on = device_of(opts.device)
    manifest = load_manifest(opts.model_dir)
    precisions = opts.precisions or tuple(p for p in on.bench_precisions if p in manifest.graphs)
    cache_precision = next((p for p in precisions if manifest.has_cache_graphs(p)), None)
    if opts.suffix_data and cache_precision is None:
        raise SettingsError("suffix_data times the cached pair of graphs, and this model has none; re-export a "
                            "decoder with `bbt-onnx export --kv-cache`", "suffix_data")
    prompts, enc = synthetic_inputs(manifest, opts.batch, opts.seq)
    results, models = [], {}
    for precision in precisions:
        models[precision] = Model.load(opts.model_dir, OrtSpec(opts.device, precision, opts.threads))
        log(f"timing {precision} on {opts.device}: {opts.batch} sequences x {opts.seq} tokens")
        results.append(time_engine(models[precision].engine, precision, opts.device, prompts, enc, opts.repeat))
        results[-1].memcpy_nodes = memcpy_nodes(manifest, precision, opts.device)

    torch_note = None
    if opts.baseline == "torch":
        torch_note = torch_baseline(manifest, opts.torch_model or manifest.source, prompts, enc, opts.device, results,
                                    opts.repeat, log)
        if torch_note:
            log(f"note: {torch_note}")
    report = {"model": str(opts.model_dir), "architecture": manifest.architecture, "device": opts.device,
              "results": [r.to_json() for r in results], "torch_baseline": torch_note or "measured"}
    report["optimizer_ms_per_generation"] = optimizer_costs(opts.e2e_dim, 20)
    if cache_precision:
        rows = suffix_rows(opts.suffix_data)
        p = min(10, manifest.prompt_tokens)
        log(f"timing a suffix prompt ({cache_precision}): {len(rows)} rows, P={p}, popsize 10, full vs cached text")
        report["suffix_cache"] = suffix_cache(manifest, cache_precision, opts.device, rows, p, 10, opts.repeat,
                                              opts.threads)
    budget = opts.e2e_budget if opts.e2e_budget is not None else on.bench_e2e_budget
    if budget:
        fast = min(results, key=lambda r: r.ms_per_call).precision if results else REFERENCE_PRECISION
        log(f"end to end: {budget} calls, popsize 20, d={opts.e2e_dim}, {fast}")
        model = models.get(fast) or Model.load(opts.model_dir, OrtSpec(opts.device, fast, opts.threads))
        report["end_to_end"] = {"precision": fast, **end_to_end(
            model, budget, 20, opts.e2e_dim, manifest.prompt_tokens,
            words=max(1, (opts.seq - manifest.prompt_tokens) // 2))}
    return report


def format_bench(report: dict) -> str:
    """The human table of either kind of bench report."""
    if "load" in report:
        from ..serving.loadtest import format_load

        return format_load(report)
    return format_report(report)


def suffix_rows(path: str | None, count: int = 32) -> list:
    """`count` rows drawn at random from `path`, or synthetic reviews of about an MR sentence's length."""
    import random

    from ..data import Example, read_examples
    from ..synthetic import sentiment_examples

    if path is None:
        return sentiment_examples(count, seed=0, min_words=12, max_words=30)
    rows = read_examples(path)
    return [Example(r.text, r.text_b) for r in random.Random(0).sample(rows, min(count, len(rows)))]  # text only


def torch_baseline(manifest: Manifest, source: str, prompts: np.ndarray, enc: EncodedSet, device: str,
                   results: list, repeat: int, log: Callable[[str], None] = lambda _m: None) -> str | None:
    """Fill the torch columns of `results`; a reason when the baseline cannot run."""
    try:
        from bbt_onnx_export.baseline import VARIANTS, torch_ms
    except ImportError as exc:
        return f"no torch baseline: {exc}"
    fp16 = DEVICES[device].torch_fp16
    timings = {}
    for attn in VARIANTS:
        log(f"timing torch {attn} ({'fp16' if fp16 else 'fp32'}) on {device}")
        try:
            timings[attn] = torch_ms(manifest, source, prompts, enc, device, fp16, attn, repeat)
        except BBTError as exc:
            return f"no torch baseline: {exc}"
    best = min(timings, key=timings.get)
    for r in results:
        r.torch_ms_per_call, r.torch_variant = timings[best], f"{best} {'fp16' if fp16 else 'fp32'}"
        r.ratio_vs_torch = timings[best] / r.ms_per_call
    return None


@dataclass
class EngineTiming:
    precision: str
    device: str
    batch: int  # sequences per call = candidates x texts
    seq: int
    candidates: int
    texts: int
    ms_per_call: float
    sequences_per_s: float
    tokens_per_s: float
    torch_ms_per_call: float | None = None
    torch_variant: str | None = None
    ratio_vs_torch: float | None = None
    memcpy_nodes: int | None = None  # host<->device copies inside the graph; 0: every node on the provider

    def to_json(self) -> dict:
        return asdict(self)


def time_engine(engine, precision: str, device: str, prompts: np.ndarray, enc: EncodedSet,
                repeat: int) -> EngineTiming:
    ms = median_ms(lambda: engine.label_logits(prompts, enc), repeat)
    batch = prompts.shape[0] * len(enc)
    seq = enc.input_ids.shape[1]
    return EngineTiming(precision, device, batch, seq, prompts.shape[0], len(enc), ms, 1000 * batch / ms,
                        1000 * batch * seq / ms)


# NodeProto.op_type is field 4 (tag 0x22), then the string's length: enough to count copy nodes without onnx
MEMCPY_OPS = (b"\x22\x0cMemcpyToHost", b"\x22\x0eMemcpyFromHost")


def memcpy_nodes(manifest: Manifest, precision: str, device: str) -> int:
    """Copies between host and device that onnxruntime inserted into the graph (0 when every node
    runs on the chosen provider), counted in the optimised graph the session writes."""
    return count_memcpy(optimized_graph(manifest, precision, device))


def count_memcpy(model_bytes: bytes) -> int:
    return sum(model_bytes.count(op) for op in MEMCPY_OPS)


def optimized_graph(manifest: Manifest, precision: str, device: str) -> bytes:
    """The serialized graph as onnxruntime runs it on `device`, after its own optimisations."""
    import tempfile

    ort = onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(str(manifest.graph_path(precision)), opts, providers=[DEVICES[device].provider])
        with open(opts.optimized_model_filepath, "rb") as f:
            return f.read()


def optimizer_costs(dim: int, popsize: int, generations: int = 10) -> dict[str, float]:
    """ms per ask+tell generation for full and diagonal CMA-ES at this d, on a dummy objective."""
    from ..methods import new_es
    from ..tuning.tuner import TuneConfig

    out = {}
    for name, diagonal in (("full", False), ("diagonal", True)):
        es = new_es(TuneConfig(intrinsic_dim=dim, popsize=popsize, budget=popsize * (generations + 2),
                               diagonal=diagonal), 0)
        rng = np.random.default_rng(0)
        es.tell(es.ask(), list(rng.random(popsize)))  # first generation builds caches
        t0 = time.perf_counter()
        for _ in range(generations):
            z = es.ask()
            es.tell(z, list(rng.random(popsize)))
        out[name] = 1000 * (time.perf_counter() - t0) / generations
    return out


def end_to_end(model, budget: int, popsize: int, dim: int, prompt_tokens: int, words: int, seed: int = 0,
               diagonal: bool = False) -> dict:
    """A real tune on synthetic rows (16 per class, `words` words each): calls/s and where the time goes."""
    from ..synthetic import sentiment_examples
    from ..tuning.tuner import BlackBoxTuner, TuneConfig

    rows = sentiment_examples(TEXTS_PER_CALL, seed, min_words=words, max_words=words)
    config = TuneConfig(prompt_tokens=prompt_tokens, intrinsic_dim=dim, popsize=popsize, budget=budget,
                        seed=seed, checkpoint_every=0, diagonal=diagonal)
    tuner = BlackBoxTuner(model, example_task(model.manifest), config)
    train = tuner.encode(rows)
    tuner.fit(train)
    r = tuner.report
    wall = r.wall_seconds
    generations = max(r.generations, 1)
    return {
        "budget": budget, "popsize": popsize, "intrinsic_dim": dim, "prompt_tokens": prompt_tokens,
        "texts": len(train), "seq": int(train.input_ids.shape[1]), "wall_seconds": wall,
        "calls_per_second": r.calls_per_second, "generations": r.generations, "engine_seconds": r.engine_seconds,
        "optimizer_seconds": r.optimizer_seconds, "host_seconds": r.host_seconds,
        "optimizer_and_host_share": (r.optimizer_seconds + r.host_seconds) / wall if wall else 0.0,
        "ms_per_generation": 1000 * wall / generations,
        "engine_ms_per_generation": 1000 * r.engine_seconds / generations,
        "optimizer_ms_per_generation": 1000 * r.optimizer_seconds / generations,
        "train_loss_initial": r.train_loss_initial, "train_loss_final": r.train_loss_final,
    }


def words_for_length(model, prompt_tokens: int, seq: int, seed: int = 0) -> int:
    """The fewest words per synthetic row whose encoded rows reach `seq` tokens."""
    from ..synthetic import sentiment_examples

    encoder = model.encoder(example_task(model.manifest), prompt_tokens)
    for words in range(1, 400):
        if encoder.encode(sentiment_examples(TEXTS_PER_CALL, seed, min_words=words,
                                             max_words=words)).input_ids.shape[1] >= seq:
            return words
    return 400


def suffix_cache(manifest: Manifest, precision: str, device: str, rows: list, prompt_tokens: int, popsize: int,
                 repeat: int, threads: int | None = None, seed: int = 0) -> dict:
    """One generation of a suffix prompt (`popsize` candidates on the training rows) recomputed in full, with
    the engine's length buckets, against the same on the cached text, side by side; and how far apart the
    logits are."""
    from ..encoding import Encoder, load_tokenizer
    from ..engines.ort import OrtEngine

    task = example_task(manifest, Framing(bos="never", position="suffix"))
    enc = Encoder(load_tokenizer(manifest), manifest, task, prompt_tokens).encode(rows)
    rng = np.random.default_rng(seed)
    shape = (popsize, prompt_tokens, manifest.hidden_size)
    prompts = rng.normal(0, manifest.embedding_std, size=shape).astype(np.float32)
    full = OrtEngine(manifest, precision, device, threads, kv_cache=False)
    cached = OrtEngine(manifest, precision, device, threads, kv_cache=True)
    t0 = time.perf_counter()
    got = cached.label_logits(prompts, enc)  # computes and keeps the text, then the first tail call
    first_ms = 1000 * (time.perf_counter() - t0)
    want = full.label_logits(prompts, enc)
    cached_ms = median_ms(lambda: cached.label_logits(prompts, enc), repeat, warmup=0)
    full_ms = median_ms(lambda: full.label_logits(prompts, enc), repeat, warmup=0)
    return {"precision": precision, "rows": len(enc), "prompt_tokens": prompt_tokens, "popsize": popsize,
            "text_tokens": int(enc.prompt_pos.max()), "tail_tokens": int(enc.suffix_tail),
            "full_ms_per_generation": full_ms, "cached_ms_per_generation": cached_ms,
            "speedup": full_ms / cached_ms, "text_once_ms": max(first_ms - cached_ms, 0.0),
            "max_abs_diff": float(np.abs(got - want).max())}


def format_report(report: dict) -> str:
    """The human table."""
    lines = [f"{report['architecture']} on {report['device']}",
             f"{'precision':<9} {'batch':>5} {'seq':>4} {'ms/call':>9} {'seq/s':>8} {'tok/s':>9} {'torch ms':>9} "
             f"{'vs torch':>8} {'memcpy':>6}"]
    for r in report["results"]:
        torch = f"{r['torch_ms_per_call']:9.1f} {r['ratio_vs_torch']:7.2f}x" if r["torch_ms_per_call"] else \
            f"{'-':>9} {'-':>8}"
        lines.append(f"{r['precision']:<9} {r['batch']:>5} {r['seq']:>4} {r['ms_per_call']:9.1f} "
                     f"{r['sequences_per_s']:8.1f} {r['tokens_per_s']:9.0f} {torch} {r['memcpy_nodes']!s:>6}")
    if report["results"] and report["results"][0]["torch_variant"]:
        lines.append(f"torch baseline: {report['results'][0]['torch_variant']} (the faster of eager and SDPA)")
    elif report.get("torch_baseline") != "measured":
        lines.append(str(report.get("torch_baseline")))
    opt = report["optimizer_ms_per_generation"]
    lines.append(f"CMA-ES ask+tell per generation: full {opt['full']:.1f} ms, diagonal {opt['diagonal']:.1f} ms")
    c = report.get("suffix_cache")
    if c:
        lines.append(f"suffix prompt ({c['precision']}, {c['rows']} rows of {c['text_tokens']} text + "
                     f"{c['tail_tokens']} tail tokens, P={c['prompt_tokens']}, popsize {c['popsize']}): full "
                     f"{c['full_ms_per_generation']:.1f} ms/generation, cached text {c['cached_ms_per_generation']:.1f} "
                     f"ms ({c['speedup']:.2f}x; the text once {c['text_once_ms']:.1f} ms), max abs diff "
                     f"{c['max_abs_diff']:.1e}")
    e = report.get("end_to_end")
    if e:
        lines.append(f"end to end ({e['precision']}): {e['budget']} calls in {e['wall_seconds']:.2f}s = "
                     f"{e['calls_per_second']:.1f} calls/s, {e['ms_per_generation']:.1f} ms/generation; engine "
                     f"{e['engine_seconds']:.2f}s, optimizer {e['optimizer_seconds']:.2f}s, host "
                     f"{e['host_seconds']:.2f}s ({e['optimizer_and_host_share']:.1%} optimizer+host)")
    return "\n".join(lines)
