"""Exceptions for mistakes a user can make, one subclass per kind so Python callers can catch by kind.

The CLI prints any of them as one line on stderr and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class BBTError(Exception):
    """A user-caused problem, with a message that says what to do about it."""


class SettingsError(BBTError):
    """A flag, config value or task definition is out of range or contradicts another."""


class DataError(BBTError):
    """A data file or row cannot be read or does not fit the task."""


class ModelError(BBTError):
    """The model directory, its manifest, tokenizer or graphs are missing, damaged or unusable."""


class PromptError(BBTError):
    """A prompt file is damaged, or was tuned for another model."""


class RunError(BBTError):
    """A run directory is busy, already holds a run, or cannot be resumed."""


class StorageError(BBTError):
    """The filesystem refused a read or write: no permission, read-only, full disk, a missing folder."""


class ServerError(BBTError):
    """A remote engine refused or failed: server down, token refused, unknown model, another model, a request
    over its limit."""
