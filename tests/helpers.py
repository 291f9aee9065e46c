"""Assertions shared by the CLI tests."""

from click.testing import CliRunner

from bbt_onnx.cli import cli


def invoke(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def cli_error(args) -> str:
    """The command fails the user way: exit 2, one `error:` line last on stderr, no traceback, nothing on stdout."""
    result = invoke(args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress notes may come before it
    assert "Traceback" not in result.output and result.stdout == ""
    return errors[0]


def generations(run) -> list[dict]:
    """A run's log.jsonl rows for generations (the baselines' rows, scored before tuning, left out)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "baseline" not in r]
