"""A lab leaves nothing behind: after a normal exit, an exception, Ctrl-C, or its owner's death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from statelab.lab import Lab, lab_tag
from statelab.record import Record, alive
from statelab.spec import load

pytestmark = pytest.mark.root
SMALL = Path(__file__).resolve().parent.parent / "data" / "small.yaml"
REPO = Path(__file__).resolve().parents[2]


def namespaces() -> set[int]:
    """Inodes of every network namespace some process is in."""
    found = set()
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            found.add(os.stat(ns).st_ino)
        except OSError:
            pass
    return found


def lab_links(tag: str) -> list[str]:
    return [p.name for p in Path("/sys/class/net").iterdir() if tag in p.name]


def ovs_bridges() -> list[str]:
    return subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True).stdout.split()


def assert_nothing_left(record: Record, ns_before: set[int]) -> None:
    tag = lab_tag(record.lab)
    assert [p for p in record.processes if alive(p.pid, p.start)] == []
    assert lab_links(tag) == []
    assert f"s{tag}" not in ovs_bridges()
    assert namespaces() - ns_before == set()
    assert not Path(record.run_dir).exists()


def test_normal_exit_leaves_nothing() -> None:
    before = namespaces()
    with Lab(load(SMALL)) as lab:
        record = lab.record
        assert len(namespaces() - before) >= 4  # g1, g2, state server, one NF
        assert " 0% packet loss" in lab.host("g1").cmd("ping -c 1 -W 2 10.9.0.2")
    assert_nothing_left(record, before)


def test_exception_inside_the_lab_leaves_nothing() -> None:
    before = namespaces()
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(load(SMALL)) as lab:
            record = lab.record
            lab.control.scale_out("green", "fw")
            raise RuntimeError("boom")
    assert_nothing_left(record, before)


def _start_cli(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "statelab.cli", "up", str(SMALL), "--no-cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "is up;" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("statelab up did not come up:\n" + "".join(lines))


def test_ctrl_c_leaves_nothing() -> None:
    before = namespaces()
    proc = _start_cli()
    record = Record.load(Path("/run/statelab/small/record.json"))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), out
    assert "tearing down" in out
    assert_nothing_left(record, before)


def test_statelab_down_stops_a_lab_from_another_terminal() -> None:
    before = namespaces()
    proc = _start_cli()
    record = Record.load(Path("/run/statelab/small/record.json"))
    down = subprocess.run([sys.executable, "-m", "statelab.cli", "down", "small"], cwd=REPO,
                          capture_output=True, text=True, timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    proc.wait(timeout=30)
    assert_nothing_left(record, before)


def test_clean_removes_what_a_killed_owner_left() -> None:
    before = namespaces()
    proc = _start_cli()
    record = Record.load(Path("/run/statelab/small/record.json"))
    proc.kill()  # the owner dies without tearing down
    proc.wait()
    assert any(alive(p.pid, p.start) for p in record.processes)
    status = subprocess.run([sys.executable, "-m", "statelab.cli", "status"], cwd=REPO,
                            capture_output=True, text=True)
    assert "dead: run `statelab clean`" in status.stdout
    clean = subprocess.run([sys.executable, "-m", "statelab.cli", "clean", "small"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert_nothing_left(record, before)
