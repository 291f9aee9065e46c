"""Torch modules that compute the graph contract from a Hugging Face model.

One wrapper per kind of architecture, reaching into the model through its family record (export/families.py).
Each takes the contract's inputs (bbt_onnx.contract) and returns label
logits [C, N, K]: the N texts are embedded once, every one of the C prompts is added onto
the placeholder positions (1..P' after <s> for RoBERTa; from each row's `prompt_pos` for a
decoder), and only the K label rows of the output layer are computed.

A decoder's suffix prompt also has a cached pair: a text graph that returns every layer's
keys and values for the text before the slots, and a tail graph that scores the slots and
the answer cue on them.

The deep variant (BBTv2) takes two more inputs: `deep_prompts` [L, P', H], one prompt
added to the input of each of the L layers (layer 0's input is the embedding output),
and `prompt_layer` [1], the layer whose prompt the C candidates replace. So one call scores a
population for one layer with every other layer at its current prompt.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bbt_onnx.contract import GRAPH_OUTPUTS, PREFIX_INPUTS, TAIL_INPUTS, TEXT_INPUTS, TEXT_OUTPUTS, graph_inputs

from .attention import active, sharing

# the cached pair's names, as export writes them now (with the shared prefix's input last)
TEXT_NAMES = (list(TEXT_INPUTS + PREFIX_INPUTS), list(TEXT_OUTPUTS))
TAIL_NAMES = (list(TAIL_INPUTS + PREFIX_INPUTS), list(GRAPH_OUTPUTS))


def reach(module, path: str):
    """`module.a.b` for the path "a.b"."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


def input_names(family, deep: bool) -> list[str]:
    """The contract's inputs, in the order the scorers take them: decoders take each row's prompt position."""
    return list(graph_inputs(family.lm.prompt_positions, deep))


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


