"""Pure parts of the runtime: projection, seeds, losses, tasks, data, k-shot sampling, encoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bbt_onnx import losses
from bbt_onnx.data import DataSpec, Example, check_labels, k_shot_split, load_splits, read_examples
from bbt_onnx.encoding import Encoder, label_token_ids, load_tokenizer
from bbt_onnx.errors import BBTError
from bbt_onnx.kinds import KINDS
from bbt_onnx.manifest import load_manifest
from bbt_onnx.options import flag_of
from bbt_onnx.seeding import seeds
from bbt_onnx.synthetic import write_csv
from bbt_onnx.subspace import ProjectionSpec, build_projection, normal_std, project
from bbt_onnx.tasks import PRESETS, Task, check_template, parse_labels, resolve_task

from conftest import PROMPT_TOKENS


# -- projection ----------------------------------------------------------------------------------
def test_normal_projection_std_follows_the_reference_formula():
    assert normal_std(0.2, 400, alpha=1.0, sigma=1.0) == pytest.approx(0.2 / 20)
    assert normal_std(0.2, 400, alpha=3.0, sigma=0.5) == pytest.approx(3 * 0.2 / (20 * 0.5))
    spec = ProjectionSpec(seed=7, intrinsic_dim=100, prompt_tokens=20, hidden_size=50, embedding_std=0.3,
                          alpha=2.0, sigma=0.5)
    a = build_projection(spec)
    assert a.shape == (100, 1000) and a.dtype == np.float32
    assert a.std() == pytest.approx(2.0 * 0.3 / (10 * 0.5), rel=0.02)
    assert abs(a.mean()) < 0.01


def test_uniform_projection_is_the_papers_range():
    a = build_projection(ProjectionSpec(1, 64, 4, 8, 0.3, kind="uniform"))
    assert a.max() <= 1 / 8 and a.min() >= -1 / 8 and a.max() > 0.12 and a.min() < -0.12


def test_projection_is_regenerated_from_the_seed_and_projects_as_a_matmul():
    spec = ProjectionSpec(3, 10, 2, 4, 0.1)
    a = build_projection(spec)
    np.testing.assert_array_equal(a, build_projection(spec))
    assert not np.array_equal(a, build_projection(ProjectionSpec(4, 10, 2, 4, 0.1)))
    z = np.arange(20, dtype=np.float64).reshape(2, 10) / 10
    prompts = project(a, z, 2)
    assert prompts.shape == (2, 2, 4)
    np.testing.assert_allclose(prompts[1].ravel(), a.T @ z[1].astype(np.float32), rtol=1e-5)


def test_seed_streams_are_independent_and_stable():
    s = seeds(42)
    assert len(set(s.values())) == 3 and s == seeds(42) and s != seeds(43)


def test_bad_projection_settings_are_user_errors():
    with pytest.raises(BBTError, match="random_proj"):
        ProjectionSpec(1, 10, 2, 4, 0.1, kind="sparse")
    with pytest.raises(BBTError, match="sigma"):
        ProjectionSpec(1, 10, 2, 4, 0.1, sigma=0)


# -- losses ----------------------------------------------------------------------------------------
LOGITS = np.array([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]])  # C=1, N=2, K=3
LABELS = np.array([0, 2])


def test_cross_entropy_by_hand():
    row0 = -np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1)))
    row1 = -np.log(1 / (np.exp(0.5) + np.exp(1.5) + 1))
    assert losses.cross_entropy(LOGITS, LABELS)[0] == pytest.approx((row0 + row1) / 2)


def test_hinge_by_hand_with_margin_two():
    # row 0 (y=0): max(0, 0-2+2)=0, max(0, -1-2+2)=0 ; row 1 (y=2): max(0, .5-0+2)=2.5, max(0, 1.5+2)=3.5
    assert losses.hinge(LOGITS, LABELS)[0] == pytest.approx((0 + 0 + 2.5 + 3.5) / 2)


def test_metrics_and_perf_loss():
    assert losses.accuracy(LOGITS, LABELS)[0] == pytest.approx(0.5)
    assert losses.loss("perf", "accuracy", LOGITS, LABELS)[0] == pytest.approx(-0.5)
    two = np.array([[[0, 1], [0, 1], [1, 0], [1, 0]]], dtype=float)  # predicts 1, 1, 0, 0
    y = np.array([1, 0, 1, 0])  # tp=1, fp=1, fn=1 -> f1 = 0.5
    assert losses.f1(two, y)[0] == pytest.approx(0.5)
    assert losses.f1(np.array([[[1.0, 0.0]]]), np.array([0]))[0] == 0.0


def test_losses_score_every_candidate_at_once():
    stacked = np.concatenate([LOGITS, -LOGITS])
    ce = losses.cross_entropy(stacked, LABELS)
    assert ce.shape == (2,) and ce[0] == pytest.approx(losses.cross_entropy(LOGITS, LABELS)[0])
    assert losses.hinge(stacked, LABELS)[1] == pytest.approx(losses.hinge(-LOGITS, LABELS)[0])


# -- tasks -----------------------------------------------------------------------------------------
def test_presets_follow_the_reference():
    assert PRESETS["sst2"].template == " . {text} . It was {mask} ."
    assert PRESETS["agnews"].label_words == ("World", "Sports", "Business", "Tech")
    assert len(PRESETS["dbpedia"].labels) == 14 and PRESETS["dbpedia"].label_words[-1] == "Written"
    assert PRESETS["mrpc"].metric == "f1" and PRESETS["rte"].label_words == ("Yes", "No")
    assert PRESETS["snli"].label_words == ("Yes", "Maybe", "No")


def test_custom_tasks_from_flags_and_files(tmp_path):
    task = resolve_task(template=" {text} It was {mask} .", labels="negative=bad,positive=great")
    assert task.labels == (("negative", "bad"), ("positive", "great"))
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"template": " {text} ? {mask}", "labels": {"n": "No", "y": "Yes"}, "metric": "f1"}))
    assert resolve_task(task_file=f).metric == "f1"
    assert parse_labels("a=x, b =y") == (("a", "x"), ("b", "y"))


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "imdb"}, "unknown task"),
    ({"template": " {text} It was .", "labels": "a=x,b=y"}, None),  # checked against the model kind later
    ({"template": " {mask} only", "labels": "a=x,b=y"}, "no {text}"),
    ({"template": " {text} {mask}", "labels": "a=x"}, "at least two"),
    ({"template": " {text} {mask}", "labels": "ax,b=y"}, "name=word"),
    ({"template": " {txt} {mask}", "labels": "a=x,b=y"}, "unknown placeholder"),
    ({}, "say what the task is"),
])
def test_task_mistakes(kwargs, match):
    if match is None:
        task = resolve_task(**kwargs)
        with pytest.raises(BBTError, match="no \\{mask\\}"):
            check_template(task.template, KINDS["masked"])
        return
    with pytest.raises(BBTError, match=match):
        task = resolve_task(**kwargs)
        check_template(task.template, KINDS["masked"])


# -- label ids ---------------------------------------------------------------------------------------
def test_preset_label_ids_are_the_first_piece_without_a_space(tiny_model, tiny_src):
    """Cross-checked against the reference's own call: tokenizer.encode(word, add_special_tokens=False)[0]."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_src))
    tok = load_tokenizer(load_manifest(tiny_model))
    for task in PRESETS.values():
        ids, _ = label_token_ids(tok, task.label_words, prefix="")
        assert ids == [hf.encode(w, add_special_tokens=False)[0] for w in task.label_words], task.name


