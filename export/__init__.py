"""The export step: the only code in bbt-onnx that imports torch or transformers."""

from bbt_onnx.export_options import ExportOptions

from .errors import ExportError
from .pipeline import export_model

__all__ = ["ExportError", "ExportOptions", "export_model"]
