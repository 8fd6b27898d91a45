"""The errors caused by the user's input (files, options): entry scripts turn them into a single
``error: ...`` line and a nonzero exit instead of a traceback."""
from delta_modules import DeltaError


class UserError(ValueError):
    """Bad input: the message names the file (and line) or the option at fault."""


# What an entry point reports as one line: our own errors, a delta that does not fit, and files
# that are missing or may not be read or written.
USER_ERRORS = (UserError, DeltaError, FileNotFoundError, NotADirectoryError, PermissionError)
