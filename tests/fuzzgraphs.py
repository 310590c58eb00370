"""Random small CNN graphs (onnx.helper, IR 8) and the check every fuzz case must pass.

One builder makes every graph; *what* it builds is decided by a `Draws` object, so the same blocks
serve hypothesis (`graphs()`: every decision is a hypothesis draw, so failures shrink) and a seeded
numpy generator (`random_case(seed)`: the benchmark's thousand graphs). Weight values come from a
numpy generator seeded by one drawn integer (values do not need shrinking, structures do).

A graph is x[1 or N, 3, H, W] (H, W in 8..16) → a conv → at most `MAX_BLOCKS` - 1 more blocks → an
optional dense head, at most `MAX_LAYERS` weighted layers in all. Blocks: Conv k×k with pads (also
asymmetric), strides and dilations (+ BatchNormalization / InstanceNormalization node or a folded-BN
bias, + activation), depthwise (multiplier 1 or 2) and grouped Conv, activations (Relu, Clip,
HardSwish, Sigmoid, x·sigmoid(x), LeakyRelu, PRelu with per-channel slopes, HardSigmoid, Tanh),
residual Add/Sum/Max/Mul/Sub/Mean of equal-shape tensors, Concat on channels (the same tensor twice
too) or on H, Split on channels (sizes, or equal parts without sizes; parts concatenated back,
added, or left dangling), Slice on channels (negative / out-of-range / INT64_MAX bounds, no axes
input, with a spatial crop, stride or flip beside), SE blocks (GlobalAveragePool / ReduceMean /
GlobalMaxPool → Conv → Relu → Conv → HardSigmoid|Sigmoid → Mul, sometimes Add), Max/AveragePool,
Resize (nearest, scales or sizes), ConvTranspose (plain, grouped, depthwise), per-channel and scalar
Mul/Add/Sub/Div constants ([C,1,1], [1,C,1,1], [], [1]), one conv weight used twice, spatial Pad,
a channels-last dense layer (Transpose → MatMul → Transpose), Reshape [1, C, H·W] → Softmax →
Reshape back, and ops that mix channels (LRN, Softmax over C, channel shuffle, DepthToSpace,
spatial attention) before a conv. Heads: GlobalAveragePool → Flatten | Squeeze → Gemm, ReduceMean
→ Gemm, Flatten of the map → Gemm, Reshape(constant shape) → MatMul (+ Add); one or two dense
layers. Weights are initializers (torch style), Constant nodes (Paddle style) or a mix; equal
constants may be deduplicated and same-shape weights shared between layers (clones at cut time);
some graphs list their initializers as inputs (old exports), some carry value_info, some a second
output. Opset ∈ {11, 13, 17}. Every graph passes onnx.checker's full check.

`check_case(model, input_shape, plan_seeds, batch)` cuts the graph with one random plan per seed
(every prunable group keeps a random non-empty subset) and classifies what went wrong, if anything:
checker / runtime (onnxruntime with its default optimizations) / nonequivalent (`verify`) / macs
(`cm.macs(keep)` against tests/reference_macs.py) / error (an exception inside aofp_onnx).
"""
from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # onnx.helper writes IR 14 by default, which this onnxruntime refuses (opsets 19-21: 9, 10)
INPUT = "input"
OPSETS = (13, 11, 17, 12, 14, 15, 16, 18, 19, 20, 21)  # first = what hypothesis shrinks towards
MAX_BLOCKS = 8
MAX_LAYERS = 12  # Conv, ConvTranspose, MatMul and Gemm nodes, the head's included
MAX_WIDTH = 24
MAX_SIDE = 32
INT64_MAX = np.iinfo(np.int64).max
TOL = 1e-4
TOL_FP16 = 1e-2  # float16 graphs: the masked original and the cut round differently
BATCHES = {"dynamic": "N", "pinned": 1, "minus1": -1}  # the batch dim as exporters declare it


@dataclass(frozen=True)
class Conventions:
    """How an exporter writes the graph; each is a switch, and a case's tags name the ones it has on (plus
    "pinned_in_reshape": a declared-dynamic batch that a Reshape / Resize constant writes as 1).

    batch: "dynamic" (dim_param), "pinned" (dim 1, and 1 in every Reshape constant: torch.onnx.export without
    dynamic_axes), "minus1" (Paddle's dim_value -1); weights: "init" | "constant" (Paddle's Constant nodes) |
    "mixed"; paddle_bias: conv biases as Add(Reshape(bias[C], [1, C, 1, 1])); nhwc: an NHWC input behind a
    Transpose, channels-last segments (Transpose, per-channel op on the last axis, Transpose back) after convs
    and NHWC map outputs (keras2onnx / tf2onnx); fp16: "fp16" (everything float16) or "fp16-io32" (float32
    inputs/outputs behind Casts), by onnxconverter-common as users convert; opset: 11..21.
    """

    batch: str = "dynamic"
    weights: str = "init"
    paddle_bias: bool = False
    nhwc: bool = False
    fp16: str = ""
    opset: int = 13

    def tags(self) -> list[str]:
        return ([f"batch={self.batch}", f"weights={self.weights}", f"opset={self.opset}"]
                + ["paddle_bias"] * self.paddle_bias + ["nhwc"] * self.nhwc + ([self.fp16] if self.fp16 else []))


# the switches `random_case(seed, force=...)` and the benchmark's --convention take
SWITCHES = {"dynamic": {"batch": "dynamic"}, "pinned": {"batch": "pinned"}, "minus1": {"batch": "minus1"},
            "constant": {"weights": "constant"}, "paddle_bias": {"paddle_bias": True}, "nhwc": {"nhwc": True},
            "fp16": {"fp16": "fp16"}, "fp16-io32": {"fp16": "fp16-io32"},
            **{f"opset{v}": {"opset": v} for v in OPSETS}}


# ---------------------------------------------------------------------------------------------------
# where decisions come from


