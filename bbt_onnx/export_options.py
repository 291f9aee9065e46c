"""What `bbt-onnx export` is asked for. The export package (`bbt_onnx_export`, torch) carries it out; the options
live here, torch-free, so that the CLI describes export in an install without the export extra."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import SettingsError
from .fileio import OutputKind
from .manifest import looks_like_model_dir
from .options import setting

MIN_OPSET, MAX_OPSET = 14, 20
MODEL_DIR = OutputKind("a model directory (`bbt-onnx export`)", looks_like_model_dir)
INT8_LEVELS = ("mixed", "two")


@dataclass(frozen=True)
class ExportOptions:
    model: str = setting(None, "Hugging Face hub id, or a directory written by save_pretrained.", required=True)
    out: Path = setting(None, "Model directory to write.", required=True)
    prompt_tokens: int = setting(50, "Most soft-prompt tokens a run may use (P).")
    opset: int = setting(17, "ONNX opset.")
    fp16: bool = setting(False, "Also write a fused fp16 graph for CUDA (model.fp16.onnx).")
    int8: bool = setting(False, "Also write an int8 graph for CPU (model.int8.onnx): dynamic for masked LMs, "
                         "calibrated for decoders.")
    force: bool = setting(False, "Replace an earlier model directory in --out.")
    force_any: bool = setting(False, "Replace --out even when it does not look like a model directory (everything "
                              "in it is deleted).")
    gguf_file: str | None = setting(None, "Load this GGUF file from the --model directory (needs the gguf extra).")
    deep: bool = setting(False, "Also write the deep-prompt graphs BBTv2 tunes (tune --method bbtv2).")
    kv_cache: bool = setting(False, "Decoders: also write the text/tail graph pair that computes the text once per "
                             "run for suffix prompts (--prompt-position suffix).")
    int8_levels: str = setting("mixed", "Decoders' int8: one activation level on the middle layers' MLP inputs "
                               "(about 2x fp32) or two levels everywhere (about 1.8x, logits closer to fp32).",
                               choices=INT8_LEVELS)

    def check(self) -> None:
        """Settings first: nothing is loaded or written for a value that cannot work."""
        if not self.model:
            raise SettingsError("model is required (a hub id or a save_pretrained directory)", "model")
        if not self.out:
            raise SettingsError("out is required (the model directory to write)", "out")
        if self.prompt_tokens < 1:
            raise SettingsError(f"prompt_tokens must be at least 1, got {self.prompt_tokens}", "prompt_tokens")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise SettingsError(f"opset must be between {MIN_OPSET} and {MAX_OPSET} (the TorchScript exporter's "
                                f"range), got {self.opset}", "opset")
        if self.int8_levels not in INT8_LEVELS:
            raise SettingsError(f"int8_levels must be one of {', '.join(INT8_LEVELS)}, got {self.int8_levels!r}",
                                "int8_levels")
        if self.int8_levels != "mixed" and not self.int8:
            raise SettingsError("int8_levels needs int8", ("int8_levels", "int8"))

    def inputs(self) -> list[tuple[str, Path | None]]:
        """What export reads from disk, which --out must keep apart from: a local checkpoint's directory."""
        source = Path(self.model)
        return [("source model directory", source if source.is_dir() else None)]

    def check_out(self) -> None:
        """--out may be written: empty, or an earlier model directory with force (anything with force_any), and
        neither the source checkpoint's directory nor in it, nor around it; touches nothing."""
        from .fileio import check_replaceable

        check_replaceable(self.out, self.force, MODEL_DIR, self.force_any, self.inputs())

