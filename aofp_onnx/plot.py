"""`prune --plot`: a bar chart of each prunable group's width before and after (matplotlib, optional)."""
from __future__ import annotations

import io

from .errors import InputError
from .io import write_atomic


def require_matplotlib():
    """pyplot on the file-only Agg backend; refused (exit 2) before any work when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'aofp-onnx[plot]'") from None
    return plt


def label(group_id: str, width: int = 24) -> str:
    """A group's name shortened from the left (the end of a tensor name says the most)."""
    return group_id if len(group_id) <= width else "…" + group_id[-width + 1:]


def plot_widths(report: dict, path) -> None:
    plt = require_matplotlib()
    groups = report["groups"]
    xs = range(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(groups)), 5))
    ax.bar(xs, [g["width_before"] for g in groups], color="#c8d3e0", label="before")
    ax.bar(xs, [g["width_after"] for g in groups], color="#2f6db5", label="after")
    ax.set_xticks(list(xs), [label(g["id"]) for g in groups], rotation=90, fontsize=7)
    ax.set_xlabel("prunable group (graph order)")
    ax.set_ylabel("channels")
    ratio = report["macs_after"] / max(report["macs_before"], 1)
    ax.set_title(f"{report['criterion']}: widths per group, MACs x{ratio:.3f}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
