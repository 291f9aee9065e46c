"""The cached pair's attention: keys and values that are shared are attended to where they are, never copied.

A shared prefix (demonstrations) has its keys and values once, batch 1; every row attends to them by a broadcast
product, so no call copies them per row. The tail graph's C candidates of a row attend to that row's cached text
together (one product over C*U queries, linear in C) and each to its own U tail tokens (C blocks of U x U), so the
attention a candidate costs does not grow with the number of candidates in a call. The parts share one softmax
(their common maximum, their summed weights), so the result is the model's attention over the whole row.

It is registered with transformers' attention interface as `bbt_shared` (`active`), for the decoders whose
attention layers call that interface (Llama, Qwen2, GPT-2), and reads what is shared from `SHARED`, which the
cached pair's wrappers set for one forward (`sharing`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

NAME = "bbt_shared"


@dataclass
class Shared:
    """What the attention layers share in the forward under way."""

    prefix: torch.Tensor | None = None  # [L, 2, 1, kv_heads, S_p, head_dim]: keys and values before every row's own
    blocks: tuple | None = None  # (C, U): the queries are C candidates' tails of U tokens, after the cached keys


SHARED = Shared()


@contextmanager
def sharing(prefix: torch.Tensor | None = None, blocks: tuple | None = None):
    """`SHARED` for the duration of one forward."""
    SHARED.prefix, SHARED.blocks = prefix, blocks
    try:
        yield
    finally:
        SHARED.prefix, SHARED.blocks = None, None


def layer_scaling(module, head_dim: int, scaling: float | None) -> float:
    """The factor scores are multiplied by: the layer's own (Llama, Qwen2), or GPT-2's from its settings."""
    if scaling is not None:
        return scaling
    value = 1.0 / math.sqrt(head_dim) if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        value /= float(module.layer_idx + 1)
    return value


def shared_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_kwargs):
    """transformers' attention-interface call: query [N, H, Q, d], key and value [N, kv_heads, K, d] (the row's own:
    its cached keys, then the new ones), the additive mask the wrapper built for the row's own keys -> [N, Q, H, d].

    Query heads are grouped by the key head they read (head i reads key head i // (H / kv_heads), as transformers
    repeats them), so grouped-query attention needs no repeated keys either. Scores are laid out [N, kv, g, C, U,
    keys] (C = 1 and U = Q outside the tail)."""
    n, h, q, d = query.shape
    kv = key.shape[1]
    g = h // kv
    scale = layer_scaling(module, d, scaling)
    flat = query.reshape(n, kv, g * q, d)
    c, u = SHARED.blocks if SHARED.blocks is not None else (1, q)

    def against(keys):  # every query against keys [N or 1, kv, K, d]
        return (torch.matmul(flat, keys.transpose(-1, -2)) * scale).reshape(n, kv, g, c, u, -1)

    scores, values = [], []
    if SHARED.prefix is not None:
        scores.append(against(SHARED.prefix[module.layer_idx, 0]))  # [1, kv, S_p, d], broadcast over the rows
        values.append(SHARED.prefix[module.layer_idx, 1])
    if SHARED.blocks is None:  # the row's own keys, masked as the wrapper says ([N, 1, Q, K])
        scores.append(against(key) + attention_mask.reshape(n, 1, 1, 1, q, -1))
        values.append(value)
    else:  # the cached text (its padding masked: [N, 1, 1, S]), then each candidate's own tail, causal
        text = key.shape[2] - c * u
        scores.append(against(key[:, :, :text]) + attention_mask.reshape(n, 1, 1, 1, 1, -1))
        values.append(value[:, :, :text])
        own = torch.matmul(query.reshape(n, kv, g, c, u, d), key[:, :, text:].reshape(n, kv, 1, c, u, d).transpose(
            -1, -2)) * scale
        causal = torch.ones(u, u, dtype=torch.bool, device=query.device).tril()
        scores.append(own.masked_fill(~causal, torch.finfo(own.dtype).min))
        values.append(value[:, :, text:].reshape(n, kv, 1, c, u, d))
    # one softmax over every part, computed part by part: no scores are concatenated and split again
    top = scores[0].amax(dim=-1, keepdim=True)
    for part in scores[1:]:
        top = torch.maximum(top, part.amax(dim=-1, keepdim=True))
    weights = [torch.exp(part - top) for part in scores]
    total = weights[0].sum(dim=-1, keepdim=True)
    for w in weights[1:]:
        total = total + w.sum(dim=-1, keepdim=True)
    out = 0
    for w, v in zip(weights, values):
        if v.dim() == 6:  # a candidate's weights over its own tail, times its own values
            out = out + torch.matmul(w, v).reshape(n, kv, g * q, d)
        else:
            out = out + torch.matmul(w.reshape(n, kv, g * q, -1), v)
    out = out / total.reshape(n, kv, g * q, 1)
    return out.reshape(n, h, q, d).transpose(1, 2).contiguous(), None


@contextmanager
def active(model):
    """`model` (a transformers model) attending with `bbt_shared` for the duration, registered first."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, shared_attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
