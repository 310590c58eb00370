"""The Python API; the CLI is a thin layer over these functions.

    load → analyze → (criterion → keep) → cut → verify → save + report

`Pruner` (module `pruner`) holds one loaded model and its channel map so several plans can be tried
without reloading.
Every function that writes refuses an output path equal to the input and writes atomically.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import onnx

from . import fidelity as fid
from .calib import Data, ImageOptions, apply_input_shapes, input_specs, load_data
from .count import count_params
from .criteria import CRITERIA, DESCENT_OPTIONS, check_criterion, choose_keep, resolve_auto  # noqa: F401 (API)
from .batch import working_model
from .errors import InputError, VerificationError
from .graph import load_model, read_model
from .modeldata import ModelData, split_weights
from .groups import analyze  # noqa: F401 (API name)
from .io import release_memory
from .plan import Plan, keep_from_plan, plan_from_keep
from .progress import QUIET, Phases
from .latency import measure_latency
from .runtime import Runner
from .save import check_output_path, check_outputs, save_model  # noqa: F401 (the CLI checks paths through api)
from .targets import (check_round_by, check_targets, fit_fields, latency_weights, meet_measured, missed_note,
                      parse_round_to, resolve_round_by, resolve_round_to, round_to_target, slower_hint, stderr_line,
                      step_errors, targets_reached, tensorrt_widths)
from .pruner import VERIFY_SAMPLES, Pruner
from .verify import Verification, verify

AUTO_BATCH = 8  # batch of the whole-model alignment probes behind --round-to auto (without a latency target)
RECONSTRUCT_SAMPLES = 256  # calibration samples `apply --reconstruct` loads (reconstruct.SAMPLES)


def inspect(path, input_shapes: dict | None = None) -> dict:
    """Groups, MACs, params and the prunable share of a model (the `inspect --json` contract)."""
    return Pruner.load(path, input_shapes=input_shapes).inspect()


def accuracy(model: onnx.ModelProto | ModelData, data: Data, provider: str, batch_size: int = 256) -> float:
    """Top-1 accuracy of the first output's argmax over axis 1 against `data.labels`."""
    runner = Runner(model, provider)
    correct = 0
    for k, feeds in enumerate(data.batches(batch_size)):
        logits = runner.run(feeds)[0]
        labels = data.labels[k * batch_size: k * batch_size + len(logits)]
        correct += int((logits.reshape(len(logits), -1).argmax(axis=1) == labels).sum())
    return correct / len(data)


def report(pruner: Pruner, keep: np.ndarray, pruned: ModelData, verification: Verification,
           criterion: str, search: dict, latency: dict | None) -> dict:
    cm = pruner.cmap
    return {
        "model": pruner.path,
        "criterion": criterion,
        "notes": pruner.notes,
        "macs_before": cm.total_macs,
        "macs_after": cm.macs(keep),
        "params_before": count_params(pruner.graph.model),
        "params_after": count_params(pruned.proto),
        "groups": [{"id": g.id, "width_before": g.width, "width_after": int(keep[g.slots].sum())}
                   for g in cm.prunable],
        "verification": verification.to_json(),
        "latency_ms": latency,
        "search": search,
    }


def apply_plan(model_path, plan_path, output, *, calib: str | None = None, input_shapes: dict | None = None,
               provider: str = "auto", latency: bool = False, reconstruct: bool = False, eval_src: str | None = None,
               verify_samples: int = VERIFY_SAMPLES, progress: bool = False) -> dict:
    """Cut `model_path` as `plan_path` says, verify, [reconstruct,] and write `output`; returns the report."""
    check_output_path(model_path, output)
    if reconstruct and not calib:
        raise InputError("--reconstruct needs calibration data (--calib)")
    _check_verify_samples(verify_samples)
    limit = max(RECONSTRUCT_SAMPLES if reconstruct else 0, verify_samples)
    pruner = Pruner.load(model_path, input_shapes=input_shapes, data=calib, limit=limit, hold_out=True)
    plan = Plan.load(plan_path)
    keep = keep_from_plan(pruner.cmap, plan, label=os.fspath(plan_path))
    labelled = _labelled(pruner, eval_src)
    before = accuracy(pruner.graph.data, labelled, provider) if labelled is not None else None
    rep, pruned = finish(pruner, keep, output, criterion=plan.criterion or "plan",
                         search={"trials": 0, "seconds": 0.0}, provider=provider, latency=latency,
                         reconstruct=reconstruct, verify_samples=verify_samples, phases=Phases(progress))
    if labelled is not None:
        rep["accuracy"] = {"before": before, "after": accuracy(pruned, labelled, provider), "samples": len(labelled)}
    return rep


