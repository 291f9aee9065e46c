"""A sweep through Ray against the same tunes in a shell loop, side by side in one run; and a trial killed mid-run.

For SPEC's trials, in this order: every trial as `bbt-onnx tune` in a loop (one process after another, each with
--threads CPUS), then `bbt-onnx sweep SPEC --cpus-per-trial CPUS` (one trial at a time: the loop's work, through
Ray), then with --cpus-per-trial 1 (the trials side by side, one thread each); and a bare start and stop of a local
Ray cluster (a Python process importing Ray Tune, as the sweep's does), timed, so that Ray's overhead reads as:
sweep - loop - start-up. With --kill, a further sweep whose
first trial's worker is killed at a checkpoint once --kill-after seconds have passed: the trial resumes, and its z
is compared with the loop's run. Prints one JSON object; writes under --work (kept).

usage: python benchmarks/sweep.py SPEC --work DIR [--cpus 2] [--kill] [--kill-after 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bbt_onnx.cli import tune_argv
from bbt_onnx.jobs.sweep import read_spec
from bbt_onnx.prompt import load_prompt

CLI = [sys.executable, "-m", "bbt_onnx.cli"]


def timed(argv: list[str], log: Path) -> float:
    started = time.monotonic()
    with open(log, "w") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - started


def z(run: Path) -> bytes:
    return load_prompt(run).z.tobytes()


def ray_start_stop() -> float:
    """A bare local cluster started and stopped as a sweep does it, Ray Tune's import included (in a process of its
    own, as the sweep's is)."""
    code = ("from bbt_onnx.jobs.ray_runner import cluster, environ, environment\n"
            "from bbt_onnx.jobs.sweep import SweepOptions\n"
            "with environ(environment(SweepOptions())):\n"
            "    import ray.tune\n"
            "    with cluster(SweepOptions()):\n"
            "        pass\n")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def killed_sweep(spec: Path, work: Path, cpus: int, after: float) -> dict:
    """The sweep with its first trial's worker killed once the trial has a checkpoint and `after` seconds have
    passed (while it still runs: a worker is reused by the next trial once one ends)."""
    folder = work / "killed"
    trials = [p.name for p in read_spec(spec).trials()]
    proc = subprocess.Popen([*CLI, "sweep", str(spec), "--out", str(folder), "--cpus-per-trial", str(cpus),
                             "--max-failures", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started, killed, at = time.monotonic(), None, None
    run, log = folder / "runs" / trials[0], folder / "logs" / f"{trials[0]}.log"
    while proc.poll() is None and killed is None:
        running = (run / "checkpoint.npz").is_file() and not (run / "prompt.npz").is_file()
        if running and time.monotonic() - started > after:
            killed, at = int(log.read_text().split(" pid ")[1].split()[0]), time.monotonic() - started
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    resumed = [name for name in trials if ": resumable" in (folder / "logs" / f"{name}.log").read_text()]
    return {"trial": trials[0], "killed_pid": killed, "killed_at_s": None if at is None else round(at, 1),
            "exit": proc.returncode, "resumed_trials": resumed,
            "z_equals_loop": {name: z(folder / "runs" / name) == z(work / "loop" / name) for name in trials},
            "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--kill-after", type=float, default=5.0)
    args = ap.parse_args()
    spec = read_spec(args.spec)
    trials = spec.trials()
    args.work.mkdir(parents=True, exist_ok=False)
    loop = args.work / "loop"
    loop.mkdir()
    started = time.monotonic()
    for plan in trials:  # the shell loop: one `bbt-onnx tune` after another
        options = {"threads": args.cpus, **plan.options}
        timed([*CLI, "tune", "--model", spec.model, "--out", str(loop / plan.name), *tune_argv(plan.name, options),
               "--quiet"], args.work / f"loop-{plan.name}.log")
    loop_s = time.monotonic() - started
    startup_s = ray_start_stop()
    sweep_s = timed([*CLI, "sweep", str(args.spec), "--out", str(args.work / "ray"), "--cpus-per-trial",
                     str(args.cpus)], args.work / "ray.log")
    wide_s = timed([*CLI, "sweep", str(args.spec), "--out", str(args.work / "ray-wide"), "--cpus-per-trial", "1"],
                   args.work / "ray-wide.log")
    same = all(z(args.work / "ray" / "runs" / p.name) == z(loop / p.name) for p in trials)
    result = {"trials": len(trials), "cpus": args.cpus, "loop_s": round(loop_s, 1), "ray_start_stop_s":
              round(startup_s, 1), "sweep_s": round(sweep_s, 1), "overhead_beyond_startup":
              round((sweep_s - startup_s - loop_s) / loop_s, 3), "z_sweep_equals_loop": same,
              "sweep_one_cpu_a_trial_s": round(wide_s, 1), "speedup_one_cpu_a_trial": round(loop_s / wide_s, 2)}
    if args.kill:
        result["killed"] = killed_sweep(args.spec, args.work, args.cpus, args.kill_after)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