class Draws:
    """Decisions: integers in [lo, hi], a choice among options (the first is the 'simplest'), a coin."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options):
        options = list(options)
        return options[self.int(0, len(options) - 1)]

    def coin(self) -> bool:
        return bool(self.int(0, 1))


class RngDraws(Draws):
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))


class HypothesisDraws(Draws):
    def __init__(self, draw):
        self.draw = draw

    def int(self, lo, hi):
        from hypothesis import strategies as st

        return self.draw(st.integers(lo, hi))


# ---------------------------------------------------------------------------------------------------
# the builder


@dataclass
class FM:
    """A feature map [1, c, h, w] held by tensor `name`."""

    name: str
    c: int
    h: int
    w: int


@dataclass
class Case:
    model: onnx.ModelProto
    input_shape: tuple[int, ...]
    description: list[str] = field(default_factory=list)
    batch: int = 1  # the batch the checks feed (2 for a dynamic batch dim that no constant pins to 1)
    conventions: list[str] = field(default_factory=list)  # Conventions.tags()

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        opset = self.model.opset_import[0].version
        return (f"Case(opset={opset}, conventions={self.conventions}, input={self.input_shape}, batch={self.batch}, "
                f"blocks={self.description}, "
                f"nodes={[n.op_type for n in self.model.graph.node]})")


class Builder:
    def __init__(self, d: Draws, opset: int, style: str, seed: int, sharing: str = "none",
                 conventions: Conventions = Conventions()):
        self.d = d
        self.opset = opset
        self.style = style  # "init" | "constant" | "mixed"
        self.batch_mode = conventions.batch
        self.fp16 = bool(conventions.fp16)
        self.paddle_bias = conventions.paddle_bias
        self.nhwc = conventions.nhwc
        self.sharing = sharing  # "none" | "dedupe" (equal constants are one tensor) | "share" (+ same-shape weights)
        self._made: dict[tuple, str] = {}
        self.zero_padded: set[str] = set()
        self.batch_literal = False
        self.plain = False  # biases 0, BN scale/var 1 and bias/mean 0: equal constants, deduped across layers
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.maps: list[FM] = []  # every feature map made so far (for residuals / concats with earlier ones)
        self.convs = 0
        self.log: list[str] = []
        self._n = 0

    # -- primitives ---------------------------------------------------------------------------------
    def uid(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value, prefix="w", dtype=np.float32) -> str:
        value = np.asarray(value, dtype=dtype)
        exact = ("=", value.dtype.str, value.shape, value.tobytes())
        # any reader of that shape (conv bias, BN mean, ...); positive values (BN var, divisors) stay positive
        alike = ("~", value.dtype.str, value.shape, bool(np.all(value > 0)))
        if self.sharing != "none" and exact in self._made:  # exporters dedupe equal constants
            return self._made[exact]
        weight_like = value.dtype == np.float32 and value.size > 1 and prefix != "scales"
        if self.sharing == "share" and weight_like and alike in self._made and self.rng.random() < 0.6:  # shared
            return self._made[alike]
        name = self.uid(prefix)
        self._made.setdefault(exact, name)
        self._made.setdefault(alike, name)
        tensor = numpy_helper.from_array(value, name)
        as_node = self.style == "constant" or (self.style == "mixed" and self.rng.random() < 0.5)
        if as_node:  # Paddle2ONNX style: the weight is a Constant node placed just before its reader
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=f"{name}_const"))
        else:
            self.inits.append(tensor)
        return name

    def ints(self, values, prefix="s") -> str:
        if prefix == "shape" and self.batch_mode == "pinned" and values[0] in (0, -1):
            values = [1, *values[1:]]  # torch.onnx.export without dynamic_axes: the batch is a literal 1
        elif prefix == "shape" and self.batch_mode == "minus1" and values[0] == 1:
            values = [0, *values[1:]]  # Paddle: 0 copies the (-1) batch dim
        if prefix in ("shape", "sizes") and values[0] == 1:
            self.batch_literal = True  # this graph only runs with batch 1
        return self.const(np.asarray(values, np.int64), prefix, np.int64)

    def op(self, op_type, inputs, n_out=1, **attrs):
        name = self.uid(op_type.lower())
        outs = [f"{name}_o{k}" for k in range(n_out)] if n_out > 1 else [f"{name}_o"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def reduce_mean(self, x: str, axes, keepdims: int) -> str:
        if self.opset >= 18:  # axes became an input
            return self.op("ReduceMean", [x, self.ints(axes, "axes")], keepdims=keepdims)
        return self.op("ReduceMean", [x], axes=axes, keepdims=keepdims)

    def channels_last(self, x: FM) -> FM:
        """keras2onnx / tf2onnx between convs: Transpose to NHWC, a per-channel op on the last axis, back."""
        t = self.op("Transpose", [x.name], perm=[0, 2, 3, 1])
        kind = self.d.choice(["bias", "scale", "relu", "none"])
        if kind == "bias":
            t = self.op("Add", [t, self.const(self.uniform(-0.5, 0.5, x.c, 0.0), "nhwc_b")])
        elif kind == "scale":
            t = self.op("Mul", [t, self.const(self.rng.uniform(0.5, 1.5, x.c), "nhwc_s")])
        elif kind == "relu":
            t = self.op("Relu", [t])
        self.log.append(f"nhwc_{kind}")
        return self.fm(self.op("Transpose", [t], perm=[0, 3, 1, 2]), x.c, x.h, x.w)

    def fm(self, name, c, h, w) -> FM:
        out = FM(name, int(c), int(h), int(w))
        self.maps.append(out)
        return out

    def normal(self, shape, std):
        return self.rng.normal(0.0, std, shape)

    def uniform(self, lo, hi, shape, plain: float):
        """Random per-channel values, or `plain` everywhere in a 'fresh' graph (zero biases, BN stats 0/1)."""
        return np.full(shape, plain) if self.plain else self.rng.uniform(lo, hi, shape)

    # -- convolutions -------------------------------------------------------------------------------
    def width(self, hi=MAX_WIDTH) -> int:
        return self.d.int(1, max(1, hi))

    def _pads(self, k, h, w):
        mode = self.d.choice(["same", "valid", "asym", "auto"])
        if mode == "valid" and min(h, w) >= k:
            return [0, 0, 0, 0]
        if mode == "auto":  # TF-converted models: auto_pad instead of pads
            auto = self.d.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])
            return auto if auto != "VALID" or min(h, w) >= k else "SAME_UPPER"
        if mode == "asym" and k > 1:
            pads = [self.d.int(0, k - 1) for _ in range(4)]
            if h + pads[0] + pads[2] >= k and w + pads[1] + pads[3] >= k:
                return pads
        return [k // 2] * 4

    def conv(self, x: FM, cout: int, k: int = 3, stride: int = 1, group: int = 1, pads=None, bias=True,
             dilation: int = 1, weights: tuple[str, str | None] | None = None) -> FM:
        self.convs += 1
        span = dilation * (k - 1) + 1
        pads = [span // 2] * 4 if pads is None else pads
        if weights is None:
            wname = self.const(self.normal((cout, x.c // group, k, k), 1 / np.sqrt(x.c // group * k * k)))
            bname = self.const(self.uniform(-0.5, 0.5, cout, 0.0), "b") if bias else None
        else:
            wname, bname = weights
        self.last_weights = (wname, bname)
        paddle = weights is None and bname is not None and self.paddle_bias and self.d.coin()
        ins = [x.name, wname] + ([bname] if bname and not paddle else [])
        extra = {"dilations": [dilation, dilation]} if dilation > 1 else {}
        if isinstance(pads, str):  # auto_pad
            out = self.op("Conv", ins, kernel_shape=[k, k], auto_pad=pads, strides=[stride, stride], group=group,
                          **extra)
            if pads == "VALID":
                h, w = (x.h - span) // stride + 1, (x.w - span) // stride + 1
            else:
                h, w = -(-x.h // stride), -(-x.w // stride)
        else:
            out = self.op("Conv", ins, kernel_shape=[k, k], pads=pads, strides=[stride, stride], group=group, **extra)
            h = (x.h + pads[0] + pads[2] - span) // stride + 1
            w = (x.w + pads[1] + pads[3] - span) // stride + 1
        if paddle:  # Paddle2ONNX: the bias [C] reshaped to [1, C, 1, 1] by a constant shape, then added
            b4 = self.op("Reshape", [bname, self.ints([1, cout, 1, 1], "bias_shape")])
            out = self.op("Add", [out, b4])
            self.log.append("paddle_bias")
        return self.fm(out, cout, h, w)

    def batchnorm(self, x: FM) -> FM:
        c = x.c
        if self.d.int(0, 3) == 0 and not self.fp16:  # (onnxconverter-common mistypes InstanceNormalization)
            ins = [x.name, self.const(self.uniform(0.5, 1.5, c, 1.0), "in_s"),
                   self.const(self.uniform(-0.3, 0.3, c, 0.0), "in_b")]
            return self.fm(self.op("InstanceNormalization", ins, epsilon=1e-5), c, x.h, x.w)
        ins = [x.name, self.const(self.uniform(0.5, 1.5, c, 1.0), "bn_s"),
               self.const(self.uniform(-0.3, 0.3, c, 0.0), "bn_b"),
               self.const(self.uniform(-0.3, 0.3, c, 0.0), "bn_m"), self.const(self.uniform(0.5, 1.5, c, 1.0), "bn_v")]
        return self.fm(self.op("BatchNormalization", ins, epsilon=1e-5), c, x.h, x.w)

    def activation(self, x: FM) -> FM:
        kinds = ["Relu", "Clip", "Sigmoid", "swish", "LeakyRelu", "PRelu", "HardSigmoid", "Tanh", "Identity", "Dropout"]
        if self.opset >= 14:
            kinds.append("HardSwish")
        kind = self.d.choice(kinds)
        self.log.append(kind)
        if kind == "Clip":
            bounds = self.d.choice(["min", "min_max", "none", "max_only"])
            lo = self.const(np.array(0.0), "clip_lo") if bounds.startswith("min") else ""
            hi = self.const(np.array(6.0), "clip_hi") if bounds in ("min_max", "max_only") else None
            ins = [x.name] + ([lo] if lo or hi else []) + ([hi] if hi else [])
            out = self.op("Clip", ins)
        elif kind == "swish":
            s = self.op("Sigmoid", [x.name])
            out = self.op("Mul", [x.name, s] if self.d.coin() else [s, x.name])
        elif kind == "LeakyRelu":
            out = self.op("LeakyRelu", [x.name], alpha=0.1)
        elif kind == "PRelu":
            shape = self.d.choice([(x.c, 1, 1), (1, x.c, 1, 1)])
            out = self.op("PRelu", [x.name, self.const(self.rng.uniform(0.05, 0.3, shape), "slope")])
        else:
            out = self.op(kind, [x.name])
        return self.fm(out, x.c, x.h, x.w)

    def post(self, x: FM) -> FM:
        """What follows a conv: nothing (a folded BN is just the bias), a BN node, an activation, or both."""
        mode = self.d.choice(["none", "act", "bn_act", "bn"])
        if mode.startswith("bn"):
            x = self.batchnorm(x)
        if mode.endswith("act"):
            x = self.activation(x)
        return x

    # -- blocks -------------------------------------------------------------------------------------
    def block_conv(self, x: FM) -> FM:
        k = self.d.choice([3, 1, 5, 2])
        stride = self.d.choice([1, 2]) if min(x.h, x.w) >= 4 else 1
        dilation = self.d.choice([1, 2]) if k == 3 and min(x.h, x.w) >= 5 else 1
        pads = self._pads(k, x.h, x.w) if dilation == 1 else None
        y = self.conv(x, self.width(), k, stride, pads=pads, bias=self.d.coin(), dilation=dilation)
        self.log.append(f"conv{k}s{stride}d{dilation}->{y.c}")
        return self.after_conv(self.post(y))

    def block_twice(self, x: FM) -> FM:
        """One conv weight (and bias) applied twice in a row: a shared initializer with two readers."""
        k = self.d.choice([1, 3])
        y = self.conv(x, x.c, k, bias=self.d.coin())
        z = self.activation(y) if self.d.coin() else y
        self.log.append("twice")
        return self.conv(z, x.c, k, weights=self.last_weights)

    def block_depthwise(self, x: FM) -> FM:
        mult = self.d.choice([1, 2])
        k = self.d.choice([3, 5, 1])
        stride = self.d.choice([1, 2]) if min(x.h, x.w) >= 4 else 1
        y = self.conv(x, x.c * mult, k, stride, group=x.c, pads=self._pads(k, x.h, x.w), bias=self.d.coin())
        self.log.append(f"dw{k}x{mult}")
        return self.after_conv(self.post(y))

    def after_conv(self, y: FM) -> FM:
        return self.channels_last(y) if self.nhwc and self.d.coin() else y

    def block_grouped(self, x: FM) -> FM:
        groups = [g for g in range(2, x.c) if x.c % g == 0]
        if not groups:
            return self.block_conv(x)
        g = self.d.choice(groups)
        cout = g * self.d.int(1, max(1, MAX_WIDTH // g))
        y = self.conv(x, cout, self.d.choice([3, 1]), group=g, bias=self.d.coin())
        self.log.append(f"grouped{g}->{cout}")
        return self.post(y)

    def block_activation(self, x: FM) -> FM:
        return self.activation(x)

    def block_residual(self, x: FM) -> FM:
        earlier = [m for m in self.maps if (m.c, m.h, m.w) == (x.c, x.h, x.w) and m.name != x.name]
        if earlier and self.d.coin():
            other = self.d.choice(earlier)
            self.log.append("add_earlier")
        else:
            other = self.conv(x, x.c, self.d.choice([3, 1]), bias=self.d.coin())
            if self.d.coin():
                other = self.activation(other)
            self.log.append("residual")
        ins = [x.name, other.name] if self.d.coin() else [other.name, x.name]
        op = self.d.choice(["Add", "Sum", "Max", "Mul", "Sub", "Mean"])
        if op == "Max" and self.fp16:  # onnxconverter-common keeps Max float32 and mistypes its inputs
            op = "Add"
        if op in ("Sum", "Mean") and self.d.coin():
            ins.append(self.d.choice(ins))  # a third operand: one of the two again
        self.log.append(op)
        return self.fm(self.op(op, ins), x.c, x.h, x.w)

    def block_concat(self, x: FM) -> FM:
        same = [m for m in self.maps if (m.h, m.w) == (x.h, x.w) and m.name != x.name]
        if same and self.d.coin():
            parts = [x, self.d.choice(same)]
            self.log.append("concat_earlier")
        else:
            n = self.d.int(2, 3)
            parts = []
            for _ in range(n):
                if self.d.coin():
                    parts.append(x)  # possibly twice: Concat([x, x])
                else:
                    parts.append(self.conv(x, self.width(MAX_WIDTH // n), self.d.choice([1, 3]), bias=self.d.coin()))
            self.log.append(f"concat{n}")
        if self.d.coin():
            parts = parts[::-1]
        if len({p.c for p in parts}) == 1 and self.d.int(0, 3) == 0:  # along H: channel i of each input is one
            out = self.op("Concat", [p.name for p in parts], axis=2)
            self.log.append("concat_h")
            return self.fm(out, x.c if parts[0].c == x.c else parts[0].c, x.h * len(parts), x.w)
        axis = self.d.choice([1, -3])
        out = self.op("Concat", [p.name for p in parts], axis=axis)
        return self.fm(out, sum(p.c for p in parts), x.h, x.w)

    def block_split(self, x: FM) -> FM:
        if x.c < 2:
            return self.block_conv(x)
        n = self.d.int(2, min(3, x.c))
        equal = [k for k in (2, 3) if x.c % k == 0]
        implicit = bool(equal) and self.d.int(0, 2) == 0  # no sizes given: equal parts
        if implicit:
            sizes = [x.c // equal[0]] * equal[0]
        else:
            cuts = sorted({self.d.int(1, x.c - 1) for _ in range(n - 1)})
            sizes = [int(v) for v in np.diff([0, *cuts, x.c])]
        axis = self.d.choice([1, -3])
        if implicit:
            outs = self.op("Split", [x.name], n_out=len(sizes), axis=axis,
                           **({"num_outputs": len(sizes)} if self.opset >= 18 else {}))
        elif self.opset < 13:
            outs = self.op("Split", [x.name], n_out=len(sizes), axis=axis, split=sizes)
        else:
            outs = self.op("Split", [x.name, self.ints(sizes, "split")], n_out=len(sizes), axis=axis)
        parts = [self.fm(o, s, x.h, x.w) for o, s in zip(outs, sizes)]
        mode = self.d.choice(["concat", "one", "add"])
        self.log.append(f"split{sizes}{'=' if implicit else ''}:{mode}")
        if mode == "one":  # the other parts dangle (unused node outputs)
            return self.d.choice(parts)
        if mode == "add" and len(set(sizes)) < len(sizes):
            a, b = [p for p in parts if sum(q.c == p.c for q in parts) > 1][:2]
            return self.fm(self.op("Add", [a.name, b.name]), a.c, x.h, x.w)
        mapped = []
        for p in parts:
            what = self.d.choice(["as_is", "conv", "act"])
            if what == "conv":
                p = self.conv(p, self.width(MAX_WIDTH // len(parts)), self.d.choice([1, 3]), bias=self.d.coin())
            elif what == "act":
                p = self.activation(p)
            mapped.append(p)
        if self.d.coin():
            mapped = mapped[::-1]
        out = self.op("Concat", [p.name for p in mapped], axis=1)
        return self.fm(out, sum(p.c for p in mapped), x.h, x.w)

    def block_slice(self, x: FM) -> FM:
        if x.c < 2:
            return self.block_conv(x)
        begin = self.d.int(0, x.c - 1)
        end = self.d.int(begin + 1, x.c)
        end_form = self.d.choice(["count", "max", "negative", "beyond"])
        end_value = {"max": INT64_MAX if end == x.c else end, "negative": end - x.c if end < x.c else end,
                     "beyond": end + 5 if end == x.c else end, "count": end}[end_form]
        begin_form = self.d.choice(["count", "negative", "before"])
        begin_value = {"count": begin, "negative": begin - x.c, "before": -1000 if begin == 0 else begin}[begin_form]
        starts, ends, axes = [begin_value], [end_value], [self.d.choice([1, -3])]
        steps = [1]
        h, w = x.h, x.w
        spatial = self.d.choice(["none", "crop", "stride", "flip"]) if x.h >= 4 else "none"
        if spatial == "crop":  # a spatial crop alongside
            starts, ends, axes, steps = starts + [1], ends + [x.h - 1], axes + [2], steps + [1]
            h = x.h - 2
        elif spatial == "stride":  # every other column
            starts, ends, axes, steps = starts + [0], ends + [INT64_MAX], axes + [3], steps + [2]
            w = (x.w + 1) // 2
        elif spatial == "flip":  # columns reversed
            starts, ends, axes, steps = starts + [-1], ends + [-INT64_MAX], axes + [-1], steps + [-1]
        # (not over a -1 batch: onnx's shape inference aborts the process there, a C++ assertion)
        if spatial == "none" and self.d.int(0, 2) == 0 and self.batch_mode != "minus1":  # no axes: axes 0, 1
            ins = [x.name, self.ints([0, begin_value]), self.ints([INT64_MAX, end_value])]
        else:
            ins = [x.name, self.ints(starts), self.ints(ends), self.ints(axes)]
            if self.d.coin() or any(st != 1 for st in steps):
                ins.append(self.ints(steps))
        self.log.append(f"slice[{begin_value}:{end_value}]")
        return self.fm(self.op("Slice", ins), end - begin, h, w)

    def block_se(self, x: FM) -> FM:
        pool = self.d.choice(["GlobalAveragePool", "ReduceMean", "GlobalMaxPool"])
        if pool == "ReduceMean":
            pooled = self.fm(self.reduce_mean(x.name, [2, 3], 1), x.c, 1, 1)
        else:
            pooled = self.fm(self.op(pool, [x.name]), x.c, 1, 1)
        r = self.d.int(1, 8)
        squeeze = self.conv(pooled, r, 1)
        squeeze = self.fm(self.op("Relu", [squeeze.name]), r, 1, 1)
        expand = self.conv(squeeze, x.c, 1)
        gate_op = self.d.choice(["HardSigmoid", "Sigmoid"])
        gate = self.op(gate_op, [expand.name])
        self.log.append(f"se{r}")
        ins = [x.name, gate] if self.d.coin() else [gate, x.name]
        combine = self.d.choice(["Mul", "Mul", "Add"])
        return self.fm(self.op(combine, ins), x.c, x.h, x.w)

    def block_pool(self, x: FM) -> FM:
        op = self.d.choice(["MaxPool", "AveragePool"])
        if min(x.h, x.w) >= 2 and self.d.coin():
            ceil = self.d.int(0, 1)
            out = self.op(op, [x.name], kernel_shape=[2, 2], strides=[2, 2], **({"ceil_mode": 1} if ceil else {}))
            h, w = (-(-x.h // 2), -(-x.w // 2)) if ceil else (x.h // 2, x.w // 2)
        else:
            extra = {"count_include_pad": self.d.int(0, 1)} if op == "AveragePool" else {}
            out = self.op(op, [x.name], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], **extra)
            h, w = x.h, x.w
        self.log.append(op)
        return self.fm(out, x.c, h, w)

    def block_resize(self, x: FM) -> FM:
        if 2 * max(x.h, x.w) > MAX_SIDE:
            return self.block_pool(x)
        sy, sx = self.d.choice([(2, 2), (2, 1), (1, 2)])
        by_sizes = self.d.coin() and self.batch_mode != "minus1"  # sizes [1, ...] contradict a -1 batch
        empty = self.const(np.zeros(0), "empty") if by_sizes or self.opset < 13 else ""
        if by_sizes:
            sizes = self.ints([1, x.c, x.h * sy, x.w * sx], "sizes")
            ins = [x.name, empty, empty if self.opset < 13 else "", sizes]
        else:
            scales = self.const(np.array([1, 1, sy, sx], np.float32), "scales")
            ins = [x.name, empty if self.opset < 13 else "", scales]
        self.log.append(f"resize{'sizes' if by_sizes else 'scales'}{sy}x{sx}")
        return self.fm(self.op("Resize", ins, mode="nearest"), x.c, x.h * sy, x.w * sx)

    def block_convtranspose(self, x: FM) -> FM:
        options = [(3, 1, 1)] + ([(2, 2, 0), (4, 2, 1)] if 2 * max(x.h, x.w) <= MAX_SIDE else [])
        k, s, p = self.d.choice(options)
        kind = self.d.choice(["plain", "depthwise", "grouped"])
        divisors = [g for g in range(2, x.c) if x.c % g == 0]
        if kind == "depthwise" and x.c > 1:
            group, cout = x.c, x.c * self.d.choice([1, 2])
        elif kind == "grouped" and divisors:
            group = self.d.choice(divisors)
            cout = group * self.d.int(1, max(1, MAX_WIDTH // group))
        else:
            group, cout = 1, self.width()
        self.convs += 1
        w = self.const(self.normal((x.c, cout // group, k, k), 1 / np.sqrt(x.c // group * k * k)))
        ins = [x.name, w] + ([self.const(self.uniform(-0.5, 0.5, cout, 0.0), "b")] if self.d.coin() else [])
        out = self.op("ConvTranspose", ins, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=group)
        h, wd = (x.h - 1) * s - 2 * p + k, (x.w - 1) * s - 2 * p + k
        self.log.append(f"convT{k}s{s}g{group}->{cout}")
        return self.post(self.fm(out, cout, h, wd))

    def block_affine(self, x: FM) -> FM:
        op = self.d.choice(["Mul", "Add", "Sub", "Div"])
        shape = self.d.choice([(x.c, 1, 1), (1, x.c, 1, 1), (), (1,), (1, 1, 1, 1)])
        value = self.rng.uniform(0.5, 1.5, shape) if op in ("Mul", "Div") else self.rng.uniform(-0.5, 0.5, shape)
        c = self.const(value, "affine")
        ins = [c, x.name] if op != "Div" and self.d.coin() else [x.name, c]
        self.log.append(f"{op}{shape}")
        return self.fm(self.op(op, ins), x.c, x.h, x.w)

    def block_pad(self, x: FM) -> FM:
        mode = self.d.choice(["constant", "reflect", "edge"])
        value = self.d.choice([0.0, 0.5]) if mode == "constant" else None
        # onnxruntime fuses zero Pads (several in a row too) into the next pool's pads and then refuses
        # pads >= kernel (session creation fails on the *original* model): one zero Pad in a row, ≤ 1 wide
        if value == 0.0 and x.name in self.zero_padded:
            value = 0.5
        most = 1 if value == 0.0 else 2
        pads = [0, 0, self.d.int(0, most), self.d.int(0, most), 0, 0, self.d.int(0, most), self.d.int(0, most)]
        if mode == "reflect" and max(pads) >= min(x.h, x.w):
            mode = "edge"
        self.log.append(f"pad{mode}")
        ins = [x.name, self.ints(pads, "pads")] + ([self.const(np.array(value), "pad_value")] if value else [])
        out = self.op("Pad", ins, mode=mode)
        if value == 0.0:
            self.zero_padded.add(out)
        return self.fm(out, x.c, x.h + pads[2] + pads[6], x.w + pads[3] + pads[7])

    def block_nhwc_linear(self, x: FM) -> FM:
        """Transpose to NHWC → MatMul over channels (+ bias) → Transpose back: a pointwise dense layer."""
        n = self.width()
        self.convs += 1
        t = self.op("Transpose", [x.name], perm=[0, 2, 3, 1])
        y = self.op("MatMul", [t, self.const(self.normal((x.c, n), 1 / np.sqrt(x.c)))])
        if self.d.coin():
            y = self.op("Add", [y, self.const(self.uniform(-0.5, 0.5, n, 0.0), "b")])
        if self.d.coin():
            y = self.op("Relu", [y])
        self.log.append(f"nhwc_linear->{n}")
        return self.fm(self.op("Transpose", [y], perm=[0, 3, 1, 2]), n, x.h, x.w)

    def block_reshape_spatial(self, x: FM) -> FM:
        """Reshape [1, C, H·W] → Softmax over the positions → Reshape back: shape constants holding C."""
        first = self.d.choice([[1, x.c, x.h * x.w], [0, x.c, -1], [1, -1, x.h * x.w]])
        flat = self.op("Reshape", [x.name, self.ints(first, "shape")])
        # (opset 11's Softmax would coerce to 2-D from its axis on: there the positions get a Relu)
        y = self.op("Softmax", [flat], axis=-1) if self.opset >= 13 and self.d.coin() else self.op("Relu", [flat])
        back = self.d.choice([[1, x.c, x.h, x.w], [0, -1, x.h, x.w], [-1, x.c, x.h, x.w]])
        self.log.append("reshape_spatial")
        return self.fm(self.op("Reshape", [y, self.ints(back, "shape")]), x.c, x.h, x.w)

    def block_blocked(self, x: FM) -> FM:
        """Ops that mix channels (their inputs' channel groups must stay whole), then a conv."""
        kinds = ["LRN", "softmax_c", "spatial_attention"]
        if x.c % 2 == 0:
            kinds.append("shuffle")
        if x.c % 4 == 0 and 2 * max(x.h, x.w) <= MAX_SIDE:
            kinds.append("depth_to_space")
        kind = self.d.choice(kinds)
        self.log.append(kind)
        c, h, w = x.c, x.h, x.w
        if kind == "LRN":
            out = self.op("LRN", [x.name], size=3)
        elif kind == "softmax_c":
            out = self.op("Softmax", [x.name], axis=1)  # opset 11: over C·H·W (coerced to 2-D), still mixing
        elif kind == "spatial_attention":  # x · sigmoid(conv(mean over channels))
            m = self.fm(self.reduce_mean(x.name, [1], 1), 1, h, w)
            a = self.op("Sigmoid", [self.conv(m, 1, 3).name])
            out = self.op("Mul", [x.name, a])
        elif kind == "shuffle":  # ShuffleNet: [1, 2, C/2, H, W] → swap → [1, C, H, W]
            r = self.op("Reshape", [x.name, self.ints([1, 2, c // 2, h, w], "shape")])
            t = self.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
            out = self.op("Reshape", [t, self.ints([1, c, h, w], "shape")])
        else:
            out = self.op("DepthToSpace", [x.name], blocksize=2)
            c, h, w = c // 4, h * 2, w * 2
        y = self.fm(out, c, h, w)
        return self.post(self.conv(y, self.width(), self.d.choice([1, 3]), bias=self.d.coin()))

    BLOCKS = ("conv", "activation", "depthwise", "grouped", "residual", "concat", "split", "slice", "se", "pool",
              "resize", "convtranspose", "affine", "twice", "pad", "nhwc_linear", "reshape_spatial", "blocked")

    # -- heads --------------------------------------------------------------------------------------
    def dense(self, flat: str, k: int, n: int, matmul: bool) -> str:
        """Gemm (transB either way, bias [n], [1, n] or none) or MatMul + Add bias."""
        if matmul:
            y = self.op("MatMul", [flat, self.const(self.normal((k, n), 1 / np.sqrt(k)))])
            return self.op("Add", [y, self.const(self.uniform(-0.5, 0.5, n, 0.0), "fc_b")]) if self.d.coin() else y
        trans_b = self.d.int(0, 1)
        ins = [flat, self.const(self.normal((n, k) if trans_b else (k, n), 1 / np.sqrt(k)))]
        if self.d.coin():
            ins.append(self.const(self.uniform(-0.5, 0.5, self.d.choice([(n,), (1, n)]), 0.0), "fc_b"))
        scale = {"alpha": 0.5, "beta": 2.0} if self.d.int(0, 3) == 0 else {}
        return self.op("Gemm", ins, transB=trans_b, **scale)

    def head(self, x: FM) -> tuple[str, list[int]]:
        kind = self.d.choice(["none", "gap_gemm", "flatten_gemm", "reshape_matmul", "squeeze_gemm", "reduce_gemm"])
        if kind == "none":
            return x.name, [1, x.c, x.h, x.w]
        if kind == "gap_gemm":
            flat = self.op("Flatten", [self.op("GlobalAveragePool", [x.name])], axis=1)
            k = x.c
        elif kind == "squeeze_gemm":
            pooled = self.op("GlobalAveragePool", [x.name])
            if self.opset < 13:
                flat = self.op("Squeeze", [pooled], axes=[2, 3])
            else:
                flat = self.op("Squeeze", [pooled, self.ints(self.d.choice([[2, 3], [-1, -2]]), "axes")])
            k = x.c
        elif kind == "reduce_gemm":
            flat = self.reduce_mean(x.name, self.d.choice([[2, 3], [-2, -1]]), 0)
            k = x.c
        elif kind == "flatten_gemm":
            flat = self.op("Flatten", [x.name], axis=1)
            k = x.c * x.h * x.w
        else:
            k = x.c * x.h * x.w
            target = self.d.choice([[1, k], [-1, k], [0, k], [1, -1]])
            flat = self.op("Reshape", [x.name, self.ints(target, "shape")])
        matmul = kind == "reshape_matmul"
        layers = self.d.int(1, 2)
        self.log.append(f"{kind}x{layers}")
        if layers == 2:  # a hidden dense layer: its outputs are prunable channels too
            hidden = self.d.int(1, 16)
            flat = self.dense(flat, k, hidden, matmul)
            if self.d.coin():
                flat = self.op(self.d.choice(["Relu", "Sigmoid"]), [flat])
            k = hidden
        n = self.d.int(1, 10)
        return self.dense(flat, k, n, matmul), [1, n]


def draw_conventions(d: Draws, force: dict | None = None) -> Conventions:
    """Every convention drawn (the first option of each is the plain one), then `force` (SWITCHES values) applied."""
    drawn = Conventions(batch=d.choice(list(BATCHES)), weights=d.choice(["init", "constant", "mixed"]),
                        paddle_bias=d.int(0, 3) == 3, nhwc=d.int(0, 3) == 3,
                        fp16=d.choice(["", "", "", "fp16", "fp16-io32"]), opset=d.choice(OPSETS))
    return dataclasses.replace(drawn, **(force or {}))


def build(d: Draws, force: dict | None = None) -> Case:
    """One random graph, every structural decision taken from `d`; `force` fixes conventions (see SWITCHES)."""
    conv = draw_conventions(d, force)
    opset, style = conv.opset, conv.weights
    h, w = d.int(8, 16), d.int(8, 16)
    seed = d.int(0, 2**31 - 1)
    sharing = d.choice(["none", "dedupe", "share"])
    if conv.fp16:  # onnxconverter-common mistypes a constant shared by a kept-float32 and a converted reader
        sharing = "none"
    batch = BATCHES[conv.batch]  # a dynamic batch dim is fixed to 1 for the analysis
    b = Builder(d, opset, style, seed, sharing, conv)
    b.plain = sharing != "none" and d.int(0, 2) == 0
    if conv.nhwc:  # the input is NHWC; the graph starts with the Transpose to NCHW
        x = b.fm(b.op("Transpose", [INPUT], perm=[0, 3, 1, 2]), 3, h, w)
    else:
        x = b.fm(INPUT, 3, h, w)
    x = b.block_conv(x)  # the input's channels are never prunable: start with a conv
    n_blocks = d.int(0, MAX_BLOCKS - 1)
    for _ in range(n_blocks):
        if b.convs > MAX_LAYERS - 2 - 3:  # a block adds at most 3 layers, the head 2
            break
        kind = d.choice(Builder.BLOCKS)
        x = getattr(b, f"block_{kind}")(x)
    outputs = [b.head(x)]
    if d.int(0, 3) == 0:  # an intermediate map as a second output (its channels are blocked)
        extra = d.choice(b.maps[1:])
        if extra.name not in [o[0] for o in outputs]:
            outputs.append((extra.name, [1, extra.c, extra.h, extra.w]))
    if conv.nhwc:  # feature-map outputs are NHWC too
        outputs = [(b.op("Transpose", [o], perm=[0, 2, 3, 1]), [1, sh[2], sh[3], sh[1]]) if len(sh) == 4 else (o, sh)
                   for o, sh in outputs]
    outputs = [(name, [batch, *shape[1:]]) for name, shape in outputs]
    input_shape = (1, h, w, 3) if conv.nhwc else (1, 3, h, w)
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, *input_shape[1:]])]
    if b.inits and d.int(0, 3) == 0 and not conv.fp16:  # old exports (keep_initializers_as_inputs): initializers
        # listed as inputs (not empty ones: onnxruntime's transpose optimizer gathers from a Resize's empty roi
        # when it is an overridable input and fails at run time, on the original already)
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits if all(t.dims)]
        b.log.append("inits_as_inputs")
    graph = helper.make_graph(
        b.nodes, "fuzz", inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs], b.inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name=f"fuzz-{style}",
                              ir_version=max(IR_VERSION, helper.find_min_ir_version_for(opsets)))
    # (not on -1 dims: onnx's shape inference aborts the process on a Slice over a -1 batch, a C++ assertion)
    if "inits_as_inputs" not in b.log and d.int(0, 3) == 0 and not conv.fp16 and batch != -1:  # value_info
        model = onnx.shape_inference.infer_shapes(model)
        b.log.append("value_info")
    if conv.fp16:
        model = to_float16(model, keep_io_types=conv.fp16 == "fp16-io32")
    feed_batch = 2 if batch != 1 and not b.batch_literal else 1
    tags = conv.tags() + (["pinned_in_reshape"] if b.batch_literal and batch != 1 else [])
    return Case(model, input_shape, [f"style={style}", f"sharing={sharing}"] + b.log, feed_batch, tags)