def _check_verify_samples(n: int) -> None:
    if n < 1:
        raise InputError(f"--verify-samples must be at least 1, got {n}")


def _labelled(pruner: Pruner, eval_src: str | None, image_options: ImageOptions | None = None) -> Data | None:
    return load_data(eval_src, input_specs(pruner.graph.model), image_options=image_options, labels=True) \
        if eval_src else None


def finish(pruner: Pruner, keep: np.ndarray, output, *, criterion: str, search: dict, provider: str,
           latency: bool, batch_size: int = 32, reconstruct: bool = False, verify_samples: int = VERIFY_SAMPLES,
           phases: Phases = QUIET, original: ModelData | None = None,
           threads: int | None = None, round_to=None) -> tuple[dict, ModelData]:
    """Cut, verify (refusing to write a model that fails), [reconstruct,] measure fidelity, write; the report
    and the written model.

    The verification (masked original ≡ pruned) runs on the cut model, before reconstruction changes its
    weights; the reconstructed model is checked with onnx.checker and a run (see `reconstruct`). Fidelity
    compares the written model's outputs with `original`'s (default: the loaded model) on held-out samples."""
    with phases("verify", f"cutting, then comparing with the masked original on {pruner.verify_count(verify_samples)} "
                          "samples, layer by layer"):
        pruned, verification = pruner.cut_and_verify(keep, provider, verify_samples)
    if not verification.passed:
        raise VerificationError(f"verification failed: pruned model differs from the masked original "
                                f"(max abs diff {verification.max_abs_diff:.3g}; {verification.detail}); "
                                "nothing written")
    recovered = None
    if reconstruct:
        from .reconstruct import reconstruct as refit

        if pruner.data is None:
            raise InputError("--reconstruct needs calibration data (--calib)")
        with phases("refit", "least-squares re-fit of the layers that lost input channels"):
            pruned, recovered = refit(pruner.cmap, keep, pruned, pruner.data, provider=provider)
        release_memory()
    lat = None
    written = pruner.written(pruned)
    if latency:  # the models as the user runs them: at the file's batch where it pins one
        size = min(pruner.file_pins(written).values(), default=batch_size)
        with phases("latency", f"timing the original and the pruned model, interleaved, batch {size}"):
            feeds = pruner.feeds(size, size)[0]
            lat = measure_latency(pruner.written(pruner.graph.data), written, feeds, provider, threads=threads)
        if lat["slower"]:
            lat["hint"] = slower_hint(round_to)
            stderr_line(f"aofp-onnx: warning: {lat['hint']} (x{lat['ratio']:.3f}, median of {lat['repeats']})")
    samples, held = pruner.fidelity_data()
    with phases("fidelity", f"comparing outputs with the original's on {len(samples)} samples"):
        fidelity = fid.fidelity(original or pruner.graph.data, pruned, samples, provider, batch_size, held)
    with phases("write", os.fspath(output)):
        save_model(written, output, external_data=pruner.external_data)
    rep = report(pruner, keep, pruned, verification, criterion, search, lat)
    if pruner.unpinning is not None or pruner.pinned:
        rep["batch"] = pruner.unpinning.to_json() if pruner.unpinning is not None else {
            "pinned": dict(pruner.pinned), "working_copy": "none (the batch is pinned beyond Reshape targets): "
                                                           "one pinned batch per run"}
    if recovered is not None:
        rep["verification"]["model"] = "cut (before reconstruction)"
        rep["reconstruction"] = recovered.to_json()
    rep["fidelity"] = fidelity
    return rep, pruned


def verify_plan(original, pruned_path, plan_path, *, calib: str | None = None, input_shapes: dict | None = None,
                provider: str = "auto", verify_samples: int = VERIFY_SAMPLES) -> Verification:
    """Check an already written pruned model against the original masked by the plan."""
    _check_verify_samples(verify_samples)
    pruner = Pruner.load(original, input_shapes=input_shapes, data=calib, limit=verify_samples)
    keep = keep_from_plan(pruner.cmap, Plan.load(plan_path), label=os.fspath(plan_path))
    return verify(pruner.cmap, keep, load_model(pruned_path), pruner.feeds(verify_samples), provider)


