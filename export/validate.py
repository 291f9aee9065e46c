"""Parity at export: the ONNX graph against the unmodified PyTorch model on the same inputs.

The reference side does not use the export wrapper: it runs the Hugging Face model
itself, with forward pre-hooks that add each prompt onto its layer's input (the embedding
output for layer 0), so a bug in the wrapper cannot hide in both sides.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from bbt_onnx.compare import compare_logits as compare  # noqa: F401 - the runtime's, so check needs no torch
from bbt_onnx.contract import PREFIX_KV

from .wrappers import pre_hook_adding

FP32_TOLERANCE = 1e-4  # the graph's error against float64, where torch's own fp32 error is smaller
TORCH_ERROR_MARGIN = 2.0  # where it is larger (ill-conditioned weights), the graph may be this many times off


@dataclass(frozen=True)
class ParityInputs:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    mask_pos: np.ndarray
    prompt_embeds: np.ndarray
    label_ids: np.ndarray
    deep_prompts: np.ndarray | None = None  # [L, P, H]: the deep graph's per-layer prompts
    prompt_layer: int = 0  # the layer the candidates replace there
    prompt_pos: np.ndarray | None = None  # [N]: each row's first slot (decoders' graphs take it)
    prefix: int = 0  # the first `prefix` ids, the same in every row: what the cached pair takes as a shared prefix

    def feeds(self) -> dict[str, np.ndarray]:
        """The graph's inputs, in the order the scorers take them."""
        feeds = {name: getattr(self, name) for name in ("input_ids", "attention_mask", "mask_pos", "prompt_embeds",
                                                         "label_ids")}
        if self.prompt_pos is not None:
            feeds["prompt_pos"] = self.prompt_pos
        if self.deep_prompts is not None:
            feeds.update(deep_prompts=self.deep_prompts, prompt_layer=np.array([self.prompt_layer], dtype=np.int64))
        return feeds

    def rows(self):
        """The rows as the runtime's EncodedSet: the first `prefix` ids as their shared prefix, the rest their own."""
        from bbt_onnx.encoding import EncodedSet

        p = self.prefix
        assert (self.input_ids[:, :p] == self.input_ids[:1, :p]).all(), "the rows' first ids differ"
        return EncodedSet(self.input_ids[:, p:], self.attention_mask[:, p:], self.mask_pos - p,
                          np.zeros(len(self.input_ids)), self.label_ids,
                          prompt_pos=None if self.prompt_pos is None else self.prompt_pos - p,
                          prefix_ids=self.input_ids[0, :p] if p else None)

    def cache_split(self):
        """The rows cut for the cached pair (they must carry a suffix prompt), after the shared prefix."""
        from bbt_onnx.encoding import cache_split

        split = cache_split(self.rows())
        assert split is not None, "the parity rows carry no suffix prompt"
        return split

    def layer_prompts(self) -> np.ndarray:
        """[C, L', P, H]: every layer's prompt for each candidate (L' = 1 for the plain graph)."""
        if self.deep_prompts is None:
            return self.prompt_embeds[:, None]
        full = np.repeat(self.deep_prompts[None], len(self.prompt_embeds), axis=0)
        full[:, self.prompt_layer] = self.prompt_embeds
        return full


def hf_layers(loaded) -> torch.nn.ModuleList:
    return loaded.family.layers(loaded.model)


def torch_reference(loaded, inputs: ParityInputs, prompt_start: int = 1) -> np.ndarray:
    """[C, N, K] label logits from the Hugging Face model, one candidate at a time: forward pre-hooks add
    prompt i onto the input of layer i (layer 0's input is the embedding output), at each row's
    `prompt_pos`, or at `prompt_start` when the inputs have none."""
    model = loaded.model
    layers = hf_layers(loaded)
    ids = torch.from_numpy(inputs.input_ids)
    mask = torch.from_numpy(inputs.attention_mask)
    rows = torch.arange(ids.shape[0])
    pos = torch.from_numpy(inputs.mask_pos)
    labels = torch.from_numpy(inputs.label_ids)
    starts = [prompt_start] * len(ids) if inputs.prompt_pos is None else [int(p) for p in inputs.prompt_pos]
    out = []
    for candidate in inputs.layer_prompts():
        handles = [layers[i].register_forward_pre_hook(_adding(torch.from_numpy(p), starts), with_kwargs=True)
                   for i, p in enumerate(candidate)]
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
        finally:
            for handle in handles:
                handle.remove()
        out.append(logits[rows, pos][:, labels].numpy())
    return np.stack(out)


