"""What a long run is doing, on stderr: a line for each phase that runs longer than two seconds, with its
elapsed time at the end, and the search's status line.

On a terminal a line is redrawn in place; otherwise (logs, pipes) whole lines are written, the search's
every 10 rounds, or after LOG_EVERY_S seconds without one (a large detector's round can take a minute).
The search's ETA extrapolates the elapsed time linearly in the progress made towards the target: with
r the current ratio (e.g. MACs kept) and t the target, done = (1 − r) / (1 − t) and
ETA = elapsed · (1 − done) / done (or the share of `--max-trials` spent, when that is further along).
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


LOG_EVERY_S = 30.0  # in a log, the longest silence between two status lines of the search


def _stream():
    return sys.stderr


class Phases:
    """`with phases("verify", "comparing ... on 4 samples"):` says what runs once it has run `delay` seconds
    (short phases stay silent), and then, at its end, how long it took."""

    def __init__(self, enabled: bool = True, delay: float = 2.0):
        self.enabled, self.delay = enabled, delay

    @contextmanager
    def __call__(self, name: str, what: str):
        if not self.enabled:
            yield
            return
        out, start, lock, shown = _stream(), time.perf_counter(), threading.Lock(), []
        tty = out.isatty()

        def announce():
            with lock:
                if shown is not None:
                    out.write(f"{name}: {what} ..." + ("" if tty else "\n"))
                    out.flush()
                    shown.append(True)

        timer = threading.Timer(self.delay, announce)
        timer.daemon = True
        if self.delay > 0:
            timer.start()
        else:
            announce()
        try:
            yield
        finally:
            timer.cancel()
            with lock:
                if shown:
                    seconds = time.perf_counter() - start
                    out.write(f" {seconds:.1f} s\n" if tty else f"{name}: done in {seconds:.1f} s\n")
                    out.flush()
                shown = None  # a timer that fires late prints nothing


QUIET = Phases(False)


class SearchProgress:
    """The search's status line: trials, each measure against its target, groups still searching, elapsed
    time, ETA; a line of its own when the threshold is raised.

    `targets` maps a measure's name to its target ratio ({"MACs": 0.5}; a latency target adds
    {"latency": 0.6}); the search calls the printer with the current ratios as keywords named the same
    way in lower case (`macs=0.73`, `latency=0.81`)."""

    def __init__(self, kind: str, targets: dict[str, float] | None = None, max_trials: int | None = None,
                 counted: str = "trials", active: str | None = None):
        self.kind, self.targets, self.max_trials = kind, dict(targets or {}), max_trials
        # what the line counts, and what its active/total are (the descent's: single ablations, forwards, groups)
        self.counted = counted
        self.active = ("groups searching" if kind == "aofp" else "candidates") if active is None else active
        self.start = time.perf_counter()
        self.threshold = None
        self.tty = _stream().isatty()
        self.drawn = False
        self.last = None  # the latest status line, shown or not
        self.written = self.start  # when a status line was last written

    def __call__(self, stats, macs_ratio: float | None, active: int, total: int, **ratios) -> None:
        ratios = {**({"macs": macs_ratio} if macs_ratio is not None else {}), **ratios}
        threshold = getattr(stats, "threshold", None)
        if self.threshold is not None and threshold and threshold != self.threshold:
            self._line(f"{self.kind}: every group saturated before the target at MACs x{macs_ratio:.3f}: "
                       f"threshold raised {self.threshold:.3g} -> {threshold:.3g}, "
                       "the groups it lets through search again",
                       True, own_line=True)
        self.threshold = threshold
        elapsed = time.perf_counter() - self.start
        parts = [f"{self.kind}: {stats.trials} {self.counted}"]
        for name, value in ratios.items():
            target = next((t for k, t in self.targets.items() if k.lower() == name), None)
            label = "MACs" if name == "macs" else name
            parts.append(f"{label} x{value:.3f}" + (f" (target x{target:.3f})" if target is not None else ""))
        if self.active:  # "": the line has no active/total (the descent's ranking)
            parts.append(f"{active}/{total} {self.active}")
        parts.append(f"{elapsed:.0f} s")
        eta = self.eta(ratios, stats.trials, elapsed, getattr(stats, "share", None))
        if eta is not None:
            parts.append(f"ETA ~{eta:.0f} s")
        now = time.perf_counter()
        self._line(", ".join(parts), self.tty or stats.rounds % 10 == 1 or now - self.written >= LOG_EVERY_S)

    def eta(self, ratios: dict[str, float], trials: int, elapsed: float, share: float | None = None) -> float | None:
        """`share`: the share of the work done, where the caller knows it better than the counts (the descent's
        ranking)."""
        if share is not None:
            done = [share]
        else:
            done = [(1 - ratios[k.lower()]) / (1 - t) for k, t in self.targets.items() if k.lower() in ratios and t < 1]
            done += [trials / self.max_trials] if self.max_trials else []
        best = min(max(done, default=0.0), 1.0)
        return elapsed * (1 - best) / best if best > 0.02 else None

    def _line(self, line: str, show: bool, own_line: bool = False) -> None:
        out = _stream()
        if not own_line:
            self.last = line if not show else None
        if not show:
            return
        self.written = time.perf_counter()
        if self.tty:
            out.write("\r" + line + (" " * 8 if not own_line else "\n"))
        else:
            out.write(line + "\n")
        out.flush()
        self.drawn = True

    def close(self) -> None:
        """Ends the redrawn line; in a log, writes the final status if it was not yet written."""
        if self.drawn and self.tty:
            _stream().write("\n")
        elif self.last is not None:
            _stream().write(self.last + "\n")
