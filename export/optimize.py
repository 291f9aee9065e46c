"""Graph variants: fused fp32 (CPU) and fp16 (CUDA) through onnxruntime's transformer optimizer, and dynamic int8."""

from __future__ import annotations

import logging
from pathlib import Path

FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "LayerNormalization", "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "RotaryEmbedding", "GroupQueryAttention")


def _quiet():
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger
    for name in ("onnxruntime", "onnxruntime.transformers", "fusion_base", "onnx_model", "optimizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fuse(src: Path, dst: Path, *, num_heads: int, hidden_size: int, fp16: bool,
         model_type: str | None) -> dict[str, int]:
    """Fuse Attention / SkipLayerNorm / BiasGelu with onnxruntime's transformer optimizer.

    `model_type` is the optimizer's (a family's `fusion_type`); None: no Python fusions. fp16 targets CUDA and
    converts weights and compute to fp16 while the graph keeps float32 inputs and outputs; fp32 targets the CPU.
    Returns the count of each fused operator, so the manifest shows what the optimizer found.
    """
    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.onnx_model import OnnxModel

    _quiet()
    if model_type is None:
        model, stats = OnnxModel(onnx.load(str(src))), {}
    else:
        model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=num_heads,
                                         hidden_size=hidden_size, opt_level=0, use_gpu=fp16)
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
    if fp16:
        model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    return stats


def dynamic_int8(src: Path, dst: Path) -> dict[str, int]:
    """Weights of MatMuls to int8, activations quantized on the fly: the CPU path.

    Embedding tables and the label rows of the output layer stay fp32, so the prompt is
    added to unquantized embeddings and the label logits keep their scale.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=False, reduce_range=False)
    return {}
