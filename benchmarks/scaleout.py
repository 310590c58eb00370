"""Wall time of 1 vs 2 processes/sessions: fine-tuning under torchrun, and the AOFP search over --devices.

    python benchmarks/scaleout.py [--repeats 3] [--epochs 2] [--samples 512] [--search-model models/mnist_cnn.onnx]
                                  [--max-trials 128] [--devices cpu,cpu] [--skip-finetune] [--skip-search]

1. Fine-tuning: the shipped MNIST CNN cut by L1 to half its MACs, supervised `finetune` on
   `--samples` labelled digits for `--epochs`, run as one process (with torch's default threads, and
   with OMP_NUM_THREADS=1 as torchrun gives each worker) and as `torchrun --nproc_per_node 2` (gloo on
   CPU), interleaved, `--repeats` times each. Printed: medians of the whole command's wall time and of
   the training itself (the report's `seconds`: training and validation, without start-up), the
   ratios to one process, and the accuracy each reaches on 500 held-out digits.
2. Search: `search_run.run` (AOFP to keep 0.5, `--max-trials`) on `--search-model` with one trial session
   and with `--devices`, interleaved, medians and ratio; the plans are checked to be identical.

Both are CPU figures on whatever this machine's cores are doing: torchrun gives each worker one
OpenMP thread (OMP_NUM_THREADS=1) while one process uses all cores, and two CPU sessions split the
cores that one session uses alone, so on a few shared cores expect little; the point of both is
several GPUs (NCCL, `--devices cuda:0,cuda:1`), which take the same code paths.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aofp_onnx import api, search_run  # noqa: E402

MODELS = ROOT / "models"


def timed(cmd: list[str], env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    report = cmd[cmd.index("--report") + 1]
    return wall, json.loads(Path(report).read_text())


def finetune(args, tmp: Path) -> None:
    cut = tmp / "cut.onnx"
    subprocess.run([sys.executable, "-m", "aofp_onnx", "prune", str(MODELS / "mnist_cnn.onnx"), "-o", str(cut),
                    "--calib", str(MODELS / "mnist_calib.npz"), "--criterion", "l1", "--flops-target", "0.5",
                    "--no-progress"], check=True, capture_output=True, cwd=ROOT)
    with np.load(MODELS / "mnist_test.npz") as t:
        x, y = t["input"], t["labels"]
    n = min(args.samples, 500)
    np.savez(tmp / "train.npz", input=x[:n], labels=y[:n])
    np.savez(tmp / "eval.npz", input=x[500:], labels=y[500:])
    common = ["finetune", str(cut), "--data", str(tmp / "train.npz"), "--eval", str(tmp / "eval.npz"),
              "--epochs", str(args.epochs), "--lr", "2e-3", "--device", "cpu", "--no-progress"]
    one = [sys.executable, "-m", "aofp_onnx"]
    runs = {  # name: (command prefix, environment)
        "1 process": (one, {}),
        "1 process, 1 thread": (one, {"OMP_NUM_THREADS": "1"}),
        "2 processes (torchrun)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "aofp_onnx"], {}),
    }
    walls, trains, accs = ({k: [] for k in runs} for _ in range(3))
    for r in range(args.repeats):
        for name, (prefix, env) in runs.items():
            out = tmp / f"ft{r}.onnx"
            wall, rep = timed(prefix + common + ["-o", str(out), "--report", str(tmp / f"ft{r}.json")], env)
            walls[name].append(wall)
            trains[name].append(rep["seconds"])
            accs[name].append(rep["accuracy"]["after"])
    print(f"fine-tuning: MNIST CNN cut to 0.5, supervised, {n} samples x {args.epochs} epochs, batch 32, "
          f"{args.repeats} interleaved repeats (medians)")
    base_wall, base_train = (np.median(v["1 process"]) for v in (walls, trains))
    for name in runs:
        w, t = np.median(walls[name]), np.median(trains[name])
        print(f"  {name:<24} command {w:6.1f} s (x{w / base_wall:.2f})   training {t:6.1f} s (x{t / base_train:.2f})"
              f"   accuracy {100 * np.median(accs[name]):.1f}%")


def search_time(args) -> None:
    pruner = api.Pruner.load(args.search_model, data=str(MODELS / "mnist_calib.npz"))
    runs = {"1 session": None, f"--devices {args.devices}": args.devices}
    times, keeps = {k: [] for k in runs}, {}
    for _ in range(args.repeats):
        for name, devices in runs.items():
            start = time.perf_counter()
            keep, _, info = search_run.run(pruner, "aofp", flops_target=0.5, provider="cpu", max_trials=args.max_trials,
                                           devices=devices)
            times[name].append(time.perf_counter() - start)
            keeps.setdefault(name, keep)
            assert np.array_equal(keep, keeps[name])
    same = all(np.array_equal(k, keeps["1 session"]) for k in keeps.values())
    print(f"search: AOFP on {Path(args.search_model).name}, {args.max_trials} trials, {args.repeats} interleaved "
          f"repeats (medians); plans identical: {same}")
    base = np.median(times["1 session"])
    for name in runs:
        t = np.median(times[name])
        print(f"  {name:<24} {t:6.1f} s (x{t / base:.2f})")
    if not same:
        sys.exit("the plans differ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=400, help="training digits (at most 500)")
    p.add_argument("--search-model", default=str(MODELS / "mnist_cnn.onnx"))
    p.add_argument("--max-trials", type=int, default=128)
    p.add_argument("--devices", default="cpu,cpu")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_finetune:
            finetune(args, Path(tmp))
    if not args.skip_search:
        search_time(args)


if __name__ == "__main__":
    main()
