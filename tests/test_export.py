"""Export: the graph contract, parity with PyTorch, the manifest, variants, the CLI and bad input."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from bbt_onnx.cli import cli
from bbt_onnx.data import Example
from bbt_onnx.encoding import Encoder, load_tokenizer
from bbt_onnx.fileio import sha256_file
from bbt_onnx.contract import graph_inputs
from bbt_onnx.manifest import load_manifest
from bbt_onnx.tasks import PRESETS
from bbt_onnx_export import ExportError, ExportOptions, export_model
from bbt_onnx_export import validate
from bbt_onnx_export.loading import load_model

from conftest import LAYERS, PROMPT_TOKENS
from helpers import cli_error


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(path, feeds):
    return session(path).run(["label_logits"], feeds)[0]


@pytest.fixture(scope="module")
def encoded(tiny_model):
    m = load_manifest(tiny_model)
    enc = Encoder(load_tokenizer(m), m, PRESETS["sst2"], PROMPT_TOKENS)
    return m, enc.encode([Example("a fun movie"), Example("the plot was really very slow and dull ."),
                          Example("it was")])


def feeds(enc, prompts, label_ids=None):
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "mask_pos": enc.mask_pos,
            "prompt_embeds": prompts.astype(np.float32),
            "label_ids": enc.label_ids if label_ids is None else np.asarray(label_ids, np.int64)}


def test_manifest_describes_the_model(tiny_model, tiny_src):
    m = load_manifest(tiny_model)
    hf = load_model(str(tiny_src))
    weights = hf.model.get_input_embeddings().weight.detach().double().numpy()
    assert m.kind == "masked" and m.architecture == "RobertaForMaskedLM"
    assert (m.hidden_size, m.num_layers, m.num_heads) == (32, LAYERS, 4)
    assert m.vocab_size == hf.model.config.vocab_size
    assert m.max_positions == 128 and m.prompt_tokens == PROMPT_TOKENS
    assert (m.bos_id, m.eos_id, m.pad_id, m.mask_id) == (0, 2, 1, hf.tokenizer.mask_token_id)
    assert len(m.placeholder_ids) == PROMPT_TOKENS and not set(m.placeholder_ids) & set(hf.tokenizer.all_special_ids)
    assert m.embedding_std == pytest.approx(weights.std(), rel=1e-9)
    for name in ("torch", "transformers", "onnx", "onnxruntime"):
        assert m.versions[name]
    assert set(m.graphs) == {"fp32", "fp16", "int8", "deep-fp32", "deep-fp16", "deep-int8"}
    for g in m.graphs.values():
        assert g.sha256 == sha256_file(tiny_model / g.file)
        assert [t.name for t in g.inputs] == list(graph_inputs(False, g.deep))
        assert [t.name for t in g.outputs] == ["label_logits"]
        # measured at export on 3 prompts x 4 rows: fp32 within 1e-4 and agreeing, the others close (dynamic int8
        # on weights 25x the usual init is coarse)
        fp32 = g.precision == "fp32"
        assert g.parity["rows"] == 12 and g.parity["argmax_agreement"] >= (1.0 if fp32 else 0.5)
        assert g.parity["max_abs_diff"] <= (1e-4 if fp32 else 5.0)
    assert m.graphs["fp32"].parity["max_abs_diff"] <= 1e-4
    assert (tiny_model / "tokenizer.json").is_file()
    raw = json.loads((tiny_model / "manifest.json").read_text())
    assert raw["opset"] == 17 and raw["graphs"]["fp32"]["inputs"][3]["shape"] == ["C", "P", 32]


def test_graph_matches_pytorch_with_dynamic_c_n_k_and_shorter_prompts(tiny_model, tiny_src, encoded):
    """C, N, K and P' all vary; the answer equals the unmodified HF model with the prompt added after its embeddings."""
    m, enc = encoded
    loaded = load_model(str(tiny_src))
    rng = np.random.default_rng(0)
    for c, p, k in ((1, PROMPT_TOKENS, 2), (4, 3, 5)):
        prompts = rng.normal(0, m.embedding_std, (c, p, m.hidden_size)).astype(np.float32)
        labels = rng.choice(np.arange(10, m.vocab_size), size=k, replace=False)
        short = Encoder(load_tokenizer(m), m, PRESETS["sst2"], p).encode(
            [Example("a fun movie"), Example("the plot was really very slow and dull ."), Example("it was")])
        inputs = validate.ParityInputs(short.input_ids, short.attention_mask, short.mask_pos, prompts,
                                       labels.astype(np.int64))
        got = run(tiny_model / "model.onnx", inputs.feeds())
        assert got.shape == (c, 3, k)
        np.testing.assert_allclose(got, validate.torch_reference(loaded, inputs), atol=1e-4)


