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


EXAMPLE_DIM = 224  # what a hint puts for a dynamic non-batch dim: any size the model accepts will do


def shape_hint(name: str, dims) -> str:
    """A runnable `--input-shape` for an input with `dims` (ints fixed; str/None/≤0 dynamic): batch 1, the
    fixed dims as they are, an example size for the other dynamic ones, which the hint names."""
    dynamic = [i for i, d in enumerate(dims) if i > 0 and not (isinstance(d, int) and d > 0)]
    example = [d if isinstance(d, int) and d > 0 else 1 if i == 0 else EXAMPLE_DIM for i, d in enumerate(dims)]
    text = f"--input-shape {name}:{','.join(map(str, example))}"
    return text + (f" (dims {', '.join(map(str, dynamic))} are free: use the size your data has)" if dynamic else "")
