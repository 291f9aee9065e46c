"""Settings described once, on the config dataclasses, and turned into command-line options from there.

A field made with `setting(default, help, ...)` carries its help text, choices and bounds as metadata; the CLI
generates each option from it (`click_options`) and builds the dataclass back from the parsed values
(`from_params`), so no default, choice list or help text is restated in the CLI. Rules between flags are declared
with the command (`Rule`) and checked by `Command` before it runs. `Group` makes every user mistake one `error:`
line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import errno
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import click

from .errors import BBTError, SettingsError
from .fileio import storage_error

KEY = "option"


@dataclass(frozen=True)
class Option:
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    open_minimum: bool = False
    flag: str | None = None  # the option's declaration [default: --field-name]; "--a/--no-a" for a tri-state flag
    short: str | None = None
    path: bool = False  # a file (click checks it is not a folder)
    show_default: bool = True
    multiple: bool = False  # repeatable; the field holds a tuple
    required: bool = False


def setting(default: Any, help: str, **option) -> Any:
    """A dataclass field with its command-line description."""
    return dataclasses.field(default=default, metadata={KEY: Option(help, **option)})


def described(cls) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata[KEY]) for f in dataclasses.fields(cls) if KEY in f.metadata]


def flag_of(cls, name: str) -> str:
    """The command-line flag of field `name`."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    option = field.metadata.get(KEY)
    if option is not None and option.flag:
        return option.flag.split("/")[0]
    return "--" + name.replace("_", "-")


class FiniteFloat(click.FloatRange):
    """A float option: a finite number (NaN and infinity are refused), at least `min` when it has one."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def get_metavar(self, param, *args, **kwargs) -> str:
        return "FLOAT"

    def _describe_range(self) -> str:
        return super()._describe_range() if self.min is not None else ""


def _python_type(annotation: str) -> str:
    parts = [p.strip() for p in str(annotation).split("|") if p.strip() != "None"]
    return parts[0] if parts else "str"


def click_options(cls, skip: Sequence[str] = (), only: Sequence[str] | None = None, defaults: dict | None = None):
    """A decorator adding one click option per described field of `cls` (in field order), with its help, type,
    bounds, choices and default; `defaults` overrides a field's default for this command."""
    def decorate(f):
        for field, opt in reversed(described(cls)):
            if field.name in skip or (only is not None and field.name not in only):
                continue
            default = (defaults or {}).get(field.name, field.default)
            kind = _python_type(field.type)
            kw: dict[str, Any] = {"help": opt.help, "required": opt.required}
            decls = [opt.flag or "--" + field.name.replace("_", "-")]
            if opt.short:
                decls.append(opt.short)
            if opt.multiple:
                kind = _python_type(str(field.type).removeprefix("tuple[").split(",")[0])
                kw["multiple"] = True
                default = None
            if kind == "bool" and "/" not in decls[0]:
                kw["is_flag"] = True
            elif kind == "bool":  # --x/--no-x: the field's default (None: neither given, the caller decides)
                kw["default"] = default
                kw["show_default"] = default is not None
            else:
                if opt.choices:
                    kw["type"] = click.Choice(list(opt.choices))
                elif opt.path:
                    kw["type"] = click.Path(dir_okay=False)
                elif kind == "int":
                    kw["type"] = click.IntRange(min=opt.minimum) if opt.minimum is not None else int
                elif kind == "float":
                    kw["type"] = FiniteFloat(min=opt.minimum, min_open=opt.open_minimum)
                if default is not None:
                    kw["default"] = default
                    kw["show_default"] = opt.show_default
            f = click.option(*decls, field.name, **kw)(f)
        return f
    return decorate


def from_params(cls, params: dict, **fixed):
    """`cls` built from a command's parsed values (taken out of `params`), plus `fixed` values."""
    values = {f.name: params.pop(f.name) for f, _ in described(cls) if f.name in params}
    return cls(**values, **fixed)


@dataclass(frozen=True)
class Rule:
    """A mistake made of several flags: every flag in `given` set (a `(name, value)` pair: set to that value),
    none in `absent`, and, with `any_of`, at least one of those, which `{flags}` names in the message."""

    message: str
    given: tuple = ()
    absent: tuple = ()
    any_of: tuple = ()

    def broken(self, ctx) -> str | None:
        def given(name) -> bool:
            if isinstance(name, tuple):
                return ctx.params.get(name[0]) == name[1]
            value = ctx.params.get(name)
            source = ctx.get_parameter_source(name)
            return source not in (None, click.core.ParameterSource.DEFAULT) and \
                not (value is None or value is False or value == ())

        if not all(given(n) for n in self.given) or any(given(n) for n in self.absent):
            return None
        named = [n for n in self.any_of if given(n)]
        if self.any_of and not named:
            return None
        flags = {p.name: p.opts[0] for p in ctx.command.params}
        return self.message.format(flags=", ".join(flags[n] for n in named))


class Command(click.Command):
    """A command with `rules` between its flags, checked before it runs."""

    def __init__(self, *args, rules=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.rules = rules

    def invoke(self, ctx):
        for rule in self.rules:
            message = rule.broken(ctx)
            if message:
                raise SettingsError(message)
        return super().invoke(ctx)


class Group(click.Group):
    """User mistakes, ours (BBTError) and click's (usage errors), end as one `error:` line on stderr and exit
    code 2; a refused read or write too. Any other exception is a bug and keeps its traceback."""

    command_class = Command

    def parse_args(self, ctx, args):
        with one_line_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with one_line_errors(ctx):
            return super().invoke(ctx)


@contextmanager
def one_line_errors(ctx):
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # bare `bbt-onnx`: click prints the help
    except click.ClickException as exc:
        fail(ctx, exc.format_message())
    except BBTError as exc:
        fail(ctx, exc.render(flags_of(ctx)))
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # a closed pipe downstream (`| head`): click handles it quietly
        fail(ctx, str(storage_error(exc.filename, exc, "use") if exc.filename else exc))


def flags_of(ctx) -> dict[str, str]:
    """The running command's options by their parameter names: what an error's arguments are called here."""
    command = ctx.command
    if isinstance(command, click.Group) and ctx.invoked_subcommand:
        command = command.get_command(ctx, ctx.invoked_subcommand) or command
    return {p.name: p.opts[0] for p in command.params if isinstance(p, click.Option) and p.opts}


def fail(ctx, message: str) -> None:
    click.echo("error: " + " ".join(message.split()), err=True)
    ctx.exit(2)
