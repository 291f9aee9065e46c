"""The executors a sweep's trials run on, by name: each opens from the sweep's options into a `Runner`, and needs
its own extra only when chosen."""

from __future__ import annotations

from typing import Callable

from .sweep import Runner, SweepOptions


def open_runner(options: SweepOptions, log: Callable[[str], None]) -> Runner:
    options.check()
    if options.executor == "ray":
        from .ray_runner import open_ray

        return open_ray(options, log)
    from .slurm_runner import open_slurm

    return open_slurm(options, log)