def to_float16(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    """float16 as users convert: onnxconverter-common (the `test` extra). float32 inputs/outputs are Casts
    added here around the converted graph (what its keep_io_types does, which mistypes some of these graphs)."""
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():  # "the float32 number ... will be truncated": expected
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(model, keep_io_types=False)
    if keep_io_types:
        g = model.graph
        for value, is_input in [(v, True) for v in g.input[:1]] + [(v, False) for v in g.output]:
            inner = f"{value.name}_fp16"
            for n in g.node:
                n.input[:] = [inner if i == value.name else i for i in n.input]
                n.output[:] = [inner if o == value.name else o for o in n.output]
            if is_input:
                g.node.insert(0, helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16))
            else:
                g.node.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT))
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


def graphs():
    """Hypothesis strategy of `Case`s (shrinks towards fewer, simpler blocks)."""
    from hypothesis import strategies as st

    @st.composite
    def _cases(draw):
        return build(HypothesisDraws(draw))

    return _cases()


def random_case(seed: int, force: str | dict | None = None) -> Case:
    """The benchmark's generator: the same builder, decisions from a seeded numpy generator. `force`: a
    SWITCHES name (e.g. "pinned", "fp16", "opset21": that convention alone, the others plain) or a dict of
    Conventions fields (set on top of the drawn ones)."""
    if isinstance(force, str):
        force = {**dataclasses.asdict(Conventions()), **SWITCHES[force]}
    return build(RngDraws(np.random.default_rng(seed)), force)


