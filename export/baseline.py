"""The PyTorch side of `bbt-onnx bench`: the exported model's source checkpoint loaded with the chosen attention
implementation (eager or SDPA) and its family's reference forward (`reference.py`) timed on the same inputs, dtype
and shapes as the engine, in the same process.
"""
from __future__ import annotations

import numpy as np

from bbt_onnx.timing import median_ms
from bbt_onnx.encoding import EncodedSet

from .errors import ExportError
from .families import family_of
from .loading import check_gguf, check_source, load_config

VARIANTS = ("eager", "sdpa")


def load_scorer(source: str, attn: str, device: str, fp16: bool, gguf_file: str | None = None,
                prompt_start: int = 1):
    import torch
    import transformers

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
