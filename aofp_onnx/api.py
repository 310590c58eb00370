"""The Python API; the CLI is a thin layer over these functions.

    load → analyze → (criterion → keep) → cut → verify → save + report

`Pruner` holds one loaded model and its channel map so several plans can be tried without reloading.
Every function that writes refuses an output path equal to the input and writes atomically.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import criteria
from .calib import Data, ImageOptions, apply_input_shapes, input_specs, load_data
from .count import count_params
from .errors import InputError
from .graph import Graph, load_model, read_model
from .modeldata import ModelData, as_model_data, split_weights
from .groups import ChannelMap, analyze
from .io import release_memory
from .plan import Plan, keep_from_plan, plan_from_keep
from .runtime import Runner, latency_ms
from .select import round_widths, select_by_score
from .surgery import cut
from .verify import Verification, verify

CRITERIA = ("aofp", "l1", "random", "oracle")
VERIFY_SAMPLES = 4  # compared layer by layer, a few samples expose any wrong channel; each costs 2 runs
RECONSTRUCT_SAMPLES = 256  # calibration samples `apply --reconstruct` loads (reconstruct.SAMPLES)


@dataclass
class Pruner:
    """A loaded model: its working graph, channel map and (optionally) calibration data."""

    path: str
    graph: Graph
    cmap: ChannelMap
    data: Data | None = None
    input_shapes: dict = field(default_factory=dict)
    external_data: bool = False  # the file kept its weights in external data: so will the output

    @classmethod
    def load(cls, path, *, input_shapes: dict | None = None, data: str | None = None, limit: int | None = None,
             image_options: ImageOptions | None = None, seed: int = 0, labels: bool = False) -> "Pruner":
        model, external = read_model(path)
        specs = input_specs(model)
        if input_shapes:
            specs = apply_input_shapes(specs, input_shapes)
        loaded = load_data(data, specs, limit=limit, image_options=image_options, seed=seed, labels=labels) \
            if data else None
        shapes = dict(input_shapes or {})
        if loaded is not None:
            for name, arr in loaded.inputs.items():
                shapes.setdefault(name, (1,) + tuple(arr.shape[1:]))
        graph = Graph.from_model(model, shapes)
        del model  # the weights now live in graph.weights; give the parsed file's memory back
        release_memory()
        return cls(os.fspath(path), graph, analyze(graph), loaded, shapes, external)

    # -- data ----------------------------------------------------------------------------------
    def feeds(self, n: int = VERIFY_SAMPLES, batch_size: int = 1) -> list[dict[str, np.ndarray]]:
        """Batches for verification: the calibration data, or seeded normal noise at the analysis shapes."""
        if self.data is not None:
            return list(self.data.take(min(n, len(self.data))).batches(batch_size))
        rng = np.random.default_rng(0)
        inputs = {}
        for name in self.graph.inputs:
            shape = self.graph.input_shapes[name]
            vi = next(v for v in self.graph.model.graph.input if v.name == name)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            inputs[name] = rng.standard_normal((n,) + tuple(shape[1:])).astype(dtype)
        return list(Data(inputs, None, "noise", True).batches(batch_size))

    # -- steps ---------------------------------------------------------------------------------
    def inspect(self) -> dict:
        cm = self.cmap
        return {
            "model": self.path,
            "fingerprint": self.graph.fingerprint(),
            "opset": self.graph.opset,
            "input_shapes": {k: list(v) for k, v in self.graph.input_shapes.items()},
            "macs": cm.total_macs,
            "params": count_params(self.graph.model),
            "prunable_macs_fraction": cm.prunable_macs_fraction(),
            "groups": [{"id": g.id, "width": g.width, "macs": g.macs, "prunable": g.prunable,
                        "reason": None if g.prunable else "; ".join(g.reasons)} for g in cm.groups],
        }

    def cut_and_verify(self, keep: np.ndarray, provider: str = "auto") -> tuple[ModelData, Verification]:
        pruned = cut(self.cmap, keep)
        # onnx.checker runs on the written file (save_model), where it costs no second copy in memory
        verification = verify(self.cmap, keep, pruned, self.feeds(), provider, checker=False)
        release_memory()
        return pruned, verification


def inspect(path, input_shapes: dict | None = None) -> dict:
    """Groups, MACs, params and the prunable share of a model (the `inspect --json` contract)."""
    return Pruner.load(path, input_shapes=input_shapes).inspect()


def check_output_path(src, out) -> None:
    """Refuse writing over the input, into a missing folder, or onto a folder."""
    out = os.fspath(out)
    if os.path.isdir(out):
        raise InputError(f"{out}: is a directory; give an output file name")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InputError(f"{out}: folder {folder} does not exist")
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise InputError(f"{out}: the output path is the input model; choose another name")


def save_model(model: onnx.ModelProto | ModelData, path, external_data: bool = False, check: bool = True) -> None:
    """Write `model` atomically (a temp file in the destination folder, then rename), after
    onnx.checker (full check) when `check`. With `external_data` (or past 1.8 GB of weights) the weights
    go to `<name>.data` beside it; otherwise one file, streamed an initializer at a time."""
    data = as_model_data(model)
    if check:
        try:
            data.check()
        except Exception as exc:
            raise RuntimeError(f"the pruned model fails onnx.checker: {_first_line(exc)}; nothing written") from None
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    external_data = external_data or sum(a.nbytes for a in data.weights.values()) >= int(1.8e9)
    tmpdir = tempfile.mkdtemp(prefix=".aofp-", dir=folder)
    try:
        tmp = os.path.join(tmpdir, base)
        if external_data:
            onnx.save_model(data.materialize(), tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=base + ".data", size_threshold=1024)
            os.replace(os.path.join(tmpdir, base + ".data"), os.path.join(folder, base + ".data"))
        else:
            with open(tmp, "wb") as f:
                data.write(f)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def measure_latency(before: ModelData, after: ModelData, feeds: dict, provider: str,
                    repeats: int = 20) -> dict:
    runners = [Runner(before, provider), Runner(after, provider)]
    stats = latency_ms(runners, [feeds, feeds], repeats=repeats)
    return {"before": stats[0]["median"], "after": stats[1]["median"], "provider": runners[0].provider,
            "batch_size": int(len(next(iter(feeds.values())))), "repeats": repeats}


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
               provider: str = "auto", latency: bool = False, reconstruct: bool = False) -> dict:
    """Cut `model_path` as `plan_path` says, verify, [reconstruct,] and write `output`; returns the report."""
    check_output_path(model_path, output)
    if reconstruct and not calib:
        raise InputError("--reconstruct needs calibration data (--calib)")
    limit = RECONSTRUCT_SAMPLES if reconstruct else VERIFY_SAMPLES
    pruner = Pruner.load(model_path, input_shapes=input_shapes, data=calib, limit=limit)
    plan = Plan.load(plan_path)
    keep = keep_from_plan(pruner.cmap, plan, label=os.fspath(plan_path))
    return finish(pruner, keep, output, criterion=plan.criterion or "plan",
                  search={"trials": 0, "seconds": 0.0}, provider=provider, latency=latency,
                  reconstruct=reconstruct)[0]


def finish(pruner: Pruner, keep: np.ndarray, output, *, criterion: str, search: dict, provider: str,
           latency: bool, batch_size: int = 32, reconstruct: bool = False) -> tuple[dict, ModelData]:
    """Cut, verify (refusing to write a model that fails), [reconstruct,] write; the report and the written model.

    The verification (masked original ≡ pruned) runs on the cut model, before reconstruction changes its
    weights; the reconstructed model is checked with onnx.checker and a run (see `reconstruct`)."""
    pruned, verification = pruner.cut_and_verify(keep, provider)
    if not verification.passed:
        raise RuntimeError(f"verification failed: pruned model differs from the masked original "
                           f"(max abs diff {verification.max_abs_diff:.3g}; {verification.detail}); nothing written")
    recovered = None
    if reconstruct:
        from .reconstruct import reconstruct as refit

        if pruner.data is None:
            raise InputError("--reconstruct needs calibration data (--calib)")
        pruned, recovered = refit(pruner.cmap, keep, pruned, pruner.data, provider=provider)
        release_memory()
    lat = None
    if latency:
        feeds = pruner.feeds(batch_size, batch_size)[0]
        lat = measure_latency(pruner.graph.data, pruned, feeds, provider)
    save_model(pruned, output, external_data=pruner.external_data)
    rep = report(pruner, keep, pruned, verification, criterion, search, lat)
    if recovered is not None:
        rep["verification"]["model"] = "cut (before reconstruction)"
        rep["reconstruction"] = recovered.to_json()
    return rep, pruned


def verify_plan(original, pruned_path, plan_path, *, calib: str | None = None, input_shapes: dict | None = None,
                provider: str = "auto") -> Verification:
    """Check an already written pruned model against the original masked by the plan."""
    pruner = Pruner.load(original, input_shapes=input_shapes, data=calib, limit=VERIFY_SAMPLES)
    keep = keep_from_plan(pruner.cmap, Plan.load(plan_path), label=os.fspath(plan_path))
    return verify(pruner.cmap, keep, load_model(pruned_path), pruner.feeds(), provider)


def choose_keep(pruner: Pruner, criterion: str, *, flops_target: float | None, min_channels: int = 1,
                seed: int = 0, **search_options) -> tuple[np.ndarray, np.ndarray, dict]:
    """(keep, scores, search stats) for a criterion; l1/random need a MACs target."""
    if criterion not in CRITERIA:
        raise InputError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    start = time.perf_counter()
    if criterion in ("l1", "random"):
        if flops_target is None:
            raise InputError(f"--criterion {criterion} needs --flops-target (the share of MACs to keep)")
        scores = criteria.l1_scores(pruner.cmap) if criterion == "l1" else criteria.random_scores(pruner.cmap, seed)
        keep = select_by_score(pruner.cmap, scores, flops_target, min_channels)
        return keep, scores, {"trials": 0, "seconds": time.perf_counter() - start}
    from . import search

    return search.run(pruner, criterion, flops_target=flops_target, min_channels=min_channels, seed=seed,
                      **search_options)


def prune(model_path, output, *, calib: str, criterion: str = "aofp", flops_target: float | None = None,
          round_to: int = 1, min_channels: int = 1, provider: str = "auto", seed: int = 0,
          input_shapes: dict | None = None, plan_out=None, batch_size: int = 32, calib_limit: int | None = None,
          latency: bool = True, image_options: ImageOptions | None = None, eval_src: str | None = None,
          reconstruct: bool = False, finetune_steps: int = 0, finetune_data: str | None = None,
          finetune_options=None, **search_options) -> dict:
    """Search (criterion) → plan → cut → verify → [reconstruct →] write; returns the report (the
    `prune --report` contract; with `reconstruct`, also `reconstruction`).

    `finetune_steps` > 0 (AOFP only) fine-tunes the base path on `finetune_data` after every half of
    the search (training-time AOFP); the cut is then verified against the fine-tuned original."""
    check_output_path(model_path, output)
    if flops_target is not None and not 0 < flops_target <= 1:
        raise InputError(f"--flops-target must be in (0, 1], got {flops_target}")
    if round_to < 1 or min_channels < 1:
        raise InputError("--round-to and --min-channels must be at least 1")
    pruner = Pruner.load(model_path, input_shapes=input_shapes, data=calib, limit=calib_limit,
                         image_options=image_options, seed=seed)
    labelled = load_data(eval_src, input_specs(pruner.graph.model), image_options=image_options, labels=True) \
        if eval_src else None
    before = accuracy(pruner.graph.data, labelled, provider) if labelled is not None else None
    if finetune_steps:
        search_options["tuner"] = _base_path_tuner(pruner, criterion, finetune_steps, finetune_data,
                                                   finetune_options, image_options, seed)
    keep, scores, search = choose_keep(pruner, criterion, flops_target=flops_target, min_channels=min_channels,
                                       seed=seed, provider=provider, batch_size=batch_size, **search_options)
    keep = round_widths(pruner.cmap, keep, scores, round_to, min_channels, flops_target)
    plan = plan_from_keep(pruner.cmap, keep, criterion, seed=seed, flops_target=flops_target)
    rep, pruned = finish(pruner, keep, output, criterion=criterion, search=search, provider=provider,
                         latency=latency, batch_size=batch_size, reconstruct=reconstruct)
    if labelled is not None:
        rep["accuracy"] = {"before": before,
                           "after": accuracy(pruned, labelled, provider), "samples": len(labelled)}
    if plan_out:
        plan.save(plan_out)
    return rep


def _base_path_tuner(pruner: Pruner, criterion: str, steps: int, src: str | None, options, image_options, seed: int):
    from . import finetune as ft

    if criterion != "aofp":
        raise InputError("--finetune-steps interleaves fine-tuning with the AOFP search: use --criterion aofp")
    if not src:
        raise InputError("--finetune-steps needs training data (--data)")
    data = load_data(src, input_specs(pruner.graph.model), image_options=image_options, seed=seed, labels=None)
    return ft.BasePathTuner(pruner.cmap, data, steps, options or ft.Options(seed=seed))


def finetune(pruned_path, output, *, data: str, teacher: str | None = None, val: str | None = None,
             mode: str = "auto", options=None, bridge: str = "torch",
             provider: str = "auto", input_shapes: dict | None = None, image_options: ImageOptions | None = None,
             eval_src: str | None = None) -> dict:
    """Fine-tune the pruned model (distillation from `teacher`, supervised, or the user's trainer) and
    write the same graph with the trained initializer values; returns the report."""
    from . import finetune as ft

    options = options or ft.Options()
    options.check()
    check_output_path(pruned_path, output)
    if teacher is not None:
        check_output_path(teacher, output)
    student_proto, external = read_model(pruned_path)
    specs = input_specs(student_proto)
    if input_shapes:
        specs = apply_input_shapes(specs, input_shapes)
    student = split_weights(student_proto)
    want = True if mode == "supervised" else None
    train = load_data(data, specs, image_options=image_options, seed=options.seed, labels=want)
    held = load_data(val, specs, image_options=image_options, labels=want) if val else None
    teacher_data = split_weights(read_model(teacher)[0]) if teacher else None
    if teacher_data is not None:
        ft.check_teacher(student, teacher_data)
    mode = ft.resolve_mode(mode, train, teacher_data, options.trainer)
    if held is None:
        train, held = ft.split_validation(train, options.seed)
    labelled = load_data(eval_src, specs, image_options=image_options, labels=True) if eval_src else None
    job = ft.Job(student, teacher_data, train, held, mode, options)
    start = time.perf_counter()
    result = ft.run(job, bridge)
    tuned = ft.with_values(student, result.values)
    if not ft.same_graph(student.proto, tuned.proto):
        raise RuntimeError("fine-tuning changed the graph; nothing written")
    rep = {"model": os.fspath(pruned_path), "teacher": teacher and os.fspath(teacher), "mode": mode,
           "bridge": bridge, "options": {k: v for k, v in vars(options).items() if k != "progress"},
           "train_samples": len(train), "val_samples": len(held), "seconds": time.perf_counter() - start,
           **result.to_json()}
    if teacher_data is not None:
        before, after = ft.output_errors([student, tuned], teacher_data, held, provider)
        rep["distill_error"] = {"before": before, "after": after}
    if labelled is not None:
        rep["accuracy"] = {"before": accuracy(student, labelled, provider), "after": accuracy(tuned, labelled, provider),
                           "samples": len(labelled)}
        if teacher_data is not None:
            rep["accuracy"]["teacher"] = accuracy(teacher_data, labelled, provider)
    save_model(tuned, output, external_data=external)
    return rep
