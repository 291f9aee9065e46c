"""Progress on stderr for long work, tuning and scoring rows: a bar on a terminal; off one (a log file, a CI job,
a pipe), a status line every few seconds, since a bar there prints nothing until it ends."""

from __future__ import annotations

import sys
import time
from contextlib import AbstractContextManager, contextmanager
from typing import Callable

import click

STATUS_EVERY = 5.0  # seconds between status lines off a terminal


class StatusLines:
    """A bar's stand-in off a terminal: `label: done/total, detail` at most every `every` seconds, and at the end."""

    def __init__(self, label: str, total: int, every: float | None = None, stream=None):
        self.label, self.total = label, total
        self.every = STATUS_EVERY if every is None else every
        self.stream = stream or sys.stderr
        self.pos, self.detail, self.last = 0, "", time.monotonic()

    def update(self, steps: int, detail: str = "") -> None:
        self.pos += steps
        self.detail = detail or self.detail
        if time.monotonic() - self.last >= self.every:
            self.write()

    def write(self) -> None:
        self.last = time.monotonic()
        detail = f", {self.detail}" if self.detail else ""
        print(f"{self.label}: {self.pos}/{self.total}{detail}", file=self.stream, flush=True)

    def close(self) -> None:
        self.write()


def bar(label: str, total: int, detail: bool = False):
    """A click bar on a terminal, status lines elsewhere; both have update(steps[, detail]) and close()."""
    if not sys.stderr.isatty():
        return StatusLines(label, total)
    progress = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_percent=not detail,
                                 item_show_func=(lambda s: s) if detail else None)
    progress.__enter__()
    progress.close = lambda: progress.__exit__(None, None, None)
    return progress


class Progress:
    """Tuning's progress: calls, best loss, dev metric."""

    def __init__(self, quiet: bool, stream=None, every: float | None = None):
        self.quiet = quiet
        self.stream, self.every = stream, every  # status lines into `stream` (a log file), not a bar on stderr
        self.bar = None
        self.dev: dict[int, float] = {}  # each seed's last dev metric
        self.calls: dict[int, int] = {}  # each seed's calls (seeds in lock-step share the bar)

    def start(self, total: int, done: int) -> None:
        if self.quiet:
            return
        self.bar = StatusLines("tuning", total, self.every, self.stream) if self.stream else \
            bar("tuning", total, detail=True)
        if done:
            self.bar.update(done)

    def update(self, event) -> None:
        if self.bar is None:
            return
        if event.dev_metric is not None:
            self.dev[event.seed] = event.dev_metric
        self.calls[event.seed] = event.calls
        dev = f"{max(self.dev.values()):.3f}" if self.dev else "-"
        seed = f"seed {event.seed}  " if len(self.calls) > 1 else ""
        self.bar.update(sum(self.calls.values()) - self.bar.pos,
                        f"{seed}loss {event.best_loss_so_far:.4f}  dev {dev}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def row_progress(total: int, label: str, quiet: bool):
    """Progress over rows; yields the function that advances it."""
    if quiet:
        yield lambda _n: None
        return
    progress = bar(label, total)
    try:
        yield progress.update
    finally:
        progress.close()


# a job's progress over rows: called with the row count and a label, it gives the function that advances it
RowProgress = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]


def no_progress(total: int, label: str) -> AbstractContextManager[Callable[[int], None]]:
    """A job's default: nothing shown."""
    return row_progress(total, label, quiet=True)