def test_prompt_is_added_at_positions_after_bos_only(tiny_model, encoded):
    m, enc = encoded
    prompts = np.zeros((2, PROMPT_TOKENS, m.hidden_size), np.float32)
    prompts[1, 0] = 1.0  # only the second candidate moves its first slot
    out = run(tiny_model / "model.onnx", feeds(enc, prompts))
    assert not np.allclose(out[0], out[1])
    # z = 0 must equal the plain model on the same ids: the graph adds nothing else
    hf_free = validate.torch_reference(load_model(str(Path(m.source))),
                                       validate.ParityInputs(**feeds(enc, prompts[:1])))
    np.testing.assert_allclose(out[:1], hf_free, atol=1e-4)


def test_graph_never_computes_the_full_vocabulary(tiny_model):
    m = load_manifest(tiny_model)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_model / "model.onnx")))
    init_names = {i.name for i in model.graph.initializer}
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info
            if v.name not in init_names]
    assert dims, "shape inference found no intermediate values"
    assert not any(m.vocab_size in d for d in dims)


def test_fp16_graph_is_fused_and_agrees_on_cpu(tiny_model, encoded):
    m, enc = encoded
    for name in ("fp32", "fp16"):  # the last layer's attention runs for the mask row only: not the fused pattern
        fused = m.graphs[name].fused_ops
        assert fused.get("Attention") == m.num_layers - 1
        assert fused.get("SkipLayerNormalization") == 2 * m.num_layers
        assert fused.get("BiasGelu") == m.num_layers
    prompts = np.random.default_rng(1).normal(0, m.embedding_std, (3, PROMPT_TOKENS, m.hidden_size))
    ref = run(tiny_model / "model.onnx", feeds(enc, prompts))
    fp16 = run(tiny_model / m.graphs["fp16"].file, feeds(enc, prompts))
    assert fp16.dtype == np.float32 and fp16.shape == ref.shape
    assert np.abs(fp16 - ref).max() < 2e-2 * np.abs(ref).max()
    assert (fp16.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    # int8 on weights 25x the usual init drifts far more than on a real model (see the slow test): it must
    # still track fp32 closely
    int8 = run(tiny_model / m.graphs["int8"].file, feeds(enc, prompts))
    assert int8.dtype == np.float32 and int8.shape == ref.shape
    assert np.corrcoef(int8.ravel(), ref.ravel())[0, 1] > 0.9
    assert m.graphs["fp16"].parity["argmax_agreement"] >= 0.9


def test_cli_export_prints_json_and_writes_the_directory(tiny_src, tmp_path):
    out = tmp_path / "m"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_src), "--out", str(out), "--prompt-tokens", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["prompt_tokens"] == 4 and summary["graphs"]["fp32"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def save_hf(tmp_path, cls_name, name):
    import transformers
    from bbt_onnx_export.tiny import make_tokenizer

    tok = make_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32)
    config = {"Bert": transformers.BertConfig, "Electra": transformers.ElectraConfig,
              "Roberta": transformers.RobertaConfig}[next(k for k in ("Bert", "Electra", "Roberta")
                                                          if cls_name.startswith(k))](**sizes)
    path = tmp_path / name
    getattr(transformers, cls_name)(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("cls_name", ["ElectraForMaskedLM", "RobertaForSequenceClassification",
                                      "BertForSequenceClassification"])
def test_unsupported_architectures_name_what_is_supported(tmp_path, cls_name):
    """Another model type, and a supported type without its LM head, name every architecture the registry has."""
    from bbt_onnx_export.families import FAMILIES

    src = save_hf(tmp_path, cls_name, "m")
    line = cli_error(["export", "--model", str(src), "--out", str(tmp_path / "o")])
    assert cls_name in line and all(f.architecture in line for f in FAMILIES.values())
    assert not (tmp_path / "o").exists()


def test_missing_directory(tmp_path):
    line = cli_error(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "does not exist" in line


def test_unreadable_directory(tiny_src, tmp_path, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == Path(tiny_src) else real(p, mode))
    line = cli_error(["export", "--model", str(tiny_src), "--out", str(tmp_path / "o")])
    assert "cannot read" in line and "permission" in line


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    line = cli_error(["export", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "config.json" in line


def test_hub_id_offline_says_so_and_points_to_local_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(["export", "--model", "roberta-large", "--out", str(tmp_path / "o")])
    assert "hub" in line and "cannot be reached" in line and "local directory" in line


def test_existing_out_needs_force(tiny_src, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = cli_error(["export", "--model", str(tiny_src), "--out", str(out)])
    assert "--force" in line and (out / "keep.txt").read_text() == "mine"


def test_prompt_too_long_for_positions(tiny_src, tmp_path):
    line = cli_error(["export", "--model", str(tiny_src), "--out", str(tmp_path / "o"), "--prompt-tokens", "126"])
    assert "no room for text" in line and "at most 124" in line


def test_failed_validation_leaves_nothing_half_written(tiny_src, tmp_path, monkeypatch):
    real = validate.run_onnx
    monkeypatch.setattr(validate, "run_onnx", lambda path, inputs: real(path, inputs) + 0.01)  # a graph 0.01 off
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_model(ExportOptions(str(tiny_src), tmp_path / "o", prompt_tokens=4))
    assert list(tmp_path.iterdir()) == []


def test_a_re_export_with_more_graphs_is_the_same_model(tiny_src, tiny_model, tmp_path):
    """The fingerprint covers the weights and the contract, not which graphs were exported beside them: prompts keep
    working across a re-export with --deep or --int8, and a prompt written with the old fingerprint (the manifest
    file's sha256) keeps loading."""
    from bbt_onnx import Model, TunedPrompt
    from bbt_onnx.subspace import ProjectionSpec

    plain = export_model(ExportOptions(str(tiny_src), tmp_path / "a", prompt_tokens=PROMPT_TOKENS))
    more = load_manifest(tiny_model)  # the same source exported with fp16, int8 and deep graphs too
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tiny_model / "model.onnx").read_bytes()
    a, b = load_manifest(tmp_path / "a"), more
    assert set(more.graphs) > set(plain.graphs) and a.fingerprint() == b.fingerprint()
    assert a.legacy_fingerprint() != b.legacy_fingerprint()
    spec = ProjectionSpec(0, 1, PROMPT_TOKENS, a.hidden_size, a.embedding_std)
    for fingerprint in (a.fingerprint(), b.legacy_fingerprint()):
        TunedPrompt.zero(spec, PRESETS["sst2"], fingerprint).check_model(Model(b, None, None))
    other = export_model(ExportOptions(str(tiny_src), tmp_path / "c", prompt_tokens=6))  # another contract
    assert load_manifest(tmp_path / "c").fingerprint() != a.fingerprint() and other.prompt_tokens == 6


def test_export_quiet_prints_only_the_result(tiny_src, tmp_path):
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_src), "--out", str(tmp_path / "m"),
                                      "--prompt-tokens", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and json.loads(result.stdout)["prompt_tokens"] == 4


def test_force_replaces_an_old_export(tiny_src, tmp_path):
    out = tmp_path / "o"
    export_model(ExportOptions(str(tiny_src), out, prompt_tokens=4))
    export_model(ExportOptions(str(tiny_src), out, prompt_tokens=6, force=True))
    assert load_manifest(out).prompt_tokens == 6
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.slow
def test_roberta_base_shape_exports_and_matches(tmp_path):
    """Real sizes work: a RoBERTa-base-shaped model (random weights, 50265 vocab, 12 layers)."""
    import transformers

    from bbt_onnx_export.tiny import make_tokenizer

    tok = make_tokenizer()
    config = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    torch.manual_seed(0)
    src = tmp_path / "base"
    transformers.RobertaForMaskedLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    m = export_model(ExportOptions(str(src), tmp_path / "out", prompt_tokens=50, int8=True))
    assert m.placeholder_ids == tuple(range(1000, 1050))
    assert m.graphs["fp32"].parity["max_abs_diff"] <= 1e-4
    assert m.graphs["int8"].parity["argmax_agreement"] >= 0.9


def test_the_fp16_graph_is_the_fused_fp32_graph_in_half_precision(tiny_model):
    """fp16 weights behind the fp32 graph's float32 inputs and outputs, with the same fused operators: one fusion
    pass writes both."""
    from collections import Counter

    import onnx

    m = load_manifest(tiny_model)
    for deep in (False, True):
        half, full = (onnx.load(str(tiny_model / m.graph(p, deep).file)).graph for p in ("fp16", "fp32"))
        assert {t.data_type for t in half.initializer if len(t.dims) >= 2} == {onnx.TensorProto.FLOAT16}
        assert [str(v.type) for v in (*half.input, *half.output)] == [str(v.type) for v in (*full.input, *full.output)]
        ops = [Counter(n.op_type for n in g.node if n.op_type != "Cast") for g in (half, full)]
        assert ops[0] == ops[1] and ops[0]["Attention"] > 0  # fused, as on the CPU
        assert m.graph("fp16", deep).fused_ops == m.graph("fp32", deep).fused_ops


def test_parity_is_judged_against_float64_without_false_alarms(tmp_path, tiny_model):
    """Large random weights make torch's own fp32 result drift from float64 far past 1e-4: the graph is judged
    against float64 with room for that drift, and both numbers are recorded."""
    from bbt_onnx_export.tiny import make_tiny_roberta

    src = make_tiny_roberta(tmp_path / "src", hidden=64, layers=4, init_std=1.0)
    m = export_model(ExportOptions(str(src), tmp_path / "out", prompt_tokens=4))
    parity = m.graphs["fp32"].parity
    assert parity["torch_fp32_vs_fp64"] > 1e-4  # ill-conditioned: the old 1e-4 rule against fp32 torch refused it
    assert parity["max_abs_diff_fp64"] <= parity["fp32_tolerance"] == pytest.approx(2 * parity["torch_fp32_vs_fp64"])
    tame = load_manifest(tiny_model).graphs["fp32"].parity  # well conditioned: 1e-4 as ever
    assert 2 * tame["torch_fp32_vs_fp64"] < 1e-4 and tame["fp32_tolerance"] == 1e-4
    assert tame["max_abs_diff_fp64"] <= 1e-4


def test_a_tokenizer_without_single_token_a_and_b_exports(tmp_path):
    """Export's own rows (parity, int8 calibration) take label words export picks from the model's vocabulary:
    a byte-level BPE that never saw " a" or " b" splits both into the same first piece, and must not be refused
    for words the user never chose."""
    from bbt_onnx_export.families import FAMILIES
    from bbt_onnx_export.tiny import builder, corpus, make_tokenizer, save_random

    texts = [" ".join(w for w in line.split() if not w.startswith(("a", "b"))) for line in corpus()]
    tok = make_tokenizer(texts)
    assert tok.tokenize(" a")[0] == tok.tokenize(" b")[0] == "Ġ"  # the words that were once fixed would clash
    family = FAMILIES["llama"]
    src = save_random(tmp_path / "src", family.architecture, builder(family.tiny.config)(tok, 32, 2, 4, 128, 0.02), tok, 0)
    m = export_model(ExportOptions(str(src), tmp_path / "out", prompt_tokens=4, int8=True))
    assert m.graphs["fp32"].parity["max_abs_diff"] <= 1e-4 and "int8" in m.graphs


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tiny_src, tmp_path, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("bbt_onnx_export.pipeline.open", full, raising=False)  # the tokenizer, written first
    out = tmp_path / "model"
    line = cli_error(["export", "--model", tiny_src, "--out", out, "--prompt-tokens", 4, "-q"])
    assert "No space left on device" in line and "tokenizer.json" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
