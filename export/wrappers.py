"""Torch modules that compute the graph contract from a Hugging Face model.

One wrapper per architecture family. Each takes the contract's five inputs and returns
label logits [C, N, K]: the N texts are embedded once, every one of the C prompts is
added onto the placeholder positions 1..P', and only the K label rows of the output
layer are computed.
"""

from __future__ import annotations

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


def place_prompts(prompt_embeds: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[C, P', H] -> [C, T, H], zero except positions 1..P' (right after <s>)."""
    c, p, h = prompt_embeds.shape
    before = prompt_embeds.new_zeros(c, 1, h)
    after = prompt_embeds.new_zeros(c, seq_len - 1 - p, h)
    return torch.cat([before, prompt_embeds, after], dim=1)


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], positions [B] -> [B, H]."""
    b, _, h = hidden.shape
    index = positions.view(b, 1, 1).expand(b, 1, h)
    return torch.gather(hidden, 1, index).squeeze(1)


class MaskedPromptScorer(nn.Module):
    """RoBERTa masked LM: prompts are added to the embedding output (after its LayerNorm),
    the reference's "add" mode; the LM head's dense+LayerNorm runs on the mask position only."""

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.embeddings = mlm.roberta.embeddings
        self.encoder = mlm.roberta.encoder
        self.lm_head = mlm.lm_head

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids):
        n, t = input_ids.shape
        c = prompt_embeds.shape[0]
        hidden = self.embeddings(input_ids=input_ids)  # [N, T, H]
        h = hidden.shape[-1]
        x = (hidden.unsqueeze(0) + place_prompts(prompt_embeds, t).unsqueeze(1)).reshape(c * n, t, h)
        mask = attention_mask.repeat(c, 1)
        additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        x = self.encoder(x, attention_mask=additive)[0]
        x = gather_rows(x, mask_pos.repeat(c))  # [C*N, H]
        head = self.lm_head
        x = head.layer_norm(nn.functional.gelu(head.dense(x)))
        logits = x @ head.decoder.weight[label_ids].t() + head.decoder.bias[label_ids]
        return logits.view(c, n, -1)


def scorer_for(loaded) -> nn.Module:
    if loaded.kind == "masked":
        return MaskedPromptScorer(loaded.model).eval()
    raise NotImplementedError(loaded.kind)
