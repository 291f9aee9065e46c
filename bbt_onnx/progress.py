"""Progress on stderr for long work: a bar for tuning and for scoring rows."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import click


class Progress:
    """A progress bar on stderr: calls, best loss, dev metric."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.dev = None

    def start(self, total: int, done: int) -> None:
        if self.quiet:
            return
        self.bar = click.progressbar(length=total, label="tuning", file=sys.stderr, show_pos=True,
                                     show_percent=False, item_show_func=lambda s: s)
        self.bar.__enter__()
        if done:
            self.bar.update(done)

    def update(self, event) -> None:
        if self.bar is None:
            return
        if event.dev_metric is not None:
            self.dev = event.dev_metric
        dev = "-" if self.dev is None else f"{self.dev:.3f}"
        self.bar.update(event.calls - self.bar.pos, f"loss {event.best_loss_so_far:.4f}  dev {dev}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@contextmanager
def row_progress(total: int, label: str, quiet: bool):
    """A progress bar over rows on stderr; yields the function that advances it."""
    if quiet:
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update
