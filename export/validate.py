"""Parity at export: the ONNX graph against the unmodified PyTorch model on the same inputs.

The reference side does not use the export wrapper: it runs the Hugging Face model
itself, with a forward hook that adds the prompt onto the embedding output, so a bug in
the wrapper cannot hide in both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityInputs:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    mask_pos: np.ndarray
    prompt_embeds: np.ndarray
    label_ids: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def torch_reference(loaded, inputs: ParityInputs, prompt_start: int = 1) -> np.ndarray:
    """[C, N, K] label logits from the Hugging Face model, one prompt at a time."""
    model = loaded.model
    embeddings = model.get_input_embeddings() if loaded.kind == "causal" else model.roberta.embeddings
    ids = torch.from_numpy(inputs.input_ids)
    mask = torch.from_numpy(inputs.attention_mask)
    rows = torch.arange(ids.shape[0])
    pos = torch.from_numpy(inputs.mask_pos)
    labels = torch.from_numpy(inputs.label_ids)
    out = []
    for prompt in inputs.prompt_embeds:
        p = torch.from_numpy(prompt)

        def add_prompt(_module, _args, output, p=p):
            output = output.clone()
            output[:, prompt_start:prompt_start + p.shape[0]] += p
            return output

        handle = embeddings.register_forward_hook(add_prompt)
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        out.append(logits[rows, pos][:, labels].float().numpy())
    return np.stack(out)


def compare(reference: np.ndarray, got: np.ndarray) -> dict:
    got = got.astype(np.float32)
    return {
        "max_abs_diff": float(np.abs(reference - got).max()),
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()),
        "rows": int(reference.shape[0] * reference.shape[1]),
    }


def run_onnx(path, inputs: ParityInputs) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return session.run(["label_logits"], inputs.feeds())[0]
