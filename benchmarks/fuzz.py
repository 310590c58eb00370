"""Fuzz the cut: N random CNN graphs × P random plans each, every cut checked; exit 1 on any failure.

    python benchmarks/fuzz.py [-n 1000] [--plans 2] [--seed 0] [--jobs 4] [--show 5] [--convention NAME] [--no-cli]

Graphs come from tests/fuzzgraphs.py (the builder tests/test_fuzz.py drives with hypothesis), here
driven by a seeded numpy generator: graph i is `random_case(seed + i)`, so a failure is reproduced by
its seed alone. Each plan keeps a random non-empty subset of every prunable group. A plan fails when
the pruned model does not pass onnx.checker (full check), does not run in onnxruntime, differs from
the masked original (relative diff > 1e-4, `aofp_onnx.verify`), or its MACs differ from the
independent count of tests/reference_macs.py. 'original' counts generated graphs that are themselves
invalid (a generator bug), 'errors' exceptions raised inside aofp_onnx (analyze, cut, verify).

Each graph is written with exporter conventions drawn at random (tests/fuzzgraphs.py `Conventions`: batch
dynamic / pinned (also in Reshape constants) / -1, Constant-node weights, Paddle bias reshapes, NHWC with
Transposes, float16 with float16 or float32 inputs, opsets 11-21); `--convention NAME` forces one on every
graph, the others plain (a `fuzzgraphs.SWITCHES` name: pinned, minus1, constant, paddle_bias, nhwc, fp16,
fp16-io32, opset11 ... opset21).
Besides the API check at the analysis batch, the first plan of every graph also goes through the CLI
(tests/fuzzcli.py: `prune --criterion l1` and `apply` of a random plan, `--calib random:8`, then a run of
the written model on several samples); `--no-cli` skips that. The report ends with a table per convention:
graphs having it, failing graphs, and failures by kind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's aofp_onnx, not an installed one


def one(args):
    seed, plans, force, cli = args
    import tempfile

    import fuzzgraphs as fg

    case = fg.random_case(seed, force)
    outcome = fg.check_case(case.model, case.input_shape, [seed * 7919 + k for k in range(plans)], case.batch)
    failures = list(outcome.failures)
    if cli and not any(kind == "original" for kind, _ in failures):
        import fuzzcli

        with tempfile.TemporaryDirectory() as folder:
            try:
                failures += fuzzcli.check_case_cli(case, seed * 7919, Path(folder))
            except Exception as exc:  # noqa: BLE001 - a failure of the check itself is reported, not fatal
                failures.append(("error", f"cli check: {type(exc).__name__}: {exc}"))
    return seed, outcome.plans, failures, case.conventions + case.description, case.conventions


def convention_table(results) -> list[str]:
    """One row per convention tag: graphs with it, graphs failing, failures by kind."""
    import fuzzgraphs as fg

    kinds = list(fg.FAILURES) + ["cli", "declarations"]
    rows: dict[str, list[int]] = {}
    for _seed, _plans, failures, _description, tags in results:
        for tag in tags:
            row = rows.setdefault(tag, [0, 0] + [0] * len(kinds))
            row[0] += 1
            row[1] += bool(failures)
            for kind, _ in failures:
                row[2 + kinds.index(kind)] += 1
    head = f"{'convention':18s} {'graphs':>6s} {'failed':>6s} " + " ".join(f"{k[:8]:>8s}" for k in kinds)
    return [head] + [f"{tag:18s} {r[0]:6d} {r[1]:6d} " + " ".join(f"{v:8d}" for v in r[2:])
                     for tag, r in sorted(rows.items())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000, help="graphs (default 1000)")
    ap.add_argument("--plans", type=int, default=2, help="random plans per graph (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="first graph seed")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--show", type=int, default=5, help="failures printed per kind")
    ap.add_argument("--convention", default=None, help="force one convention on every graph (fuzzgraphs.SWITCHES)")
    ap.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI check of each graph")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    import fuzzgraphs as fg

    start = time.perf_counter()
    if a.convention is not None and a.convention not in fg.SWITCHES:
        ap.error(f"--convention must be one of {', '.join(fg.SWITCHES)}")
    work = [(a.seed + i, a.plans, a.convention, a.cli) for i in range(a.n)]
    kinds = list(fg.FAILURES) + ["cli", "declarations"]
    counts = {kind: 0 for kind in kinds}
    examples: dict[str, list[str]] = {kind: [] for kind in kinds}
    failed_graphs = plans_tried = 0
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, initializer=ort.set_default_logger_severity, initargs=(4,)) as pool:
            results = list(pool.map(one, work, chunksize=8))
    else:
        results = [one(w) for w in work]
    for seed, plans, failures, description, _tags in results:
        plans_tried += plans
        failed_graphs += bool(failures)
        for kind, msg in failures:
            counts[kind] += 1
            if len(examples[kind]) < a.show:
                examples[kind].append(f"seed {seed} {description}: {msg.strip().splitlines()[-1][:400]}")
    seconds = time.perf_counter() - start
    print(f"graphs tried            {a.n}  (seeds {a.seed}..{a.seed + a.n - 1})")
    print(f"plans tried             {plans_tried}")
    print(f"invalid generated       {counts['original']}")
    print(f"errors in aofp_onnx     {counts['error']}")
    print(f"checker failures        {counts['checker']}")
    print(f"runtime failures        {counts['runtime']}")
    print(f"non-equivalent outputs  {counts['nonequivalent']}")
    print(f"MACs mismatches         {counts['macs']}")
    print(f"CLI failures            {counts['cli']}  (exit != 0; 'declarations': {counts['declarations']})")
    print(f"graphs with a failure   {failed_graphs}")
    print(f"seconds                 {seconds:.1f}  ({a.jobs} worker(s))")
    for kind, lines in examples.items():
        for line in lines:
            print(f"  [{kind}] {line}")
    print()
    print("\n".join(convention_table(results)))
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
