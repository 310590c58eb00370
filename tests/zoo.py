"""Test zoo: small CNNs exported to ONNX, each exercising the graph patterns a filter pruner meets.

Every entry of :data:`ZOO` is a builder ``f(directory) -> ZooModel`` that writes ``directory/NAME.onnx``
and returns where it is, the concrete input shape to run it with, and (for the torch models) the MACs
counted in torch with forward hooks on Conv/ConvTranspose/Linear modules. Builds are deterministic
(fixed seeds) and fast (tiny widths and inputs).

Torch models are exported with the TorchScript exporter (``dynamo=False``), a dynamic batch axis
named ``batch`` on the input and outputs, and input name ``input``. Each architecture comes twice:

- ``NAME``: ``do_constant_folding=True``; the exporter folds every Conv→BatchNorm into the Conv.
  BatchNorms that do not follow a Conv (DenseNet's pre-activation BN) stay.
- ``NAME_bn``: ``do_constant_folding=False``; BatchNormalization nodes stay, and parameters whose
  values are identical are deduplicated by the exporter into ``Identity(initializer)`` nodes.

BatchNorm statistics and affine parameters are randomized so BN is never the identity:
running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 2), bias ~ U(-0.5, 0.5).

The ``paddle_*`` models are written with ``onnx.helper`` in the style of Paddle2ONNX output: every
weight is a ``Constant`` node (no initializers), conv biases sometimes missing and added by a separate
``Add``, hard-swish decomposed into Add/Clip/Mul/Div with scalar Constants, etc. Their ``torch_macs``
is None; ``formula_macs`` holds the MACs from the layer list written in the builder.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"

# onnx 1.23 writes IR version 14 by default, newer than onnxruntime 1.31 reads (13): pin it.
_HELPER_IR_VERSION = 8


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    path: pathlib.Path
    input_shapes: dict[str, tuple[int, ...]]
    torch_macs: int | None
    formula_macs: int | None = None
    opset: int | None = None
    description: str = ""

    def feeds(self, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Random float32 inputs in [-1, 1) of ``input_shapes`` (batch dim replaced when given)."""
        rng = np.random.default_rng(seed)
        out = {}
        for name, shape in self.input_shapes.items():
            if batch is not None:
                shape = (batch, *shape[1:])
            out[name] = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        return out


# --------------------------------------------------------------------------------------------------
# torch helpers


def torch_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Per-sample MACs of Conv*/ConvTranspose*/Linear modules, counted with forward hooks."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        n = inp[0].shape[0]
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            total += inp[0].numel() // n * (mod.out_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.modules.conv._ConvNd):
            total += out.numel() // n * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.Linear):
            total += out.numel() // n * mod.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (uses the torch RNG)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 2.0)
                    m.bias.uniform_(-0.5, 0.5)


def export_torch(
    name: str,
    factory: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    directory: pathlib.Path,
    *,
    opset: int,
    fold_bn: bool,
    output_names: Sequence[str] = ("output",),
    seed: int = 0,
    description: str = "",
    postprocess: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
) -> ZooModel:
    torch.manual_seed(seed)
    model = factory().eval()
    randomize_bn(model)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed + 1))
    macs = torch_macs(model, x)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.onnx"
    dyn = {INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in output_names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            x,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=dyn,
            do_constant_folding=fold_bn,
        )
    if postprocess is not None:
        proto = postprocess(onnx.load(str(path)))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(path))
    return ZooModel(name, path, {INPUT_NAME: tuple(input_shape)}, macs, None, opset, description)


def cbr(cin, cout, k=3, s=1, act: type[nn.Module] | None = nn.ReLU, groups=1, bias=False) -> nn.Sequential:
    """Conv → BN → activation (activation omitted when ``act`` is None)."""
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# architectures


