"""The PyTorch side of `bbt-onnx bench`: BBT's forward as the reference computes it in PyTorch.

It loads the exported model's source checkpoint with the chosen attention implementation
(eager or SDPA) and runs what `bbt.py` runs: every layer at every position, then the full
LM head at the mask rows. Same inputs, dtype and shapes as the engine, in the same process.
"""

from __future__ import annotations

import numpy as np

from bbt_onnx.bench import median_ms
from bbt_onnx.encoding import EncodedSet

from .errors import ExportError
from .wrappers import gather_rows, padding_mask, reach, with_prompts

VARIANTS = ("eager", "sdpa")


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


def load_scorer(source: str, attn: str, device: str, fp16: bool, gguf_file: str | None = None,
                prompt_start: int = 1):
    import torch
    import transformers

    from .families import family_of
    from .loading import check_gguf, check_source, load_config

    source = check_source(source, gguf_file)
    gguf = check_gguf(source, gguf_file)
    family = family_of(load_config(source, gguf))
    dtype = torch.float16 if fp16 else torch.float32
    model = getattr(transformers, family.architecture).from_pretrained(source, attn_implementation=attn, dtype=dtype,
                                                                      **gguf)
    return family.reference(model.to(device).eval(), family, prompt_start)


def torch_ms(manifest, source: str, prompts: np.ndarray, enc: EncodedSet, device: str, fp16: bool, attn: str,
             repeat: int) -> float:
    """Median ms per call of the PyTorch scorer on the same inputs as the engine."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("the torch baseline on cuda needs a CUDA build of torch")
    gguf_file = manifest.gguf_file if source == manifest.source else None
    scorer = load_scorer(source, attn, device, fp16, gguf_file, manifest.prompt_start)
    dtype = torch.float16 if fp16 else torch.float32
    args = [torch.from_numpy(a).to(device) for a in (enc.input_ids, enc.attention_mask, enc.mask_pos)]
    args.append(torch.from_numpy(prompts).to(device=device, dtype=dtype))
    args.append(torch.from_numpy(enc.label_ids).to(device))

    def call():
        out = scorer(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        return median_ms(call, repeat)
