"""Running the real `aofp-onnx` process from tests: exit codes and stderr as a user sees them."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def run_cli(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m aofp_onnx ARGS...` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "aofp_onnx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc`, after asserting it exited 0 (showing its output when it did not)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def initializers(path) -> dict[str, np.ndarray]:
    """The initializer values of the model the CLI wrote at `path`, by name."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
