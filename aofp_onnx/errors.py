"""Errors that cross the CLI boundary.

`InputError` is the user's input being refused (exit code 2, one line on stderr, nothing written).
Anything else escaping the CLI is an internal error (exit code 1).
"""


class InputError(Exception):
    """The input (model, data, plan, path, option) was refused; the message is one readable line."""