# ---------------------------------------------------------------------------------------------------
# plans and the check


def random_keep(cm, seed: int) -> np.ndarray:
    """Every prunable group keeps a random non-empty subset (sometimes one channel, all, or all but one)."""
    rng = np.random.default_rng(seed)
    keep = cm.full_keep()
    for g in cm.prunable:
        w = g.width
        mode = int(rng.integers(4))
        if mode == 0:
            mask = rng.random(w) < rng.uniform(0.2, 0.9)
        elif mode == 1:
            mask = np.zeros(w, bool)
        elif mode == 2:
            mask = np.ones(w, bool)
        else:
            mask = np.ones(w, bool)
            if w > 1:
                mask[rng.integers(w)] = False
        if not mask.any():
            mask[rng.integers(w)] = True
        keep[g.slots] = mask
    return keep


FAILURES = ("original", "error", "checker", "runtime", "nonequivalent", "macs")


@dataclass
class Outcome:
    plans: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)

    @property
    def ok(self) -> bool:
        return not self.failures


def feeds_for(input_shape, n_batches=2, seed=0, dtype=np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{INPUT: rng.standard_normal(input_shape).astype(dtype)} for _ in range(n_batches)]


def input_dtype(model: onnx.ModelProto):
    return onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)


def is_float16(model: onnx.ModelProto) -> bool:
    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) or any(
        n.op_type == "Constant" and n.attribute[0].t.data_type == TensorProto.FLOAT16 for n in model.graph.node)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def check_case(model: onnx.ModelProto, input_shape, plan_seeds, batch: int = 1) -> Outcome:
    """Cut `model` with one random plan per seed; every cut must be valid, run, equal the masked
    original (verify, rel. diff ≤ 1e-4) and have the MACs `cm.macs(keep)` predicts (counted independently).

    The analysis runs at `input_shape` (batch 1); the checks feed batches of `batch` samples."""
    import onnxruntime as ort

    import reference_macs
    from aofp_onnx.graph import Graph
    from aofp_onnx.groups import analyze
    from aofp_onnx.surgery import cut
    from aofp_onnx.verify import verify

    out = Outcome()
    feeds = feeds_for((batch, *input_shape[1:]), dtype=input_dtype(model))
    tol = TOL_FP16 if is_float16(model) else TOL
    try:
        onnx.checker.check_model(model, full_check=True)
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    except Exception as exc:
        out.failures.append(("original", f"generated graph invalid or does not run: {exc}"))
        return out
    try:
        cm = analyze(Graph.from_model(_copy(model), {INPUT: tuple(input_shape)}))
        full = cm.macs(cm.full_keep())
        counted = reference_macs.count_macs(model, feeds[0])
        if full != counted:
            out.failures.append(("macs", f"unpruned: predicted {full}, counted {counted}"))
    except Exception:
        out.failures.append(("error", "analyze: " + traceback.format_exc(limit=4)))
        return out
    for seed in plan_seeds:
        out.plans += 1
        keep = random_keep(cm, seed)
        where = f"plan seed {seed}, widths " + str({g.id: f"{int(keep[g.slots].sum())}/{g.width}" for g in cm.prunable})
        try:
            pruned = cut(cm, keep)
            proto = pruned.materialize()
        except Exception:
            out.failures.append(("error", f"cut ({where}): " + traceback.format_exc(limit=6)))
            continue
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            out.failures.append(("checker", f"{where}: {str(exc).splitlines()[0][:300]}"))
            continue
        try:
            sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            sess.run(None, feeds[0])
        except Exception as exc:
            out.failures.append(("runtime", f"{where}: {str(exc).splitlines()[0][:300]}"))
            continue
        try:
            v = verify(cm, keep, pruned, feeds, "cpu")
        except Exception:
            out.failures.append(("error", f"verify ({where}): " + traceback.format_exc(limit=6)))
            continue
        if not v.passed or v.max_rel_diff > tol:
            out.failures.append(("nonequivalent", f"{where}: max rel diff {v.max_rel_diff:.3g} {v.detail}"))
            continue
        predicted, counted = cm.macs(keep), reference_macs.count_macs(proto, feeds[0])
        if predicted != counted:
            out.failures.append(("macs", f"{where}: predicted {predicted}, counted {counted}"))
    return out
