"""Errors that cross the CLI boundary.

`InputError` is the user's input being refused (exit code 2, one line on stderr, nothing written).
`VerificationError` is a cut that failed its check (exit code 3, nothing written).
Anything else escaping the CLI is an internal error (exit code 1).
"""


class InputError(Exception):
    """The input (model, data, plan, path, option) was refused; the message is one readable line."""


class VerificationError(Exception):
    """The pruned model failed verification (it is not the masked original, or fails onnx.checker): exit code 3,
    nothing written."""
