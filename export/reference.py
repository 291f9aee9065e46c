"""BBT's forward as the PyTorch reference computes it: every layer at every position, then the full LM head at the
scored rows. Each family record names its class; bench times it against the engine (`baseline.py`)."""

from __future__ import annotations

from .wrappers import gather_rows, padding_mask, reach, with_prompts


class MaskedReference:
    """Label logits [C, N, K] the way the PyTorch reference gets them (masked LMs)."""

    def __init__(self, mlm, family, prompt_start: int = 1):
        self.body = reach(mlm, family.body)
        self.head = family.head(mlm)

    def __call__(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids):
        n = input_ids.shape[0]
        c = prompt_embeds.shape[0]
        x = with_prompts(self.body.embeddings(input_ids=input_ids), prompt_embeds)
        x = self.body.encoder(x, attention_mask=padding_mask(attention_mask.repeat(c, 1), x.dtype))[0]
        logits = self.head.decoder(self.head(gather_rows(x, mask_pos.repeat(c))))  # the full vocabulary, as bbt.py
        return logits[:, label_ids].view(c, n, -1)


class CausalReference:
    """Decoders in plain PyTorch: the model's own forward on inputs_embeds (its own causal mask and
    attention kernel), then the full LM head at the scored rows."""

    def __init__(self, lm, family, prompt_start: int = 1):
        self.lm = lm
        self.prompt_start = prompt_start

    def __call__(self, input_ids, attention_mask, mask_pos, prompt_embeds, label_ids):
        n = input_ids.shape[0]
        c = prompt_embeds.shape[0]
        x = with_prompts(self.lm.get_input_embeddings()(input_ids), prompt_embeds, self.prompt_start)
        hidden = self.lm.base_model(inputs_embeds=x, attention_mask=attention_mask.repeat(c, 1), use_cache=False)[0]
        logits = self.lm.get_output_embeddings()(gather_rows(hidden, mask_pos.repeat(c)))
        return logits[:, label_ids].view(c, n, -1)
