"""A detection task on a third-party model: the characters of rendered captchas, judged by their boxes.

The model is ddddocr's YOLOX character detector (`ddddocr/common_det.onnx` in the wheel `ddddocr==1.6.1`,
fetched into the cache like the text-line classifier's, benchmarks/textlines.py): input `images`
[1, 3, 416, 416], raw 0-255 BGR pixels with the image at the top left of a grey (114) canvas, as the
wheel's `preproc` does; output [1, 3549, 6], per anchor of strides 8 / 16 / 32 its box offsets and
log-sizes, objectness and class score.

The data: captchas of 3-6 letters and digits (matplotlib's DejaVu fonts, 22-39 px) on a light background
crossed by 40 random lines; the renderer gives each character's box. A model's boxes are decoded as the
wheel does (grid plus offset times stride, exp of the log-sizes times stride; score = objectness x class
score > 0.1; NMS at IoU 0.45). Recall and precision match boxes one to one at IoU >= 0.5, against the
drawn characters and against the original model's boxes.

    python benchmarks/captchas.py calib OUT.npz [--samples N] [--seed S]   # {images}: prune --calib OUT.npz
    python benchmarks/captchas.py eval PRUNED.onnx [...] [--samples N] [--seed S]
"""
from __future__ import annotations

import argparse

import numpy as np

import textlines

SIDE, STRIDES = 416, (8, 16, 32)
CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghkmnpqrstuvwxyz23456789"


def captcha(rng, fonts) -> tuple[np.ndarray, np.ndarray]:
    """(image [3, 416, 416] float32 BGR 0-255, boxes [n, 4] x1 y1 x2 y2 of its characters)."""
    from PIL import Image, ImageDraw

    w, h = int(rng.integers(200, SIDE)), int(rng.integers(100, 200))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(150, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.line([x, y, x + int(rng.integers(-40, 40)), y + int(rng.integers(-40, 40))],
                  fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
    n, boxes = int(rng.integers(3, 7)), []
    for k in range(n):
        font = fonts[int(rng.integers(len(fonts)))][int(rng.integers(len(fonts[0])))]
        at = (10 + k * (w - 20) // n, int(rng.integers(5, h - 45)))
        char = CHARS[int(rng.integers(len(CHARS)))]
        draw.text(at, char, font=font, fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
        boxes.append(draw.textbbox(at, char, font=font))
    canvas = Image.new("RGB", (SIDE, SIDE), (114, 114, 114))
    canvas.paste(img, (0, 0))
    return np.asarray(canvas, np.float32)[:, :, ::-1].transpose(2, 0, 1).copy(), np.array(boxes, np.float64)


def make(samples: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    fonts, rng = textlines.load_fonts(), np.random.default_rng(seed)
    pairs = [captcha(rng, fonts) for _ in range(samples)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def decode(out: np.ndarray) -> np.ndarray:
    """The wheel's post-processing of one output [1, A, 6]: boxes [m, 4] kept by score and NMS."""
    grids, strides = [], []
    for s in STRIDES:
        xv, yv = np.meshgrid(np.arange(SIDE // s), np.arange(SIDE // s))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((len(grids[-1]), 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    p = out[0].astype(np.float64)
    xy, wh = (p[:, :2] + grid) * stride, np.exp(p[:, 2:4]) * stride
    score = (p[:, 4:5] * p[:, 5:]).max(1)
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[score > 0.1]
    order, kept = np.argsort(-score[score > 0.1]), []
    while order.size:
        kept.append(order[0])
        order = order[1:][iou(boxes[order[0]], boxes[order[1:]]) <= 0.45]
    return boxes[kept]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box `a` with each of `b` (the wheel's +1 pixel convention)."""
    inter = (np.maximum(0, np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]) + 1)
             * np.maximum(0, np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]) + 1))
    area = lambda x: (x[..., 2] - x[..., 0] + 1) * (x[..., 3] - x[..., 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def matched(truth: list[np.ndarray], found: list[np.ndarray]) -> tuple[float, float]:
    """(recall, precision) of `found` against `truth`, boxes matched one to one at IoU >= 0.5."""
    hits = 0
    for t, f in zip(truth, found):
        free = np.ones(len(f), bool)
        for box in t:
            if free.any():
                overlap = np.where(free, iou(box, f), 0)
                if overlap.max() >= 0.5:
                    hits += 1
                    free[overlap.argmax()] = False
    return hits / max(sum(map(len, truth)), 1), hits / max(sum(map(len, found)), 1)


def boxes_of(path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [decode(session.run(None, {"images": x[k:k + 1]})[0]) for k in range(len(x))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("calib", "eval"))
    parser.add_argument("paths", nargs="+", help="calib: OUT.npz; eval: the pruned models")
    parser.add_argument("--samples", type=int, default=None, help="default: 64 (calib), 128 (eval)")
    parser.add_argument("--seed", type=int, default=None, help="default: 0 (calib), 1 (eval)")
    args = parser.parse_args()
    original = textlines.corpus_model("ddddocr_det_yolox")
    calib = args.command == "calib"
    seed = args.seed if args.seed is not None else int(not calib)
    x, truth = make(args.samples or (64 if calib else 128), seed)
    if calib:
        np.savez(args.paths[0], images=x)
        print(f"{args.paths[0]}: {len(x)} captchas, {sum(map(len, truth))} characters; model {original}")
        return
    reference = boxes_of(original, x)
    print(f"{len(x)} captchas, {sum(map(len, truth))} characters (seed {seed})")
    print("| model | boxes | recall / precision vs drawn characters | vs the original's boxes |")
    print("|---|---|---|---|")
    for path in [original, *args.paths]:
        found = reference if path == original else boxes_of(path, x)
        r, p = matched(truth, found)
        ro, po = matched(reference, found)
        print(f"| {path} | {sum(map(len, found))} | {r:.3f} / {p:.3f} | {ro:.3f} / {po:.3f} |", flush=True)


if __name__ == "__main__":
    main()