def test_split_label_words_warn_naming_the_piece(tiny_model):
    tok = load_tokenizer(load_manifest(tiny_model))
    ids, warnings = label_token_ids(tok, ["Xylophonic", "great"], prefix="")
    assert len(ids) == 2 and len(warnings) == 1
    assert "Xylophonic" in warnings[0] and "using the first" in warnings[0]
    first = tok.encode("Xylophonic", add_special_tokens=False).tokens[0]
    assert repr(first) in warnings[0]


def test_label_words_sharing_a_first_piece_are_rejected(tiny_model):
    tok = load_tokenizer(load_manifest(tiny_model))
    with pytest.raises(BBTError, match="share their first piece"):
        label_token_ids(tok, ["Xylophonic", "Xylem"], prefix="")


# -- data ------------------------------------------------------------------------------------------
def test_readers_accept_csv_tsv_jsonl_with_aliases(tmp_path):
    (tmp_path / "a.csv").write_text("\ufeffsentence,label\n\"hello, world\",1\nbye,0\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("text\ttext_b\tlabel\nx\ty\tpos\n")
    (tmp_path / "c.jsonl").write_text('{"sentence1": "p", "sentence2": "h", "label": 2}\n\n{"sentence1": "q", "sentence2": "i", "label": 0}\n')
    assert read_examples(tmp_path / "a.csv") == [Example("hello, world", None, "1"), Example("bye", None, "0")]
    assert read_examples(tmp_path / "b.tsv") == [Example("x", "y", "pos")]
    assert read_examples(tmp_path / "c.jsonl")[0] == Example("p", "h", "2")


@pytest.mark.parametrize("name,content,match", [
    ("e.csv", "", "is empty"),
    ("h.csv", "sentence,label\n", "no rows"),
    ("m.csv", "words,label\nx,1\n", "no text column"),
    ("l.csv", "sentence\nx\n", "no 'label' column"),
    ("b.jsonl", '{"text": "x", "label": 1}\nnot json\n', "line 2 is not JSON"),
    ("x.parquet", "abc", "unknown data format"),
    ("r.csv", "sentence,label\nx,1,extra\n", "more fields"),
    ("v.csv", "sentence,label\n,1\n", "empty 'sentence'"),
])
def test_malformed_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(BBTError, match=match):
        read_examples(tmp_path / name)


def test_unknown_labels_are_named():
    with pytest.raises(BBTError, match="'positive'.*label names are 0, 1") as caught:
        check_labels([Example("x", label="positive")], ["0", "1"], "train.csv")
    assert caught.value.arguments == ("labels",) and "--" not in str(caught.value)


def test_k_shot_split_takes_k_per_class_for_train_and_dev_deterministically():
    rows = [Example(f"t{i}", label=str(i % 3)) for i in range(90)]
    train, dev = k_shot_split(rows, ["0", "1", "2"], 4, np.random.default_rng(0))
    assert len(train) == 12 and len(dev) == 12
    assert all(sum(e.label == c for e in part) == 4 for part in (train, dev) for c in "012")
    assert not set(train) & set(dev)
    again, _ = k_shot_split(rows, ["0", "1", "2"], 4, np.random.default_rng(0))
    other, _ = k_shot_split(rows, ["0", "1", "2"], 4, np.random.default_rng(1))
    assert again == train and other != train


def test_no_dev_tunes_on_the_same_draw_with_its_dev_rows(tmp_path):
    """no_dev: train is the default draw's train and dev, in that order (so runs with and without compare on the
    same 2k rows a class); the demonstrations come from the rest of the pool."""
    pool = tmp_path / "pool.csv"
    pool.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(60)))
    plain = load_splits(DataSpec(data=str(pool), k_shot=4, seed=3), ["0", "1"])
    merged = load_splits(DataSpec(data=str(pool), k_shot=4, seed=3, no_dev=True), ["0", "1"], demos=2)
    assert merged.dev is None and merged.train == plain.train + plain.dev
    assert len(merged.demos) == 4 and not set(map(id, merged.demos)) & set(map(id, merged.train))
    with pytest.raises(BBTError, match="a train file is used whole") as caught:
        load_splits(DataSpec(train=str(pool), no_dev=True), ["0", "1"])
    assert caught.value.arguments == ("no_dev", "train")
    with pytest.raises(BBTError, match="no_dev means no dev set"):
        load_splits(DataSpec(data=str(pool), dev=str(pool), no_dev=True), ["0", "1"])