class VGG(nn.Module):
    """Plain conv stack, MaxPool, Flatten over a 4x4 map → Linear(512→64) → ReLU → Linear(64→10)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(3, 16), cbr(16, 16), nn.MaxPool2d(2),
            cbr(16, 32), cbr(32, 32), nn.MaxPool2d(2),
            cbr(32, 32), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = cbr(cin, cout, 3, stride)
        self.conv2 = cbr(cout, cout, 3, 1, act=None)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = cbr(cin, cout, 1, stride, act=None)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = cbr(cin, planes, 1)
        self.conv2 = cbr(planes, planes, 3, stride)
        self.conv3 = cbr(planes, cout, 1, act=None)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = cbr(cin, cout, 1, stride, act=None)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + idt)


class ResNetBasic(nn.Module):
    """Stem, BasicBlock(16), stride-2 BasicBlock(16→32) with 1x1 shortcut, BasicBlock(32), GAP, FC."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class ResNetBottleneck(nn.Module):
    """Stem, Bottleneck(16→32, 1x1 shortcut), stride-2 Bottleneck(32→64), Bottleneck(64), GAP, FC."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layers = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 16, 2), Bottleneck(64, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [cbr(cin, hidden, 1, act=nn.ReLU6)]
        layers += [cbr(hidden, hidden, 3, stride, act=nn.ReLU6, groups=hidden), cbr(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """ReLU6 (→ Clip), depthwise 3x3, expansion 4, residual inverted blocks, GAP, dropout, Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 32, 1, 4),
            cbr(32, 64, 1, act=nn.ReLU6),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SqueezeExcite(nn.Module):
    """torchvision's SE: AdaptiveAvgPool → Conv1x1 → ReLU → Conv1x1 → Hardsigmoid → x * scale."""

    def __init__(self, c, squeeze):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class V3Block(nn.Module):
    def __init__(self, cin, exp, cout, k, stride, se, act):
        super().__init__()
        layers = [] if exp == cin else [cbr(cin, exp, 1, act=act)]
        layers.append(cbr(exp, exp, k, stride, act=act, groups=exp))
        if se:
            layers.append(SqueezeExcite(exp, max(8, exp // 4)))
        layers.append(cbr(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    """Hardswish stem, depthwise blocks with/without SE (Hardsigmoid), residual, Hardswish head MLP."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(3, 16, 3, 2, act=nn.Hardswish),
            V3Block(16, 16, 16, 3, 2, True, nn.ReLU),
            V3Block(16, 48, 24, 3, 2, False, nn.ReLU),
            V3Block(24, 64, 24, 5, 1, True, nn.Hardswish),
            cbr(24, 64, 1, act=nn.Hardswish),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(64, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class YConv(nn.Module):
    """Ultralytics Conv: Conv2d(bias=False) → BN → SiLU."""

    def __init__(self, cin, cout, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YBottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1 = YConv(c, c, 3)
        self.cv2 = YConv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 → split in two halves → n bottlenecks on the last part → Concat(all parts) → cv2.

    ``use_chunk=True`` is ultralytics' ``C2f.forward`` (``chunk(2, 1)``); the TorchScript exporter
    writes it as Shape→Gather→arith→Slice pairs. ``use_chunk=False`` is ``forward_split``
    (``split((c, c), 1)``), exported as one ``Split`` with a constant ``split`` input.
    """

    def __init__(self, cin, cout, n=1, shortcut=False, use_chunk=True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = YConv(cin, 2 * self.c, 1)
        self.cv2 = YConv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YBottleneck(self.c, shortcut) for _ in range(n))
        self.use_chunk = use_chunk

    def forward(self, x):
        y = self.cv1(x)
        y = list(y.chunk(2, 1) if self.use_chunk else y.split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout, k=5):
        super().__init__()
        c_ = cin // 2
        self.cv1 = YConv(cin, c_, 1)
        self.cv2 = YConv(c_ * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloV8Neck(nn.Module):
    """Tiny YOLOv8: backbone with C2f + SPPF, PAN neck (Upsample→Concat skip, stride-2 conv→Concat), 2 heads."""

    def __init__(self):
        super().__init__()
        self.b0 = YConv(3, 16, 3, 2)  # 32x32
        self.b1 = YConv(16, 32, 3, 2)  # 16x16
        self.b2 = C2f(32, 32, 1, shortcut=True, use_chunk=True)  # P3
        self.b3 = YConv(32, 64, 3, 2)  # 8x8
        self.b4 = C2f(64, 64, 1, shortcut=True, use_chunk=False)
        self.sppf = SPPF(64, 64)  # P4
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(64 + 32, 32, 1, shortcut=False, use_chunk=False)  # 16x16
        self.n2 = YConv(32, 32, 3, 2)  # 8x8
        self.n3 = C2f(32 + 64, 64, 1, shortcut=False, use_chunk=True)
        self.head3 = nn.Conv2d(32, 8, 1)
        self.head4 = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        p3 = self.b2(self.b1(self.b0(x)))
        p4 = self.sppf(self.b4(self.b3(p3)))
        n3 = self.n1(torch.cat([self.up(p4), p3], 1))
        n4 = self.n3(torch.cat([self.n2(n3), p4], 1))
        return self.head3(n3), self.head4(n4)


class UNet(nn.Module):
    """Two-level UNet: encoder convs + MaxPool, ConvTranspose2d(k2, s2) up, skip Concat, convs, 1x1 out."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(cbr(3, 16), cbr(16, 16))
        self.enc2 = nn.Sequential(cbr(16, 32), cbr(32, 32))
        self.mid = nn.Sequential(cbr(32, 64), cbr(64, 64))
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, 2)
        self.dec2 = nn.Sequential(cbr(64, 32), cbr(32, 32))
        self.up1 = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec1 = nn.Sequential(cbr(32, 16), cbr(16, 16))
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


class DenseLayer(nn.Module):
    """Pre-activation BN → ReLU → Conv1x1 (bottleneck) → BN → ReLU → Conv3x3(growth); output concatenated."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """Stem, dense block (3 layers, growth 8), transition BN-ReLU-Conv1x1 + AvgPool, dense block (2), head."""

    def __init__(self):
        super().__init__()
        g = 8
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(16, g), DenseLayer(24, g), DenseLayer(32, g))
        self.trans = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 20, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(20, g), DenseLayer(28, g))
        self.norm = nn.BatchNorm2d(36)
        self.fc = nn.Linear(36, 10)

    def forward(self, x):
        y = self.block2(self.trans(self.block1(self.stem(x))))
        y = F.adaptive_avg_pool2d(F.relu(self.norm(y)), 1)
        return self.fc(torch.flatten(y, 1))


class SharedBias(nn.Module):
    """Convs whose biases are all zeros: the exporter deduplicates equal-valued initializers.

    a: 3→16 (+BN), b: 16→16 groups=4, c: 16→16 depthwise, d: 16→8, e: 8→8, plus residual-free chain.
    Biases of b, c (16 zeros) and d, e (8 zeros) are zero-initialized (``nn.init.zeros_``) and end up
    as one initializer referenced through ``Identity`` nodes (``b.bias = Identity(<a or b>.bias)``).
    In the ``_bn`` export a's bias is zero too (BN not folded), so a, b and c share.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, 1, 1)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, 1, 1, groups=4)
        self.c = nn.Conv2d(16, 16, 3, 2, 1, groups=16)
        self.d = nn.Conv2d(16, 8, 1)
        self.e = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 10)
        for m in (self.a, self.b, self.c, self.d, self.e):
            nn.init.zeros_(m.bias)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        y = F.relu(self.b(y))
        y = F.relu(self.c(y))
        y = F.relu(self.d(y))
        y = F.relu(self.e(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Conv1dNet(nn.Module):
    """1-D: Conv1d+BN+ReLU, stride-2 Conv1d, depthwise Conv1d k5, residual, GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv1d(4, 16, 3, 1, 1, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv1d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm1d(32), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv1d(32, 32, 5, 1, 2, groups=32, bias=False), nn.BatchNorm1d(32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        y = self.c2(self.c1(x))
        y = F.relu(y + self.dw(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(y, 1), 1))


def inline_identity_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Post-processing for ``shared_bias_direct``: drop every ``Y = Identity(initializer)`` node and
    make its consumers read the initializer itself, so several Conv nodes name one bias initializer
    directly (the form other exporters and ONNX simplifiers produce)."""
    inits = {i.name for i in model.graph.initializer}
    alias = {}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


# --------------------------------------------------------------------------------------------------
# onnx.helper (Paddle2ONNX-style) graphs


class _Builder:
    """Tiny graph writer: weights as Constant nodes, MACs tallied per layer from the layer list."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.macs = 0
        self._n = 0

    def _uid(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, value, prefix="p2o.helper.constant", dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        out = self._uid(prefix)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, out)))
        return out

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self._uid(f"{op_type.lower()}.tmp") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._uid(f"p2o.{op_type}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, shape, fan_in) -> str:
        return self.const(self.rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape), "conv2d.w")

    def conv(self, x, cin, cout, k, hw_out, stride=1, group=1, bias=True) -> str:
        w = self.weight((cout, cin // group, k, k), cin // group * k * k)
        ins = [x, w] + ([self.const(self.rng.uniform(-0.1, 0.1, cout), "conv2d.b")] if bias else [])
        self.macs += hw_out[0] * hw_out[1] * cout * (cin // group) * k * k
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                       group=group, dilations=[1, 1])

    def conv_transpose(self, x, cin, cout, k, hw_in, stride, bias):
        w = self.weight((cin, cout, k, k), cin)
        ins = [x, w] + ([self.const(self.rng.uniform(-0.1, 0.1, cout), "conv2d_transpose.b")] if bias else [])
        self.macs += hw_in[0] * hw_in[1] * cin * cout * k * k
        return self.op("ConvTranspose", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[0, 0, 0, 0])

    def bn(self, x, c) -> str:
        r = self.rng
        scale = self.const(r.uniform(0.5, 2.0, c), "batch_norm.w_0")
        bias = self.const(r.uniform(-0.5, 0.5, c), "batch_norm.b_0")
        mean = self.const(r.uniform(-0.5, 0.5, c), "batch_norm.w_1")
        var = self.const(r.uniform(0.5, 2.0, c), "batch_norm.w_2")
        return self.op("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5, momentum=0.9)

    def hardswish_decomposed(self, x) -> str:
        """x * clip(x + 3, 0, 6) / 6 with scalar (0-d) Constant nodes, as Paddle2ONNX writes it."""
        a = self.op("Add", [x, self.const(3.0)])
        c = self.op("Clip", [a, self.const(0.0), self.const(6.0)])
        return self.op("Div", [self.op("Mul", [x, c]), self.const(6.0)])

    def se(self, x, c, squeeze, alpha) -> str:
        s = self.op("GlobalAveragePool", [x])
        s = self.op("Relu", [self.conv(s, c, squeeze, 1, (1, 1))])
        s = self.op("HardSigmoid", [self.conv(s, squeeze, c, 1, (1, 1))], alpha=alpha, beta=0.5)
        return self.op("Mul", [x, s])

    def affine(self, x, c, shape) -> str:
        """Per-channel y = x * scale + bias with constants of ``shape`` (e.g. [C,1,1] or [1,C,1,1])."""
        y = self.op("Mul", [x, self.const(self.rng.uniform(0.5, 1.5, c).reshape(shape), "affine.scale")])
        return self.op("Add", [y, self.const(self.rng.uniform(-0.2, 0.2, c).reshape(shape), "affine.bias")])

    def prelu(self, x, c) -> str:
        return self.op("PRelu", [x, self.const(self.rng.uniform(0.05, 0.3, (c, 1, 1)), "prelu.alpha")])

    def save(self, directory, x_shape, output, out_shape, opset) -> pathlib.Path:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *x_shape[1:]])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", *out_shape[1:]])],
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=_HELPER_IR_VERSION,
            producer_name="aofp-onnx-tests (paddle2onnx-style)",
        )
        onnx.checker.check_model(model, full_check=True)
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.onnx"
        onnx.save(model, str(path))
        return path


def _rename_output(b: _Builder, tensor: str, new: str) -> str:
    for node in b.nodes:
        node.output[:] = [new if o == tensor else o for o in node.output]
    return new


def build_paddle_det(directory: pathlib.Path) -> ZooModel:
    """Opset 11, Paddle-style segmentation/detection-like graph on 1x3x32x32 (all weights Constant nodes).

    stem Conv3x3 s2 (no bias) → BN → hard-swish decomposed (Add/Clip/Mul/Div, scalar Constants, Clip
    min/max as inputs) → depthwise 3x3 (bias) → PRelu [C,1,1] → SE (GAP → Conv → Relu → Conv →
    HardSigmoid(0.2) → Mul) → Conv1x1 16→24 (no bias) → BN → affine Mul/Add [C,1,1] → Relu (skip) →
    Conv3x3 s2 24→32 → hard-swish decomposed → ConvTranspose k2 s2 32→16 (no bias) + Add bias
    [1,C,1,1] → Relu → Concat(up, skip) → Conv3x3 40→16 → Relu → ConvTranspose k2 s2 16→1 (bias) →
    Sigmoid.
    """
    name = "paddle_det_op11"
    b = _Builder(name, seed=11)
    y = b.hardswish_decomposed(b.bn(b.conv("x", 3, 16, 3, (16, 16), stride=2, bias=False), 16))
    y = b.prelu(b.conv(y, 16, 16, 3, (16, 16), group=16), 16)
    y = b.se(y, 16, 4, alpha=0.2)
    skip = b.op("Relu", [b.affine(b.bn(b.conv(y, 16, 24, 1, (16, 16), bias=False), 24), 24, (24, 1, 1))])
    y = b.hardswish_decomposed(b.conv(skip, 24, 32, 3, (8, 8), stride=2))
    y = b.conv_transpose(y, 32, 16, 2, (8, 8), 2, bias=False)
    y = b.op("Relu", [b.op("Add", [y, b.const(b.rng.uniform(-0.1, 0.1, (1, 16, 1, 1)), "conv2d_transpose.b")])])
    y = b.op("Concat", [y, skip], axis=1)
    y = b.op("Relu", [b.conv(y, 40, 16, 3, (16, 16))])
    y = b.op("Sigmoid", [b.conv_transpose(y, 16, 1, 2, (16, 16), 2, bias=True)])
    out = _rename_output(b, y, "sigmoid_0.tmp_0")
    path = b.save(directory, (1, 3, 32, 32), out, (1, 1, 32, 32), opset=11)
    return ZooModel(name, path, {"x": (1, 3, 32, 32)}, None, b.macs, 11, build_paddle_det.__doc__ or "")


def build_paddle_cls(directory: pathlib.Path) -> ZooModel:
    """Opset 17, Paddle-style classifier on 1x3x32x32 (all weights Constant nodes).

    stem Conv3x3 s2 (no bias) → BN → HardSwish op → depthwise 3x3 (no bias) → BN → hard-swish
    decomposed → SE (HardSigmoid(1/6)) → Conv1x1 16→32 (bias) → affine Mul/Add [1,C,1,1] → PRelu
    [C,1,1] → Conv3x3 s2 32→32 → BN → HardSwish → depthwise 5x5 s2 → Relu (4x4) → Reshape to
    [-1, 32*4*4] (shape Constant) → MatMul 512x64 → Add → HardSwish → MatMul 64x10 → Add.
    """
    name = "paddle_cls_op17"
    b = _Builder(name, seed=17)
    y = b.op("HardSwish", [b.bn(b.conv("x", 3, 16, 3, (16, 16), stride=2, bias=False), 16)])
    y = b.hardswish_decomposed(b.bn(b.conv(y, 16, 16, 3, (16, 16), group=16, bias=False), 16))
    y = b.se(y, 16, 8, alpha=1.0 / 6.0)
    y = b.prelu(b.affine(b.conv(y, 16, 32, 1, (16, 16)), 32, (1, 32, 1, 1)), 32)
    y = b.op("HardSwish", [b.bn(b.conv(y, 32, 32, 3, (8, 8), stride=2, bias=False), 32)])
    y = b.op("Relu", [b.conv(y, 32, 32, 5, (4, 4), stride=2, group=32)])
    y = b.op("Reshape", [y, b.const([-1, 32 * 4 * 4], "reshape.shape", dtype=np.int64)])
    y = b.op("MatMul", [y, b.const(b.rng.normal(0, math.sqrt(2 / 512), (512, 64)), "linear.w")])
    b.macs += 512 * 64
    y = b.op("HardSwish", [b.op("Add", [y, b.const(b.rng.uniform(-0.1, 0.1, 64), "linear.b")])])
    y = b.op("MatMul", [y, b.const(b.rng.normal(0, math.sqrt(2 / 64), (64, 10)), "linear.w")])
    b.macs += 64 * 10
    y = b.op("Add", [y, b.const(b.rng.uniform(-0.1, 0.1, 10), "linear.b")])
    out = _rename_output(b, y, "linear_1.tmp_1")
    path = b.save(directory, (1, 3, 32, 32), out, (1, 10), opset=17)
    return ZooModel(name, path, {"x": (1, 3, 32, 32)}, None, b.macs, 17, build_paddle_cls.__doc__ or "")


# --------------------------------------------------------------------------------------------------
# registry

ZOO: dict[str, Callable[[pathlib.Path], ZooModel]] = {}


def _register_torch(base, factory, input_shape, opset, output_names=("output",), postprocess=None, variants=None):
    description = (factory.__doc__ or "").strip()
    variants = variants or {base: True, f"{base}_bn": False}
    for name, fold in variants.items():
        def builder(directory, _name=name, _fold=fold):
            return export_torch(_name, factory, input_shape, directory, opset=opset, fold_bn=_fold,
                                output_names=output_names, description=description,
                                postprocess=postprocess if _name.endswith("_direct") else None)
        builder.__doc__ = f"{name}: {description} (opset {opset}, BN {'folded' if fold else 'kept'})"
        ZOO[name] = builder


_register_torch("vgg", VGG, (1, 3, 32, 32), 13, ("logits",))
_register_torch("resnet_basic", ResNetBasic, (1, 3, 32, 32), 13, ("logits",))
_register_torch("resnet_bottleneck", ResNetBottleneck, (1, 3, 32, 32), 17, ("logits",))
_register_torch("mobilenet_v2", MobileNetV2, (1, 3, 32, 32), 11, ("logits",))
_register_torch("mobilenet_v3", MobileNetV3, (1, 3, 32, 32), 17, ("logits",))
_register_torch("yolov8_neck", YoloV8Neck, (1, 3, 64, 64), 17, ("p3", "p4"))
_register_torch("unet", UNet, (1, 3, 32, 32), 13, ("mask",))
_register_torch("densenet", DenseNet, (1, 3, 16, 16), 13, ("logits",))
_register_torch("shared_bias", SharedBias, (1, 3, 16, 16), 13, ("logits",),
                postprocess=inline_identity_initializers,
                variants={"shared_bias": True, "shared_bias_bn": False, "shared_bias_direct": True})
_register_torch("conv1d", Conv1dNet, (1, 4, 64), 13, ("logits",))
ZOO["paddle_det_op11"] = build_paddle_det
ZOO["paddle_cls_op17"] = build_paddle_cls


def names() -> list[str]:
    return list(ZOO)


def build(name: str, directory: pathlib.Path | str) -> ZooModel:
    try:
        builder = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None
    return builder(pathlib.Path(directory))


__all__ = ["ZOO", "ZooModel", "build", "export_torch", "names", "randomize_bn", "torch_macs"]
