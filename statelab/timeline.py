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

    def plot(self, path: Path, title: str, load: Optional[tuple[float, float]] = None,
             losses: Optional[list[tuple[float, int]]] = None) -> Path:
        """Draw the timeline as a PNG.

        The y axis starts at 0 (a dip is drawn at its true size); the load's window is shaded,
        so lines falling to 0 after it read as the load ending, not as an outage; datagrams
        lost are marked where they were sent; events are labelled at staggered heights so
        that a kill and its failover milliseconds apart can both be read.

        Args:
            path: where to write the PNG.
            title: the plot's title (e.g. the check's ID and sentence).
            load: (start, end) of the offered load, wall-clock seconds.
            losses: (wall-clock time, datagrams lost) per 100 ms of sending.

        Returns:
            ``path``.
        """
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
        if load is not None:
            ax.axvspan(load[0] - self.t0, load[1] - self.t0, color="0.92", zorder=0, label="offered load")
        for iid, pts in sorted(self.rates().items()):
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=iid, linewidth=1.6)
        lost = [(at - self.t0, n) for at, n in (losses or []) if n > 0]
        if lost:
            ax2 = ax.twinx()
            ax2.bar([x for x, _ in lost], [n for _, n in lost], width=0.1, color="red", alpha=0.6,
                    label="datagrams lost (by send time)")
            ax2.set_ylabel("lost per 100 ms", color="red")
            ax2.set_ylim(bottom=0)
            ax2.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0))
        for n, (at, what, iid) in enumerate(self.events):
            x = at - self.t0
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"{what} {iid}", (x, 0.98 - 0.12 * (n % 4)), xycoords=("data", "axes fraction"),
                        va="top", ha="left", fontsize=8, xytext=(3, 0), textcoords="offset points",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7", "alpha": 0.9})
        ax.set_ylim(bottom=0)
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
