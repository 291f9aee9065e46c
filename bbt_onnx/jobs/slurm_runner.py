"""A sweep's trials as one Slurm job array through submitit (the `slurm` extra); where there is no Slurm, submitit's
local executor runs them as processes here.

A job that Slurm stops at its time limit or preempts is requeued (submitit's checkpoint protocol), and its trial
continues from its run's own checkpoint; the job's own folder (submitit's pickles and logs) is the sweep's
`slurm/` folder.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import SettingsError
from .sweep import Runner, Sweep, SweepOptions, Trial, TrialResult, exception_line, run_trial

JOBS = "slurm"  # submitit's folder in the sweep's
CONTROLLERS_LOG = "local-controllers.log"  # what the local executor's controller processes print
POLL_SECONDS = 2.0
STOP_SECONDS = 15.0  # how long stopped local jobs get to end (submitit's controller kills its tasks after 1 s)


def open_slurm(options: SweepOptions, log: Callable[[str], None]) -> Runner:
    try:
        import submitit
    except ImportError:
        raise SettingsError("executor slurm needs submitit: pip install 'bbt-onnx[slurm]'", "executor") from None

    class Requeued(submitit.helpers.Checkpointable):
        """One trial; on a time limit or a preemption the same call is submitted again, and the trial resumes
        from its run directory (which is the state, so nothing else is pickled)."""

        def __call__(self, trial: Trial) -> tuple[dict, float]:
            started = time.monotonic()
            return run_trial(trial), time.monotonic() - started

    def run(sweep: Sweep, done: Callable[[TrialResult], None]) -> None:
        executor, cluster = executor_for(submitit, sweep, options)
        if cluster == "slurm":
            jobs = executor.map_array(Requeued(), sweep.trials)
        else:  # the local executor's controllers print tracebacks when Ctrl-C stops them: into their own log
            (sweep.folder / JOBS).mkdir(parents=True, exist_ok=True)
            with output_to(sweep.folder / JOBS / CONTROLLERS_LOG):
                jobs = executor.map_array(Requeued(), sweep.trials)
        log(f"{len(jobs)} trials as {'a Slurm job array' if cluster == 'slurm' else 'local processes'} "
            f"({jobs[0].job_id.split('_')[0] if jobs else '-'})")
        names = {job.job_id: trial.name for job, trial in zip(jobs, sweep.trials)}
        try:
            for job in submitit.helpers.as_completed(jobs, poll_frequency=POLL_SECONDS):
                try:
                    metrics, seconds = job.result()
                    done(TrialResult(names[job.job_id], metrics, None, seconds))
                except Exception as exc:  # the trial's own error, raised here by submitit
                    done(TrialResult(names[job.job_id], None, exception_line(str(exc)) or type(exc).__name__))
        finally:
            stopping = [job for job in jobs if not job.done()]
            for job in stopping:
                job.cancel(check=False)
            if cluster != "slurm":  # processes here: gone before the command returns, so a resume finds runs free
                deadline = time.monotonic() + STOP_SECONDS
                while any(not job.done() for job in stopping) and time.monotonic() < deadline:
                    time.sleep(0.05)

    return run


@contextmanager
def output_to(path: Path):
    """Processes started inside inherit `path` as their stdout and stderr (ours are back afterwards): what they
    print stays out of the command's output (the summary JSON on stdout, the lines on stderr)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def executor_for(submitit, sweep: Sweep, options: SweepOptions):
    """Slurm's executor where Slurm is (submitit's own detection), else its local one; and which it is. Each job
    is told to stop `signal_delay` seconds before its limit, and is requeued up to `max_failures` times."""
    cluster = submitit.AutoExecutor.which()
    folder, warning = sweep.folder / JOBS, signal_delay(options.slurm_minutes)
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder, max_num_timeout=options.max_failures)
        executor.update_parameters(job_name="bbt-onnx-sweep", time=max(1, int(options.slurm_minutes)),
                                   cpus_per_task=options.cpus_per_trial, signal_delay_s=warning,
                                   **({"partition": options.slurm_partition} if options.slurm_partition else {}))
    else:  # processes here: a limit may be a fraction of a minute
        executor = submitit.LocalExecutor(folder, max_num_timeout=options.max_failures)
        executor.update_parameters(timeout_min=options.slurm_minutes, signal_delay_s=warning)
    return executor, cluster


def signal_delay(minutes: float) -> int:
    """Seconds before the time limit at which a job is told to stop and requeue: submitit's 90 at most, a third of
    the limit at most (a job only stops: its trial's state is its last checkpoint, already on disk)."""
    return max(1, min(90, int(60 * minutes / 3)))
