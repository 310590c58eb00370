"""Output checks: a cut's relative error at the model outputs, run only where the checked channels reach.

`OutputCheck(batches, keep, R)` = Σ_o Σ‖y_o − y_o,K∖R‖² / Σ_o Σ‖y_o‖², y the original outputs (AOFP's
`--accept-by output`, `search_run.CutErrors`). A check of a half R of one group g on top of a cut K differs
from K alone only in the nodes g's masks reach; the rest computes what K computes. So, once per K and batch,
one forward of the masked model (`masking`) also returns every tensor that some group's downstream part reads
from outside it (its boundary), and a check of g runs g's part alone on them (extracted with
`onnx.utils.Extractor`, keep K∖R), the outputs g does not reach taken from K's forward. The same nodes on
the same values: the same error (float16: to float16 rounding, since onnxruntime runs some float16 ops in
float32 inside a model and a part's boundary holds float16 values). On the PP-OCR text-orientation
classifier a part costs 19-95 % of a forward (half on average over its 26 groups); its search at 0.5 of the
MACs (`--accept-by output`, 64 check samples, seed 0) made the same cut with its 2561 checks in 107 s against
186 s, timed side by side on the same calls. Where a part cannot be extracted (no inferred type or working
shape for a boundary tensor, a control-flow node) or the boundary would not fit `budget` bytes over the check
samples, the check runs the whole model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.utils import Extractor

from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed, masked_model
from .modeldata import ModelData
from .runtime import Runner
from .trial import DEFAULT_MEMORY_BUDGET

CHECK_SAMPLES = 64  # calibration samples every output check runs on (at most; `search_run.check_batches`)


class OutputCheck:
    """`check(batches, keep, slots)`: the relative output error of the cut `keep` without `slots` against the
    original outputs, over `batches`; each output's relative error counts on its own, as each consumer's does
    in the trials (`trial`): pooled, a large output would drown a small one (a detector's scores and boxes,
    MTCNN's landmarks). Measured against the cut so far instead, each accepted half adds its error to the
    others': on RapidOCR's PP-LCNet orientation classifier at 0.5 of the MACs the cut kept 49.6 % accuracy
    (chance: 25 %) where against the original it kept 81.5 % (one seed). With `parts` (`DownstreamParts`), a
    cut that differs from the base cut within one group runs that group's downstream part (see the module)."""

    def __init__(self, runner: Runner, parts: "DownstreamParts | None" = None):
        self.runner, self.parts = runner, parts if parts is not None and parts.parts else None
        self._original = {}  # id of a batch (the caller's batches live as long as the search) -> (y, Σ‖y_o‖²)
        self._cut: tuple[bytes, dict] = (b"", {})  # the last base cut: per batch id, its forward's tensors
        self.forwards = 0  # whole-model forwards run (the original's and the base cuts' included)

    def __call__(self, batches: list[dict[str, np.ndarray]], keep: np.ndarray, slots: np.ndarray) -> float:
        removed = keep.copy()
        removed[slots] = False
        return self.error(batches, keep, removed)

    def error(self, batches: list[dict[str, np.ndarray]], base: np.ndarray, cut: np.ndarray) -> float:
        """The relative output error of `cut`; on a group's part when it differs from `base` within that group
        (its boundary from `base`'s forward, cached for the next call on the same base)."""
        part = self.parts.part(np.flatnonzero(base != cut)) if self.parts is not None else None
        on_parts = self.parts is not None and (part is not None or np.array_equal(base, cut))
        num, den = np.zeros(len(self.runner.outputs)), np.zeros(len(self.runner.outputs))
        for feeds in batches:
            if id(feeds) not in self._original:
                y0 = self._run(feeds, np.ones_like(cut))
                self._original[id(feeds)] = y0, [np.square(y, dtype=np.float64).sum() for y in y0]
            original, energy = self._original[id(feeds)]
            ys = self._run_part(feeds, base, cut, part) if on_parts else self._run(feeds, cut)
            num += [np.square(y - y0, dtype=np.float64).sum() for y, y0 in zip(ys, original)]
            den += energy
        return float((num / np.maximum(den, 1e-30)).sum())

    def _run(self, feeds: dict, keep: np.ndarray) -> list[np.ndarray]:
        self.forwards += 1
        return self.runner.run({**feeds, KEEP_INPUT: keep_feed(keep)})

    def _run_part(self, feeds: dict, base: np.ndarray, cut: np.ndarray, part: "_Part | None") -> list[np.ndarray]:
        """The outputs of `cut`: its group's part on the base cut's boundary tensors, the base's own outputs
        where the group does not reach (all of them for the base itself)."""
        if self._cut[0] != base.tobytes():
            self._cut = base.tobytes(), {}
        cached = self._cut[1]
        if id(feeds) not in cached:
            self.forwards += 1
            cached[id(feeds)] = self.parts.forward(feeds, base)
        values = cached[id(feeds)]
        got = {} if part is None else dict(zip(part.outputs, part.runner.run(
            {**part.feeds(values), KEEP_INPUT: keep_feed(cut)})))
        return [got.get(name, values[name]) for name in self.runner.outputs]


class _Part:
    """One group's downstream part: its extracted model's runner (built at its first check)."""

    def __init__(self, model: ModelData, inputs: list[str], outputs: list[str], provider: str):
        self.model, self.inputs, self.outputs, self.provider = model, inputs, outputs, provider
        self._runner = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = Runner(self.model, self.provider)
        return self._runner

    def feeds(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Its inputs, from a cut's `DownstreamParts.forward`."""
        return {n: values[n] for n in self.inputs}


class DownstreamParts:
    """Per prunable group, the nodes of the masked model its masks reach (`part(slots)`, None for slots of
    several groups or a group left whole), and `boundary`: the tensors those parts read from outside them,
    which `model` (the masked model) returns beside its `outputs`."""

    def __init__(self, cmap: ChannelMap, provider: str = "auto", budget: int = DEFAULT_MEMORY_BUDGET,
                 samples: int = CHECK_SAMPLES):
        data, masks = masked_model(cmap, with_masks=True)
        self.provider, self._runner = provider, None
        self.slot_group = np.full(cmap.n_slots + 1, -1)
        for k, g in enumerate(cmap.prunable):
            self.slot_group[g.slots] = k
        self.model, self.outputs = data, [o.name for o in data.proto.graph.output]
        self.parts: dict[int, _Part] = {}
        self.boundary: list[str] = []
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in data.proto.graph.node for a in n.attribute):
            return  # a subgraph reads outer tensors the walk below does not see
        proto = onnx.shape_inference.infer_shapes(data.copy_proto())
        extractor = Extractor(proto)
        graph_inputs = {i.name for i in proto.graph.input}
        nodes = list(proto.graph.node)
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(nodes):
            for name in node.input:
                consumers.setdefault(name, []).append(i)
        mask_nodes = {i for i, node in enumerate(nodes) for name in node.output if name in masks}
        mask_values = {value for _, value in masks.values()}  # a part recomputes them from its keep input
        sources = {node.output[0]: node.input[0] for i, node in enumerate(nodes) if i in mask_nodes}

        def sample_bytes(name: str) -> int | None:  # the working graph's shapes: its inputs' are fixed
            shape = cmap.graph.shape(sources.get(name, name))
            info = extractor.value_infos.get(name)
            if shape is None or info is None or not info.type.HasField("tensor_type"):
                return None
            size = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).itemsize
            return int(np.prod(shape[1:], dtype=np.int64)) * size

        parts, boundary = {}, set()
        for k, g in enumerate(cmap.prunable):
            starts = [i for i in mask_nodes if np.isin(masks[nodes[i].output[0]][0], g.slots).any()]
            reached = _reachable(nodes, consumers, starts)
            made = {name for i in reached for name in nodes[i].output}
            needs = {name for i in reached for name in nodes[i].input if name and name not in made}
            inputs = sorted(needs - set(extractor.initializers) - mask_values - {KEEP_INPUT})
            outs = [name for name in self.outputs if name in made]
            if not outs or any(sample_bytes(n) is None for n in inputs):
                continue
            try:
                sub = extractor.extract_model(inputs + [KEEP_INPUT], outs)
            except (ValueError, KeyError):
                continue
            parts[k] = _Part(ModelData(sub, data.weights), inputs, outs, provider)
            boundary |= set(inputs) - graph_inputs
        if parts and sum(sample_bytes(n) for n in boundary) * samples <= budget:
            self.parts, self.boundary = parts, sorted(boundary - set(self.outputs))
            self.model = ModelData(data.copy_proto(), data.weights)
            self.model.proto.graph.output.extend(extractor.value_infos[n] for n in self.boundary)

    @property
    def runner(self) -> Runner:
        """The masked model's session (its outputs by default; the boundary on request), built once."""
        if self._runner is None:
            self._runner = Runner(self.model, self.provider, outputs=self.outputs)
        return self._runner

    def forward(self, feeds: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
        """The cut `keep`'s outputs and boundary tensors on `feeds` (one forward), beside the feeds."""
        names = self.outputs + self.boundary
        return {**feeds, **dict(zip(names, self.runner.run({**feeds, KEEP_INPUT: keep_feed(keep)}, names)))}

    def check(self) -> OutputCheck:
        """An `OutputCheck` that runs these parts."""
        return OutputCheck(self.runner, self)

    def part(self, slots: np.ndarray) -> _Part | None:
        groups = set(self.slot_group[slots].tolist())
        return self.parts.get(groups.pop()) if len(groups) == 1 else None


def _reachable(nodes: list, consumers: dict[str, list[int]], starts: list[int]) -> set[int]:
    seen, stack = set(), list(starts)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack += [j for name in nodes[i].output for j in consumers.get(name, [])]
    return seen