def test_k_larger_than_a_class_names_it():
    rows = [Example("a", label="0")] * 10 + [Example("b", label="1")] * 5
    with pytest.raises(BBTError, match="class '1' has only 5 examples"):
        k_shot_split(rows, ["0", "1"], 4, np.random.default_rng(0))


def test_hf_sources_need_datasets_or_say_offline(tmp_path):
    with pytest.raises(BBTError, match="datasets|Hugging Face hub"):
        load_splits(DataSpec(data="hf:glue/sst2"), ["0", "1"])


# -- encoding ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_parts(tiny_model):
    m = load_manifest(tiny_model)
    return m, load_tokenizer(m)


def test_rows_are_bos_placeholders_template_eos(model_parts):
    m, tok = model_parts
    enc = Encoder(tok, m, PRESETS["sst2"], 5).encode([Example("great fun"), Example("bad")])
    ids = enc.input_ids[0][enc.attention_mask[0] == 1]
    assert ids[0] == m.bos_id and ids[-1] == m.eos_id
    assert list(ids[1:6]) == list(m.placeholder_ids[:5])
    whole = tok.encode(" . great fun . It was <mask> .", add_special_tokens=False).ids
    assert list(ids[6:-1]) == whole
    assert ids[enc.mask_pos[0]] == m.mask_id and enc.input_ids[1, enc.mask_pos[1]] == m.mask_id
    assert enc.attention_mask[1].sum() < enc.attention_mask[0].sum()
    assert (enc.input_ids[1][enc.attention_mask[1] == 0] == m.pad_id).all()
    assert list(enc.labels) == [-1, -1]


