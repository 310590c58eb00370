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


def l1_cut(model, calib, out, target: float):
    """`out`: `model` cut by L1 to `target` of its MACs through the CLI, at --round-to 1 (widths not left to
    the machine's measured --round-to auto)."""
    ok(run_cli("prune", model, "-o", out, "--calib", calib, "--criterion", "l1", "--flops-target", target,
               "--round-to", "1", "--no-progress"))
    return out


def initializers(path) -> dict[str, np.ndarray]:
    """The initializer values of the model the CLI wrote at `path`, by name."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
