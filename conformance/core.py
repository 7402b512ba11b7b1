"""The conformance suite's machinery: checks with stable IDs, results, the run's report.

A check is a function ``f(ctx) -> Result`` registered with :func:`check` under a stable ID
(ISO-n, SCALE-n, CONT-n); its docstring's first sentence is its MUST/SHOULD statement. The
pytest tests in ``conformance/test_*.py`` only run checks; the suite's own tests
(``tests/test_conformance_fails.py``) run the same checks against deliberately broken labs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import subprocess
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Result:
    """What a check found.

    Attributes:
        verdict: PASS, FAIL or SKIP.
        figures: the measured numbers (each also recorded with pytest's record_property).
        details: for a person: what failed and where, or why it was skipped.
        timeline: the PNG timeline, for scale/kill checks.
    """

    verdict: str
    figures: dict[str, Any] = field(default_factory=dict)
    details: str = ""
    timeline: Optional[str] = None


@dataclass(frozen=True)
class Check:
    id: str
    level: str
    sentence: str
    func: Callable[..., Result]


CHECKS: dict[str, Check] = {}
FAMILIES = ("conformance.isolation", "conformance.scale", "conformance.continuity")


def registry() -> dict[str, Check]:
    """Every check of the three families, by ID (importing a family registers its checks)."""
    for family in FAMILIES:
        importlib.import_module(family)
    return CHECKS


def check(check_id: str) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """Register a check under ``check_id``; its docstring's first paragraph is its sentence."""
    def register(func: Callable[..., Result]) -> Callable[..., Result]:
        sentence = " ".join((func.__doc__ or "").strip().split("\n\n")[0].split())
        level = "MUST" if " MUST " in f" {sentence} " else "SHOULD" if " SHOULD " in f" {sentence} " else ""
        if not level:
            raise ValueError(f"{check_id}: the docstring's first sentence needs MUST or SHOULD")
        CHECKS[check_id] = Check(check_id, level, sentence, func)
        return func
    return register


def verdict(ok: bool, figures: dict[str, Any], details: str = "", timeline: Optional[Path] = None) -> Result:
    """A PASS or FAIL result."""
    return Result(PASS if ok else FAIL, figures, "" if ok else details, str(timeline) if timeline else None)


@dataclass
class Record:
    id: str
    level: str
    sentence: str
    verdict: str
    figures: dict[str, Any]
    details: str
    timeline: Optional[str]
    seconds: float


class Report:
    """The run's report: target, versions, topology and every check's verdict and figures.

    Args:
        target: fabric kind under test.
        topology: topology file.
        directory: where report.json and the PNG timelines go (None: nowhere).
    """

    def __init__(self, target: str, topology: Path, directory: Optional[Path], state: Optional[str] = None) -> None:
        self.target = target
        self.topology = topology
        self.state = state  # --state, in place of the topology's state: (None: as it says)
        self.directory = directory
        self.records: list[Record] = []
        self.started = time.time()

    def add(self, c: Check, result: Result, seconds: float) -> None:
        self.records.append(Record(c.id, c.level, c.sentence, result.verdict, result.figures,
                                   result.details, result.timeline, round(seconds, 1)))

    def versions(self) -> dict[str, str]:
        """Versions of what ran: statelab, Python, Open vSwitch, Redis, kernel."""
        import statelab

        def first_line(cmd: list[str]) -> str:
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return "not installed"
            return out.splitlines()[0].strip() if out else "unknown"
        return {"statelab": statelab.__version__, "python": platform.python_version(),
                "openvswitch": first_line(["ovs-vswitchd", "--version"]),
                "redis": first_line(["redis-server", "--version"]),
                "bmv2": first_line(["simple_switch_grpc", "--version"]), "kernel": platform.release()}

    def as_dict(self) -> dict[str, Any]:
        counts = {v: sum(1 for r in self.records if r.verdict == v) for v in (PASS, FAIL, SKIP)}
        try:
            text = self.topology.read_text()
        except OSError:
            text = ""
        return {"target": self.target, "topology": str(self.topology), "state_override": self.state,
                "topology_sha256": hashlib.sha256(text.encode()).hexdigest(), "topology_text": text,
                "versions": self.versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "summary": counts, "checks": [asdict(r) for r in self.records]}

    def write(self) -> Optional[Path]:
        """Write ``report.json``; return its path."""
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "report.json"
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    def table(self, width: int = 110) -> str:
        """The one-screen summary: a line per check (figures wrapped, never cut); a SKIP shows
        its reason, a FAIL what broke."""
        lines = [f"statelab conformance on {self.target} ({self.topology.name}"
                 + (f", state {self.state})" if self.state else ")"),
                 f"{'check':9} {'verdict':7} {'level':6} figures"]
        indent = " " * 25
        for r in sorted(self.records, key=lambda r: r.id):
            figs = ", ".join(f"{k}={v}" for k, v in r.figures.items() if not isinstance(v, (dict, list)))
            text = f"reason: {r.details}" if r.verdict == SKIP else figs
            if r.verdict == FAIL and r.details:
                text = f"{figs}; FAIL: {r.details}"
            wrapped = textwrap.wrap(text, width - len(indent), break_long_words=False) or [""]
            lines.append(f"{r.id:9} {r.verdict:7} {r.level:6} {wrapped[0]}")
            lines += [indent + w for w in wrapped[1:]]
        return "\n".join(lines)