def scatter_prompts(prompt_embeds: torch.Tensor, prompt_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[C, P', H] prompts, [N] first slots -> [C, N, T, H]: prompt c on row n's slots, zero elsewhere."""
    c, p, h = prompt_embeds.shape
    padded = torch.cat([prompt_embeds, prompt_embeds.new_zeros(c, 1, h)], dim=1)  # index p is the zero row
    offset = torch.arange(seq_len, device=prompt_pos.device).unsqueeze(0) - prompt_pos.unsqueeze(1)  # [N, T]
    inside = (offset >= 0) & (offset < p)
    return padded[:, torch.where(inside, offset, torch.full_like(offset, p))]


def add_prompts_at(x: torch.Tensor, prompt_embeds: torch.Tensor, prompt_pos: torch.Tensor) -> torch.Tensor:
    """Hidden states [C*N, T, H] (or [N, T, H], shared by all C) plus candidate c's prompt at each row's slots."""
    t, h = x.shape[1], x.shape[2]
    placed = scatter_prompts(prompt_embeds, prompt_pos, t)  # [C, N, T, H]
    return (x.view(-1, placed.shape[1], t, h) + placed).reshape(-1, t, h)


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


class RobertaHead(nn.Module):
    """RoBERTa's LM head up to its decoder: dense, GELU, LayerNorm."""

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.head = mlm.lm_head
        self.decoder = mlm.lm_head.decoder

    def forward(self, x):
        return self.head.layer_norm(nn.functional.gelu(self.head.dense(x)))


class BertHead(nn.Module):
    """BERT's LM head up to its decoder: the prediction transform (dense, activation, LayerNorm)."""

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.transform = mlm.cls.predictions.transform
        self.decoder = mlm.cls.predictions.decoder

    def forward(self, x):
        return self.transform(x)


class MaskedPromptScorer(nn.Module):
    """Masked LMs (RoBERTa, BERT): prompts are added to the embedding output (after its LayerNorm), the
    reference's "add" mode. Only the mask position leaves the last layer, and only the K label rows of the
    decoder are computed."""

    def __init__(self, mlm: nn.Module, family):
        super().__init__()
        self.embeddings = family.embedding_module(mlm)
        self.layers = family.layers(mlm)
        self.lm_head = family.head(mlm)

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids):
        return self.score(input_ids, attention_mask, mask_pos, label_ids, [prompt_embeds])

    def score(self, input_ids, attention_mask, mask_pos, label_ids, prompts: list[torch.Tensor]):
        """`prompts[i]` [C, P', H] goes onto the input of layer i, right after <s>; one entry is plain BBT."""
        n = input_ids.shape[0]
        c = prompts[0].shape[0]
        x = with_prompts(self.embeddings(input_ids=input_ids), prompts[0])  # texts embedded once for all C
        additive = padding_mask(attention_mask.repeat(c, 1), x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if 0 < i < len(prompts):
                x = add_prompts(x, prompts[i])
            x = bert_layer(layer, x, additive, mask_pos.repeat(c) if i == last else None)  # last: [C*N, H]
        decoder = self.lm_head.decoder
        logits = self.lm_head(x) @ decoder.weight[label_ids].t() + decoder.bias[label_ids]
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


def pre_hook_adding(add):
    """A forward pre-hook that passes a layer's input hidden states through `add`, positional or keyword."""
    def hook(_module, args, kwargs):
        if args:
            return (add(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}
    return hook


class CausalPromptScorer(nn.Module):
    """Decoder LMs (Llama, Qwen2, GPT-2): prompts are added to the token embeddings at each row's
    `prompt_pos` (before the template, or after the text for a suffix prompt); the label words are scored by
    the next-token logits at `mask_pos` (the last template token)."""

    def __init__(self, lm: nn.Module, family):
        super().__init__()
        self.embed = family.embedding_module(lm)
        self.body = reach(lm, family.body)  # ends with the final norm
        self.head = lm.get_output_embeddings()
        self.blocks_path = family.blocks

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids, prompt_pos):
        return self.score(input_ids, attention_mask, mask_pos, label_ids, [prompt_embeds], prompt_pos)

    def score(self, input_ids, attention_mask, mask_pos, label_ids, prompts: list[torch.Tensor], prompt_pos=None):
        """`prompts[i]` [C, P', H] goes onto the input of block i (block 0's input is the embeddings)."""
        n = input_ids.shape[0]
        c = prompts[0].shape[0]
        x = add_prompts_at(self.embed(input_ids), prompts[0], prompt_pos)
        mask = causal_mask(attention_mask.repeat(c, 1), x.dtype)
        hooks = [block.register_forward_pre_hook(
                     pre_hook_adding(lambda h, p=p: add_prompts_at(h, p, prompt_pos)), with_kwargs=True)
                 for block, p in zip(list(reach(self.body, self.blocks_path))[1:], prompts[1:])]
        try:
            x = self.body(inputs_embeds=x, attention_mask=mask, use_cache=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
        return self.label_logits(x, mask_pos.repeat(c), label_ids).view(c, n, -1)

    def label_logits(self, hidden: torch.Tensor, positions: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, H] final hidden states -> [B, K] logits of the label words at `positions`."""
        x = gather_rows(hidden, positions)
        logits = x @ self.head.weight[label_ids].t()
        if self.head.bias is not None:
            logits = logits + self.head.bias[label_ids]
        return logits


def cache_pairs(cache) -> list:
    """Every layer's (keys, values) of a transformers cache: a tuple of pairs before 4.56, layers since (5.x
    dropped `to_legacy_cache`, and iterating its cache yields triples)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def cache_from_pairs(pairs: tuple):
    """A DynamicCache holding these (keys, values), on transformers 4.x and 5.x alike."""
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(pairs)
    return DynamicCache(pairs)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one the model takes (0, or the dtype's minimum)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class CausalTextGraph(CausalPromptScorer):
    """The text half of the cached pair: N texts (everything before a suffix prompt's slots) -> every layer's
    keys and values [L, 2, N, kv_heads, S, head_dim], computed once per set of rows.

    With `prefix_kv` [L, 2, 1, kv_heads, S_p, head_dim], the keys and values of a prefix every row shares (this
    graph's own output on the prefix, with an empty prefix), the texts continue it: they attend to it where it is
    (export/attention.py: never copied per row), their positions start at S_p, and only their own keys and values
    are returned. An empty prefix (S_p = 0) gives the texts alone. Without `prefix_kv` at export, the graph of pairs
    exported before prefixes existed. It attends with `bbt_shared` whatever the model's own setting."""

    def forward(self, input_ids, attention_mask, prefix_kv=None):
        x = self.embed(input_ids)
        start = 0 if prefix_kv is None else prefix_kv.shape[4]
        positions = (torch.arange(input_ids.shape[1], device=input_ids.device) + start).unsqueeze(0)
        with active(self.body), sharing(prefix=prefix_kv):
            out = self.body(inputs_embeds=x, attention_mask=causal_mask(attention_mask, x.dtype),
                            position_ids=positions, use_cache=True)
        return torch.stack([torch.stack([k, v]) for k, v in cache_pairs(out.past_key_values)])


class CausalTailGraph(CausalPromptScorer):
    """The tail half: C prompts on the slots of each row's tail (the slots and the answer cue, U tokens from
    position len(text)), attending to the cached text -> label logits [C, N, K], equal to the full graph's.

    The C candidates' tails of a row run as one sequence of C*U queries over that row's cached keys, each block
    with its own positions; the `bbt_shared` attention (export/attention.py) scores them against the text together
    and each against its own tail alone, so neither the cache nor the attention grows per candidate. With
    `prefix_kv`, the shared prefix comes before every row's text (positions after it): prefix, text, then tail."""

    def forward(self, text_kv, text_mask, tail_ids, mask_pos, prompt_embeds, label_ids, prefix_kv=None):
        n, u = tail_ids.shape
        c = prompt_embeds.shape[0]
        emb = self.embed(tail_ids)  # [N, U, H]
        h = emb.shape[-1]
        x = (emb.unsqueeze(1) + place_prompts(prompt_embeds, u, 0).unsqueeze(0)).reshape(n, c * u, h)
        step = torch.arange(u, device=tail_ids.device).repeat(c)  # each query's place within its tail
        positions = text_mask.sum(1, keepdim=True) + step.unsqueeze(0)  # [N, C*U]
        if prefix_kv is not None:
            positions = positions + prefix_kv.shape[4]
        mask = additive(text_mask[:, None, None, :].bool(), emb.dtype)  # [N, 1, 1, S]: the texts' padding
        pairs = tuple((text_kv[i, 0], text_kv[i, 1]) for i in range(text_kv.shape[0]))
        with active(self.body), sharing(prefix=prefix_kv, blocks=(c, u)):
            out = self.body(inputs_embeds=x, attention_mask=mask, position_ids=positions,
                            past_key_values=cache_from_pairs(pairs), use_cache=True)[0]  # [N, C*U, H]
        rows = torch.arange(c, device=tail_ids.device).unsqueeze(0) * u + mask_pos.unsqueeze(1)  # [N, C]
        picked = torch.gather(out, 1, rows.unsqueeze(-1).expand(n, c, h)).transpose(0, 1).reshape(c * n, 1, h)
        zero = torch.zeros(c * n, dtype=torch.long, device=tail_ids.device)
        return self.label_logits(picked, zero, label_ids).view(c, n, -1)


class DeepPromptScorer(nn.Module):
    """The deep (BBTv2) contract over either family's scorer: a prompt on every layer's input."""

    def __init__(self, scorer: nn.Module, layers: int):
        super().__init__()
        self.scorer = scorer
        self.layers = layers

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids, *rest):
        """`rest`: (deep_prompts, prompt_layer), after `prompt_pos` for a decoder."""
        *positions, deep_prompts, prompt_layer = rest
        prompts = layer_prompts(deep_prompts, prompt_embeds, prompt_layer, self.layers)
        return self.scorer.score(input_ids, attention_mask, mask_pos, label_ids, prompts, *positions)


def scorer_for(loaded, deep: bool = False) -> nn.Module:
    """The family's contract module over the loaded model; with `deep`, the deep (BBTv2) contract over it."""
    scorer = loaded.family.scorer(loaded.model, loaded.family)
    if deep:
        scorer = DeepPromptScorer(scorer, int(loaded.model.config.num_hidden_layers))
    return scorer.eval()
