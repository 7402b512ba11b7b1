"""Per-instance traffic over time, sampled from the NF counters, and its PNG timeline.

A :class:`Timeline` samples every NF instance's ``rx`` counter a few times a second in a
background thread while a check runs; :meth:`Timeline.plot` draws packets per second per
instance with the lab's scale/kill events marked, so a reader sees traffic move between
instances.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Optional

INTERVAL = 0.2


class Timeline:
    """Samples a running lab's NF counters.

    Args:
        lab: the running lab.
        instances: instance id prefixes to follow (e.g. ``["red-fw-"]``); all if None.
        interval: seconds between samples.
    """

    def __init__(self, lab: Any, instances: Optional[list[str]] = None, interval: float = INTERVAL) -> None:
        self.lab = lab
        self.prefixes = instances
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self.t0 = time.time()
        self.events_from = len(lab.control.events)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._events: Optional[list[tuple[float, str, str]]] = None

    def _follow(self, iid: str) -> bool:
        return self.prefixes is None or any(iid.startswith(p) for p in self.prefixes)

    def sample(self) -> None:
        """Take one sample of every followed instance (its own ``updated`` time, its ``rx``)."""
        for inst in self.lab.iter_instances():
            if not self._follow(inst.id):
                continue
            c = inst.counters()
            if c:
                series = self.samples.setdefault(inst.id, [])
                point = (c["updated"], c["rx"])
                if not series or series[-1][0] != point[0]:
                    series.append(point)

    def __enter__(self) -> "Timeline":
        self.t0 = time.time()
        self.events_from = len(self.lab.control.events)
        self._thread = threading.Thread(target=self._run, name="statelab-timeline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self._events = self.lab.control.events[self.events_from:]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @property
    def events(self) -> list[tuple[float, str, str]]:
        """(time, event, instance) of the lab's control events while the timeline ran."""
        if self._events is not None:
            return self._events
        return self.lab.control.events[self.events_from:]

    def rates(self) -> dict[str, list[tuple[float, float]]]:
        """Packets per second per instance: ``{id: [(seconds since start, pps), ...]}``."""
        out = {}
        for iid, series in self.samples.items():
            pts = []
            for (t1, r1), (t2, r2) in zip(series, series[1:]):
                if t2 > t1:
                    pts.append((round(t2 - self.t0, 3), round((r2 - r1) / (t2 - t1), 1)))
            out[iid] = pts
        return out

    def carried(self, iid: str, after: float) -> int:
        """Packets instance ``iid`` received after wall-clock time ``after``."""
        series = self.samples.get(iid, [])
        before = [r for t, r in series if t <= after]
        return (series[-1][1] - (before[-1] if before else 0)) if series else 0

    def plot(self, path: Path, title: str) -> Path:
        """Draw the timeline as a PNG.

        Args:
            path: where to write the PNG.
            title: the plot's title (e.g. the check's ID and sentence).

        Returns:
            ``path``.
        """
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
        for iid, pts in sorted(self.rates().items()):
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=iid, linewidth=1.6)
        for t, what, iid in self.events:
            x = t - self.t0
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"{what} {iid}", (x, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("packets/s received")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path
