"""The least-squares re-fit of one consumer (the maths behind `reconstruct`).

A consumer is a linear map of patches of its input: for an output position q, y_q = M·p_q + b, where p_q
is the im2col patch (Conv: the C·∏k input values the filter window covers, with the node's pads/strides/
dilations; Gemm/MatMul: one row of the input) and M the weight as a matrix (Conv W[O, C, k..] → [O, C·∏k];
Gemm alpha·op(B)ᵀ; MatMul Bᵀ). `fit` solves

    min over M', β   Σ_q ‖M'·p_q(X) + β − y_q‖² + λ‖M'‖²,   λ = ridge · tr(PᵀP) / D

on a seeded sample of at most `positions` output positions per sample, the normal equations accumulated
in float64 over chunks of about ROWS patch rows (memory O(D²), D = C_kept·∏k + 1). The patches are
gathered with numpy indexing rather than an onnxruntime graph: the fit needs them for sampled positions
only, and exactly in the weight's column order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .channels.attrs import attr

RIDGE = 1e-3  # λ = RIDGE · mean diagonal of the Gram matrix (weights only, never the intercept)
POSITIONS = 64  # sampled output positions per calibration sample
ROWS = 4096  # patch rows per chunk when accumulating the normal equations

# --------------------------------------------------------------------------------------------------
# im2col (exact, any number of spatial dims)

@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]

    @classmethod
    def of(cls, node: onnx.NodeProto, in_spatial, w_shape) -> "ConvGeometry":
        """The geometry of Conv `node` for an input of spatial dims `in_spatial` and weight shape `w_shape`."""
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        d = len(in_spatial)
        kernel = tuple(int(k) for k in a.get("kernel_shape", w_shape[2:]))
        strides = tuple(int(s) for s in a.get("strides", [1] * d))
        dilations = tuple(int(s) for s in a.get("dilations", [1] * d))
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin = []
            for i in range(d):
                out = -(-in_spatial[i] // strides[i])
                total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i])
                begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        elif auto == "VALID":
            begin = [0] * d
        else:
            begin = [int(p) for p in a.get("pads", [0] * (2 * d))[:d]]
        return cls(kernel, strides, dilations, tuple(begin))


def im2col(x: np.ndarray, geo: ConvGeometry, out_spatial, sample: np.ndarray, flat_pos: np.ndarray) -> np.ndarray:
    """Patches [S, C·∏k] of `x` [N, C, *spatial] for output positions (sample[i], unravel(flat_pos[i])).

    Column order matches a Conv weight [O, C, *k] reshaped to [O, C·∏k]; padding reads zeros."""
    spatial = x.shape[2:]
    d = len(spatial)
    outs = np.unravel_index(flat_pos, tuple(out_spatial))
    kidx = np.unravel_index(np.arange(int(np.prod(geo.kernel))), geo.kernel)
    pad_end = [max(0, (out_spatial[i] - 1) * geo.strides[i] + (geo.kernel[i] - 1) * geo.dilations[i] + 1
                   - spatial[i] - geo.pads_begin[i]) for i in range(d)]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(geo.pads_begin[i], pad_end[i]) for i in range(d)])
    index = [sample[:, None]]
    for i in range(d):
        index.append(outs[i][:, None] * geo.strides[i] + kidx[i][None, :] * geo.dilations[i])
    # advanced indices around a slice: numpy puts the advanced dims first -> [S, K, C]
    patches = xp[(index[0], slice(None), *index[1:])]
    return patches.transpose(0, 2, 1).reshape(len(sample), -1)


# --------------------------------------------------------------------------------------------------
# consumers as linear maps

@dataclass
class Layer:
    """A consumer as y = M·p + b: where its weight, bias and patches come from."""

    node_index: int
    node: onnx.NodeProto
    kind: str  # "conv" | "gemm" | "matmul"
    out_axis: int
    bias: str = "none"  # "own" | "BatchNormalization mean" | "Add constant" | "none" (where β goes)
    bias_name: str | None = None  # the initializer that receives β
    fixed_bias: str | None = None  # an own bias that stays (subtracted from the target)

    @property
    def weight_name(self) -> str:
        return self.node.input[1]

    def matrix(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1)
        if self.kind == "gemm":
            alpha = attr(self.node, "alpha", 1.0)
            return alpha * (w if attr(self.node, "transB", 0) else w.T)
        return w.T

    def weight(self, m: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            out = m.reshape(like.shape)
        elif self.kind == "gemm":
            alpha = attr(self.node, "alpha", 1.0)
            out = (m if attr(self.node, "transB", 0) else m.T) / alpha
        else:
            out = m.T
        return np.ascontiguousarray(out.astype(like.dtype))

    def own_bias_vector(self, value: np.ndarray, n_out: int) -> np.ndarray:
        """The bias the node adds to each output channel, from its bias input's value."""
        if self.kind == "gemm":
            value = attr(self.node, "beta", 1.0) * value
        return np.broadcast_to(value.reshape(-1), (n_out,)) if value.size == 1 else value.reshape(-1)


