"""Tests for aofp_onnx.calib: specs, every data source, and every refusal with its message."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from aofp_onnx.calib import (Data, ImageOptions, InputSpec, apply_input_shapes, input_specs, load_data,
                             parse_input_shapes)
from aofp_onnx.errors import InputError

F32 = np.dtype(np.float32)


def make_model(inputs):
    """A model whose graph inputs are `inputs` [(name, elem_type, shape)] plus an initializer input `w`."""
    infos = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    infos.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    graph = helper.make_graph(nodes, "g", infos, outputs, initializer=[w])
    return helper.make_model(graph)


def one_input(shape=("N", 3, 4, 4)):
    return [InputSpec("x", tuple(shape), F32)]


def two_inputs():
    return [InputSpec("a", ("N", 2), F32), InputSpec("b", ("N", 3), F32)]


# --- input_specs / shapes -------------------------------------------------------------------------

def test_input_specs_skips_initializers_and_keeps_dynamic_dims():
    model = make_model([("x", TensorProto.FLOAT, ["batch", 3, None, 8]), ("ids", TensorProto.INT64, [2])])
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x", "ids"]
    assert specs[0].shape == ("batch", 3, None, 8)
    assert specs[0].dtype == np.float32
    assert specs[1].shape == (2,)
    assert specs[1].dtype == np.int64


def test_parse_input_shapes_accepts_names_with_colons():
    assert parse_input_shapes(["x:1,3,224,224", "in:0:2,5"]) == {"x": (1, 3, 224, 224), "in:0": (2, 5)}


@pytest.mark.parametrize("value, message", [
    ("x", "is not NAME:D0,D1"),
    (":1,2", "is not NAME:D0,D1"),
    ("x:", "is not NAME:D0,D1"),
    ("x:1,a", "not an integer"),
    ("x:1,0", "dim below 1"),
])
def test_parse_input_shapes_refuses_bad_syntax(value, message):
    with pytest.raises(InputError, match=message):
        parse_input_shapes([value])


def test_parse_input_shapes_refuses_duplicates():
    with pytest.raises(InputError, match="'x' is given twice"):
        parse_input_shapes(["x:1,2", "x:1,3"])


def test_apply_input_shapes_fills_dynamic_dims():
    specs = apply_input_shapes(one_input(("N", 3, "H", "W")), {"x": (2, 3, 5, 6)})
    assert specs[0].shape == (2, 3, 5, 6)
    assert specs[0].dtype == np.float32


@pytest.mark.parametrize("shapes, message", [
    ({"y": (1, 3, 4, 4)}, r"unknown input\(s\) y \(model inputs: x\)"),
    ({"x": (1, 3, 4)}, "rank 4"),
    ({"x": (1, 1, 4, 4)}, "dim 1: expected 3, got 1"),
])
def test_apply_input_shapes_refuses_conflicts(shapes, message):
    with pytest.raises(InputError, match=message):
        apply_input_shapes(one_input(("N", 3, "H", "W")), shapes)


# --- npz / npy ------------------------------------------------------------------------------------

def test_npz_keyed_by_input_names(tmp_path):
    path = tmp_path / "d.npz"
    a, b = np.arange(10.0).reshape(5, 2), np.ones((5, 3), np.float64)
    np.savez(path, a=a, b=b)
    data = load_data(str(path), two_inputs())
    assert len(data) == 5
    assert data.inputs["a"].dtype == np.float32
    np.testing.assert_array_equal(data.inputs["a"], a.astype(np.float32))
    assert data.labels is None
    assert data.source == str(path)
    assert data.synthetic is False


def test_npz_single_array_any_key_and_labels(tmp_path):
    path = tmp_path / "d.npz"
    x = np.full((4, 3, 4, 4), 0.5, np.float32)
    np.savez(path, whatever=x, labels=np.array([0, 1, 2, 3]))
    data = load_data(str(path), one_input())
    assert data.inputs["x"].shape == (4, 3, 4, 4)
    assert data.labels is None  # ignored unless asked for
    labelled = load_data(str(path), one_input(), labels=True)
    np.testing.assert_array_equal(labelled.labels, [0, 1, 2, 3])


def test_npz_limit_keeps_first_samples(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(6 * 2, dtype=np.float32).reshape(6, 2), labels=np.arange(6))
    data = load_data(str(path), [InputSpec("x", (None, 2), F32)], limit=2, labels=True)
    np.testing.assert_array_equal(data.inputs["x"], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(data.labels, [0, 1])


def test_npy_for_one_input(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((3, 3, 4, 4), np.float16))
    data = load_data(str(path), one_input())
    assert data.inputs["x"].dtype == np.float32
    assert data.inputs["x"].shape == (3, 3, 4, 4)


def test_integer_input_takes_safely_castable_data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, ids=np.array([[1, 2], [3, 4]], np.int32))
    data = load_data(str(path), [InputSpec("ids", ("N", 2), np.dtype(np.int64))])
    assert data.inputs["ids"].dtype == np.int64
    np.testing.assert_array_equal(data.inputs["ids"], [[1, 2], [3, 4]])


def test_missing_file():
    with pytest.raises(InputError, match="data source not found: /nope/d.npz"):
        load_data("/nope/d.npz", one_input())


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2\n")
    with pytest.raises(InputError, match="unsupported data source .*d.csv"):
        load_data(str(path), one_input())


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"PK\x03\x04 this is not an archive" if suffix == ".npz" else b"\x93NUMPY garbage")
    with pytest.raises(InputError, match=f"cannot read .*d{suffix} as {suffix}"):
        load_data(str(path), one_input())


def test_npy_given_as_npz(tmp_path):
    path = tmp_path / "d.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="is not a .npz archive"):
        load_data(str(path), one_input())


def test_npz_missing_input_lists_expected(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"lacks input\(s\) b \(expected: a, b\)"):
        load_data(str(path), two_inputs())


def test_npz_unknown_key(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((2, 2)), b=np.zeros((2, 3)), extra=np.zeros(2))
    with pytest.raises(InputError, match=r"unknown key\(s\) extra \(expected: a, b\)"):
        load_data(str(path), two_inputs())


def test_npz_two_arrays_for_one_input_names_the_stray_key(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 3, 4, 4)), other=np.zeros((2, 3, 4, 4)))
    with pytest.raises(InputError, match=r"unknown key\(s\) other"):
        load_data(str(path), one_input())


def test_npz_labels_requested_but_absent(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 3, 4, 4)))
    with pytest.raises(InputError, match="has no 'labels' array"):
        load_data(str(path), one_input(), labels=True)


def test_npy_for_two_inputs(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"the model has 2 inputs \(a, b\); use a .npz"):
        load_data(str(path), two_inputs())


def test_npy_has_no_labels(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((2, 3, 4, 4)))
    with pytest.raises(InputError, match="is a .npy, which has no labels"):
        load_data(str(path), one_input(), labels=True)


def save_x(tmp_path, array, **extra):
    path = tmp_path / "d.npz"
    np.savez(path, x=array, **extra)
    return str(path)


def test_rank_mismatch(tmp_path):
    with pytest.raises(InputError, match=r"input 'x' has rank 4 .* but the data has rank 3 \(2, 3, 4\)"):
        load_data(save_x(tmp_path, np.zeros((2, 3, 4))), one_input())


def test_fixed_dim_mismatch(tmp_path):
    with pytest.raises(InputError, match="input 'x' dim 2: expected 4, got 5 from the data"):
        load_data(save_x(tmp_path, np.zeros((2, 3, 5, 4))), one_input())


def test_batch_dim_is_not_checked_against_a_fixed_model_batch(tmp_path):
    data = load_data(save_x(tmp_path, np.zeros((7, 3, 4, 4))), one_input((1, 3, 4, 4)))
    assert len(data) == 7


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_integer_or_bool_data_for_float_input(tmp_path, dtype):
    with pytest.raises(InputError, match=f"input 'x' is float32 but the data is {np.dtype(dtype)}; give floating"):
        load_data(save_x(tmp_path, np.zeros((2, 3, 4, 4), dtype)), one_input())


def test_non_numeric_data_for_float_input(tmp_path):
    with pytest.raises(InputError, match="input 'x' is float32 but the data is <U1"):
        load_data(save_x(tmp_path, np.full((2, 3, 4, 4), "a")), one_input())


def test_unsafe_cast_for_integer_input(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, ids=np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match="input 'ids' is int64 but the data is float32"):
        load_data(str(path), [InputSpec("ids", ("N", 2), np.dtype(np.int64))])


def test_nan_and_inf_are_counted(tmp_path):
    x = np.zeros((2, 3, 4, 4), np.float32)
    x[0, 0, 0, :2] = np.nan
    x[1, 2, 3, 3] = -np.inf
    with pytest.raises(InputError, match=r"input 'x' has 2 NaN and 1 Inf value\(s\)"):
        load_data(save_x(tmp_path, x), one_input())


def test_nan_beyond_the_limit_is_not_used(tmp_path):
    x = np.zeros((3, 3, 4, 4), np.float32)
    x[2] = np.nan
    assert len(load_data(save_x(tmp_path, x), one_input(), limit=2)) == 2


def test_inconsistent_sample_counts(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((4, 2)), b=np.zeros((3, 3)))
    with pytest.raises(InputError, match="different sample counts: a=4, b=3"):
        load_data(str(path), two_inputs())


def test_zero_samples(tmp_path):
    with pytest.raises(InputError, match="holds zero samples"):
        load_data(save_x(tmp_path, np.zeros((0, 3, 4, 4))), one_input())


def test_zero_d_array(tmp_path):
    with pytest.raises(InputError, match="0-d array"):
        load_data(save_x(tmp_path, np.float32(1.0)), one_input())


def test_label_count_differs(tmp_path):
    path = save_x(tmp_path, np.zeros((3, 3, 4, 4)), labels=np.arange(2))
    with pytest.raises(InputError, match="has 2 labels for 3 samples"):
        load_data(path, one_input(), labels=True)


def test_bad_limit(tmp_path):
    with pytest.raises(InputError, match="sample limit must be at least 1, got 0"):
        load_data(save_x(tmp_path, np.zeros((3, 3, 4, 4))), one_input(), limit=0)


def test_no_inputs():
    with pytest.raises(InputError, match="no inputs"):
        load_data("random:2", [])


# --- Data -----------------------------------------------------------------------------------------

def test_data_batches_and_take():
    data = Data({"a": np.arange(5)[:, None], "b": np.arange(5)[:, None] * 10}, np.arange(5), "s", False)
    batches = list(data.batches(2))
    assert [len(b["a"]) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(batches[2]["b"], [[40]])
    first = data.take(3)
    assert len(first) == 3
    np.testing.assert_array_equal(first.labels, [0, 1, 2])
    assert first.source == "s"
    with pytest.raises(InputError, match="batch size must be at least 1, got 0"):
        next(data.batches(0))


# --- random:N -------------------------------------------------------------------------------------

def test_random_uses_fixed_dims_and_warns(capsys):
    data = load_data("random:4", [InputSpec("x", ("N", 3, 2, 2), np.dtype(np.float16))], seed=1)
    assert data.inputs["x"].shape == (4, 3, 2, 2)
    assert data.inputs["x"].dtype == np.float16
    assert data.synthetic is True
    assert data.labels is None
    expected = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype(np.float16)
    np.testing.assert_array_equal(data.inputs["x"], expected)
    assert capsys.readouterr().err == "warning: random:4 is synthetic data, fit for smoke tests only\n"


def test_random_limit():
    assert len(load_data("random:10", one_input(), limit=3)) == 3


@pytest.mark.parametrize("src", ["random:", "random:0", "random:x", "random:-2"])
def test_random_bad_count(src):
    with pytest.raises(InputError, match="is not random:N with N a positive integer"):
        load_data(src, one_input())


def test_random_needs_fixed_non_batch_dims():
    with pytest.raises(InputError, match=r"input 'x' has dynamic dim\(s\) \[2, 3\] .* pass --input-shape x:"):
        load_data("random:2", one_input(("N", 3, "H", "W")))


def test_random_unknown_rank():
    with pytest.raises(InputError, match="pass --input-shape x:"):
        load_data("random:2", [InputSpec("x", None, F32)])


def test_random_refuses_integer_inputs_and_labels():
    with pytest.raises(InputError, match="random data fits float inputs only; input 'ids' is int64"):
        load_data("random:2", [InputSpec("ids", ("N", 2), np.dtype(np.int64))])
    with pytest.raises(InputError, match="random data has no labels"):
        load_data("random:2", one_input(), labels=True)


# --- image folders --------------------------------------------------------------------------------

def write_png(path, rgb, size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def test_images_resize_scale_mean_std(tmp_path):
    write_png(tmp_path / "b.png", (255, 0, 51), size=(8, 6))
    write_png(tmp_path / "a.png", (0, 102, 255), size=(3, 5))
    opts = ImageOptions(mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 0.2))
    data = load_data(str(tmp_path), one_input(("N", 3, 2, 3)), image_options=opts)
    x = data.inputs["x"]
    assert x.shape == (2, 3, 2, 3)
    assert x.dtype == np.float32
    # sorted by name: a.png first; x = (p/255 - mean) / std per channel
    np.testing.assert_allclose(x[0, :, 0, 0], [-1.0, 0.4, 5.0], rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 1, 2], [1.0, 0.0, 1.0], rtol=1e-6)
    assert data.synthetic is False


def test_images_explicit_size_bgr_nhwc(tmp_path):
    write_png(tmp_path / "a.png", (10, 20, 30))
    opts = ImageOptions(size=(2, 5), scale=1.0, channel_order="bgr", layout="nhwc")
    x = load_data(str(tmp_path), one_input(("N", "H", "W", 3)), image_options=opts).inputs["x"]
    assert x.shape == (1, 2, 5, 3)
    np.testing.assert_array_equal(x[0, 1, 4], [30.0, 20.0, 10.0])


def test_images_grayscale(tmp_path):
    write_png(tmp_path / "a.png", (255, 255, 255))
    opts = ImageOptions(grayscale=True, mean=(0.5,), std=(0.25,))
    x = load_data(str(tmp_path), one_input(("N", 1, 4, 4)), image_options=opts).inputs["x"]
    assert x.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(x, 2.0, rtol=1e-6)


def test_images_labels_from_sorted_subfolders_and_limit(tmp_path):
    write_png(tmp_path / "dog" / "1.png", (0, 0, 0))
    write_png(tmp_path / "cat" / "2.png", (0, 0, 0))
    write_png(tmp_path / "cat" / "1.bmp", (0, 0, 0))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_data(str(tmp_path), one_input(), labels=True)
    assert len(data) == 3
    np.testing.assert_array_equal(data.labels, [0, 0, 1])  # cat/1.bmp, cat/2.png, dog/1.png
    limited = load_data(str(tmp_path), one_input(), labels=True, limit=2)
    np.testing.assert_array_equal(limited.labels, [0, 0])
    assert limited.inputs["x"].shape == (2, 3, 4, 4)


def test_images_labels_need_subfolders(tmp_path):
    write_png(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(InputError, match="holds images directly: a.png"):
        load_data(str(tmp_path), one_input(), labels=True)


def test_empty_image_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="holds no png/jpg/jpeg/bmp files"):
        load_data(str(tmp_path), one_input())


def test_undecodable_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot decode image .*a.png"):
        load_data(str(tmp_path), one_input())


def test_images_need_size_for_dynamic_hw(tmp_path):
    write_png(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(InputError, match=r"dynamic height/width \('H', 'W'\); .* with --image-size HxW"):
        load_data(str(tmp_path), one_input(("N", 3, "H", "W")))


def test_images_channel_count_checked_against_model(tmp_path):
    write_png(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(InputError, match="input 'x' dim 1: expected 1, got 3"):
        load_data(str(tmp_path), one_input(("N", 1, 4, 4)))


def test_images_feed_one_input_only(tmp_path):
    write_png(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(InputError, match=r"an image folder feeds one input but the model has 2 \(a, b\)"):
        load_data(str(tmp_path), two_inputs())


@pytest.mark.parametrize("kwargs, message", [
    ({"channel_order": "rbg"}, "channel order must be 'rgb' or 'bgr'"),
    ({"layout": "chw"}, "image layout must be 'nchw' or 'nhwc'"),
    ({"size": (0, 4)}, "image size must be two positive ints"),
    ({"mean": (0.1, 0.2)}, "image mean needs 1 or 3 values, got 2"),
    ({"grayscale": True, "std": (1.0, 1.0, 1.0)}, "image std needs 1 value, got 3"),
    ({"std": (1.0, 0.0, 1.0)}, "image std must be non-zero"),
])
def test_image_options_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        ImageOptions(**kwargs)


def test_input_specs_on_a_real_model_feed_load_data(tmp_path):
    model = make_model([("x", TensorProto.FLOAT, ["N", 3, 4, 4])])
    onnx.checker.check_model(model)
    data = load_data("random:2", input_specs(model))
    assert data.inputs["x"].shape == (2, 3, 4, 4)
