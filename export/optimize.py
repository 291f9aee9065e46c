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


class Fusion:
    """onnxruntime's transformer optimizer over one graph (Attention / SkipLayerNorm / BiasGelu), run once and
    written as fused fp32 (CPU) and fp16 (CUDA).

    At opt_level 0 the optimizer's fusions do not depend on the target device, so both variants start from the
    same fused graph; each is written from its own copy of it, as a separate pass would write it. `model_type` is
    the optimizer's (a family's `fusion_type`); None: no Python fusions. fp16 converts weights and compute to fp16
    while the graph keeps float32 inputs and outputs.
    """

    def __init__(self, src: Path, *, num_heads: int, hidden_size: int, model_type: str | None):
        self.src, self.num_heads, self.hidden_size, self.model_type = src, num_heads, hidden_size, model_type
        self._fused: bytes | None = None
        self.stats: dict[str, int] = {}  # the count of each fused operator, so the manifest shows what was found

    def _run(self) -> bytes:
        import onnx
        from onnxruntime.transformers import optimizer

        _quiet()
        if self.model_type is None:
            return onnx.load(str(self.src)).SerializeToString()
        model = optimizer.optimize_model(str(self.src), model_type=self.model_type, num_heads=self.num_heads,
                                         hidden_size=self.hidden_size, opt_level=0)
        self.stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
        return model.model.SerializeToString()

    def write(self, dst: Path, fp16: bool) -> dict[str, int]:
        """The fused graph to `dst`, in fp16 or fp32; returns the fused operators' counts."""
        import onnx
        from onnxruntime.transformers.onnx_model import OnnxModel

        if self._fused is None:
            self._fused = self._run()
        model = OnnxModel(onnx.load_from_string(self._fused))
        if fp16:
            model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(dst))
        return dict(self.stats)


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
