"""Export failures a user can act on are the runtime's ModelError, so the CLI reports them the same way."""

from bbt_onnx.errors import ModelError


class ExportError(ModelError):
    """The model cannot be exported, or the exported graph failed validation."""
