"""Exceptions for mistakes a user can make, one subclass per kind so Python callers can catch by kind.

The CLI prints any of them as one line on stderr and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class BBTError(Exception):
    """A user-caused problem, with a message that says what to do about it.

    `argument` names the arguments (config fields, e.g. "budget") the message speaks of, by the names they have in
    Python: "budget must be at least 1". The CLI writes the first mention of each as its flag ("--budget must be
    at least 1"), so the library never speaks of flags and the CLI restates nothing.
    """

    def __init__(self, message: str = "", argument: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.arguments: tuple[str, ...] = (argument,) if isinstance(argument, str) else tuple(argument or ())

    def render(self, names: dict[str, str]) -> str:
        """The message with the first mention of each of its arguments written as `names` gives it (a flag): a
        word of its own, not part of a path the message quotes (`out /runs/force/a` names out, not force)."""
        import re

        message = str(self)
        for argument in self.arguments:
            if argument in names:
                message = re.sub(rf"(?<![\w/\\.-]){re.escape(argument)}(?![\w-]|[/\\.]\w)", names[argument],
                                 message, count=1)
        return message


class SettingsError(BBTError):
    """A flag, config value or task definition is out of range or contradicts another."""


class DataError(BBTError):
    """A data file or row cannot be read or does not fit the task."""


class ModelError(BBTError):
    """The model directory, its manifest, tokenizer or graphs are missing, damaged or unusable."""


class PromptError(BBTError):
    """A prompt file is damaged, or was tuned for another model."""


class RunError(BBTError):
    """A run directory is busy, already holds a run, or cannot be resumed; or a tuner's steps are called out of
    order."""


class StorageError(BBTError):
    """The filesystem refused a read or write: no permission, read-only, full disk, a missing folder."""


class ServerError(BBTError):
    """A remote engine refused or failed: server down, token refused, unknown model, another model, a request
    over its limit."""