def prune(model_path, output, *, calib: str, criterion: str = "auto", flops_target: float | None = None,
          latency_target: float | None = None, round_to: int | str = "auto", round_by: str = "auto",
          min_channels: int = 1, provider: str = "auto", seed: int = 0, input_shapes: dict | None = None, plan_out=None,
          batch_size: int = 32, latency_batch: int | None = None, threads: int | None = None,
          calib_limit: int | None = None,
          latency: bool = True, image_options: ImageOptions | None = None, eval_src: str | None = None,
          reconstruct: bool = False, finetune_steps: int = 0, finetune_data: str | None = None,
          finetune_options=None, verify_samples: int = VERIFY_SAMPLES, progress: bool = False,
          **search_options) -> dict:
    """Search (criterion) → plan → cut → verify → [reconstruct →] fidelity → write; returns the report (the
    `prune --report` contract; with `reconstruct`, also `reconstruction`). `criterion="auto"` runs the descent
    or AOFP (`criteria.resolve_auto`; the report's `criterion_auto` says which and why).

    Up to `fidelity.HELD_OUT` calibration samples (a quarter at most) are held out of the search and the
    reconstruction; the written model's outputs are compared with the original's on them (`fidelity`).
    `finetune_steps` > 0 (AOFP only) fine-tunes the base path on `finetune_data` after every half of
    the search (training-time AOFP); the cut is then verified against the fine-tuned original, and the
    fidelity measured against the original as loaded.
    `latency_target` R keeps R of the latency measured on `provider` at `latency_batch` (default
    `batch_size`) with `threads`, through a latency table (`latency.build_table`, cached), checked on the
    cut model; `round_to="auto"` rounds widths to the multiple that table says the kernels reward, each step
    valued by `round_by` (`targets.resolve_round_by`: the scores, or the cut's output error). Under
    torchrun the fine-tuning of `finetune_steps` is data-parallel: rank 0 searches and writes, the other
    processes train with it and return None."""
    from .finetune import launched_processes, leads, release

    if launched_processes() > 1 and not finetune_steps:
        raise InputError("under torchrun, prune spreads only the fine-tuning of --finetune-steps over the processes; "
                         "spread the search with --devices, in one process")
    start = time.perf_counter()
    check_output_path(model_path, output)
    check_targets(flops_target, latency_target)
    round_to = parse_round_to(round_to)
    check_round_by(round_by)
    if min_channels < 1:
        raise InputError("--round-to and --min-channels must be at least 1")
    _check_verify_samples(verify_samples)
    check_criterion(criterion, flops_target, latency_target)
    phases = Phases(progress)
    pruner = Pruner.load(model_path, input_shapes=input_shapes, data=calib, limit=calib_limit,
                         image_options=image_options, seed=seed, hold_out=True)
    chosen = None
    if criterion == "auto":
        given = [k for k, v in search_options.items() if v is not None] + ["finetune_steps"] * bool(finetune_steps)
        chosen = resolve_auto(pruner, flops_target, latency_target, given, batch_size,
                              search_options.get("memory_budget"), search_options.get("damage_at", "auto"))
        criterion = chosen["criterion"]
        if criterion == "descent":  # AOFP's options (unset, and its checkpoint's path) are not the descent's
            search_options = {k: v for k, v in search_options.items() if k in DESCENT_OPTIONS}
    if criterion in ("aofp", "oracle", "descent"):
        search_options["progress"] = progress
    if criterion == "aofp":
        search_options["refit"] = reconstruct  # what --accept-by auto decides by (damage_point)
    labelled = _labelled(pruner, eval_src, image_options)
    original = pruner.graph.data
    if finetune_steps:
        tuner = _base_path_tuner(pruner, criterion, finetune_steps, finetune_data, finetune_options, image_options,
                                 seed)
        search_options["tuner"], original = tuner, tuner.teacher
        if not leads(tuner.training):
            return None
    lat_batch = latency_batch or batch_size
    lat_feeds = pruner.feeds(lat_batch, lat_batch)[0]
    table = None
    targeted = latency_target is not None or flops_target is not None  # layer timings then weigh the scores
    if latency_target is not None or (round_to == "auto" and pruner.cmap.prunable):
        from .latency import build_table

        # without a latency target, at most AUTO_BATCH samples: the rewarded multiple and the MACs weighting
        feeds = lat_feeds if latency_target is not None else {k: v[:AUTO_BATCH] for k, v in lat_feeds.items()}
        with phases("latency table", "timing the model and its layers at a few widths" if targeted else
                    "timing the model at aligned and off-grid widths (--round-to auto)"):
            table = build_table(pruner.cmap, feeds, provider, threads=threads, full=targeted)
    # with a table (a latency target, or --round-to auto): the budget goes where the kernels turn MACs into time;
    # not the descent's, which values each step by its cost (on the PP-OCR classifier at 0.5 of the MACs,
    # weighted: 57.6 % of the test lines, against 88.1 %)
    weights = latency_weights(pruner.cmap, table) if table is not None and targeted and criterion != "descent" else None
    step = resolve_round_to(round_to, table)
    by = resolve_round_by(pruner.cmap, round_by)
    errors = step_errors(pruner, by, provider, batch_size, search_options.get("memory_budget"))
    if criterion == "descent":  # it lands as it searches, on the same forwards
        search_options.update(step=step, errors=errors)
    keep, scores, search = choose_keep(pruner, criterion, flops_target=flops_target, min_channels=min_channels,
                                       seed=seed, provider=provider, batch_size=batch_size, table=table,
                                       latency_target=latency_target, weights=weights, **search_options)
    if labelled is not None:  # after the search, so that refused options never wait for it
        with phases("accuracy", f"the original on {len(labelled)} labelled samples"):
            before = accuracy(original, labelled, provider)
    target = latency_target if latency_target is not None else flops_target
    keep, step, unreachable = round_to_target(pruner.cmap, keep, scores, step, round_to == "auto", min_channels,
                                              target, table.ratio if latency_target is not None else None, errors,
                                              weights)
    measured_rounds = None
    if latency_target is not None:
        with phases("latency target", "checking the estimate on the cut model"):
            keep, measured_rounds = meet_measured(pruner, keep, scores, table, latency_target, step, min_channels,
                                                  lat_feeds, provider, threads, errors, weights)
    plan = plan_from_keep(pruner.cmap, keep, criterion, seed=seed, flops_target=flops_target)
    rep, pruned = finish(pruner, keep, output, criterion=criterion, search=search, provider=provider,
                         latency=latency, batch_size=lat_batch, reconstruct=reconstruct,
                         verify_samples=verify_samples, phases=phases, original=original, threads=threads,
                         round_to=round_to)
    if chosen:
        rep["criterion_auto"] = chosen
    rep["round_to"] = {"given": round_to, "used": step, "latency_weighted": weights is not None,
                       "tensorrt": tensorrt_widths(pruner.cmap, keep), **fit_fields(by, errors),
                       **({"unreachable": unreachable} if unreachable else {})}
    rep["targets"] = targets_reached(pruner, keep, flops_target, latency_target, table, rep.get("latency_ms"))
    if measured_rounds is not None:
        rep["targets"]["latency"]["rounds"] = measured_rounds
        note = missed_note(measured_rounds, latency_target, threads, provider)
        if note:
            rep["targets"]["latency"]["note"] = note
    if table is not None:
        rep["latency_table"] = table.summary()
    if labelled is not None:
        with phases("accuracy", f"the pruned model on {len(labelled)} labelled samples"):
            rep["accuracy"] = {"before": before, "after": accuracy(pruned, labelled, provider),
                               "samples": len(labelled)}
    if plan_out:
        plan.save(plan_out)
    rep["seconds"] = time.perf_counter() - start
    if finetune_steps:
        release(tuner.training)
    return rep