def references(loaded, inputs: ParityInputs, prompt_start: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The Hugging Face model's logits on `inputs` in float32 and in float64: what a graph is judged against."""
    fp32 = torch_reference(loaded, inputs, prompt_start)
    with float64(loaded.model):
        return fp32, torch_reference(loaded, inputs, prompt_start)


def _adding(p: torch.Tensor, starts: list[int]):
    def add(hidden):
        hidden = hidden.clone()
        for row, start in enumerate(starts):
            hidden[row, start:start + p.shape[0]] += p
        return hidden
    return pre_hook_adding(add)


@contextmanager
def float64(model):
    """The model in float64 for the duration: the exact reference fp32 results are judged against."""
    torch.nn.Module.double(model)  # the Module methods: transformers 5 refuses .double()/.float() on GGUF models
    try:
        yield model
    finally:
        torch.nn.Module.float(model)


def judge(torch_fp32: np.ndarray, exact: np.ndarray, got: np.ndarray) -> dict:
    """Parity numbers for the manifest: the graph against torch fp32 (agreement, as before) and against a
    float64 reference, with the tolerance that torch's own fp32 error on the same inputs allows."""
    torch_error = float(np.abs(torch_fp32.astype(np.float64) - exact).max())
    return {**compare(torch_fp32, got),
            "max_abs_diff_fp64": float(np.abs(got.astype(np.float64) - exact).max()),
            "torch_fp32_vs_fp64": torch_error,
            "fp32_tolerance": max(FP32_TOLERANCE, TORCH_ERROR_MARGIN * torch_error)}


def clipped_std(values: np.ndarray, rounds: int = 5, width: float = 3.0) -> float:
    """The reference's hidden-state scale: clip to mean +- 3 std, recompute, five times over."""
    h = np.asarray(values, dtype=np.float64).ravel()
    for _ in range(rounds):
        mu, sd = h.mean(), h.std()
        h = np.clip(h, mu - width * sd, mu + width * sd)
    return float(h.std())


def layer_stds(loaded, inputs: ParityInputs, embedding_std: float) -> tuple[float, ...]:
    """The std BBTv2 scales each layer's projection by: the word embeddings' for layer 0, and for layer i the
    clipped std of the hidden states entering it (with zero prompts), measured on the sample rows."""
    with torch.no_grad():
        hidden = loaded.model(input_ids=torch.from_numpy(inputs.input_ids),
                              attention_mask=torch.from_numpy(inputs.attention_mask),
                              output_hidden_states=True).hidden_states
    layers = len(hf_layers(loaded))
    return (embedding_std, *(clipped_std(hidden[i].float().numpy()) for i in range(1, layers)))


def session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(path, inputs: ParityInputs) -> np.ndarray:
    return session(path).run(["label_logits"], inputs.feeds())[0]


def run_cached(text_path, tail_path, inputs: ParityInputs) -> np.ndarray:
    """The cached pair on suffix-prompt rows: the shared prefix's keys and values (its first `prefix` ids, none
    when 0), then the texts' after it, then the tails. A pair exported before prefixes takes none."""
    split = inputs.cache_split()
    text, tail = session(text_path), session(tail_path)
    extra = {}
    if PREFIX_KV in {i.name for i in text.get_inputs()}:
        extra[PREFIX_KV] = empty_prefix(text)
        if inputs.prefix:
            ids = inputs.input_ids[:1, :inputs.prefix]
            extra[PREFIX_KV] = text.run(["text_kv"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                                      **extra})[0]
    else:
        assert not inputs.prefix, "this cached pair takes no prefix"
    kv = text.run(["text_kv"], {"input_ids": split.text_ids, "attention_mask": split.text_mask, **extra})[0]
    return tail.run(["label_logits"], {
        "text_kv": kv, "text_mask": split.text_mask, "tail_ids": split.tail_ids, "mask_pos": split.tail_mask_pos,
        "prompt_embeds": inputs.prompt_embeds, "label_ids": inputs.label_ids, **extra})[0]


def empty_prefix(text_session) -> np.ndarray:
    """The text graph's prefix_kv of length 0: what rows without a shared prefix feed."""
    shape = next(i.shape for i in text_session.get_inputs() if i.name == PREFIX_KV)
    return np.zeros([1 if axis == 2 else 0 if axis == 4 else d for axis, d in enumerate(shape)], np.float32)
