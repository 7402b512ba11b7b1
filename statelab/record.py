"""What a lab created, written down as it goes, so teardown can end exactly that.

Every process the lab starts is recorded by PID together with its start time (so a PID reused
by the kernel is never mistaken for ours), every interface and bridge by name. ``statelab
clean`` reads the record of a lab whose owner died and removes only what is in it: no kill by
name, no ``mn -c``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

RUN_ROOT = Path(os.environ.get("STATELAB_RUN", "/run/statelab"))


def proc_start_time(pid: int) -> Optional[int]:
    """Return a process's start time in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is dead; only its parent's wait is missing
        return None
    return int(fields[19])


def alive(pid: int, start: Optional[int]) -> bool:
    """True if ``pid`` is still the process that was recorded with ``start``.

    A process recorded without a start time (it had already exited when it was recorded) is
    never ours again: whatever has its PID now is some other process, never to be signalled.
    """
    now = proc_start_time(pid)
    return now is not None and start is not None and now == start


@dataclass
class ProcessEntry:
    pid: int
    start: Optional[int]
    what: str


@dataclass
class Record:
    """The persistent list of what one lab created; saved on every change."""

    lab: str
    owner: int
    owner_start: Optional[int]
    run_dir: str
    ovs_started: bool = False
    processes: list[ProcessEntry] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    ovs_bridges: list[str] = field(default_factory=list)
    linux_bridges: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / "record.json"

    def save(self) -> None:
        """Write the record atomically."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> "Record":
        data = json.loads(path.read_text())
        data["processes"] = [ProcessEntry(**p) for p in data.get("processes", [])]
        return cls(**data)

    def add_process(self, pid: int, what: str) -> None:
        self.processes.append(ProcessEntry(pid, proc_start_time(pid), what))
        self.save()

    def add_interface(self, name: str) -> None:
        self.interfaces.append(name)
        self.save()

    def owner_alive(self) -> bool:
        return alive(self.owner, self.owner_start)

    def leftovers(self) -> list[str]:
        """Describe everything recorded that still exists."""
        left = [f"process {p.pid} ({p.what})" for p in self.processes if alive(p.pid, p.start)]
        left += [f"interface {i}" for i in self.interfaces + self.linux_bridges if _link_exists(i)]
        existing = set(_ovs_bridges())
        left += [f"OVS bridge {b}" for b in self.ovs_bridges if b in existing]
        return left

    def clean(self, grace: float = 2.0) -> None:
        """End every recorded process (SIGTERM, then SIGKILL after ``grace`` s) and delete
        every recorded interface and bridge. Safe to call any number of times."""
        procs = [p for p in self.processes if alive(p.pid, p.start)]
        for p in procs:
            _signal(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while procs and time.monotonic() < deadline:
            _reap(procs)
            procs = [p for p in procs if alive(p.pid, p.start)]
            if procs:
                time.sleep(0.05)
        for p in procs:
            _signal(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while procs and time.monotonic() < deadline:
            _reap(procs)
            procs = [p for p in procs if alive(p.pid, p.start)]
            if procs:
                time.sleep(0.05)
        if self.ovs_bridges:
            existing = set(_ovs_bridges())
            for br in self.ovs_bridges:
                if br in existing:
                    subprocess.run(["ovs-vsctl", "--if-exists", "del-br", br], capture_output=True)
        for name in self.interfaces + self.linux_bridges:
            if _link_exists(name):
                subprocess.run(["ip", "link", "del", name], capture_output=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(procs: list[ProcessEntry]) -> None:
    """Collect the exit status of those that are our children (else they stay zombies)."""
    for p in procs:
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _ovs_bridges() -> list[str]:
    try:
        out = subprocess.run(["ovs-vsctl", "-t", "2", "list-br"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    return out.stdout.split() if out.returncode == 0 else []


def lab_records(root: Path = RUN_ROOT) -> list[Record]:
    """Every lab recorded on this machine (running, or dead and not yet cleaned)."""
    records = []
    for path in sorted(root.glob("*/record.json")):
        try:
            records.append(Record.load(path))
        except (OSError, ValueError, TypeError):
            continue
    return records
