"""Calibration and evaluation data: read a source into validated numpy arrays keyed by input name.

A source is a `.npz` (keys = input names), a `.npy` (one-input models), a folder of images, or
`random:N` (synthetic standard-normal data, for smoke tests only). Axis 0 of every array is the
sample axis; the other axes must match the model input's rank and fixed dims. Floating data is
cast to the input's dtype; integer or bool data for a float input, NaN/Inf values, mismatched
sample counts and empty sources are refused with an `InputError` naming the problem.

An image becomes x = (pixel · scale − mean[c]) / std[c], where pixel ∈ 0..255 after an RGB (or
grayscale) decode and a bilinear resize to (H, W); c indexes channels in the model's channel order
(after the optional RGB→BGR swap), and a one-value mean/std applies to every channel.
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from PIL import Image, UnidentifiedImageError

from .errors import EXAMPLE_DIM, InputError, shape_hint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABELS_KEY = "labels"
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class InputSpec:
    """A model input: shape holds ints for fixed dims, str or None for dynamic ones (None: unknown rank)."""

    name: str
    shape: tuple | None
    dtype: np.dtype


@dataclass(frozen=True)
class ImageOptions:
    """How image files become input tensors (see the module docstring for the formula)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    channel_order: str = "rgb"
    layout: str = "nchw"
    grayscale: bool = False

    def __post_init__(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise InputError(f"channel order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if self.layout not in ("nchw", "nhwc"):
            raise InputError(f"image layout must be 'nchw' or 'nhwc', got {self.layout!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise InputError(f"image size must be two positive ints (H, W), got {self.size}")
        channels = 1 if self.grayscale else 3
        allowed = "1 value" if channels == 1 else f"1 or {channels} values"
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise InputError(f"image {what} needs {allowed}, got {len(values)}")
        if any(s == 0 for s in self.std):
            raise InputError(f"image std must be non-zero, got {self.std}")


@dataclass(frozen=True, eq=False)
class Data:
    """Validated samples: every array in `inputs` has the same leading sample count."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    synthetic: bool

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Data:
        """The first n samples (all of them when n >= len)."""
        labels = None if self.labels is None else self.labels[:n]
        return replace(self, inputs={k: v[:n] for k, v in self.inputs.items()}, labels=labels)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of `batch_size` samples; the last one holds the remainder."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.inputs.items()}


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, in graph order."""
    initializers = {t.name for t in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in initializers]


def _spec(vi: onnx.ValueInfoProto) -> InputSpec:
    if not vi.type.HasField("tensor_type"):
        raise InputError(f"input {vi.name!r} is not a tensor")
    tt = vi.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    if not tt.HasField("shape"):
        return InputSpec(vi.name, None, dtype)
    # a dim_param, an unset dim and Paddle's dim_value -1 are all dynamic (None or the symbol)
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                 for d in tt.shape.dim)
    return InputSpec(vi.name, dims, dtype)


def parse_input_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse `NAME:D0,D1,...` strings (the name may itself contain ':') into {name: dims}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        if not sep or not name or not dims:
            raise InputError(f"input shape {value!r} is not NAME:D0,D1,...")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise InputError(f"input shape {value!r} has a dim that is not an integer") from None
        if min(shape) < 1:
            raise InputError(f"input shape {value!r} has a dim below 1")
        if name in shapes:
            raise InputError(f"input shape for {name!r} is given twice")
        shapes[name] = shape
    return shapes


def parse_image_options(kw: dict) -> ImageOptions:
    """The CLI's image options (`--image-size HxW`, `--mean`/`--std` comma-separated, ...) as ImageOptions."""
    size = None
    if kw.get("image_size"):
        try:
            h, w = (int(x) for x in kw["image_size"].lower().split("x"))
            size = (h, w)
        except ValueError:
            raise InputError(f"--image-size: expected HxW, got {kw['image_size']!r}") from None
    return ImageOptions(size=size, mean=_floats(kw.get("mean"), "mean") or (0.0,),
                        std=_floats(kw.get("std"), "std") or (1.0,), scale=kw.get("pixel_scale", 1 / 255),
                        channel_order=kw.get("channel_order", "rgb"), layout=kw.get("layout", "nchw"),
                        grayscale=bool(kw.get("grayscale")))


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--{what}: expected comma-separated numbers, got {text!r}") from None


def apply_input_shapes(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]]) -> list[InputSpec]:
    """Specs with the dims of `shapes` filled in; a shape must keep the rank and agree with fixed dims."""
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise InputError(f"--input-shape names unknown input(s) {', '.join(unknown)} "
                         f"(model inputs: {_names(specs)})")
    out = []
    for spec in specs:
        shape = shapes.get(spec.name)
        if shape is not None and spec.shape is not None:
            _check_dims(spec, shape, first_dim=0, what="--input-shape")
        out.append(spec if shape is None else replace(spec, shape=shape))
    return out


