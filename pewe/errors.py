"""The one base class of errors caused by the user's input (files, options); entry scripts turn them
into a single ``error: ...`` line and a nonzero exit instead of a traceback."""


class UserError(ValueError):
    """Bad input: the message names the file (and line) or the option at fault."""