def _base_path_tuner(pruner: Pruner, criterion: str, steps: int, src: str | None, options, image_options, seed: int):
    from . import finetune as ft

    if criterion != "aofp":
        raise InputError("--finetune-steps interleaves fine-tuning with the AOFP search: use --criterion aofp")
    if not src:
        raise InputError("--finetune-steps needs training data (--data)")
    data = load_data(src, input_specs(pruner.graph.model), image_options=image_options, seed=seed, labels=None)
    options = options or ft.Options(seed=seed)
    if pruner.pinned:  # the bridge runs the graph as it is: one pinned batch per step
        options = dataclasses.replace(options, batch_size=pruner.batch_size(options.batch_size))
    return ft.BasePathTuner(pruner.cmap, data, steps, options)


def finetune(pruned_path, output, *, data: str, teacher: str | None = None, val: str | None = None,
             mode: str = "auto", options=None, bridge: str = "torch",
             provider: str = "auto", input_shapes: dict | None = None, image_options: ImageOptions | None = None,
             eval_src: str | None = None, progress: bool = False) -> dict:
    """Fine-tune the pruned model (distillation from `teacher`, supervised, or the user's trainer) and
    write the same graph with the trained initializer values; returns the report. With a teacher, the
    report's `fidelity` compares the written model's outputs with the teacher's on the validation samples
    (never trained on; `fidelity_before`: the model as it came). Under torchrun, None on the processes
    other than rank 0: they train with it and return once it has written."""
    from . import finetune as ft

    options = options or ft.Options()
    options.check()
    check_output_path(pruned_path, output)
    if teacher is not None:
        check_output_path(teacher, output)
    ft.load_bridge(bridge)  # a missing framework is refused before any data is read
    phases = Phases(progress)
    student_proto, external = read_model(pruned_path)
    specs = input_specs(student_proto)
    if input_shapes:
        specs = apply_input_shapes(specs, input_shapes)
    student_file = split_weights(student_proto)
    want = True if mode == "supervised" else None
    train = load_data(data, specs, image_options=image_options, seed=options.seed, labels=want)
    held = load_data(val, specs, image_options=image_options, labels=want) if val else None
    teacher_data = split_weights(read_model(teacher)[0]) if teacher else None
    if teacher_data is not None:
        ft.check_teacher(student_file, teacher_data)
    # the bridge trains a working copy whose batch is dynamic (same names: the values go back to the file's graph)
    student, pins = working_model(student_file, train.inputs)
    teacher_work = None
    if teacher_data is not None:
        teacher_work, teacher_pins = working_model(teacher_data, train.inputs)
        pins = {**teacher_pins, **pins}
    if pins:  # pinned in a way the copy cannot prove away: one pinned batch per step
        options = dataclasses.replace(options, batch_size=min(pins.values()))
    mode = ft.resolve_mode(mode, train, teacher_data, options.trainer)
    if held is None:
        train, held = ft.split_validation(train, options.seed)
    labelled = load_data(eval_src, specs, image_options=image_options, labels=True) if eval_src else None
    job = ft.Job(student, teacher_work, train, held, mode, options)
    start = time.perf_counter()
    training = ft.start(job, bridge)
    if not ft.leads(training):  # torchrun: rank 0 writes, this process trained with it and waited
        return None
    result = training.train()
    student = student_file  # trained values only: the copy's integer constants are its unpinned targets
    trained = {k: v for k, v in result.values.items() if np.asarray(v).dtype.kind == "f"}
    tuned = ft.with_values(student, trained)
    if not ft.same_graph(student.proto, tuned.proto):
        raise VerificationError("fine-tuning changed the graph; nothing written")
    rep = {"model": os.fspath(pruned_path), "teacher": teacher and os.fspath(teacher), "mode": mode,
           "bridge": bridge, "options": {k: v for k, v in vars(options).items() if k != "progress"},
           "train_samples": len(train), "val_samples": len(held), "seconds": time.perf_counter() - start,
           **result.to_json()}
    rep["fidelity"] = None
    if teacher_data is not None:
        before, after = ft.output_errors([student, tuned], teacher_data, held, provider)
        rep["distill_error"] = {"before": before, "after": after}
        with phases("fidelity", f"comparing outputs with the teacher's on {len(held)} validation samples"):
            rep["fidelity_before"] = fid.fidelity(teacher_data, student, held, provider, options.batch_size)
            rep["fidelity"] = fid.fidelity(teacher_data, tuned, held, provider, options.batch_size)
        if not val:
            for key in ("fidelity_before", "fidelity"):
                rep[key]["source"] = f"the validation split (not trained on) of {held.source}"
    if labelled is not None:
        with phases("accuracy", f"on {len(labelled)} labelled samples"):
            rep["accuracy"] = {"before": accuracy(student, labelled, provider),
                               "after": accuracy(tuned, labelled, provider), "samples": len(labelled)}
            if teacher_data is not None:
                rep["accuracy"]["teacher"] = accuracy(teacher_data, labelled, provider)
    with phases("write", os.fspath(output)):
        save_model(tuned, output, external_data=external)
    ft.release(training)
    return rep
