"""What a run prints: the report of `prune`, `apply` and `finetune` as lines a person reads at a glance.

The fidelity lines come last before "wrote", and a collapsed output adds a loud warning (on stderr)
that names what to try.
"""
from __future__ import annotations

import click

from . import fidelity as fid


def cut_lines(rep: dict) -> list[str]:
    """MACs, params, groups, verification, latency, refit, accuracy of a `prune`/`apply` report."""
    ratio = rep["macs_after"] / max(rep["macs_before"], 1)
    out = [f"note    {note}" for note in rep.get("notes", [])]
    chosen = rep.get("criterion_auto")
    if chosen:
        out.append(f"search  --criterion auto -> {chosen['criterion']}: {chosen['why']}")
    out += [f"MACs    {rep['macs_before']:,} -> {rep['macs_after']:,}  (x{ratio:.3f})",
           f"params  {rep['params_before']:,} -> {rep['params_after']:,}  "
           f"(x{rep['params_after'] / max(rep['params_before'], 1):.3f})"]
    changed = sum(g["width_after"] != g["width_before"] for g in rep["groups"])
    out.append(f"groups  {changed} of {len(rep['groups'])} prunable groups narrowed")
    v = rep["verification"]
    out.append(f"verify  {'passed' if v['passed'] else 'FAILED'}: max abs diff {v['max_abs_diff']:.3g} vs the masked "
               f"original, verified on {v['samples']} samples ({v['provider']})")
    out += target_lines(rep)
    rec = rep.get("reconstruction")
    if rec:
        done = [c for c in rec["consumers"] if "skipped" not in c]
        # measured on the samples the fit used: a layer with more inputs than samples fits them exactly, so
        # this is no held-out figure (the fidelity line is)
        out.append(f"refit   {len(done)} layers re-fitted, {len(rec['consumers']) - len(done)} skipped, "
                   f"output error vs the original on the {rec['samples']} fitting samples "
                   f"{rec['output_error']['cut']:.3g} -> {rec['output_error']['reconstructed']:.3g} "
                   f"({rec['seconds']:.1f} s; held out: see fidelity; verify applies to the cut)")
    acc = rep.get("accuracy")
    if acc:
        out.append(f"accuracy {100 * acc['before']:.2f}% -> {100 * acc['after']:.2f}%  on {acc['samples']} samples")
    return out


def target_lines(rep: dict) -> list[str]:
    """Each target beside what was reached; latency with its spread and settings; the latency table."""
    out = []
    for what, t in (rep.get("targets") or {}).items():
        if t.get("target") is not None:
            reached = t["reached"] if what == "macs" else t["measured"] if t.get("measured") is not None \
                else t["estimated"]
            out.append(f"target  {what} x{t['target']:.3f}, reached x{reached:.3f}"
                       + (f" (estimated x{t['estimated']:.3f})" if what == "latency" else "")
                       + (f", {len(t['rounds'])} cuts measured" if len(t.get("rounds") or ()) > 1
                          else "")
                       + (f", latency/MACs {t['latency_per_macs']:.2f}" if "latency_per_macs" in t else ""))
            if t.get("note"):
                out.append(f"note    {t['note']}")
    lat = rep.get("latency_ms")
    if lat:
        shapes = " ".join(f"{k}:{','.join(map(str, v))}" for k, v in lat.get("input_shapes", {}).items())
        out.append(f"latency {lat['before']:.2f} ms -> {lat['after']:.2f} ms  (x{lat['after'] / lat['before']:.3f}, "
                   f"medians of {lat['repeats']} interleaved; p10-p90 {lat.get('before_p10', 0):.2f}-"
                   f"{lat.get('before_p90', 0):.2f} -> {lat.get('after_p10', 0):.2f}-{lat.get('after_p90', 0):.2f}; "
                   f"batch {lat['batch_size']}, {shapes}, {lat['provider']}, threads {lat.get('threads', 'default')})"
                   + ("  SLOWER than the original" if lat.get("slower") else ""))
    table = rep.get("latency_table")
    if table:
        share = 100 * table["seconds"] / max(rep.get("seconds", 0.0), 1e-9)
        built = "cached" if table["cached"] else f"built in {table['seconds']:.1f} s ({share:.0f}% of the run)"
        what = f"table of {table['node_configs']} layer configurations" if table["node_configs"] else "probes"
        out.append(f"round   --round-to {rep['round_to']['given']} -> {rep['round_to']['used']} (measured off-grid "
                   f"penalties {table['class_penalty']}; {what} {built})"
                   + (f"; multiples of {rep['round_to']['unreachable']} could not reach the target"
                      if rep["round_to"].get("unreachable") else ""))
        if rep["round_to"].get("latency_weighted"):
            searched = rep.get("criterion") in ("aofp", "oracle")
            where = " (in the rounding; the search chose by damage)" if searched else ""
            out.append(f"widths  hardware-aware: scores weighted by each group's measured latency per MAC{where}")
    rounded = rep.get("round_to") or {}
    if rounded.get("checks"):
        spent = "; the budget spent, the scores valued the rest" if rounded.get("budget_spent") else ""
        out.append(f"fit     widths landed on the target by the cut's output error (--round-by output): "
                   f"{rounded['checks']} forwards, {rounded['seconds']:.1f} s{spent}")
    trt = rounded.get("tensorrt")
    if trt and any(r["off"] for r in trt.values()):
        out.append("tensorrt " + "; ".join(f"{len(r['off'])} of {r['narrowed']} narrowed groups off {p.upper()}'s "
                                           f"multiple of {r['multiple']}" for p, r in trt.items())
                   + " (--round-to 8 or 32 aligns them)")
    return out


