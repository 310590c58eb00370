"""PyTorch bridge: run an ONNX graph in torch to fine-tune its weights, then write them back.

`OnnxModule` is an executor in the manner of torch.fx's Interpreter: it walks the ONNX nodes in graph
order with one small handler per op type (`aofp_onnx.bridge.registry`), keeping a name → tensor
environment. Every float initializer is an `nn.Parameter` (BatchNormalization running mean/var are
buffers), so a torch optimizer trains exactly the ONNX weights. `write_back` puts the trained values
into the same graph: the result is byte-identical to the input except for initializer values.

We chose our own executor over onnx2torch because onnx2torch needs torchvision (which does not work
with our torch build) and does not keep initializer identity for write-back: it rebuilds the model
as torch modules, so a trained value cannot be traced back to the initializer it came from.

This subpackage is the only part of aofp_onnx that imports torch.
"""
try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where torch is absent
    raise ImportError("the PyTorch bridge needs torch: pip install 'aofp-onnx[torch]'") from exc

from .executor import NodeError, OnnxModule, UnsupportedOpError, to_torch_inputs
from .registry import supported_ops
from .writeback import write_back

__all__ = ["NodeError", "OnnxModule", "UnsupportedOpError", "supported_ops", "to_torch_inputs", "write_back"]
