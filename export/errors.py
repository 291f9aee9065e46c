"""Export failures a user can act on share the runtime's BBTError, so the CLI reports them the same way."""

from bbt_onnx.errors import BBTError


class ExportError(BBTError):
    """The model cannot be exported, or the exported graph failed validation."""
