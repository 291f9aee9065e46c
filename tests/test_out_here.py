"""`--out .` (or a folder above the working directory) for the commands that write a directory whole (export,
deploy, client-dir, triton-repo): refused with one `error:` line, with or without --force / --force-any, and
nothing in the working directory is touched. Replacing it would pull the folder the command runs in from under it."""

from __future__ import annotations

import pytest

from helpers import cli_error, invoke
from test_hardening import snapshot
from test_tune import tune_args


@pytest.fixture(scope="module")
def run(tiny_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("here") / "run"
    result = invoke(tune_args(tiny_model, data_dir, out, "--budget", 20, "-q"))
    assert result.exit_code == 0, result.output
    return out


COMMANDS = ("export", "deploy", "client-dir", "triton-repo")


def argv(command: str, tiny_src, tiny_model, run) -> list:
    return {"export": ["export", "--model", tiny_src],
            "deploy": ["deploy", "--model", tiny_model, "--prompt", run],
            "client-dir": ["client-dir", "--model", tiny_model],
            "triton-repo": ["triton-repo", "--model", tiny_model, "--kind", "cpu"]}[command]


@pytest.mark.parametrize("force", [[], ["--force"], ["--force-any"]], ids=["plain", "force", "force-any"])
@pytest.mark.parametrize("filled", [False, True], ids=["empty", "with-files"])
@pytest.mark.parametrize("command", COMMANDS)
def test_out_dot_is_refused(command, filled, force, tiny_src, tiny_model, run, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    if filled:
        (here / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    line = cli_error([*argv(command, tiny_src, tiny_model, run), "--out", ".", *force])
    assert "--out . is the working directory" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", ["..", "sub/../.."])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_that_holds_the_working_directory_is_refused(command, out, tiny_src, tiny_model, run, tmp_path,
                                                            monkeypatch):
    here = tmp_path / "a" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    line = cli_error([*argv(command, tiny_src, tiny_model, run), "--out", out, "--force-any"])
    assert f"--out {out.removeprefix('sub/../')} holds the working directory" in line, line
    assert snapshot(tmp_path) == before


def test_a_dotted_out_is_written_where_it_points(tiny_model, tmp_path, monkeypatch):
    """`sub/../client` is ./client: checked and written there (sub never made)."""
    monkeypatch.chdir(tmp_path)
    result = invoke(["client-dir", "--model", tiny_model, "--out", "sub/../client"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "client").is_dir() and not (tmp_path / "sub").exists()
    (tmp_path / "client" / "mine.txt").write_text("kept\n")
    assert "exists and is not empty" in cli_error(["client-dir", "--model", tiny_model, "--out", "sub/../client"])
