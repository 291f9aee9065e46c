"""The library's messages speak of arguments by their Python names, never of the CLI's flags (docs/DESIGN.md,
`errors.py`): the CLI writes the arguments an error names as its flags. Read from the source with `ast`: nothing is
imported, so this takes well under a second."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bbt_onnx"
CLI_ONLY = {"cli.py"}  # the CLI's own rules and help speak of its flags
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
COMMAND = re.compile(r"`bbt-onnx [^`]*`")  # a shell command to run, quoted: the same words from Python


def error_classes() -> set[str]:
    """BBTError and every class errors.py derives from it."""
    tree = ast.parse((PACKAGE / "errors.py").read_text(encoding="utf-8"))
    names = {"BBTError"}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in names for b in node.bases):
            names.add(node.name)
    return names


def text_of(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's, with `{}` for each value put in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def called_name(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def message_nodes(tree: ast.AST, errors: set[str]):
    """Every `raise` statement and every call of an error class: where a message for the user is written."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) or (isinstance(node, ast.Call) and called_name(node) in errors):
            yield node


def strings_in(node: ast.AST):
    """The string literals and f-strings under `node`, outermost first (an f-string's parts are not repeated)."""
    inner: set[int] = set()
    for sub in ast.walk(node):
        if id(sub) in inner:
            continue
        text = text_of(sub)
        if text is not None:
            inner.update(id(s) for s in ast.walk(sub))
            yield sub, text


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in CLI_ONLY)


def flags_in_messages(source: str, errors: set[str]) -> list[tuple[int, str]]:
    """(line, flag) for each flag a message names outside a quoted `bbt-onnx ...` command."""
    found = set()
    for node in message_nodes(ast.parse(source), errors):
        for string, text in strings_in(node):
            for flag in FLAG.findall(COMMAND.sub("", text)):
                found.add((string.lineno, flag))
    return sorted(found)


def test_no_library_message_names_a_flag():
    errors = error_classes()
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {flag}" for path in library_files()
             for line, flag in flags_in_messages(path.read_text(encoding="utf-8"), errors)]
    assert not found, "messages name CLI flags; name the argument instead (BBTError's `argument`):\n" + \
        "\n".join(found)


@pytest.mark.parametrize("source,flags", [
    ('raise SettingsError("--choose is wrong")', ["--choose"]),
    ('raise SettingsError(f"x {y}: pass --force-any")', ["--force-any"]),
    ('e = RunError("use " "--resume")', ["--resume"]),
    ('raise SettingsError(f"finish it with `bbt-onnx tune --resume {p}` first")', []),
    ('raise SettingsError("budget must be at least 1", "budget")', []),
    ('x = setting(1, "With --server: calls per client.")', []),  # a help text, not a message
    ('raise ValueError("a range --1 or x--y")', []),
])
def test_the_scan_reads_what_it_should(source, flags):
    assert [flag for _, flag in flags_in_messages(source, error_classes())] == flags