def test_truncation_cuts_only_the_text(model_parts):
    m, tok = model_parts
    task = PRESETS["mrpc"]
    long = " ".join(["movie"] * 200)
    enc = Encoder(tok, m, task, PROMPT_TOKENS, max_length=40).encode([Example(long, "short one", "1")])
    ids = list(enc.input_ids[0])
    assert len(ids) == 40 and enc.truncated == 1
    assert ids[enc.mask_pos[0]] == m.mask_id and ids[-1] == m.eos_id
    assert ids[1:1 + PROMPT_TOKENS] == list(m.placeholder_ids)
    tail = tok.encode(" short one", add_special_tokens=False).ids
    assert ids[-1 - len(tail):-1] == tail  # text_b kept whole: the longest field was cut


def test_template_that_cannot_fit_is_a_user_error(model_parts):
    m, tok = model_parts
    task = Task("t", " " + "word " * 60 + "{text} {mask}", (("0", "a"), ("1", "b")))
    with pytest.raises(BBTError, match="no room for text"):
        Encoder(tok, m, task, PROMPT_TOKENS, max_length=30).encode([Example("hello there you")])


def test_prompt_tokens_beyond_the_export_are_rejected(model_parts):
    m, tok = model_parts
    with pytest.raises(BBTError, match="re-export"):
        Encoder(tok, m, PRESETS["sst2"], PROMPT_TOKENS + 1)


def test_batches_sort_by_length_and_trim_padding(model_parts):
    m, tok = model_parts
    rows = [Example("x " * n) for n in (30, 1, 12, 2, 25)]
    enc = Encoder(tok, m, PRESETS["sst2"], 2).encode(rows)
    seen = []
    for idx, batch in enc.batches(2):
        assert batch.input_ids.shape[1] == batch.attention_mask.sum(1).max()
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(5)) and seen[:2] == [1, 3]


def test_encoding_rows_with_unknown_labels_is_a_user_error(model_parts):
    m, tok = model_parts
    with pytest.raises(BBTError, match="'positive'.*label names are 0, 1"):
        Encoder(tok, m, PRESETS["sst2"], 2).encode([Example("fine", label="positive")])


