"""AOFP's estimators and damage points against the exact oracle, L1 and random on labelled real tasks.

    python benchmarks/estimators.py [--tasks digits ocr-cls] [--keeps 0.7 0.5] [--seeds 0 1 2]

Tasks: `digits`, the narrow ResNet-20 trained here (models/resnet20_digits.onnx, MNIST digits);
`ocr-cls`, PaddleOCR's text-orientation classifier from the rapidocr wheel on Pillow-rendered text
lines (benchmarks/textlines.py); `orientation`, RapidAI's PP-LCNet document-orientation classifier on
rendered pages rotated by 0/90/180/270° (benchmarks/pages.py). All in this one run, on the same
calibration samples and provider:

1. per damage point (next, block, output; `auto` resolves to one of them, see aofp_onnx/damage_point.py)
   and normalization (`--damage-norm`: relative per sample, over the batch (the paper's), or auto, the
   default: per sample on these classifiers; see aofp_onnx/trial.py and damage_point.py): the same
   `--spearman-trials` random-half trials at full width through each trial graph, and per estimator
   (mean; ridge at each `--ridges` λ) the Spearman rank correlation of its per-channel estimate with
   the oracle's first-round damage (single-channel ablation at the outputs), pooled over all channels and
   averaged within groups (groups wider than 2);
2. per MACs target: search wall and CPU time of the oracle (one greedy run to the deepest target, timed
   as it passes the milder ones: the same as a run to each) and of every AOFP variant (median over seeds;
   one variant per estimator, damage point, normalization and `--thresholds` value);
3. per MACs target, test accuracy of the cut without recovery and after least-squares reconstruction
   (`--reconstruct`, on `--recon-samples` calibration samples): oracle, every AOFP variant (mean and
   min over seeds), the descent criterion (`--descent-step`: `prune --criterion descent --round-to K`;
   one run, nothing in it is random), L1, random (mean over seeds); then the issue's checks for the
   default settings (without recovery the variant the default `--accept-by` runs when the cut ships as
   it is, with reconstruction the one it runs under `--reconstruct`, the same unless the default is
   `auto`) and for the descent.

Variants are named ESTIMATOR@POINT/NORM[ by=ACCEPT][ t=THRESHOLD][ fit=K] (by: `--accept-by`, its default
where not given; `by=auto` resolves as `prune` without `--reconstruct` does; fit=K: the widths then rounded to
multiples of K and landed on the target by the cut's output error, `prune --round-to K --round-by output`,
its forwards counted in the search time). `--no-oracle` leaves the oracle
out (the orientation classifier's costs about two minutes per ranking here); `--oracle-cache` reuses an
earlier run's oracle (experiments).
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import statistics
import time

import numpy as np

from aofp_onnx.api import Pruner, accuracy
from aofp_onnx.calib import input_specs, load_data
from aofp_onnx.check import DownstreamParts
from aofp_onnx.criteria import l1_scores, random_scores, resolve_auto
from aofp_onnx.damage_point import resolve, resolve_accept, resolve_norm
from aofp_onnx.descent import descend, ranking
from aofp_onnx.estimate import ESTIMATORS, RIDGE, mean_scores, ridge_scores
from aofp_onnx.masking import masked_model
from aofp_onnx.oracle import oracle, output_damage
from aofp_onnx.reconstruct import reconstruct
from aofp_onnx.runtime import Runner
from aofp_onnx.search import ACCEPT_BY, DEFAULT_ACCEPT_BY, DEFAULT_DAMAGE_AT, DEFAULT_ESTIMATOR, aofp, default_threshold
from aofp_onnx.search_run import CutErrors, check_batches
from aofp_onnx.select import round_widths, select_by_score
from aofp_onnx.statefile import data_digest
from aofp_onnx.surgery import cut
from aofp_onnx.trial import DAMAGE_AT, DAMAGE_NORMS, DEFAULT_DAMAGE_NORM, TrialEngine
from aofp_vs_oracle import spearman

DEFAULT = f"{DEFAULT_ESTIMATOR}@{DEFAULT_DAMAGE_AT}/{DEFAULT_DAMAGE_NORM}"


def task_data(name: str, args):
    """(model path, search calibration path, test path) of a task."""
    if name == "digits":
        return "models/resnet20_digits.onnx", "models/mnist_calib.npz", "models/mnist_test.npz"
    import pages
    import textlines

    module = {"ocr-cls": textlines, "orientation": pages}[name]
    model = module.fetch_model()
    paths = []
    for label, n, seed in (("calib", args.recon_samples, 100), ("test", args.test_samples, 200)):
        path = textlines.cache_dir() / f"{module.__name__}_{label}_{n}_{seed}.npz"
        if not path.exists():
            x, labels = module.make(n, seed)
            np.savez(path, x=x, labels=labels)
        paths.append(str(path))
    return str(model), *paths


def run_task(name: str, args) -> list[str]:
    model, calib, test_path = task_data(name, args)
    pruner = Pruner.load(model, data=calib, limit=args.recon_samples)
    cmap = pruner.cmap
    recon_data = pruner.data
    search_data = recon_data.take(args.samples)
    batches = list(search_data.batches(args.batch))
    test = load_data(test_path, input_specs(pruner.graph.model), labels=True)
    original = accuracy(pruner.graph.data, test, args.provider)
    print(f"\n=== {name}: {model}; {cmap.total_macs:,} MACs, {len(cmap.prunable)} prunable groups of "
          f"{len(cmap.groups)}, {cmap.n_slots} channels; search on {len(search_data)} samples in batches of "
          f"{args.batch}, reconstruction on {len(recon_data)}; test {len(test)} samples, original "
          f"{100 * original:.2f}%", flush=True)
    variants = args.variants or grid(args)
    sites = sorted({variant_parts(v)[1] for v in variants})  # "auto/sample": one trial graph each
    masked = Runner(masked_model(cmap), args.provider)  # the oracle's and --accept-by output's model
    points = {d: resolve(cmap, d) for d in {site.split("/")[0] for site in sites}}  # auto: damage_point's choice
    for d, (point, auto) in points.items():
        if auto:
            print(f"   damage-at auto -> {point} (MACs ratio output/next {auto['macs_ratio']:.2f}, limit "
                  f"{auto['limit']:g})", flush=True)
    engines = {site: TrialEngine(cmap, args.provider, damage_at=points[site.split("/")[0]][0],
                                 damage_norm=site.split("/")[1]) for site in sites}

    descent_rank = ranking(cmap, resolve(cmap, "auto")[0], resolve_norm(cmap, "auto"), args.provider)[0]

    def search(variant, seed, target, trials_per_half=args.trials_per_half, max_trials=None):
        est, at, t, by, fit = variant_parts(variant)
        by = resolve_accept(cmap, points[at.split("/")[0]][0], by)
        t = default_threshold(by) if t is None else t
        counter = iter(range(1 << 40))
        engine = engines[at]
        stack = min(trials_per_half, engine.max_stack(args.batch), 8)

        def damage(keep, rows):
            return engine.damage(keep, rows, batches[next(counter) % len(batches)])

        measure, checked_on = DownstreamParts(cmap, args.provider).check(), check_batches(batches)

        def check(keep, slots):  # --accept-by output, on the samples search_run.run checks on
            return measure(checked_on, keep, slots)

        keep, scores, stats = aofp(cmap, damage, threshold=t, trials_per_half=trials_per_half, flops_target=target,
                                   max_trials=max_trials, seed=seed, stack=stack, estimator=est,
                                   check=check if by == "output" else None)
        if fit:  # prune's rounding to multiples of `fit`, its steps valued by the output error (--round-by output)
            keep = round_widths(cmap, keep, scores, fit, 1, target, damage=CutErrors(cmap, batches, args.provider))
        return keep, scores, stats

    def scores_of(keep):
        pruned = cut(cmap, keep)
        fitted, _ = reconstruct(cmap, keep, pruned, recon_data, provider=args.provider)
        return accuracy(pruned, test, args.provider), accuracy(fitted, test, args.provider)

    lines = []
    spearman_points = [] if args.no_spearman else list(engines)
    if spearman_points:
        oracle_first = output_damage(masked, batches, cmap.full_keep(), np.arange(cmap.n_slots), 8)  # 1st round
        print(f"\n{name}: Spearman with the oracle's single-channel output damage, {args.spearman_trials} random-half "
              f"trials at full width per damage point (pooled / mean within groups; trial time)")
    estimators = [("mean", mean_scores)] + [(f"ridge λ={r:g}", lambda m, y, r=r: ridge_scores(m, y, r))
                                            for r in args.ridges]
    for at in spearman_points:
        start = time.perf_counter()
        masks, damage = full_width_trials(cmap, engines[at], batches, args.spearman_trials, args.seeds[0])
        seconds = time.perf_counter() - start
        for label, fn in estimators:
            est = np.zeros(cmap.n_slots)
            for k, g in enumerate(cmap.prunable):
                est[g.slots] = fn(masks[k], damage[:, k])
            within = [spearman(est[g.slots], oracle_first[g.slots]) for g in cmap.prunable if g.width > 2]
            print(f"   {at:<14} {label:<14} {spearman(est, oracle_first):6.3f} / {np.mean(within):6.3f}   "
                  f"({seconds:.1f} s)", flush=True)
    targets = [] if args.spearman_only else sorted(args.keeps, reverse=True)
    oracle_runs = {}
    cached = oracle_cache(args, model, batches, targets)
    if cached is not None and cached.exists():
        saved = np.load(cached)
        oracle_runs = {t: (saved[f"keep_{t}"], *saved[f"seconds_{t}"]) for t in targets}
        print(f"   oracle runs read from {cached} (their times are an earlier run's)", flush=True)
    elif targets and not args.no_oracle:  # one greedy run to the deepest target passes through the milder ones
        passing = {t: None for t in targets[:-1]}
        start, cpu = time.perf_counter(), time.process_time()
        keep_o, _, stats_o = oracle(cmap, masked, batches, flops_target=targets[-1], stack=8,
                                    oracle_step=args.oracle_step, passing=passing,
                                    parts=DownstreamParts(cmap, args.provider),
                                    progress=lambda st, macs, n, _: print(f"   [{name}] oracle ranking {st.rounds}: "
                                                                           f"{n} candidates, MACs x{macs:.3f}, "
                                                                           f"{time.perf_counter() - start:.0f} s",
                                                                           flush=True))
        oracle_runs = {**passing, targets[-1]: (keep_o, time.perf_counter() - start, time.process_time() - cpu)}
        if cached is not None:
            np.savez(cached, **{f"keep_{t}": k for t, (k, *_) in oracle_runs.items()},
                     **{f"seconds_{t}": np.array(secs) for t, (_, *secs) in oracle_runs.items()})
    chosen = resolve_auto(pruner, min(targets, default=None), None, [], args.batch)  # the same at any target
    for target in targets:
        rows = {}
        if target in oracle_runs:
            keep_o, oracle_s, oracle_cpu = oracle_runs[target]
            print(f"   [{name} x{target}] oracle: {oracle_s:.1f} s (CPU {oracle_cpu:.1f} s)", flush=True)
            rows["oracle"] = ([scores_of(keep_o)], [oracle_s], [oracle_cpu])
        for variant in variants:
            accs, secs, cpus = [], [], []
            for seed in args.seeds:
                start, cpu = time.perf_counter(), time.process_time()
                keep, _, _ = search(variant, seed, target)
                secs.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
                accs.append(scores_of(keep))
            rows[f"aofp {variant}"] = (accs, secs, cpus)
            print(f"   [{name} x{target}] aofp {variant}: {np.mean(accs, axis=0)} {np.median(secs):.1f} s "
                  f"(CPU {np.median(cpus):.1f} s)", flush=True)
        if args.descent_step:  # deterministic: one run
            start, cpu = time.perf_counter(), time.process_time()
            keep, _, info = descend(cmap, descent_rank, check_batches(batches), target=target, step=args.descent_step,
                                    errors=CutErrors(cmap, batches, args.provider))
            rows["descent"] = ([scores_of(keep)], [time.perf_counter() - start], [time.process_time() - cpu])
            print(f"   [{name} x{target}] descent: {rows['descent'][0][0]} {rows['descent'][1][0]:.1f} s "
                  f"({info['forwards']} forwards)", flush=True)
        rows["l1"] = ([scores_of(select_by_score(cmap, l1_scores(cmap), target))], [0.0], [0.0])
        rows["random"] = ([scores_of(select_by_score(cmap, random_scores(cmap, s), target)) for s in args.seeds],
                          [0.0], [0.0])
        reaches = f" (oracle reaches x{cmap.macs(keep_o) / cmap.total_macs:.3f})" if "oracle" in rows else ""
        print(f"\n{name}, keep {target} of the MACs{reaches}: test accuracy without / with reconstruction (mean over "
              f"seeds; min), search time: wall and CPU "
              f"(this process, all threads: what other jobs on a shared machine do not inflate), and x less than "
              f"the oracle's")
        width = max(22, *map(len, rows))
        print(f"   {'criterion':<{width}} {'no recovery':>20} {'reconstructed':>20} {'search s':>9} {'CPU s':>9} "
              f"{'vs oracle':>13}")
        for label, (accs, secs, cpus) in rows.items():
            a = 100 * np.array(accs)
            sec, cpu = statistics.median(secs), statistics.median(cpus)
            versus = sec > 0 and "oracle" in rows and label != "oracle"
            ratio = f"x{oracle_s / sec:.1f} / x{oracle_cpu / cpu:.1f}" if versus else ""
            print(f"   {label:<{width}} {a[:, 0].mean():7.2f}% ({a[:, 0].min():6.2f}%) {a[:, 1].mean():7.2f}% "
                  f"({a[:, 1].min():6.2f}%) {sec:9.1f} {cpu:9.1f} {ratio:>13}")
        # the default settings (--criterion auto: the descent or AOFP, resolve_auto) and AOFP's defaults, also when
        # run under the names auto resolves to (e.g. --damage-norm sample, and --accept-by: without recovery it may
        # check at the outputs, with --reconstruct it may not)
        print(f"   [{name} x{target}] default settings: --criterion auto -> {chosen['criterion']} ({chosen['why']})",
              flush=True)
        descent_row, aofp_default = {0: "descent", 1: "descent"}, {k: default_row(rows, cmap, bool(k)) for k in (0, 1)}
        default, other = (descent_row, aofp_default) if chosen["criterion"] == "descent" else (aofp_default, descent_row)
        checked = [row for row in (default, other) if row[0] in rows and row[1] in rows]  # each that ran
        mean = lambda key, k: float(np.mean(np.array(rows[key][0])[:, k]))  # noqa: E731
        for row in checked:
            for k, kind in ((0, "no recovery"), (1, "reconstructed")):
                acc = mean(row[k], k)
                # one test set's resolution: the binomial standard error of an accuracy p on n samples
                se = 100 * np.sqrt(acc * (1 - acc) / len(test))
                lines.append(f"{name} x{target} {kind} ({row[k]}{', the default' * (row == default)}): "
                             f"{100 * acc:.2f}% >= L1 "
                             f"{100 * mean('l1', k):.2f}%: {acc >= mean('l1', k)}; >= random "
                             f"{100 * mean('random', k):.2f}%: {acc >= mean('random', k)} (standard error of one "
                             f"accuracy on these {len(test)} test samples: {se:.2f} points)")
            if "oracle" not in rows:
                continue
            gap = 100 * (mean("oracle", 0) - mean(row[0], 0))
            lines.append(f"{name} x{target}: oracle - {row[0]} (no recovery) {gap:.2f} points (<= 2: {gap <= 2})")
            for k in (0, 1) if row[0] != row[1] else (0,):
                d = rows[row[k]]
                speed, speed_cpu = oracle_s / statistics.median(d[1]), oracle_cpu / statistics.median(d[2])
                lines.append(f"{name} x{target}: {row[k]} search x{speed:.1f} faster than the oracle in wall time, "
                             f"x{speed_cpu:.1f} in CPU time (>= 10: {speed >= 10}, {speed_cpu >= 10})")

    return lines


def default_row(rows: dict, cmap, refit: bool) -> str | None:
    """The row of the default settings (with or without `--reconstruct`), under any name it was run as."""
    point = resolve(cmap, DEFAULT_DAMAGE_AT)[0]
    by = resolve_accept(cmap, point, DEFAULT_ACCEPT_BY, refit)
    names = [f"aofp {DEFAULT_ESTIMATOR}@{at}/{norm}{suffix}" for at in (DEFAULT_DAMAGE_AT, point)
             for norm in (DEFAULT_DAMAGE_NORM, resolve_norm(cmap, DEFAULT_DAMAGE_NORM))
             for suffix in [f" by={by}"] + ([""] if resolve_accept(cmap, point, DEFAULT_ACCEPT_BY) == by else [])]
    # (a variant named without by= runs the default --accept-by, resolved as without --reconstruct)
    return next((n for n in names if n in rows), None)


def oracle_cache(args, model: str, batches, targets) -> pathlib.Path | None:
    """With --oracle-cache: where the oracle's runs for this model, data, targets and step are kept."""
    if not args.oracle_cache:
        return None
    import textlines

    h = hashlib.sha256(pathlib.Path(model).read_bytes())
    # "parts": the oracle's runs since it ablates on each group's downstream part (earlier runs timed the whole)
    h.update(f"{data_digest(batches)} {targets} {args.oracle_step} {args.provider} parts".encode())
    return textlines.cache_dir() / f"oracle_{h.hexdigest()[:16]}.npz"


