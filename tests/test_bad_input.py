"""The bad-input matrix: every refused input exits 2 with one line on stderr and writes nothing.

Each case runs the real CLI process (`python -m aofp_onnx ...`) in a fresh folder holding a copy of
a small zoo model, and checks:

* exit code 2 (the input was refused), never 1 (internal error) or 0;
* stderr holds exactly one non-empty line besides `warning:` lines, and it names the problem
  (a keyword asserted per case);
* the folder is unchanged afterwards: same files (no output, no `.aofp-*` temp files), each with the
  same sha256 — so the input model, the data and the plan are byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
import cliutil

MODEL = "model.onnx"
PRUNE = ("--calib", "random:2", "--criterion", "l1", "--flops-target", "0.5")


# --- helpers ----------------------------------------------------------------------------------------

def run_cli(*args, cwd):
    return cliutil.run_cli(*args, cwd=cwd, timeout=180)


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def assert_refused(work: pathlib.Path, args, *keywords: str, runner=None) -> str:
    """Run the CLI in `work` (a real process unless `runner` says otherwise); assert exit 2, one stderr line
    holding every keyword, and `work` untouched."""
    before = snapshot(work)
    proc = (runner or run_cli)(*args, cwd=work)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert len(lines) == 1, f"expected one error line, got {lines}"
    line = lines[0]
    assert line.startswith("aofp-onnx: error:"), line
    for kw in keywords:
        assert kw.lower() in line.lower(), f"{kw!r} not in {line!r}"
    assert snapshot(work) == before, "the folder changed: something was written or the input was modified"
    assert proc.stdout.strip() == "" or "wrote" not in proc.stdout
    return line


def save_helper_model(path, nodes, inputs, outputs, initializers=(), opset=13, ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)  # valid ONNX: the refusal must come from aofp-onnx's own checks
    onnx.save(model, path)
    return path


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def qlinearconv_model(path):
    w = np.random.default_rng(0).integers(0, 255, (4, 3, 3, 3)).astype(np.uint8)
    inits = [init("w", w), init("xs", np.float32(0.02)), init("xz", np.uint8(128)), init("ws", np.float32(0.01)),
             init("wz", np.uint8(128)), init("ys", np.float32(0.05)), init("yz", np.uint8(128))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qconv",
                            pads=[1, 1, 1, 1])
    return save_helper_model(path, [node], [vi("x", TensorProto.UINT8, ["N", 3, 8, 8])],
                             [vi("y", TensorProto.UINT8, ["N", 4, 8, 8])], inits)


def convinteger_model(path):
    w = np.random.default_rng(0).integers(0, 255, (4, 3, 3, 3)).astype(np.uint8)
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="iconv", pads=[1, 1, 1, 1])
    return save_helper_model(path, [node], [vi("x", TensorProto.UINT8, ["N", 3, 8, 8])],
                             [vi("y", TensorProto.INT32, ["N", 4, 8, 8])], [init("w", w)])


def qdq_model(path):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("Conv", ["xd", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return save_helper_model(path, nodes, [vi("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                             [vi("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                             [init("w", w), init("s", np.float32(0.02)), init("z", np.uint8(128))])


def opset6_model(path):
    """Older than the oldest opset onnx.version_converter upgrades here (7)."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = np.random.default_rng(1).standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return save_helper_model(path, nodes, [vi("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                             [vi("y", TensorProto.FLOAT, ["N", 2, 8, 8])], [init("w", w), init("w2", w2)],
                             opset=6, ir_version=4)


