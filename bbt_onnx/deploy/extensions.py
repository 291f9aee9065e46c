"""Where onnxruntime-extensions' custom-op library lies: the classifier's tokenizer ops need it, in deploy's own
checks and in a Triton repository's model operations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import SettingsError


def extensions_library() -> str:
    """onnxruntime-extensions' custom-op library, or one line naming the extra that brings it. Found without
    importing the package, whose import loads transformers when that is installed (seconds)."""
    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or spec.origin is None:
        raise SettingsError("deploy needs onnxruntime-extensions (the tokenizer inside the graph): "
                            "pip install 'bbt-onnx[deploy]'")
    found = sorted(Path(spec.origin).parent.glob("_extensions_pydll*"))
    if found:
        return str(found[0])
    import onnxruntime_extensions

    return onnxruntime_extensions.get_library_path()
