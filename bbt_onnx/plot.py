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
    events = [e for e in events if "baseline" not in e]  # the baselines' rows: scores, not generations
    seeds = sorted({e.get("seed", 0) for e in events})
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.ticklabel_format(axis="y", useOffset=False)  # a flat loss reads as its values, not "1e-6+6.98e-1"
    ax2 = None
    colours = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    for i, seed in enumerate(seeds):
        rows = [e for e in events if e.get("seed", 0) == seed]
        label = f" (seed {seed})" if len(seeds) > 1 else ""
        colour = colours[i % len(colours)]
        calls = [e["calls"] for e in rows]
        if len(seeds) == 1:
            ax.plot(calls, [e["best_loss"] for e in rows], color=colour, lw=1, alpha=0.5, label="generation best")
        ax.plot(calls, [e["best_loss_so_far"] for e in rows], color=colour, lw=2, label="best so far" + label)
        dev = [(e["calls"], e["dev_metric"]) for e in rows if e.get("dev_metric") is not None]
        if dev:
            ax2 = ax2 or ax.twinx()
            ax2.plot(*zip(*dev), color="#d62728", marker="o", ms=3, lw=1.5, alpha=1.0 if i == 0 else 0.5,
                     label="dev metric" + label)
    ax.set_xlabel("API calls")
    ax.set_ylabel("train loss", color=colours[0])
    handles = ax.get_lines() + (ax2.get_lines() if ax2 is not None else [])
    if ax2 is not None:
        ax2.set_ylabel("dev metric", color="#d62728")
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    # fixed margins: tight_layout lays the text out twice, and cost more than the whole drawing
    fig.subplots_adjust(left=0.1, right=0.9 if ax2 is not None else 0.97, bottom=0.2, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return True
