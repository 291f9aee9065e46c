"""How close two engines' label logits are, in the terms a user cares about. Pure numpy: export's parity
check and `bbt-onnx check` share it."""

from __future__ import annotations

import numpy as np


def compare_logits(reference: np.ndarray, got: np.ndarray) -> dict:
    """Max abs difference and argmax (prediction) agreement of [..., K] logits, over every row."""
    reference = np.asarray(reference, dtype=np.float32)
    got = np.asarray(got, dtype=np.float32)
    if reference.shape != got.shape:
        raise ValueError(f"logits of shape {got.shape} cannot be compared with {reference.shape}")
    return {
        "max_abs_diff": float(np.abs(reference - got).max()) if reference.size else 0.0,
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()) if reference.size else 1.0,
        "rows": int(np.prod(reference.shape[:-1])),
    }
