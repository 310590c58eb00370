"""Fuzz the cut: N random CNN graphs × P random plans each, every cut checked; exit 1 on any failure.

    python benchmarks/fuzz.py [-n 1000] [--plans 2] [--seed 0] [--jobs 4] [--show 5]

Graphs come from tests/fuzzgraphs.py (the builder tests/test_fuzz.py drives with hypothesis), here
driven by a seeded numpy generator: graph i is `random_case(seed + i)`, so a failure is reproduced by
its seed alone. Each plan keeps a random non-empty subset of every prunable group. A plan fails when
the pruned model does not pass onnx.checker (full check), does not run in onnxruntime, differs from
the masked original (relative diff > 1e-4, `aofp_onnx.verify`), or its MACs differ from the
independent count of tests/reference_macs.py. 'original' counts generated graphs that are themselves
invalid (a generator bug), 'errors' exceptions raised inside aofp_onnx (analyze, cut, verify).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def one(args):
    seed, plans = args
    import fuzzgraphs as fg

    case = fg.random_case(seed)
    outcome = fg.check_case(case.model, case.input_shape, [seed * 7919 + k for k in range(plans)], case.batch)
    return seed, outcome.plans, outcome.failures, case.description


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000, help="graphs (default 1000)")
    ap.add_argument("--plans", type=int, default=2, help="random plans per graph (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="first graph seed")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--show", type=int, default=5, help="failures printed per kind")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    import fuzzgraphs as fg

    start = time.perf_counter()
    work = [(a.seed + i, a.plans) for i in range(a.n)]
    counts = {kind: 0 for kind in fg.FAILURES}
    examples: dict[str, list[str]] = {kind: [] for kind in fg.FAILURES}
    failed_graphs = plans_tried = 0
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, initializer=ort.set_default_logger_severity, initargs=(4,)) as pool:
            results = list(pool.map(one, work, chunksize=8))
    else:
        results = [one(w) for w in work]
    for seed, plans, failures, description in results:
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
    print(f"graphs with a failure   {failed_graphs}")
    print(f"seconds                 {seconds:.1f}  ({a.jobs} worker(s))")
    for kind, lines in examples.items():
        for line in lines:
            print(f"  [{kind}] {line}")
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
