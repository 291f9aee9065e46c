"""Torch modules that compute the graph contract from a Hugging Face model.

One wrapper per architecture family. Each takes the contract's five inputs and returns
label logits [C, N, K]: the N texts are embedded once, every one of the C prompts is
added onto the placeholder positions (1..P' after <s>, or 0..P'-1 for a causal LM
without BOS), and only the K label rows of the output layer are computed.

The deep variant (BBTv2) takes two more inputs: `deep_prompts` [L, P', H], one prompt
added to the input of each of the L layers (layer 0's input is the embedding output),
and `prompt_layer`, the layer whose prompt the C candidates replace. So one call scores a
population for one layer with every other layer at its current prompt.
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
DEEP_INPUT_NAMES = INPUT_NAMES + ["deep_prompts", "prompt_layer"]
DEEP_DYNAMIC_AXES = {**DYNAMIC_AXES, "deep_prompts": {1: "P"}}


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


def add_prompts(x: torch.Tensor, prompt_embeds: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Hidden states [C*N, T, H] of C candidates x N texts, plus candidate c's prompt at its slots."""
    t, h = x.shape[1], x.shape[2]
    c = prompt_embeds.shape[0]
    return (x.view(c, -1, t, h) + place_prompts(prompt_embeds, t, start).unsqueeze(1)).reshape(-1, t, h)


def layer_prompts(deep_prompts: torch.Tensor, prompt_embeds: torch.Tensor, prompt_layer: torch.Tensor,
                  layers: int) -> list[torch.Tensor]:
    """[C, P', H] per layer: the candidates at `prompt_layer`, the layer's own prompt everywhere else."""
    return [torch.where(prompt_layer == i, prompt_embeds, deep_prompts[i].unsqueeze(0).expand_as(prompt_embeds))
            for i in range(layers)]


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
        return self.score(input_ids, attention_mask, mask_pos, label_ids, [prompt_embeds])

    def score(self, input_ids, attention_mask, mask_pos, label_ids, prompts: list[torch.Tensor]):
        """`prompts[i]` [C, P', H] goes onto the input of layer i; one entry is plain BBT."""
        n = input_ids.shape[0]
        c = prompts[0].shape[0]
        x = with_prompts(self.embeddings(input_ids=input_ids), prompts[0])  # texts embedded once for all C
        additive = padding_mask(attention_mask.repeat(c, 1), x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if 0 < i < len(prompts):
                x = add_prompts(x, prompts[i])
            x = bert_layer(layer, x, additive, mask_pos.repeat(c) if i == last else None)  # last: [C*N, H]
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


def decoder_layers(base_model: nn.Module) -> nn.ModuleList:
    """The blocks of a decoder body: `layers` (Llama family) or `h` (GPT-2)."""
    layers = getattr(base_model, "layers", None)
    return layers if layers is not None else base_model.h


def pre_hook_adding(add):
    """A forward pre-hook that passes a layer's input hidden states through `add`, positional or keyword."""
    def hook(_module, args, kwargs):
        if args:
            return (add(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}
    return hook


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
        return self.score(input_ids, attention_mask, mask_pos, label_ids, [prompt_embeds])

    def score(self, input_ids, attention_mask, mask_pos, label_ids, prompts: list[torch.Tensor]):
        """`prompts[i]` [C, P', H] goes onto the input of block i (block 0's input is the embeddings)."""
        n = input_ids.shape[0]
        c = prompts[0].shape[0]
        x = with_prompts(self.embed(input_ids), prompts[0], self.prompt_start)
        mask = causal_mask(attention_mask.repeat(c, 1), x.dtype)
        hooks = [block.register_forward_pre_hook(
                     pre_hook_adding(lambda h, p=p: add_prompts(h, p, self.prompt_start)), with_kwargs=True)
                 for block, p in zip(list(decoder_layers(self.body))[1:], prompts[1:])]
        try:
            x = self.body(inputs_embeds=x, attention_mask=mask, use_cache=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
        x = gather_rows(x, mask_pos.repeat(c))
        logits = x @ self.head.weight[label_ids].t()
        if self.head.bias is not None:
            logits = logits + self.head.bias[label_ids]
        return logits.view(c, n, -1)


class DeepPromptScorer(nn.Module):
    """The deep (BBTv2) contract over either family's scorer: a prompt on every layer's input."""

    def __init__(self, scorer: nn.Module, layers: int):
        super().__init__()
        self.scorer = scorer
        self.layers = layers

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids, deep_prompts, prompt_layer):
        prompts = layer_prompts(deep_prompts, prompt_embeds, prompt_layer, self.layers)
        return self.scorer.score(input_ids, attention_mask, mask_pos, label_ids, prompts)


def scorer_for(loaded, prompt_start: int = 1, deep: bool = False) -> nn.Module:
    if loaded.kind == "masked":
        scorer = MaskedPromptScorer(loaded.model)
    else:
        scorer = CausalPromptScorer(loaded.model, prompt_start)
    if deep:
        scorer = DeepPromptScorer(scorer, int(loaded.model.config.num_hidden_layers))
    return scorer.eval()
