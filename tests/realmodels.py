"""Real production models for the slow tests, fetched on demand into a cache.

PP-OCRv4 text detection (``ch_PP-OCRv4_det_infer.onnx``, a Paddle2ONNX export, opset 12, ~4.7 MB)
comes from the PyPI wheel ``rapidocr-onnxruntime==1.4.4``, where it is shipped as
``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``. The wheel is fetched with pip
(``pip download --no-deps``), the model is extracted and checked against a pinned SHA-256.

Model facts: one input ``x`` of shape [?, 3, ?, ?] (float32, NCHW); H and W must be multiples of 32
(other sizes fail inside the FPN's Add); output ``sigmoid_0.tmp_0`` of shape [N, 1, H, W].

Cache: ``cache_dir`` argument, else ``$AOFP_ONNX_CACHE``, else ``~/.cache/aofp-onnx/``.
Failures raise :class:`RealModelUnavailable` with a message saying what to do; the ``ppocr_det``
fixture in ``conftest.py`` turns that into a pytest skip.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

PPOCR_WHEEL_REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
PPOCR_WHEEL_GLOB = "rapidocr_onnxruntime-1.4.4-*.whl"
PPOCR_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
PPOCR_DET_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
PPOCR_DET_INPUT_NAME = "x"
PPOCR_DET_INPUT_SHAPE = (1, 3, 640, 640)  # any N, and H, W multiples of 32 (e.g. 1x3x160x160)
PPOCR_DET_OUTPUT_NAME = "sigmoid_0.tmp_0"


class RealModelUnavailable(RuntimeError):
    """The real model could not be fetched or failed its integrity check."""


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


def _download_wheel(cache: pathlib.Path, timeout: float) -> pathlib.Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--quiet", PPOCR_WHEEL_REQUIREMENT, "-d", str(cache),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RealModelUnavailable(
            f"PP-OCRv4 det model unavailable: `pip download {PPOCR_WHEEL_REQUIREMENT}` failed ({exc}). "
            f"Put the wheel or the .onnx in {cache} (or set AOFP_ONNX_CACHE) to run this test offline."
        ) from exc
    wheels = sorted(cache.glob(PPOCR_WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise RealModelUnavailable(
            f"PP-OCRv4 det model unavailable: `pip download --no-deps {PPOCR_WHEEL_REQUIREMENT}` "
            f"exited {proc.returncode} ({tail[0]}). No network? Put the wheel or "
            f"{pathlib.PurePath(PPOCR_DET_MEMBER).name} in {cache} (or set AOFP_ONNX_CACHE)."
        )
    return wheels[-1]


def _find_det_member(names: list[str]) -> str:
    if PPOCR_DET_MEMBER in names:
        return PPOCR_DET_MEMBER
    found = [n for n in names if n.startswith("rapidocr_onnxruntime/models/") and "det" in n and n.endswith(".onnx")]
    if len(found) != 1:
        raise RealModelUnavailable(f"expected one det .onnx under rapidocr_onnxruntime/models/ in the wheel, found {found}")
    return found[0]


def ppocr_det_path(cache_dir: str | os.PathLike | None = None, *, timeout: float = 600.0) -> pathlib.Path:
    """Path of ``ch_PP-OCRv4_det_infer.onnx`` in the cache, fetching the wheel first if needed."""
    cache = cache_root(cache_dir)
    target = cache / pathlib.PurePath(PPOCR_DET_MEMBER).name
    if target.is_file() and _sha256(target) == PPOCR_DET_SHA256:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RealModelUnavailable(f"cannot create the model cache {cache}: {exc}") from exc
    wheels = sorted(cache.glob(PPOCR_WHEEL_GLOB))
    wheel = wheels[-1] if wheels else _download_wheel(cache, timeout)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(_find_det_member(zf.namelist()))
    except (zipfile.BadZipFile, OSError) as exc:
        wheel.unlink(missing_ok=True)  # a truncated download: fetch again next time
        raise RealModelUnavailable(f"{wheel} is not a readable wheel ({exc}); removed, try again") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != PPOCR_DET_SHA256:
        raise RealModelUnavailable(
            f"PP-OCRv4 det model from {wheel.name} has sha256 {digest}, expected {PPOCR_DET_SHA256}"
        )
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".det-", suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return target


if __name__ == "__main__":  # pragma: no cover
    print(ppocr_det_path())