def grid(args) -> list[str]:
    """Every estimator x damage point x normalization x threshold; a threshold given is said in the variant's
    name: "mean@auto/sample t=0.0016"."""
    return [f"{e}@{d}/{n}" + (f" t={t:g}" if t is not None else "") for t in args.thresholds or [None]
            for d in args.damage_at for n in args.damage_norm for e in args.estimators]


def variant_parts(variant: str) -> tuple[str, str, float, str, int | None]:
    """"mean@auto/sample by=output t=0.001 fit=8" -> ("mean", "auto/sample", 0.001, "output", 8) (`--accept-by`,
    its default where not given; the threshold None where not given: search_run.run's default for the resolved
    --accept-by; fit: the widths rounded to multiples of 8 and landed on the target by the output error, as
    `prune --round-to 8 --round-by output` does, None where not given); ValueError for a malformed name."""
    name, *extra = variant.split()
    est, _, site = name.partition("@")
    at, _, norm = site.partition("/")
    opts = dict(e.partition("=")[::2] for e in extra)
    by = opts.pop("by", DEFAULT_ACCEPT_BY)
    if (est not in ESTIMATORS or at not in (*DAMAGE_AT, "auto") or norm not in DAMAGE_NORMS or by not in ACCEPT_BY
            or set(opts) - {"t", "fit"} or not opts.get("fit", "1").isdigit()):
        raise ValueError(f"variant {variant!r}: want ESTIMATOR@POINT/NORM[ by=ACCEPT][ t=THRESHOLD][ fit=K] with "
                         f"estimator in {ESTIMATORS}, point in {(*DAMAGE_AT, 'auto')}, norm in {DAMAGE_NORMS}, accept "
                         f"in {ACCEPT_BY}")
    return est, site, float(opts["t"]) if "t" in opts else None, by, int(opts["fit"]) if "fit" in opts else None


