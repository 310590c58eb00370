"""Atomic writes (a temp file in the destination folder, then rename) and returning freed memory.

`write_atomic` gives the file the mode a plain `open` would (0666 less the umask): `mkstemp` creates
its temp file 0600.

`release_memory`: after a large protobuf message dies, glibc keeps its pages for reuse; on big models
that is a whole model's size of resident memory. `malloc_trim(0)` hands them back (glibc only).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import tempfile

_libc_name = ctypes.util.find_library("c")
try:
    _malloc_trim = ctypes.CDLL(_libc_name).malloc_trim if _libc_name else None
except (OSError, AttributeError):
    _malloc_trim = None


def release_memory() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".aofp-", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
