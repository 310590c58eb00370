"""Search-state files: the AOFP state after a round, saved atomically as .npz with the options it
belongs to, and loaded only for the same model, data and options (`prune --checkpoint/--resume`)."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from .errors import InputError
from .io import write_atomic

STATE_FORMAT = 5  # 2: each group's trials of every depth since its last prune (the search's retrace); 3: and
# the output damage of each depth's half (--accept-by output); 4: that damage is the cut's against the original;
# 5: measured on the same leading calibration samples every time (search_run.check_batches)
_GROUP_FIELDS = ("kept", "space", "masks", "damage", "levels", "score", "checked")


def snapshot(groups: list, keep: np.ndarray, rng, stats, threshold: float) -> dict:
    """The search state after a round (`search._Group`s, `search.SearchStats`): arrays per group plus the
    scalars, the RNG state and the counters."""
    state = {"keep": keep.copy(), "first_half_damage": stats.first_half_damage,
             "scalars": {"threshold": threshold, "trials": stats.trials, "rounds": stats.rounds, "checks": stats.checks,
                         "seconds": stats.seconds, "rng": rng.bit_generator.state,
                         "groups": [{"level": g.level, "saturated": g.saturated} for g in groups]}}
    for k, g in enumerate(groups):
        for name in _GROUP_FIELDS:
            state[f"g{k}_{name}"] = getattr(g, name).copy()
    return state


def restore(state: dict, groups: list, keep: np.ndarray, rng, stats) -> float:
    """Put a snapshot back into the search's groups, keep vector, RNG and stats; the threshold it had."""
    scalars = state["scalars"]
    if len(scalars["groups"]) != len(groups):
        raise InputError("the search state does not match this model's channel groups")
    for k, (g, extra) in enumerate(zip(groups, scalars["groups"])):
        for name in _GROUP_FIELDS:
            setattr(g, name, np.array(state[f"g{k}_{name}"]))
        g.level, g.saturated = extra["level"], extra["saturated"]
    keep[:] = state["keep"]
    rng.bit_generator.state = scalars["rng"]
    stats.trials, stats.rounds, stats.seconds = scalars["trials"], scalars["rounds"], scalars["seconds"]
    stats.checks = scalars["checks"]
    if state.get("first_half_damage") is not None:
        stats.first_half_damage = np.array(state["first_half_damage"])
    return scalars["threshold"]


def save_state(path, state: dict, options: dict) -> None:
    """Write a search state (and the options it belongs to) atomically as .npz."""
    arrays = {k: v for k, v in state.items() if k != "scalars" and v is not None}
    meta = json.dumps({"scalars": state["scalars"], "options": options})
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
    write_atomic(path, buf.getvalue())


def load_state(path, options: dict) -> dict:
    """A saved search state, checked to belong to the same model, data and options."""
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            state = {k: data[k] for k in data.files if k != "__meta__"}
    except FileNotFoundError:
        raise InputError(f"{path}: no such search state") from None
    except Exception as exc:
        raise InputError(f"{path}: not an aofp-onnx search state ({type(exc).__name__})") from None
    saved = meta.get("options", {})
    differ = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
    if differ:
        raise InputError(f"{path}: saved for other settings ({', '.join(differ)} differ); resume with the same "
                         "model, data and options")
    state["scalars"] = meta["scalars"]
    return state


def data_digest(batches: list[dict]) -> str:
    """A short sha256 of the calibration batches (names and values)."""
    h = hashlib.sha256()
    for feeds in batches:
        for name in sorted(feeds):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feeds[name]).tobytes())
    return h.hexdigest()[:16]