def prune_hints(rep: dict, *, reconstruct: bool, flops_target: float | None) -> tuple[str, ...]:
    hints = []
    if not reconstruct:
        hints.append("--reconstruct (a training-free least-squares re-fit)")
    if flops_target is not None:
        hints.append(f"a milder target (--flops-target {min(1.0, round(flops_target + 0.2, 2))})")
    else:
        hints.append("a lower --threshold")
    if rep.get("criterion") in ("l1", "random"):
        hints.append("the default --criterion auto (the descent with a target, else AOFP)")
    by_output = (rep.get("round_to") or {}).get("by") == "output"  # a classifier: the output error is read
    if flops_target is not None and by_output and rep.get("criterion") != "descent":
        hints.append("--criterion descent (one ablation per channel, widths by the output error)")
    hints.append("fine-tuning the result (aofp-onnx finetune OUT --teacher MODEL --data SRC)")
    return tuple(hints)


def finetune_lines(rep: dict, epochs: int) -> list[str]:
    """What `finetune` prints before the fidelity: the run, the kept epoch, the error and accuracy it moved."""
    best = rep.get("best") or {}
    procs = f", {rep['world_size']} processes" if rep.get("world_size", 1) > 1 else ""
    lines = [f"fine-tuned ({rep['mode']}, {rep['device']}{procs}, {rep['seconds']:.1f} s); kept epoch "
             f"{best.get('epoch', '-')} of {epochs}"]
    if "distill_error" in rep:
        d = rep["distill_error"]
        lines.append(f"output error vs teacher (validation): {d['before']:.4g} -> {d['after']:.4g}")
    if "accuracy" in rep:
        a = rep["accuracy"]
        teacher_acc = f" (teacher {100 * a['teacher']:.2f}%)" if "teacher" in a else ""
        lines.append(f"accuracy: {100 * a['before']:.2f}% -> {100 * a['after']:.2f}%{teacher_acc}")
    return lines


def show_fidelity(rep: dict, hints: tuple[str, ...], model: str = "pruned") -> None:
    """Echo the fidelity lines, and the warning on stderr when the output collapsed."""
    f = rep.get("fidelity")
    if not f:
        click.echo("fidelity not measured (no --teacher to compare with)")
        return
    for line in fid.lines(f, model):
        click.echo(line)
    if f["collapsed"]:
        click.echo(fid.warning(f, hints), err=True)
