"""The run's picture: train loss and dev metric against API calls (matplotlib, when installed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from .fileio import write_bytes_atomic


def plot_run(events: Sequence[dict], path: Path, title: str = "") -> bool:
    """Write a PNG; False when matplotlib is missing (it is the optional `plot` extra)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the host application's backend stays as it is
    except ImportError:
        return False
    calls = [e["calls"] for e in events]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(calls, [e["best_loss"] for e in events], color="#1f77b4", lw=1, alpha=0.5, label="generation best")
    ax.plot(calls, [e["best_loss_so_far"] for e in events], color="#1f77b4", lw=2, label="best so far")
    ax.set_xlabel("API calls")
    ax.set_ylabel("train loss", color="#1f77b4")
    handles = ax.get_lines()
    dev = [(e["calls"], e["dev_metric"]) for e in events if e.get("dev_metric") is not None]
    if dev:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*dev), color="#d62728", marker="o", ms=3, lw=1.5, label="dev metric")
        ax2.set_ylabel("dev metric", color="#d62728")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return True
