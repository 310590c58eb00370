"""Plans: per prunable group, the kept channel indices — reproducible, reviewable, re-applicable.

JSON: {"format": "aofp-onnx/plan@1", "fingerprint": <graph structure hash>, "criterion": ...,
"groups": {group_id: {"width": W, "keep": [sorted indices]}}, ...}. A plan is checked against the
model it is applied to: same fingerprint, known prunable groups, indices unique and in range, at
least one channel kept per group. Groups a plan does not name keep all their channels.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .groups import ChannelMap
from .io import write_atomic

FORMAT = "aofp-onnx/plan@1"


@dataclass
class Plan:
    fingerprint: str
    keep: dict[str, list[int]]
    widths: dict[str, int]
    criterion: str | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "criterion": self.criterion,
            "groups": {gid: {"width": self.widths[gid], "keep": self.keep[gid]} for gid in self.keep},
            **({"meta": self.meta} if self.meta else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise InputError(f"{path}: no such plan file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a JSON plan ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("groups"), dict):
            raise InputError(f"{path}: not an aofp-onnx plan (expected format {FORMAT!r})")
        keep, widths = {}, {}
        for gid, entry in data["groups"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("keep"), list) \
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in entry["keep"]):
                raise InputError(f"{path}: group {gid!r} has no list of integer 'keep' indices")
            keep[gid] = entry["keep"]
            widths[gid] = entry.get("width")
        return cls(str(data.get("fingerprint")), keep, widths, data.get("criterion"), data.get("meta") or {})


def plan_from_keep(cmap: ChannelMap, keep: np.ndarray, criterion: str | None = None, **meta) -> Plan:
    groups = cmap.prunable
    return Plan(
        cmap.graph.fingerprint(),
        {g.id: np.flatnonzero(keep[g.slots]).tolist() for g in groups},
        {g.id: g.width for g in groups},
        criterion,
        meta,
    )


def keep_from_plan(cmap: ChannelMap, plan: Plan, label: str = "plan") -> np.ndarray:
    """The keep vector a plan describes, after checking it fits this model."""
    fp = cmap.graph.fingerprint()
    if plan.fingerprint != fp:
        raise InputError(f"{label}: made for another model (fingerprint {plan.fingerprint}, this model {fp})")
    keep = cmap.full_keep()
    for gid, indices in plan.keep.items():
        g = cmap.by_id.get(gid)
        if g is None:
            raise InputError(f"{label}: group {gid!r} does not exist in this model")
        if not g.prunable:
            raise InputError(f"{label}: group {gid!r} is not prunable ({g.reasons[0]})")
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            raise InputError(f"{label}: group {gid!r} keeps no channel (at least one must stay)")
        if len(np.unique(idx)) != len(idx):
            raise InputError(f"{label}: group {gid!r} lists a channel index twice")
        if idx.min() < 0 or idx.max() >= g.width:
            raise InputError(f"{label}: group {gid!r} has index "
                             f"{int(idx.max() if idx.max() >= g.width else idx.min())} "
                             f"out of range 0..{g.width - 1}")
        mask = np.zeros(g.width, dtype=bool)
        mask[idx] = True
        keep[g.slots] = mask
    return keep
