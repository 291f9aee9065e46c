"""The export step: the only code in bbt-onnx that imports torch or transformers."""

from .errors import ExportError
from .pipeline import ExportOptions, export_model

__all__ = ["ExportError", "ExportOptions", "export_model"]