def reference_truncation(counts: dict, over: int):
    """The original rule, one token per pass: cut from the field with the most tokens, the first named on a
    tie; give up when that field is down to one."""
    left, drop = dict(counts), {f: 0 for f in counts}
    for _ in range(over):
        field = max(left, key=lambda f: left[f])
        if left[field] <= 1:
            return None
        left[field] -= 1
        drop[field] += 1
    return drop


def test_truncation_plan_is_the_longest_first_rule_in_one_step():
    from bbt_onnx.encoding import truncation_plan

    rng = np.random.default_rng(0)
    cases = [({"text": 5, "text_b": 5}, 3), ({"text": 1, "text_b": 10}, 9), ({"text": 1, "text_b": 10}, 10),
             ({"text": 10, "text_b": 0}, 9), ({"text": 10, "text_b": 0}, 10)]
    cases += [({"text": int(a), "text_b": int(b)}, int(o)) for a, b, o in rng.integers(0, 40, size=(300, 3))]
    for counts, over in cases:
        assert truncation_plan(counts, over) == reference_truncation(counts, over), (counts, over)


def test_deploys_encode_py_carries_the_truncation_rule_and_nothing_of_bbt_onnx(tmp_path, monkeypatch):
    """encode.py, written beside an ids classifier, holds `truncation_plan`'s source instead of importing it."""
    import importlib.util
    import sys

    from bbt_onnx.deploy import encoder_script
    from bbt_onnx.truncation import truncation_plan

    (tmp_path / "encode.py").write_text(encoder_script())
    monkeypatch.setitem(sys.modules, "bbt_onnx", None)  # as where it runs: no bbt-onnx to import
    spec = importlib.util.spec_from_file_location("encode", tmp_path / "encode.py")
    encode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(encode)
    assert encode.truncation_plan is not truncation_plan and encode.encode.__module__ == "encode"
    for a in range(0, 12):
        for b in range(0, 12):
            for over in range(0, 25):
                counts = {"text": a, "text_b": b}
                assert encode.truncation_plan(counts, over) == reference_truncation(counts, over), (counts, over)


def test_truncating_a_huge_row_is_linear(model_parts):
    """A row of a million characters is cut in one pass (it took 39 s at 200 KB, one token per pass)."""
    import time

    m, tok = model_parts
    text = "great fun but slow " * 52_000
    t0 = time.perf_counter()
    enc = Encoder(tok, m, PRESETS["sst2"], PROMPT_TOKENS, max_length=64).encode([Example(text)])
    assert enc.truncated == 1 and enc.input_ids.shape[1] == 64
    assert time.perf_counter() - t0 < 20  # a bound against a hang, not a timing: the quadratic cut took hours


def test_a_row_over_the_bound_is_refused_by_name(tmp_path):
    from bbt_onnx.data import MAX_ROW_CHARS
    from bbt_onnx.errors import DataError

    huge = "x" * (MAX_ROW_CHARS + 1)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "fine", "label": 0}) + "\n" +
                                        json.dumps({"text": huge, "label": 1}) + "\n")
    with pytest.raises(DataError, match="row 2 holds 1,000,001 characters"):
        read_examples(tmp_path / "big.jsonl")
    write_csv(tmp_path / "big.csv", [("fine", 0), (huge, 1)])
    with pytest.raises(DataError, match="over 1,000,000 characters"):
        read_examples(tmp_path / "big.csv")
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide csv limit is left as it was


def test_a_label_word_written_with_a_leading_space_keeps_it():
    assert parse_labels("0= bad,1=great ") == (("0", " bad"), ("1", "great"))
    assert parse_labels(" neg=bad, pos = great") == (("neg", "bad"), ("pos", " great"))