def bfloat16_model(path):
    """float32 I/O around bfloat16 convolutions: onnx.checker accepts it, onnxruntime has no kernel for it."""
    import ml_dtypes  # onnx's own dependency for these types

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(ml_dtypes.bfloat16), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("Conv", ["xb", "w"], ["yb"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
    return save_helper_model(path, nodes, [vi("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                             [vi("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w], opset=17)


def two_input_model(path):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Conv", ["s", "w"], ["y"], pads=[1, 1, 1, 1])]
    return save_helper_model(path, nodes, [vi("a", TensorProto.FLOAT, ["N", 3, 8, 8]),
                                           vi("b", TensorProto.FLOAT, ["N", 3, 8, 8])],
                             [vi("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [init("w", w)])


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture
def in_process(capfd, monkeypatch):
    """A runner calling `aofp_onnx.cli.main` in this process (for the larger matrices: a process start
    costs ~1 s). stderr is captured at the file-descriptor level, so native library output counts too."""
    from aofp_onnx import cli

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capfd.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, exc.value.code, out, err)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """resnet_basic (input 'input' [batch,3,32,32]), a valid plan for it, a pruned model, and a vgg plan."""
    d = tmp_path_factory.mktemp("bad_input_models")
    m = zoo.build("resnet_basic", d)
    other = zoo.build("vgg", d)
    for src, plan, out in ((m.path, "plan.json", "pruned.onnx"), (other.path, "vgg_plan.json", "vgg_pruned.onnx")):
        proc = run_cli("prune", src, "-o", d / out, *PRUNE, "--plan-out", d / plan, cwd=d)
        assert proc.returncode == 0, proc.stderr
    return {"model": m.path, "plan": d / "plan.json", "pruned": d / "pruned.onnx", "vgg_plan": d / "vgg_plan.json",
            "input": zoo.INPUT_NAME}


@pytest.fixture
def work(tmp_path, built):
    """A fresh folder holding model.onnx (resnet_basic), plan.json (valid for it) and pruned.onnx."""
    shutil.copy(built["model"], tmp_path / MODEL)
    shutil.copy(built["plan"], tmp_path / "plan.json")
    shutil.copy(built["pruned"], tmp_path / "pruned.onnx")
    return tmp_path


# --- bad model files: prune, inspect, apply ---------------------------------------------------------

def _truncated(d):
    data = (d / MODEL).read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return "truncated.onnx"


def _write(name, data):
    def make(d):
        (d / name).write_bytes(data)
        return name
    return make


def _text_model(d):
    os.makedirs(d / "text", exist_ok=True)
    (d / "text" / MODEL).write_text("This is not an ONNX model, just a note.\nSecond line.\n")
    return "text/model.onnx"


BAD_MODELS = {
    # name: (make(folder) -> model path relative to the folder, keywords the error line must hold)
    "missing": (lambda d: "nope.onnx", ["nope.onnx", "no such file"]),
    "empty": (_write("empty.onnx", b""), ["empty"]),
    "garbage": (_write("garbage.onnx", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
                ["garbage.onnx"]),
    "truncated": (_truncated, ["truncated.onnx"]),
    "text": (_text_model, ["model.onnx"]),
    "qlinearconv": (lambda d: qlinearconv_model(d / "q.onnx").name, ["quantized", "QLinearConv"]),
    "convinteger": (lambda d: convinteger_model(d / "ci.onnx").name, ["quantized", "ConvInteger"]),
    "qdq": (lambda d: qdq_model(d / "qdq.onnx").name, ["quantized", "QuantizeLinear"]),
    "opset6": (lambda d: opset6_model(d / "op6.onnx").name, ["opset 6", "not supported"]),
    "bfloat16": (lambda d: bfloat16_model(d / "bf16.onnx").name, ["bfloat16", "onnxruntime cannot run", "Conv"]),
}
BAD_MODEL_GENERIC = ("not", "invalid", "empty", "no such")  # one of these for the unreadable files


@pytest.mark.parametrize("case", list(BAD_MODELS))
@pytest.mark.parametrize("command", ["prune", "inspect", "apply"])
def test_bad_model_is_refused(work, case, command, in_process):
    """prune runs as a real process; inspect and apply in this process (same code path past the parser)."""
    make, keywords = BAD_MODELS[case]
    model = make(work)
    if command == "prune":
        args = ["prune", model, "-o", "out.onnx", *PRUNE]
    elif command == "inspect":
        args = ["inspect", model, "--json", "info.json"]
    else:
        args = ["apply", model, "--plan", "plan.json", "-o", "out.onnx"]
    line = assert_refused(work, args, *keywords, runner=None if command == "prune" else in_process)
    if case in ("garbage", "truncated", "text"):
        assert any(w in line.lower() for w in BAD_MODEL_GENERIC), line


def test_verify_refuses_missing_and_garbage_models(work):
    assert_refused(work, ["verify", "nope.onnx", "pruned.onnx", "--plan", "plan.json"], "nope.onnx", "no such file")
    assert_refused(work, ["verify", MODEL, "nope.onnx", "--plan", "plan.json"], "nope.onnx", "no such file")
    (work / "empty.onnx").write_bytes(b"")
    assert_refused(work, ["verify", MODEL, "empty.onnx", "--plan", "plan.json"], "empty")


# --- calibration data -------------------------------------------------------------------------------

def _x(n=2, c=3):
    return np.random.default_rng(0).standard_normal((n, c, 32, 32)).astype(np.float32)


def _npz(arrays):
    def make(d):
        np.savez(d / "calib.npz", **arrays)
        return "calib.npz"
    return make


def _nan():
    x = _x()
    x[1, 2, 3, 4] = np.nan
    return x


def _inf():
    x = _x()
    x[0, 0, 0, 0] = np.inf
    return x


BAD_CALIB = {
    "wrong_rank": (_npz({"input": _x()[:, :, :, 0]}), ["rank"]),
    "wrong_fixed_dim": (_npz({"input": _x(c=4)}), ["dim 1", "expected 3", "got 4"]),
    "integer_dtype": (_npz({"input": (_x() * 10).astype(np.int32)}), ["int32"]),
    "nan": (_npz({"input": _nan()}), ["NaN"]),
    "inf": (_npz({"input": _inf()}), ["Inf"]),
    "unknown_extra_key": (_npz({"input": _x(), "extra": _x()}), ["unknown key", "extra"]),
    "missing_file": (lambda d: "no_such_calib.npz", ["not found", "no_such_calib.npz"]),
    "bad_random": (lambda d: "random:zero", ["random:"]),
}


@pytest.mark.parametrize("case", list(BAD_CALIB))
@pytest.mark.parametrize("command", ["prune", "apply"])
def test_bad_calibration_is_refused(work, case, command, in_process):
    make, keywords = BAD_CALIB[case]
    src = make(work)
    if command == "prune":
        args = ["prune", MODEL, "-o", "out.onnx", "--calib", src, "--criterion", "l1", "--flops-target", "0.5"]
    else:
        args = ["apply", MODEL, "--plan", "plan.json", "-o", "out.onnx", "--calib", src]
    assert_refused(work, args, *keywords, runner=None if command == "prune" else in_process)


def test_calibration_with_wrong_input_name_is_refused(tmp_path):
    """A two-input model fed an .npz whose keys are not its input names (a one-input model takes any
    single key by design, see test_calib.test_npz_single_array_any_key_and_labels)."""
    two_input_model(tmp_path / MODEL)
    x = np.zeros((2, 3, 8, 8), np.float32)
    np.savez(tmp_path / "calib.npz", a=x, images=x)
    args = ["prune", MODEL, "-o", "out.onnx", "--calib", "calib.npz", "--criterion", "l1", "--flops-target", "0.5"]
    assert_refused(tmp_path, args, "images")
    np.savez(tmp_path / "calib.npz", a=x)  # b missing
    assert_refused(tmp_path, args, "lacks", "b")


# --- output paths -----------------------------------------------------------------------------------
# The first call of each test runs as a real process; further variations run in this process.

def test_output_equal_to_input_is_refused(work, in_process):
    assert_refused(work, ["prune", MODEL, "-o", MODEL, *PRUNE], "input")
    assert_refused(work, ["apply", MODEL, "--plan", "plan.json", "-o", MODEL], "input", runner=in_process)


def test_output_equal_to_input_spelled_differently_is_refused(work, in_process):
    (work / "sub").mkdir()
    (work / "sub" / "keep.txt").write_text("x")
    os.symlink(work / MODEL, work / "link.onnx")
    assert_refused(work, ["prune", MODEL, "-o", "sub/../model.onnx", *PRUNE], "input")
    for spelling in ("./model.onnx", "sub/../model.onnx", str(work / MODEL), f"{work}//sub/./../{MODEL}",
                     "link.onnx"):
        assert_refused(work, ["prune", MODEL, "-o", spelling, *PRUNE], "input", runner=in_process)
        assert_refused(work, ["prune", str(work / MODEL), "-o", spelling, *PRUNE], "input", runner=in_process)
        assert_refused(work, ["apply", f"./sub/../{MODEL}", "--plan", "plan.json", "-o", spelling], "input",
                       runner=in_process)


def test_side_outputs_equal_to_input_are_refused(work, in_process):
    """--report / --plan-out / --plot / inspect --json must not overwrite the model either."""
    assert_refused(work, ["apply", MODEL, "--plan", "plan.json", "-o", "out.onnx", "--report", MODEL], "input")
    for flag in ("--report", "--plan-out", "--plot"):
        assert_refused(work, ["prune", MODEL, "-o", "out.onnx", *PRUNE, flag, f"./{MODEL}"], "input",
                       runner=in_process)
    assert_refused(work, ["inspect", MODEL, "--json", f"./{MODEL}"], "input", runner=in_process)


def test_output_into_missing_folder_is_refused(work, in_process):
    assert_refused(work, ["prune", MODEL, "-o", "missing/out.onnx", *PRUNE], "missing", "does not exist")
    for args in (["apply", MODEL, "--plan", "plan.json", "-o", "missing/out.onnx"],
                 ["prune", MODEL, "-o", "out.onnx", *PRUNE, "--report", "missing/r.json"],
                 ["prune", MODEL, "-o", "out.onnx", *PRUNE, "--plan-out", "missing/p.json"],
                 ["prune", MODEL, "-o", "out.onnx", *PRUNE, "--plot", "missing/w.png"],
                 ["apply", MODEL, "--plan", "plan.json", "-o", "out.onnx", "--report", "missing/r.json"],
                 ["inspect", MODEL, "--json", "missing/info.json"]):
        assert_refused(work, args, "does not exist", runner=in_process)
    assert not (work / "missing").exists()


def test_output_onto_a_folder_is_refused(work, in_process):
    (work / "folder").mkdir()
    (work / "folder" / "keep.txt").write_text("x")
    assert_refused(work, ["prune", MODEL, "-o", "folder", *PRUNE], "directory", runner=in_process)


# --- options ----------------------------------------------------------------------------------------

def test_flops_target_out_of_range_is_refused(work, in_process):
    for k, target in enumerate(("1.5", "0", "-0.2")):
        assert_refused(work, ["prune", MODEL, "-o", "out.onnx", "--calib", "random:2", "--criterion", "l1",
                              "--flops-target", target], "--flops-target", runner=None if k == 0 else in_process)


def test_l1_without_flops_target_is_refused(work, in_process):
    assert_refused(work, ["prune", MODEL, "-o", "out.onnx", "--calib", "random:2", "--criterion", "l1"],
                   "--flops-target")
    assert_refused(work, ["prune", MODEL, "-o", "out.onnx", "--calib", "random:2", "--criterion", "random"],
                   "--flops-target", runner=in_process)


def test_unknown_input_shape_name_is_refused(work, in_process):
    shape = ("--input-shape", "images:1,3,32,32")
    assert_refused(work, ["prune", MODEL, "-o", "out.onnx", *PRUNE, *shape], "images")
    assert_refused(work, ["inspect", MODEL, *shape], "images", runner=in_process)
    assert_refused(work, ["apply", MODEL, "--plan", "plan.json", "-o", "out.onnx", *shape], "images",
                   runner=in_process)


def test_malformed_options_are_refused(work, in_process):
    assert_refused(work, ["prune", MODEL, *PRUNE], "-o")  # missing required option (click's own error)
    for args, keyword in ((["--input-shape", "input:1,3,x,32"], "integer"),
                          (["--input-shape", "input:1,4,32,32"], "dim 1"),
                          (["--criterion", "magic"], "criterion"),
                          (["--round-to", "0"], "--round-to"),
                          (["--batch-size", "many"], "batch-size")):
        assert_refused(work, ["prune", MODEL, "-o", "out.onnx", *PRUNE, *args], keyword, runner=in_process)


def test_a_memory_budget_that_is_not_bytes_is_refused(work, in_process, monkeypatch):
    for value in ("1GB", "-5"):
        monkeypatch.setenv("AOFP_ONNX_MEMORY_BUDGET", value)
        assert_refused(work, ["prune", MODEL, "-o", "out.onnx", "--calib", "random:2", "--flops-target", "0.5"],
                       "AOFP_ONNX_MEMORY_BUDGET", runner=in_process)


def _dynamic_hw(src, dst):
    model = onnx.load(src)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, sym in ((2, "height"), (3, "width")):
        dims[axis].Clear()
        dims[axis].dim_param = sym
    onnx.save(model, dst)


def test_dynamic_dims_without_input_shape_are_refused(work, in_process):
    _dynamic_hw(work / MODEL, work / "dyn.onnx")
    line = assert_refused(work, ["inspect", "dyn.onnx"], "dynamic", "--input-shape")
    assert "'input'" in line
    assert_refused(work, ["prune", "dyn.onnx", "-o", "out.onnx", *PRUNE], "dynamic", "--input-shape",
                   runner=in_process)
    # with the shape given it works
    proc = in_process("inspect", "dyn.onnx", "--input-shape", "input:1,3,32,32", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "MACs 13,549,888" in proc.stdout


# --- plans ------------------------------------------------------------------------------------------

def _edit_plan(edit):
    def make(d, built):
        plan = json.loads((d / "plan.json").read_text())
        edit(plan)
        (d / "bad_plan.json").write_text(json.dumps(plan))
        return "bad_plan.json"
    return make


def _first(plan):
    return next(iter(plan["groups"].values()))


def _out_of_range(plan):
    g = _first(plan)
    g["keep"] = g["keep"][:-1] + [g["width"]]


def _duplicate(plan):
    g = _first(plan)
    g["keep"] = g["keep"] + [g["keep"][0]]


def _empty(plan):
    _first(plan)["keep"] = []


def _unknown_group(plan):
    plan["groups"]["/no/such/Conv_output_0"] = {"width": 8, "keep": [0, 1]}


def _negative(plan):
    _first(plan)["keep"][0] = -1


def _not_json(d, built):
    (d / "bad_plan.json").write_text("{this is: not json,\n")
    return "bad_plan.json"


def _other_model(d, built):
    shutil.copy(built["vgg_plan"], d / "bad_plan.json")
    return "bad_plan.json"


def _missing_plan(d, built):
    return "no_plan.json"


def _wrong_format(d, built):
    (d / "bad_plan.json").write_text(json.dumps({"groups": []}))
    return "bad_plan.json"


BAD_PLANS = {
    "other_model": (_other_model, ["another model", "fingerprint"]),
    "out_of_range": (_edit_plan(_out_of_range), ["out of range"]),
    "negative_index": (_edit_plan(_negative), ["out of range"]),
    "duplicate_index": (_edit_plan(_duplicate), ["twice"]),
    "keeps_nothing": (_edit_plan(_empty), ["keeps no channel"]),
    "unknown_group": (_edit_plan(_unknown_group), ["/no/such/Conv_output_0", "does not exist"]),
    "not_json": (_not_json, ["not a JSON plan"]),
    "not_a_plan": (_wrong_format, ["not an aofp-onnx plan"]),
    "missing": (_missing_plan, ["no_plan.json", "no such plan"]),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
@pytest.mark.parametrize("command", ["apply", "verify"])
def test_bad_plan_is_refused(work, built, case, command, in_process):
    """apply runs as a real process; verify in this process."""
    make, keywords = BAD_PLANS[case]
    plan = make(work, built)
    if command == "apply":
        args = ["apply", MODEL, "--plan", plan, "-o", "out.onnx"]
    else:
        args = ["verify", MODEL, "pruned.onnx", "--plan", plan]
    assert_refused(work, args, *keywords, runner=None if command == "apply" else in_process)
