"""`bbt-onnx bench`: engine-call timings per precision, an end-to-end tune, and the optimizer's cost.

Only measurements live here; the PyTorch baseline (which needs torch) is in
`bbt_onnx_export.baseline` and runs in the same process when torch is importable.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .encoding import EncodedSet
from .errors import SettingsError
from .manifest import Manifest

TEXTS_PER_CALL = 32  # the reference's few-shot set: 16 per class x 2 classes
DECODER_TASK = (" Review: {text}\nSentiment:", (("0", " negative"), ("1", " positive")))  # template, labels


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


def split_batch(batch: int) -> tuple[int, int]:
    """(candidates, texts) for `batch` sequences: up to 32 texts, the population fills the rest."""
    texts = min(batch, TEXTS_PER_CALL)
    if batch % texts:
        raise SettingsError(f"--batch {batch} is not a multiple of {texts} texts per call")
    return batch // texts, texts


def synthetic_inputs(manifest: Manifest, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, EncodedSet]:
    """Random ids shaped like real rows: bos, P placeholders, text, mask (masked LMs), eos; full attention."""
    candidates, texts = split_batch(batch)
    p = manifest.prompt_tokens
    head = 1 + p
    if seq < head + 4:
        raise SettingsError(f"--seq {seq} is too short for {p} prompt tokens; use at least {head + 4}")
    if seq > manifest.max_positions:
        raise SettingsError(f"--seq {seq} exceeds the model's {manifest.max_positions} positions")
    rng = np.random.default_rng(seed)
    specials = {i for i in (manifest.bos_id, manifest.eos_id, manifest.pad_id, manifest.mask_id) if i is not None}
    low = max(specials) + 1 if specials else 0
    ids = rng.integers(low, manifest.vocab_size, size=(texts, seq), dtype=np.int64)
    start = manifest.prompt_start
    ids[:, start:start + p] = manifest.placeholder_ids
    if manifest.bos_id is not None:
        ids[:, 0] = manifest.bos_id
    mask_pos = np.full(texts, seq - 1, np.int64)
    if manifest.kind == "masked":
        ids[:, -1] = manifest.eos_id
        ids[:, -3] = manifest.mask_id
        mask_pos[:] = seq - 3
    enc = EncodedSet(ids, np.ones_like(ids), mask_pos, np.zeros(texts, np.int64),
                     rng.integers(low, manifest.vocab_size, size=2, dtype=np.int64))
    prompts = rng.normal(0, manifest.embedding_std, size=(candidates, p, manifest.hidden_size)).astype(np.float32)
    return prompts, enc


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


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

    import onnxruntime as ort

    from .engine import PROVIDERS

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(str(manifest.graph_path(precision)), opts, providers=[PROVIDERS[device]])
        with open(opts.optimized_model_filepath, "rb") as f:
            return f.read()


def optimizer_costs(dim: int, popsize: int, generations: int = 10) -> dict[str, float]:
    """ms per ask+tell generation for full and diagonal CMA-ES at this d, on a dummy objective."""
    from .methods import new_es
    from .tuner import TuneConfig

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


def end_to_end(model, budget: int, popsize: int, dim: int, prompt_tokens: int, words: int, seed: int = 0) -> dict:
    """A real tune on synthetic rows (16 per class): calls/s and where the time goes."""
    from .synthetic import sentiment_examples
    from .tasks import Task
    from .tuner import BlackBoxTuner, TuneConfig

    if model.manifest.kind == "masked":
        task = Task("bench", " . {text} . It was {mask} .", (("0", "bad"), ("1", "great")))
    else:
        task = Task("bench", *DECODER_TASK)
    rows = sentiment_examples(TEXTS_PER_CALL, seed, min_words=words, max_words=words)
    config = TuneConfig(prompt_tokens=prompt_tokens, intrinsic_dim=dim, popsize=popsize, budget=budget,
                        seed=seed, checkpoint_every=0)
    tuner = BlackBoxTuner(model, task, config)
    train = tuner.encode(rows)
    tuner.fit(train)
    r = tuner.report
    wall = r.wall_seconds
    return {
        "budget": budget, "popsize": popsize, "intrinsic_dim": dim, "prompt_tokens": prompt_tokens,
        "texts": len(train), "seq": int(train.input_ids.shape[1]), "wall_seconds": wall,
        "calls_per_second": r.calls_per_second, "engine_seconds": r.engine_seconds,
        "optimizer_seconds": r.optimizer_seconds, "host_seconds": r.host_seconds,
        "optimizer_and_host_share": (r.optimizer_seconds + r.host_seconds) / wall if wall else 0.0,
        "ms_per_generation": 1000 * wall / max(r.generations, 1),
    }


def suffix_cache(manifest: Manifest, precision: str, device: str, rows: list, prompt_tokens: int, popsize: int,
                 repeat: int, threads: int | None = None, seed: int = 0) -> dict:
    """One generation of a suffix prompt (`popsize` candidates on the training rows) recomputed in full, with
    the engine's length buckets, against the same on the cached text, side by side; and how far apart the
    logits are."""
    from .encoding import Encoder, load_tokenizer
    from .engine import OrtEngine
    from .tasks import Framing, Task

    task = Task("bench", *DECODER_TASK, framing=Framing(bos="never", position="suffix"))
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