def test_strict_json_never_holds_nan():
    from bbt_onnx.fileio import dumps

    text = dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 0.5})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 0.5}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("field,value", [("prompt_tokens", 0), ("intrinsic_dim", 0), ("popsize", 1), ("budget", 0),
                                         ("sigma", float("nan")), ("sigma", 0.0), ("alpha", float("inf")),
                                         ("alpha", 0.0), ("bound", -1.0), ("bound", float("nan")), ("eval_every", 0),
                                         ("seed", -1), ("seed", 2**32), ("checkpoint_every", -1), ("max_length", 4),
                                         ("loss", "mse"), ("random_proj", "sparse"), ("prompt_tokens", 2.5)])
def test_every_tune_setting_is_checked_as_a_settings_error(field, value):
    """Refused when the config is built, in the words of the library (the argument's name, never a flag), with the
    argument named for the CLI to write as its flag."""
    from bbt_onnx.errors import SettingsError
    from bbt_onnx.tuning.tuner import TuneConfig

    with pytest.raises(SettingsError, match=field if field != "prompt_tokens" or value != 2.5
                       else "whole number") as caught:
        TuneConfig(**{field: value})
    assert "--" not in str(caught.value) and field in caught.value.arguments
    assert caught.value.render({field: flag_of(TuneConfig, field)}).startswith(flag_of(TuneConfig, field))
    TuneConfig().check()  # the defaults pass


def test_error_kinds_can_be_caught_by_kind(tmp_path):
    from bbt_onnx.errors import BBTError, DataError, ModelError, SettingsError

    with pytest.raises(DataError):
        read_examples(tmp_path / "missing.csv")
    with pytest.raises(ModelError):
        load_manifest(tmp_path)
    with pytest.raises(SettingsError):
        parse_labels("nope")
    assert all(issubclass(e, BBTError) for e in (DataError, ModelError, SettingsError))


@pytest.mark.parametrize("device,options", [("cuda", {"use_tf32": "0"}), ("cpu", {})])
def test_cuda_sessions_keep_fp32_matmuls_in_fp32(tiny_model, monkeypatch, device, options):
    """onnxruntime's CUDA provider defaults to TF32 MatMuls (2e-3 off CPU on an H100): the engine turns it off."""
    import onnxruntime as ort

    from bbt_onnx.engines import OrtEngine

    asked = []

    def session(path, sess_options=None, providers=None):
        asked.append(providers)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    with pytest.raises(BBTError, match="stop here"):
        OrtEngine(load_manifest(tiny_model), device=device)
    assert asked == [[(f"{device.upper()}ExecutionProvider", options)]]


