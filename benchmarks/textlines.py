"""A labelled real task on a third-party model: PP-OCR text-orientation classification (0° / 180°).

The model is PaddleOCR's `ch_ppocr_mobile_v2.0_cls_infer.onnx` (a MobileNetV3 Paddle2ONNX export,
input x [N, 3, 48, 192], softmax over the classes '0' and '180'), shipped in the PyPI wheel
`rapidocr-onnxruntime==1.4.4`: the test corpus's `ppocr_mobile_v2_cls` (tests/realmodels.py: fetched with
`pip download --no-deps` into the cache, `$AOFP_ONNX_CACHE` or ~/.cache/aofp-onnx, and checked against a
pinned SHA-256).

The data is made from what packages ship: text lines of words taken from numpy's and matplotlib's own
sources, drawn with Pillow in matplotlib's DejaVu fonts (sizes 22-39 px, grey levels, margins varied),
half of them rotated by 180° (label 1), then preprocessed as rapidocr does for the classifier: resized
to height 48 keeping the aspect ratio (width at most 192), scaled to [-1, 1], right-padded with 0 to 192.

    python benchmarks/textlines.py OUT.npz [--samples N] [--seed S]   # writes {x, labels}
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the corpus of real models
import realmodels  # noqa: E402

FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf",
         "DejaVuSerif-Bold.ttf")
HEIGHT, WIDTH = 48, 192


def cache_dir() -> pathlib.Path:
    return realmodels.cache_root()


def fetch_model() -> pathlib.Path:
    """The classifier in the cache (downloaded with pip once), checked against its SHA-256."""
    return corpus_model("ppocr_mobile_v2_cls")


def corpus_model(model_id: str) -> pathlib.Path:
    """The test corpus's model `model_id` in the cache (tests/realmodels.py); exits with the reason when it
    cannot be had."""
    try:
        return realmodels.corpus_model_path(model_id)
    except realmodels.RealModelUnavailable as exc:
        raise SystemExit(f"{model_id}: {exc}") from None


def load_fonts() -> list[list]:
    """matplotlib's DejaVu fonts, each at sizes 22-39 px."""
    import matplotlib
    from PIL import ImageFont

    folder = pathlib.Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return [[ImageFont.truetype(str(folder / f), size) for size in range(22, 40)] for f in FONTS]


def words() -> list[str]:
    import matplotlib

    text = pathlib.Path(np.__file__).read_text() + pathlib.Path(matplotlib.__file__).read_text()
    return sorted(set(re.findall(r"[A-Za-z][a-z]{2,}", text)))


def line(rng, words, fonts):
    from PIL import Image, ImageDraw

    font = fonts[int(rng.integers(len(fonts)))][int(rng.integers(22, 40)) - 22]
    text = " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
    if rng.random() < 0.3:
        text += f" {int(rng.integers(10000))}"
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 8))
    bg, fg = int(rng.integers(170, 256)), int(rng.integers(0, 90))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (bg,) * 3)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(fg,) * 3)
    return img


def _preprocess(img) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    width = min(WIDTH, int(np.ceil(HEIGHT * w / h)))
    a = np.asarray(img.resize((width, HEIGHT), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :width] = (a - 0.5) / 0.5
    return out


def make(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [samples, 3, 48, 192] float32, labels: 0 upright, 1 rotated by 180°)."""
    fonts = load_fonts()
    rng = np.random.default_rng(seed)
    vocab = words()
    xs, labels = [], rng.integers(0, 2, samples)
    for label in labels:
        img = line(rng, vocab, fonts)
        xs.append(_preprocess(img.rotate(180) if label else img))
    return np.stack(xs), labels.astype(np.int64)


def write(doc: str, make, fetch_model, what: str):
    """The command line of a task's data: OUT.npz [--samples N] [--seed S] -> {x, labels}."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, labels = make(args.samples, args.seed)
    np.savez(args.out, x=x, labels=labels)
    print(f"{args.out}: {len(x)} {what}, classes {np.bincount(labels).tolist()}; model {fetch_model()}")


def main():
    write(__doc__, make, fetch_model, "text lines")


if __name__ == "__main__":
    main()
