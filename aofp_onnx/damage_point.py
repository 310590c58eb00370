"""`--damage-at auto` (the default): output damage where the model can afford it, else the paper's next layers;
`--damage-norm auto` (the default): damage relative per sample on a classifier, else over the batch.

Output damage reads what the user sees, as the oracle does, but each group's trial copy runs everything
downstream of the group; next-layer damage runs only its consumers. Their cost ratio is estimated from
the MACs of the analysis, with no session built:

    R = Σ_g M(downstream of g's sinks) / Σ_g M(g's sinks),

and `output` is used when R ≤ AUTO_LIMIT, else `next`. Also `next` for batches pinned beyond the Reshape
targets (the downstream trial graphs do not handle them yet), and for models with several outputs:
output damage pools them, Σ_o ‖Δy_o‖² / Σ_o ‖y_o‖², so a large output drowns a small one (MTCNN ONet at
0.7 of the MACs: its landmark output collapsed, error 1.1, against 0.48 with next). R is deterministic,
so a resumed search resolves `auto` to the same point. Measured (2-core CPU, one stacked call of 8
random-half trials on 16 samples): R tracks the time ratio of the two trial sessions, MNIST CNN R 2.0
(time 1.7x), ResNet-20 on digits 6.3 (3.6x), PP-OCRv4 det 12.4 (11.4x), PP-OCR classifier (MobileNetV3)
26 (23x). On the digits ResNet-20, output kept 70.8 % accuracy at 0.7 of the MACs without recovery
(next 14.9 %, the oracle 55.1 %) for 1.2x the search time; on the classifier it cost 8x the time for less
accuracy than next (`benchmarks/estimators.py`).

`--damage-norm auto` (see `trial` for the two ratios) reads `sample` where every model output holds one
value per class and sample ([N, C], or [N, C, 1, 1]): a classifier, judged by its per-sample decisions,
where the batch ratio lets the confident samples drown the ones a cut flips. Elsewhere (detection and
segmentation maps) it reads the paper's `batch`. Measured without recovery: on PP-OCR's MobileNetV3
text-orientation classifier `sample` kept 86.1 % accuracy at 0.7 of the MACs against 78.7 % (5 seeds),
on the digits ResNet-20 87.3 % against 70.8 % (but 17.4 against 23.6 % at 0.5); on PP-OCRv4 det at 0.6
of the MACs `sample` collapsed the output (relative error 1.005, and 0.997 when only the reads without
spatial extent, its SE gates, were per sample) where `batch` kept 0.644.

`--accept-by auto` (not the default yet: see README): `output` on a classifier whose trials read the next
layers or a block and whose cut ships as it is; `estimate` where the trials read the outputs, where
`--reconstruct` refits the cut, and on detectors and other dense outputs, where it is not measured and each
check runs the whole model (PP-OCRv4 det at 320², 48 pages, 0.8 of the MACs: over 15 minutes on 2 cores). A
next-layer relative error is worth more at the outputs in one layer than in another, so with a MACs target the
trials' estimates decide which layers lose width on scales that do not compare; the output check
(`check.OutputCheck`) puts every half on the outputs' scale. Where the trials read the outputs their
estimates are on that scale already, and the check would cost a forward per decision. A least-squares refit
repairs what the next layers see, and there the estimate's cuts kept as much or more. Measured (PP-OCR
classifier, 3 seeds, at 0.7 / 0.5 of the MACs; see README, Measured): without recovery 89.5 / 82.8 % against
the estimate's 76.1 / 56.2 % (the oracle 93.8 / 78.9 %), at 2-3x the search time; with `--reconstruct` 96.6 /
94.4 % against 97.3 / 94.6 %.
"""
from __future__ import annotations

from .errors import InputError
from .groups import ChannelMap

AUTO_LIMIT = 8.0  # the largest MACs ratio R at which `auto` reads the damage at the outputs


def sink_macs(cmap: ChannelMap) -> list[int]:
    """Per prunable group, M(g's sinks): the MACs of the consumer copies its next-layer trial row runs, per
    sample (also what weighs the descent's ranking progress)."""
    macs = {c.node_index: c.macs for c in cmap.counted}
    return [sum(macs.get(k, 0) for k in {s.node_index for s in g.sinks}) for g in cmap.prunable]


def downstream_macs(cmap: ChannelMap) -> list[int]:
    """Per prunable group, M(downstream of g's sinks): the MACs of everything its sinks reach, per sample (what
    an output trial or single ablation of g runs)."""
    graph = cmap.graph
    index = {id(n): k for k, n in enumerate(graph.nodes)}
    macs = {c.node_index: c.macs for c in cmap.counted}
    far = []
    for g in cmap.prunable:
        sinks = {s.node_index for s in g.sinks}
        seen, todo = set(), [graph.nodes[k] for k in sinks]
        while todo:
            node = todo.pop()
            if index[id(node)] in seen:
                continue
            seen.add(index[id(node)])
            todo.extend(c for out in node.output for c, _ in graph.consumers.get(out, []))
        far.append(sum(macs.get(k, 0) for k in seen))
    return far


def downstream_ratio(cmap: ChannelMap) -> float:
    """R: the MACs every group's output-damage trial runs over those its next-layer trial runs."""
    near, far = sum(sink_macs(cmap)), sum(downstream_macs(cmap))
    return far / near if near else float("inf")


def resolve(cmap: ChannelMap, damage_at: str, pinned: bool = False) -> tuple[str, dict | None]:
    """(the damage point, the `auto` choice's figures for the report or None); block and output are refused
    (InputError) where their trial graphs cannot run yet, and `auto` then reads the next layers."""
    why = "a batch pinned beyond the Reshape targets" if pinned else ""  # the downstream graphs cannot run it
    if damage_at in ("block", "output") and why:
        raise InputError(f"--damage-at {damage_at} does not support {why} yet; use --damage-at next")
    if damage_at != "auto":
        return damage_at, None
    if not why and len(cmap.graph.outputs) > 1:  # pooled over the outputs, a large output drowns a small one
        why = f"{len(cmap.graph.outputs)} outputs"
    ratio = downstream_ratio(cmap)
    point = "output" if ratio <= AUTO_LIMIT and not why else "next"
    return point, {"macs_ratio": round(ratio, 3), "limit": AUTO_LIMIT, "chosen": point,
                   **({"because": why} if why else {})}


def resolve_norm(cmap: ChannelMap, damage_norm: str) -> str:
    """`sample` or `batch`: `auto` gives `sample` on a classifier (every output [N, C] or [N, C, 1, 1])."""
    if damage_norm != "auto":
        return damage_norm
    for name in cmap.graph.outputs:
        shape = cmap.graph.shape(name)
        if not shape or len(shape) < 2 or any(d != 1 for d in shape[2:]):
            return "batch"
    return "sample"


def resolve_accept(cmap: ChannelMap, damage_at: str, accept_by: str, refit: bool = False) -> str:
    """`estimate` or `output`: `auto` checks at the outputs on a classifier (as `resolve_norm` tells one)
    whose trials read before them, unless the cut is refitted (`refit`: `--reconstruct` follows)."""
    if accept_by != "auto":
        return accept_by
    classifier = resolve_norm(cmap, "auto") == "sample"
    return "output" if classifier and damage_at != "output" and not refit else "estimate"
