"""Torch modules that compute the graph contract from a Hugging Face model.

One wrapper per architecture family. Each takes the contract's five inputs and returns
label logits [C, N, K]: the N texts are embedded once, every one of the C prompts is
added onto the placeholder positions (1..P' after <s>, or 0..P'-1 for a causal LM
without BOS), and only the K label rows of the output layer are computed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INPUT_NAMES = ["input_ids", "attention_mask", "mask_pos", "prompt_embeds", "label_ids"]
OUTPUT_NAMES = ["label_logits"]
DYNAMIC_AXES = {
    "input_ids": {0: "N", 1: "T"},
    "attention_mask": {0: "N", 1: "T"},
    "mask_pos": {0: "N"},
    "prompt_embeds": {0: "C", 1: "P"},
    "label_ids": {0: "K"},
    "label_logits": {0: "C", 1: "N", 2: "K"},
}


def place_prompts(prompt_embeds: torch.Tensor, seq_len: int, start: int = 1) -> torch.Tensor:
    """[C, P', H] -> [C, T, H], zero except positions start..start+P'-1 (right after <s>)."""
    c, p, h = prompt_embeds.shape
    parts = [prompt_embeds, prompt_embeds.new_zeros(c, seq_len - start - p, h)]
    if start:
        parts.insert(0, prompt_embeds.new_zeros(c, start, h))
    return torch.cat(parts, dim=1)


def with_prompts(tokens: torch.Tensor, prompt_embeds: torch.Tensor, start: int = 1) -> torch.Tensor:
    """N embedded texts [N, T, H] x C prompts [C, P', H] -> [C*N, T, H], each prompt added at its slots."""
    n, t, h = tokens.shape
    c = prompt_embeds.shape[0]
    return (tokens.unsqueeze(0) + place_prompts(prompt_embeds, t, start).unsqueeze(1)).reshape(c * n, t, h)


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] padding mask -> [B, 1, 1, T] additive mask (0 for tokens, the dtype's minimum for padding)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], positions [B] -> [B, H]."""
    b, _, h = hidden.shape
    index = positions.view(b, 1, 1).expand(b, 1, h)
    return torch.gather(hidden, 1, index).squeeze(1)


def bert_attention(attn: nn.Module, q_in: torch.Tensor, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention written out in the classic BERT op order, which
    onnxruntime's optimizer fuses into one Attention node whatever the transformers version."""
    b, t, _ = x.shape
    heads = attn.num_attention_heads
    d = attn.attention_head_size
    q = attn.query(q_in).view(b, -1, heads, d).transpose(1, 2)
    k = attn.key(x).view(b, -1, heads, d).transpose(1, 2)
    v = attn.value(x).view(b, -1, heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + additive_mask
    context = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, heads, Tq, d]
    return context.permute(0, 2, 1, 3).contiguous().view(b, -1, heads * d)


def bert_layer(layer: nn.Module, x: torch.Tensor, additive_mask: torch.Tensor,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """One BERT-style layer from its weights. With `positions`, only those rows (one per
    sequence) leave the layer: keys and values still see all T positions, but the query,
    attention output and feed-forward run on one row. The last layer needs nothing else."""
    q_in = x if positions is None else gather_rows(x, positions).unsqueeze(1)
    context = bert_attention(layer.attention.self, q_in, x, additive_mask)
    out = layer.attention.output
    a = out.LayerNorm(out.dense(context) + q_in)
    y = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    return y if positions is None else y.squeeze(1)


class MaskedPromptScorer(nn.Module):
    """RoBERTa masked LM: prompts are added to the embedding output (after its LayerNorm),
    the reference's "add" mode. Only the mask position leaves the last layer, and only the
    K label rows of the decoder are computed."""

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.embeddings = mlm.roberta.embeddings
        self.layers = mlm.roberta.encoder.layer
        self.lm_head = mlm.lm_head

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids):
        n = input_ids.shape[0]
        c = prompt_embeds.shape[0]
        x = with_prompts(self.embeddings(input_ids=input_ids), prompt_embeds)  # texts embedded once for all C
        additive = padding_mask(attention_mask.repeat(c, 1), x.dtype)
        for layer in self.layers[:-1]:
            x = bert_layer(layer, x, additive)
        x = bert_layer(self.layers[-1], x, additive, mask_pos.repeat(c))  # [C*N, H]
        head = self.lm_head
        x = head.layer_norm(nn.functional.gelu(head.dense(x)))
        logits = x @ head.decoder.weight[label_ids].t() + head.decoder.bias[label_ids]
        return logits.view(c, n, -1)


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] padding mask -> [B, 1, T, T] additive causal mask.

    Handing the model a ready 4D mask keeps transformers' own mask builder (which uses
    vmap, and cannot be traced) out of the graph."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class CausalPromptScorer(nn.Module):
    """Decoder LMs (Llama family, GPT-2): prompts are added to the token embeddings; the
    label words are scored by the next-token logits at `mask_pos` (the last template token)."""

    def __init__(self, lm: nn.Module, prompt_start: int):
        super().__init__()
        self.embed = lm.get_input_embeddings()
        self.body = lm.base_model  # ends with the final norm
        self.head = lm.get_output_embeddings()
        self.prompt_start = prompt_start

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids):
        n = input_ids.shape[0]
        c = prompt_embeds.shape[0]
        x = with_prompts(self.embed(input_ids), prompt_embeds, self.prompt_start)
        mask = causal_mask(attention_mask.repeat(c, 1), x.dtype)
        x = self.body(inputs_embeds=x, attention_mask=mask, use_cache=False)[0]
        x = gather_rows(x, mask_pos.repeat(c))
        logits = x @ self.head.weight[label_ids].t()
        if self.head.bias is not None:
            logits = logits + self.head.bias[label_ids]
        return logits.view(c, n, -1)


def scorer_for(loaded, prompt_start: int = 1) -> nn.Module:
    if loaded.kind == "masked":
        return MaskedPromptScorer(loaded.model).eval()
    return CausalPromptScorer(loaded.model, prompt_start).eval()