def full_width_trials(cmap, engine, batches, trials: int, seed: int, stack: int = 8):
    """`trials` rows of random halves of every group at full width: per group masks [T, width], damage [T, G]."""
    rng = np.random.default_rng(seed)
    keep = cmap.full_keep()
    masks = [np.zeros((trials, g.width), dtype=bool) for g in cmap.prunable]
    damage = np.zeros((trials, len(cmap.prunable)))
    for start in range(0, trials, stack):
        rows = np.ones((min(stack, trials - start), cmap.n_slots + 1), np.float32)
        for k, g in enumerate(cmap.prunable):
            for j in range(len(rows)):
                local = rng.choice(g.width, g.width // 2, replace=False)
                masks[k][start + j, local] = True
                rows[j, g.slots[local]] = 0.0
        damage[start:start + len(rows)] = engine.damage(keep, rows, batches[(start // stack) % len(batches)])
    return masks, damage


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "ocr-cls"],
                        choices=["digits", "ocr-cls", "orientation"])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--damage-at", nargs="+", default=list(DAMAGE_AT), choices=[*DAMAGE_AT, "auto"])
    parser.add_argument("--damage-norm", nargs="+", default=[DEFAULT_DAMAGE_NORM], choices=DAMAGE_NORMS)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples of the searches")
    parser.add_argument("--recon-samples", type=int, default=256, help="calibration samples of the reconstruction")
    parser.add_argument("--test-samples", type=int, default=512, help="ocr-cls, orientation: rendered test samples")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="AOFP thresholds to compare (default: search_run.run's for the --accept-by each variant "
                             "resolves to); a target the threshold cannot reach raises it by x1.25 until it can")
    parser.add_argument("--variants", nargs="+", default=None,
                        help='AOFP variants by name instead of the grid of the four options above, e.g. '
                             '"mean@auto/sample" "mean@output/batch t=0.001"')
    parser.add_argument("--trials-per-half", type=int, default=8)
    parser.add_argument("--spearman-trials", type=int, default=64)
    parser.add_argument("--ridges", type=float, nargs="+", default=sorted({RIDGE, 0.1, 1.0}),
                        help="ridge λ values (relative) the Spearman table compares")
    parser.add_argument("--oracle-step", type=int, default=None,
                        help="channels the oracle removes per ranking (default: 1/16 of the candidates)")
    parser.add_argument("--oracle-cache", action="store_true",
                        help="keep the oracle's runs in the cache and reuse them (for experiments: the ratios then "
                             "compare with an earlier run's times)")
    parser.add_argument("--no-oracle", action="store_true", help="AOFP, L1 and random only (no oracle column)")
    parser.add_argument("--no-spearman", action="store_true", help="only the accuracy tables")
    parser.add_argument("--spearman-only", action="store_true", help="only the Spearman table (and one oracle run)")
    parser.add_argument("--descent-step", type=int, default=8,
                        help="the descent criterion's row, in steps of this many channels (prune --round-to); 0: none")
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args()
    for variant in args.variants or []:
        try:
            variant_parts(variant)
        except ValueError as err:
            parser.error(str(err))
    checks = []
    for name in args.tasks:
        checks += run_task(name, args)
    print(f"\nchecks for the default settings (--criterion auto: the descent where a target is given and its ranking "
          f"is affordable, as each task's lines above say), the descent and AOFP's defaults ({DEFAULT}):")
    for line in checks:
        print("   " + line)


if __name__ == "__main__":
    main()
