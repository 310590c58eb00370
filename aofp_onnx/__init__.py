"""aofp-onnx: Approximated Oracle Filter Pruning (Ding et al., ICML 2019) for exported ONNX CNNs.

The Python API mirrors the CLI: `inspect`, `prune`, `apply_plan`, `verify_plan`; `Pruner` keeps one
loaded model and its channel groups for repeated use.
"""
from .api import Pruner, apply_plan, inspect, prune, verify_plan
from .errors import InputError

__all__ = ["InputError", "Pruner", "apply_plan", "inspect", "prune", "verify_plan"]
__version__ = "0.1.0"
