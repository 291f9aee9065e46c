"""The GPU benchmark's device script (benchmarks/gpu/device_run.sh) runs where a session has minutes of device time
and no chance to edit: every option it passes must be one its programs (bbt-onnx's commands, the benchmark
scripts) still take."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bbt_onnx.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DEVICE_RUN = ROOT / "benchmarks" / "gpu" / "device_run.sh"
CALL = re.compile(r'(?:benchmarks/(?:gpu/)?([\w]+\.py)"|-m bbt_onnx\.cli ([\w-]+))')
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def calls(text: str) -> list[tuple[str, set[str]]]:
    """Each program the script runs (a script's file name, or `cli COMMAND`) with the options written after it on
    its command line (continuation lines joined)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        hits = list(CALL.finditer(line))
        for hit, after in zip(hits, hits[1:] + [None]):
            rest = line[hit.end():after.start() if after else None]
            program = hit.group(1) or f"cli {hit.group(2)}"
            found.append((program, set(FLAG.findall(rest))))
    return found


def options_of(program: str) -> set[str]:
    """The options a program takes: a bbt-onnx command's from click, a script's from its --help."""
    if program.startswith("cli "):
        command = cli.commands[program.split()[1]]
        return {o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)} | \
            {"--help"}
    script = next(ROOT.glob(f"benchmarks/**/{program}"))
    text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    return set(FLAG.findall(text))


def test_the_calls_are_found():
    programs = {p for p, _ in calls(DEVICE_RUN.read_text())}
    assert {"real_fewshot.py", "e2e.py", "parity.py", "make_large.py", "probe.py", "cli export", "cli bench",
            "cli check"} <= programs


@pytest.mark.parametrize("program", sorted({p for p, _ in calls(DEVICE_RUN.read_text()) if p != "summarize.py"}))
def test_every_option_the_device_script_passes_is_taken(program):
    passed = set().union(*(flags for p, flags in calls(DEVICE_RUN.read_text()) if p == program))
    unknown = sorted(passed - options_of(program))
    assert not unknown, f"device_run.sh passes {unknown} to {program}, which does not take them"


def test_a_renamed_option_is_caught():
    line = '"$PY" "$REPO/benchmarks/real_fewshot.py" --config gpu --seeds "$SEEDS" --json-out x.jsonl\n'
    ((program, flags),) = calls(line)
    assert program == "real_fewshot.py"
    assert sorted(flags - options_of(program)) == ["--json-out", "--seeds"]
