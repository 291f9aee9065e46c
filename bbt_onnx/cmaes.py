"""pycma, imported without matplotlib's pyplot: bbt-onnx plots with its own code (plot.py).

pycma's interactive shortcuts (`cma.s`) import pyplot when matplotlib is installed, which costs every process that
tunes, serves or only asks for --help about a quarter of a second, and picks a GUI backend in a host application.
pyplot is hidden while pycma loads (unless the host already imported it), and pycma's warning about it is silenced.
"""

import sys
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*matplotlib.*")
    _hide = "matplotlib.pyplot" not in sys.modules
    if _hide:
        sys.modules["matplotlib.pyplot"] = None  # an import of it raises ImportError, which pycma expects
    try:
        import cma
    finally:
        if _hide:
            del sys.modules["matplotlib.pyplot"]

__all__ = ["cma"]
