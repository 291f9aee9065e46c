"""The export job: the export package (`bbt_onnx_export`, the `export` extra, torch inside) carries out what
`ExportOptions` asks, and a summary of what it wrote comes back."""

from __future__ import annotations

from ..errors import BBTError
from ..export_options import ExportOptions


def run_export(options: ExportOptions, log=lambda _m: None) -> dict:
    """The export pipeline (the `export` extra, torch inside), and a summary of what it wrote."""
    try:
        from bbt_onnx_export.pipeline import export_model
    except ImportError as exc:
        if (exc.name or "").startswith("onnxruntime"):
            raise BBTError("export runs onnxruntime: pip install 'bbt-onnx[cpu]' (or [gpu])") from None
        raise BBTError(f"export needs the `export` extra (torch, transformers, onnx): pip install 'bbt-onnx[export]' "
                       f"after pip install torch==2.13.0 ({exc})") from None
    manifest = export_model(options, log=log)
    graphs = {name: {"file": g.file, **g.parity, **({"fused_ops": g.fused_ops} if g.fused_ops else {})}
              for name, g in manifest.graphs.items()}
    return {"out": str(options.out), "kind": manifest.kind, "architecture": manifest.architecture,
            "prompt_tokens": manifest.prompt_tokens, "embedding_std": manifest.embedding_std, "graphs": graphs}