def load_data(src: str, specs: list[InputSpec], *, limit: int | None = None,
              image_options: ImageOptions | None = None, seed: int = 0, labels: bool | None = False) -> Data:
    """Read `src` for the model inputs `specs`, keep the first `limit` samples, and validate them.

    `labels`: True requires them, False ignores them, None takes a .npz's labels when it has some."""
    if not specs:
        raise InputError("the model has no inputs to feed")
    if limit is not None and limit < 1:
        raise InputError(f"sample limit must be at least 1, got {limit}")
    if src.startswith(RANDOM_PREFIX):
        if labels:
            raise InputError("random data has no labels; give a .npz with a 'labels' array or an image folder")
        return _random(src, specs, limit, seed)
    path = Path(src)
    if not path.exists():
        raise InputError(f"data source not found: {src}")
    if path.is_dir():
        inputs, label_array = _read_images(path, specs, image_options or ImageOptions(), labels, limit)
    elif path.suffix.lower() == ".npz":
        inputs, label_array = _read_npz(path, specs, labels)
    elif path.suffix.lower() == ".npy":
        inputs, label_array = _read_npy(path, specs, labels)
    else:
        raise InputError(f"unsupported data source {src}: expected a .npz, a .npy, an image folder or random:N")
    return _validated(inputs, label_array, specs, src, limit)


def _random(src: str, specs: list[InputSpec], limit: int | None, seed: int) -> Data:
    count = src[len(RANDOM_PREFIX):]
    if not count.isdigit() or int(count) < 1:
        raise InputError(f"{src!r} is not random:N with N a positive integer")
    n = int(count) if limit is None else min(int(count), limit)
    rng = np.random.default_rng(seed)
    inputs = {spec.name: rng.standard_normal((n, *_fixed_sample_shape(spec))).astype(spec.dtype)
              for spec in specs}
    sys.stderr.write(f"warning: {src} is synthetic data, fit for smoke tests only\n")
    return Data(inputs, None, src, synthetic=True)


def _fixed_sample_shape(spec: InputSpec) -> tuple[int, ...]:
    if spec.shape is None or len(spec.shape) == 0:
        raise InputError(f"input {spec.name!r} has no known batched shape; "
                         f"pass --input-shape {spec.name}:D0,D1,... with the dims of one batch")
    if not np.issubdtype(spec.dtype, np.floating):
        raise InputError(f"random data fits float inputs only; input {spec.name!r} is {spec.dtype}")
    dynamic = [i for i, d in enumerate(spec.shape) if i > 0 and not isinstance(d, int)]
    if dynamic:
        raise InputError(f"input {spec.name!r} has dynamic dim(s) {dynamic} ({spec.shape}); "
                         f"pass {shape_hint(spec.name, spec.shape)}")
    return tuple(spec.shape[1:])


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InputError(f"{path} is not a .npz archive")
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {path} as .npz: {e}") from None


def _read_npz(path: Path, specs: list[InputSpec], want_labels: bool | None):
    arrays = _load_arrays(path)
    names = [s.name for s in specs]
    label_array = arrays.pop(LABELS_KEY) if LABELS_KEY in arrays and LABELS_KEY not in names else None
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise InputError(f"{path} has unknown key(s) {', '.join(unknown)} (expected: {_names(specs)})")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"{path} lacks input(s) {', '.join(missing)} (expected: {_names(specs)})")
    if want_labels and label_array is None:
        raise InputError(f"{path} has no '{LABELS_KEY}' array")
    return arrays, label_array if want_labels is not False else None


def _read_npy(path: Path, specs: list[InputSpec], want_labels: bool | None):
    if len(specs) != 1:
        raise InputError(f"a .npy holds one array but the model has {len(specs)} inputs ({_names(specs)}); "
                         "use a .npz keyed by input name")
    if want_labels:
        raise InputError(f"{path} is a .npy, which has no labels; use a .npz with a '{LABELS_KEY}' array")
    try:
        with open(path, "rb") as f:
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read {path} as .npy: {e}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path} is a .npz archive, not a .npy array")
    return {specs[0].name: array}, None


