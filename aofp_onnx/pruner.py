"""The loaded model every step of the API shares: the file's working graph, its channel map, and the
calibration data (with the held-out samples for the fidelity check).

Loading runs the load + normalize step of the data flow: read and check the file (`graph.read_model`:
folding, opset upgrade), fix the analysis shapes, one probe run at them (`probe`: a shape the model cannot
run is refused), the working copy of a pinned batch (`batch.working_graph`), then the analysis
(`groups.analyze`). `Pruner` holds the result so several plans can be tried without reloading.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import fidelity as fid
from .batch import Unpinning, repin, working_graph
from .calib import Data, ImageOptions, apply_input_shapes, input_specs, load_data
from .count import count_params
from .graph import Graph, read_model
from .groups import ChannelMap, analyze
from .io import release_memory
from .modeldata import ModelData
from .probe import open_axes, probe
from .runtime import pinned_batches
from .surgery import cut
from .verify import Verification, verify

VERIFY_SAMPLES = 4  # compared layer by layer, a few samples expose any wrong channel; each costs 2 runs
GROUP_MACS_NOTE = ("a group's MACs are those of every layer whose cost shrinks with it: its producers (output "
                   "channels) and its consumers (input channels). A conv between two groups counts in both, so the "
                   "column sums to about twice the model's MACs.")


@dataclass
class Pruner:
    """A loaded model: its working graph, channel map and (optionally) calibration data."""

    path: str
    graph: Graph
    cmap: ChannelMap
    data: Data | None = None
    input_shapes: dict = field(default_factory=dict)
    external_data: bool = False  # the file kept its weights in external data: so will the output
    held: Data | None = None  # calibration samples held out of everything but the fidelity check
    unpinning: Unpinning | None = None  # the working graph is the file with its pinned batch made dynamic
    pinned: dict = field(default_factory=dict)  # inputs whose batch stays pinned in the working graph
    notes: list = field(default_factory=list)  # what loading changed (e.g. "opset 9 upgraded to 11")

    def written(self, model: ModelData) -> ModelData:
        """`model` (the working graph's, cut or not) with the file's batch declarations."""
        return repin(model, self.unpinning)

    def file_pins(self, written: ModelData) -> dict[str, int]:
        """Inputs whose batch the written file pins: in its declarations, or in its graph alone."""
        in_graph = self.unpinning.inputs if self.unpinning is not None and self.unpinning.declared else {}
        return {**pinned_batches(written.proto), **in_graph}

    def batch_size(self, wanted: int) -> int:
        """Samples per run: `wanted`, or the batch the working graph pins."""
        return min(self.pinned.values()) if self.pinned else wanted

    @classmethod
    def load(cls, path, *, input_shapes: dict | None = None, data: str | None = None, limit: int | None = None,
             image_options: ImageOptions | None = None, seed: int = 0, labels: bool = False,
             hold_out: bool = False) -> "Pruner":
        """With `hold_out`, up to `fidelity.HELD_OUT` samples past `limit` (or a quarter of all) are set aside
        in `held` for the fidelity check; `data` keeps the rest."""
        notes: list[str] = []
        model, external = read_model(path, notes)
        specs = input_specs(model)
        if input_shapes:
            specs = apply_input_shapes(specs, input_shapes)
        wanted = limit + fid.HELD_OUT if hold_out and limit is not None else limit
        loaded = load_data(data, specs, limit=wanted, image_options=image_options, seed=seed, labels=labels) \
            if data else None
        held = None
        if loaded is not None and hold_out:
            extra = len(loaded) - limit if limit is not None else 0
            loaded, held = fid.split(loaded, extra if extra > 0 else fid.held_out_count(len(loaded)))
        shapes = dict(input_shapes or {})
        if loaded is not None:
            pins = {s.name: s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
            for name, arr in loaded.inputs.items():
                shapes.setdefault(name, (pins.get(name, 1),) + tuple(arr.shape[1:]))
        graph = Graph.from_model(model, shapes)
        del model  # the weights now live in graph.weights; give the parsed file's memory back
        release_memory()
        graph_pinned = probe(graph.data, graph.input_shapes, open_axes(graph.model))
        graph, unpinning = working_graph(graph, loaded.inputs if loaded is not None else None, graph_pinned)
        return cls(os.fspath(path), graph, analyze(graph), loaded, shapes, external, held, unpinning,
                   pinned_batches(graph.model), notes)

    # -- data ----------------------------------------------------------------------------------
    def feeds(self, n: int = VERIFY_SAMPLES, batch_size: int = 1) -> list[dict[str, np.ndarray]]:
        """Batches for verification: the calibration data, or seeded normal noise at the analysis shapes."""
        if self.data is not None:
            return list(self.data.take(min(n, len(self.data))).batches(batch_size))
        return list(self.noise(n, seed=0).batches(batch_size))

    def noise(self, n: int, seed: int) -> Data:
        """`n` samples of seeded standard normal noise at the analysis shapes."""
        rng = np.random.default_rng(seed)
        inputs = {}
        for name in self.graph.inputs:
            shape = self.graph.input_shapes[name]
            vi = next(v for v in self.graph.model.graph.input if v.name == name)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            inputs[name] = rng.standard_normal((n,) + tuple(shape[1:])).astype(dtype)
        return Data(inputs, None, "noise", True)

    def fidelity_data(self) -> tuple[Data, bool]:
        """(samples, held out?): the held-out calibration samples; else the calibration data itself; else
        noise that verification did not use."""
        if self.held is not None:
            return self.held, True
        if self.data is not None:
            return self.data, False
        return self.noise(16, seed=1), True

    def verify_count(self, n: int) -> int:
        return min(n, len(self.data)) if self.data is not None else n

    # -- steps ---------------------------------------------------------------------------------
    def inspect(self) -> dict:
        cm = self.cmap
        return {
            "model": self.path,
            "fingerprint": self.graph.fingerprint(),
            "opset": self.graph.opset,
            "notes": self.notes,
            "input_shapes": {k: list(v) for k, v in self.graph.input_shapes.items()},
            "macs": cm.total_macs,
            "params": count_params(self.graph.model),
            "prunable_macs_fraction": cm.prunable_macs_fraction(),
            "group_macs": GROUP_MACS_NOTE,
            "groups": [{"id": g.id, "width": g.width, "macs": g.macs, "prunable": g.prunable,
                        "reason": None if g.prunable else "; ".join(g.reasons),
                        **dict(zip(("producers", "consumers"), cm.layers(g)))} for g in cm.groups],
        }

    def cut_and_verify(self, keep: np.ndarray, provider: str = "auto",
                       samples: int = VERIFY_SAMPLES) -> tuple[ModelData, Verification]:
        pruned = cut(self.cmap, keep)
        # onnx.checker runs on the written file (save_model), where it costs no second copy in memory
        verification = verify(self.cmap, keep, pruned, self.feeds(samples), provider, checker=False)
        release_memory()
        return pruned, verification
