"""Save: outputs written atomically (a temp file in the destination folder, then a rename), with the
umask's permissions, after the output paths were checked before any work began.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import onnx

from .errors import InputError, VerificationError
from .modeldata import ModelData, as_model_data


def check_output_path(src, out) -> None:
    """Refuse writing over the input, into a missing or read-only folder, or onto a folder."""
    out = os.fspath(out)
    if os.path.isdir(out):
        raise InputError(f"{out}: is a directory; give an output file name")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InputError(f"{out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{out}: folder {folder} is not writable")
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise InputError(f"{out}: the output path is the input model; choose another name")


def check_outputs(src, outputs: dict[str, str | None]) -> None:
    """Every given output path (option name -> path) checked, and no two the same file."""
    seen = {}
    for option, path in outputs.items():
        if not path:
            continue
        check_output_path(src, path)
        key = os.path.abspath(os.fspath(path))
        if key in seen:
            raise InputError(f"{option} and {seen[key]} name the same file {path}")
        seen[key] = option


def save_model(model: onnx.ModelProto | ModelData, path, external_data: bool = False, check: bool = True) -> None:
    """Write `model` atomically (a temp file in the destination folder, then rename), after
    onnx.checker (full check) when `check`. With `external_data` (or past 1.8 GB of weights) the weights
    go to `<name>.data` beside it; otherwise one file, streamed an initializer at a time."""
    data = as_model_data(model)
    if check:
        try:
            data.check()
        except Exception as exc:
            raise VerificationError(f"the pruned model fails onnx.checker: {_first_line(exc)}; nothing written") \
                from None
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    external_data = external_data or sum(a.nbytes for a in data.weights.values()) >= int(1.8e9)
    tmpdir = tempfile.mkdtemp(prefix=".aofp-", dir=folder)
    try:
        tmp = os.path.join(tmpdir, base)
        if external_data:
            onnx.save_model(data.materialize(), tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=base + ".data", size_threshold=1024)
            os.replace(os.path.join(tmpdir, base + ".data"), os.path.join(folder, base + ".data"))
        else:
            with open(tmp, "wb") as f:
                data.write(f)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
