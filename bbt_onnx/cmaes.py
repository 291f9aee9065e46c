"""pycma, imported without its warning that matplotlib is missing: bbt-onnx plots with its own code (plot.py)."""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*matplotlib.*")
    import cma

__all__ = ["cma"]