def _read_images(folder: Path, specs: list[InputSpec], opts: ImageOptions, want_labels: bool,
                 limit: int | None):
    if len(specs) != 1:
        raise InputError(f"an image folder feeds one input but the model has {len(specs)} ({_names(specs)})")
    spec = specs[0]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"image folder {folder} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    files = files[:limit]
    label_array = _folder_labels(folder, files) if want_labels else None
    size = opts.size or _image_size(spec, opts.layout)
    pixels = np.stack([_read_image(f, size, opts) for f in files])
    if opts.layout == "nchw":
        pixels = pixels.transpose(0, 3, 1, 2)
    return {spec.name: pixels}, label_array


def _folder_labels(folder: Path, files: list[Path]) -> np.ndarray:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    loose = [f.name for f in files if f.parent == folder]
    if loose:
        raise InputError(f"labels come from class sub-folders, but {folder} holds images directly: {loose[0]}")
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[f.relative_to(folder).parts[0]] for f in files], dtype=np.int64)


def _image_size(spec: InputSpec, layout: str) -> tuple[int, int]:
    axes = (2, 3) if layout == "nchw" else (1, 2)
    if spec.shape is None or len(spec.shape) != 4:
        raise InputError(f"images need a rank-4 input, but {spec.name!r} has shape {spec.shape}")
    size = tuple(spec.shape[a] for a in axes)
    if not all(isinstance(d, int) and d > 0 for d in size):
        raise InputError(f"input {spec.name!r} has dynamic height/width {size}; give the size to resize the images "
                         f"to with --image-size HxW (e.g. --image-size {EXAMPLE_DIM}x{EXAMPLE_DIM})")
    return size


def _read_image(path: Path, size: tuple[int, int], opts: ImageOptions) -> np.ndarray:
    """One image as (H, W, C) float32, resized, scaled, channel-ordered and normalized."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if opts.grayscale else "RGB").resize(size[::-1], Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot decode image {path}: {e}") from None
    x = np.asarray(img, dtype=np.float32).reshape(size[0], size[1], -1) * np.float32(opts.scale)
    if opts.channel_order == "bgr" and not opts.grayscale:
        x = x[..., ::-1]
    return (x - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32)


def _validated(inputs: dict[str, np.ndarray], label_array: np.ndarray | None, specs: list[InputSpec],
               src: str, limit: int | None) -> Data:
    for spec in specs:
        _check_array(spec, inputs[spec.name])
    counts = {name: len(a) for name, a in inputs.items()}
    if len(set(counts.values())) > 1:
        raise InputError(f"inputs in {src} have different sample counts: "
                         + ", ".join(f"{n}={c}" for n, c in counts.items()))
    n = next(iter(counts.values()))
    if n == 0:
        raise InputError(f"{src} holds zero samples")
    if label_array is not None and len(label_array) != n:
        raise InputError(f"{src} has {len(label_array)} labels for {n} samples")
    kept = Data(inputs, label_array, src, synthetic=False).take(limit or n)
    for spec in specs:
        _check_finite(spec.name, kept.inputs[spec.name])
    return replace(kept, inputs={s.name: kept.inputs[s.name].astype(s.dtype, copy=False) for s in specs})


def _check_array(spec: InputSpec, array: np.ndarray) -> None:
    """Rank, fixed dims (past the sample axis) and a dtype that casts to the input's dtype."""
    if array.ndim == 0:
        raise InputError(f"input {spec.name!r} got a 0-d array, which holds no samples")
    if spec.shape is not None:
        _check_dims(spec, array.shape, first_dim=1, what="data")
    if np.issubdtype(spec.dtype, np.floating):
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"input {spec.name!r} is {spec.dtype} but the data is {array.dtype}; "
                             "give floating-point values")
    elif not np.can_cast(array.dtype, spec.dtype, "safe"):
        raise InputError(f"input {spec.name!r} is {spec.dtype} but the data is {array.dtype}")


def _check_dims(spec: InputSpec, shape: tuple[int, ...], *, first_dim: int, what: str) -> None:
    """Rank must match; dims from `first_dim` on must match where the model fixes them."""
    if len(shape) != len(spec.shape):
        raise InputError(f"input {spec.name!r} has rank {len(spec.shape)} {spec.shape}, "
                         f"but the {what} has rank {len(shape)} {tuple(shape)}")
    for i in range(first_dim, len(shape)):
        if isinstance(spec.shape[i], int) and spec.shape[i] != shape[i]:
            raise InputError(f"input {spec.name!r} dim {i}: expected {spec.shape[i]}, "
                             f"got {shape[i]} from the {what}")


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    if nan or inf:
        raise InputError(f"input {name!r} has {nan} NaN and {inf} Inf value(s)")


def _names(specs: list[InputSpec]) -> str:
    return ", ".join(s.name for s in specs)