# --------------------------------------------------------------------------------------------------
# the fit

def _positions(layer: Layer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int):
    """(sample index, flat output position) pairs: up to `positions` distinct ones per sample."""
    per = int(np.prod(y.shape[2:])) if layer.kind == "conv" else int(np.prod(y.shape[1:-1]))
    n = y.shape[0]
    take = min(per, positions)
    if take == per:
        flat = np.tile(np.arange(per), n)
    else:
        flat = np.concatenate([rng.choice(per, take, replace=False) for _ in range(n)])
    return np.repeat(np.arange(n), take), flat


def _patches(layer: Layer, x: np.ndarray, y: np.ndarray, sample, flat, w_shape) -> tuple[np.ndarray, np.ndarray]:
    """(P [S, D], T [S, O]): the patches of `x` and the rows of `y` at the sampled positions."""
    if layer.kind == "conv":
        geo = ConvGeometry.of(layer.node, x.shape[2:], w_shape)
        p = im2col(x, geo, y.shape[2:], sample, flat)
        t = y.reshape(y.shape[0], y.shape[1], -1)[sample, :, flat]
        return p, t
    if layer.kind == "gemm":
        return x[sample], y[sample]
    per = int(np.prod(y.shape[1:-1]))
    rows = sample * per + flat
    return x.reshape(-1, x.shape[-1])[rows], y.reshape(-1, y.shape[-1])[rows]


def fit(layer: Layer, x: np.ndarray, target: np.ndarray, w_shape, *, intercept: bool, positions: int = POSITIONS,
        ridge: float = RIDGE, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Ridge least squares (M' [O, D], β [O] or None) mapping patches of `x` to `target` (n's outputs)."""
    rng = np.random.default_rng([seed, layer.node_index])
    gram = rhs = None
    per = int(np.prod(target.shape[2:])) if layer.kind == "conv" else int(np.prod(target.shape[1:-1]))
    chunk = max(1, ROWS // max(1, min(per, positions)))
    for start in range(0, len(x), chunk):
        xs, ts = x[start:start + chunk], target[start:start + chunk]
        sample, flat = _positions(layer, xs, ts, rng, positions)
        p, t = _patches(layer, xs, ts, sample, flat, w_shape)
        p = p.astype(np.float32)
        if intercept:
            p = np.concatenate([p, np.ones((len(p), 1), np.float32)], axis=1)
        # products in float32 (BLAS speed) over a chunk of about ROWS rows, sums in float64
        g, r = (p.T @ p).astype(np.float64), (p.T @ t.astype(np.float32)).astype(np.float64)
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
    d = gram.shape[0] - int(intercept)
    lam = ridge * float(np.trace(gram[:d, :d])) / max(d, 1)
    reg = gram.copy()
    reg[np.arange(d), np.arange(d)] += max(lam, 1e-12)
    try:
        sol = np.linalg.solve(reg, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(reg, rhs, rcond=None)[0]
    m = sol[:d].T
    return m, (sol[d] if intercept else None)
