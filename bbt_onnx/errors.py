"""The one exception type for mistakes a user can make.

The CLI prints its message as one line on stderr and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class BBTError(Exception):
    """A user-caused problem, with a message that says what to do about it."""