def test_write_dir_replaces_a_directory_whole_or_not_at_all(tmp_path):
    """client-dir and triton-repo: a failed write keeps the old directory, and leaves no staging behind."""
    from bbt_onnx.fileio import write_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(BBTError, match="not empty; pass force"):
        write_dir(out, False, lambda d: None)

    def failing(staging):
        (staging / "new").write_text("y")
        raise OSError(28, "No space left on device")

    with pytest.raises(BBTError, match="No space left on device"):
        write_dir(out, True, failing)
    assert [p.name for p in out.iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    write_dir(out, True, lambda d: (d / "new").write_text("y"))
    assert [p.name for p in out.iterdir()] == ["new"]
    (tmp_path / "file").write_text("")
    with pytest.raises(BBTError, match="is a file"):
        write_dir(tmp_path / "file", True, lambda d: None)


# -- checkpoints without pickle ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,popsize,diagonal,bound", [(12, 6, False, 0.0), (12, 6, True, 0.5), (60, 3, False, 0.5)])
@pytest.mark.parametrize("objective", ["sphere", "plateaus"])
def test_a_checkpoint_continues_cma_es_bit_for_bit(dim, popsize, diagonal, bound, objective):
    """pycma's strategy saved as data (checkpoint.npz) and restored into a fresh one asks the same candidates, bit
    for bit, and stops at the same generation for the same reason, wherever the run was cut; for the full and the
    diagonal covariance, with bounds, and in the dimension where pycma switches to TPA step-size control."""
    from types import SimpleNamespace

    from bbt_onnx import checkpoint
    from bbt_onnx.methods import new_es
    from bbt_onnx.tuning.tuner import TuneConfig, TunerState

    def f(x):
        x = np.asarray(x)
        return float(np.sum((x - 0.3) ** 2)) if objective == "sphere" else float(np.floor(np.abs(x).sum() * 4))

    cfg = TuneConfig(intrinsic_dim=dim, popsize=popsize, budget=popsize * 120, diagonal=diagonal, bound=bound)
    fresh = lambda: TunerState(cfg, [new_es(cfg, 7)])  # noqa: E731
    tuner = SimpleNamespace(config=cfg, new_state=fresh)

    def run(cut: int | None):
        state, seen = fresh(), []
        for generation in range(120):
            if generation == cut:
                state = checkpoint.loads(checkpoint.dumps(state), tuner)
            es = state.es[0]
            if es.stop():
                return seen, dict(es.stop())
            z = es.ask()
            seen.append(np.asarray(z).tobytes())
            es.tell(z, [f(x) for x in z])
        return seen, {}

    whole = run(None)
    for cut in (0, 1, 4, len(whole[0]) // 2):
        assert run(cut) == whole, cut


def test_runs_and_checkpoints_that_recorded_the_policy_among_the_tune_settings_still_load():
    """Before the run policy left TuneConfig, run.json's and checkpoint.npz's settings held `choose` and
    `fallback`: such a checkpoint restores into today's tuner, and such a run resumes with its own policy."""
    import io
    import json
    from types import SimpleNamespace

    from bbt_onnx.choice import ChoicePolicy
    from bbt_onnx.jobs.tune import TuneRequest
    from bbt_onnx.methods import new_es
    from bbt_onnx.tuning import checkpoint
    from bbt_onnx.tuning.config import TuneConfig, TunerState

    cfg = TuneConfig(intrinsic_dim=12, popsize=6, budget=60)
    fresh = lambda: TunerState(cfg, [new_es(cfg, 7)])  # noqa: E731
    state = fresh()
    state.es[0].tell(state.es[0].ask(), list(range(6)))
    with np.load(io.BytesIO(checkpoint.dumps(state)), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    doc = json.loads(str(arrays[checkpoint.DOC][()]))
    doc["config"].update(choose="max", fallback=False)  # as the config recorded them then
    arrays[checkpoint.DOC] = np.array(json.dumps(doc))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    restored = checkpoint.loads(buf.getvalue(), SimpleNamespace(config=cfg, new_state=fresh))
    assert restored.config == cfg and np.array_equal(restored.es[0].mean, state.es[0].mean)

    old = {"model": {"dir": "m"}, "task": PRESETS["sst2"].to_json(), "data": {"data": "pool.csv"},
           "tune": {**cfg.to_json(), "choose": "max", "fallback": False}, "seeds": [42]}
    request = TuneRequest.from_settings(old, "run")
    assert request.config == cfg and request.policy == ChoicePolicy(fallback=False, choose="max", baseline_rows="dev")
    assert TuneRequest.from_settings({**old, "tune": cfg.to_json()}, "run").policy == ChoicePolicy(baseline_rows="dev")


def test_one_repository_kind_for_what_triton_repo_serve_and_deploy_write(tmp_path):
    """Both writers go through model_repository.add_model, and --force recognises what either wrote, nothing else."""
    from bbt_onnx.model_repository import add_model, looks_like_repository

    stub = tmp_path / "model.py"
    stub.write_text("# the python backend's model\n")
    graphs = tmp_path / "graphs"
    add_model(graphs, "tiny", 'backend: "python"\n', lambda v: (v / "model.onnx").write_bytes(b"onnx"), stub)
    assert sorted(p.name for p in (graphs / "tiny" / "1").iterdir()) == ["model.onnx", "model.py"]
    classifier = tmp_path / "classifier"
    report = add_model(classifier, "tiny.classify", 'backend: "onnxruntime"\n',
                       lambda v: {"checked": (v / "classifier.onnx").write_bytes(b"onnx") == 4})
    assert report == {"checked": True} and looks_like_repository(graphs) and looks_like_repository(classifier)
    (classifier / "tiny.classify" / "1" / "notes.txt").write_text("mine")
    (graphs / "tiny" / "1" / "model.onnx").unlink()
    assert not looks_like_repository(classifier) and not looks_like_repository(graphs)
    assert not looks_like_repository(tmp_path / "missing")


def test_an_old_pickle_checkpoint_names_the_tuner_module_it_was_written_by(tmp_path):
    """checkpoint.pkl from before checkpoint.npz names `bbt_onnx.tuner`'s classes: trusted, it still loads."""
    import pickle

    from bbt_onnx.errors import RunError
    from bbt_onnx.methods import new_es
    from bbt_onnx.runs import RunDir
    from bbt_onnx.tuning.checkpoint import read_states
    from bbt_onnx.tuning.config import TuneConfig, TunerState

    cfg = TuneConfig(intrinsic_dim=12, popsize=6, budget=60)
    state = TunerState(cfg, [new_es(cfg, 7)], generation=3, calls=18)
    old = pickle.dumps(state, protocol=0).replace(b"cbbt_onnx.tuning.config\n", b"cbbt_onnx.tuner\n")
    assert b"cbbt_onnx.tuner\n" in old
    (tmp_path / "checkpoint.pkl").write_bytes(old)
    with pytest.raises(RunError, match="trust"):
        read_states(RunDir(tmp_path), [None])
    (restored,) = read_states(RunDir(tmp_path), [None], trust=True)
    assert isinstance(restored, TunerState) and restored.config == cfg and restored.calls == 18


def test_a_graph_file_that_links_out_of_the_model_directory_is_refused(tiny_model, tmp_path):
    """The graph a manifest names lies in its own directory: a link to a graph elsewhere is refused."""
    from bbt_onnx.errors import ModelError
    from bbt_onnx.manifest import load_manifest

    model = shutil.copytree(tiny_model, tmp_path / "model")
    elsewhere = shutil.copy(model / "model.onnx", tmp_path / "other.onnx")
    (model / "model.onnx").unlink()
    (model / "model.onnx").symlink_to(elsewhere)
    with pytest.raises(ModelError, match="'model.onnx' is a link out of the model directory"):
        load_manifest(model)
    (model / "model.onnx").unlink()
    (model / "inside.onnx").write_bytes(Path(elsewhere).read_bytes())
    (model / "model.onnx").symlink_to("inside.onnx")  # a link within the directory stays fine
    assert load_manifest(model).directory == model


def test_a_model_loaded_by_a_relative_path_keeps_scoring_after_a_change_of_directory(tiny_model, tmp_path,
                                                                                      monkeypatch):
    """A Model remembers its directory absolutely: a caller that changes directory (a server, a notebook) keeps
    scoring, and the fingerprint checks still find the files."""
    from bbt_onnx import PRESETS, Model, TunedPrompt

    monkeypatch.chdir(Path(tiny_model).parent)
    model = Model.load(Path(tiny_model).name)
    prompt = TunedPrompt.template(model.manifest, PRESETS["sst2"], "template")
    before = prompt.logits(model, ["a gripping film"])
    monkeypatch.chdir(tmp_path)
    assert np.array_equal(prompt.logits(model, ["a gripping film"]), before)


def test_the_restart_budget_recovers_with_time():
    """serve gives up after RESTARTS deaths within the window, not after RESTARTS deaths in a lifetime."""
    from bbt_onnx.serving.server import RESTART_WINDOW, recent

    assert recent([0.0, 10.0, RESTART_WINDOW + 5.0], RESTART_WINDOW + 20.0) == [RESTART_WINDOW + 5.0]
    assert recent([0.0, 1.0], 2.0) == [0.0, 1.0]
