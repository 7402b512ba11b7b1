"""The PTF suite of p4/steering.p4 (p4/tests/steering_ptf.py) on simple_switch_grpc, and the
bmv2 driver's own process handling: a failed start and a switch that dies are reported with
the exit code, the command line and the log, never a hang."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from statelab.errors import ProcessFailed

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("simple_switch_grpc") is None,
                       reason="simple_switch_grpc (bmv2 with P4Runtime) is not installed: p4lang's "
                              "Ubuntu package p4lang-bmv2; the bmv2 target is not tested here"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (veths, raw sockets)"),
]


def test_ptf_suite(tmp_path):
    pytest.importorskip("ptf", reason="ptf (PyPI) is not installed in this environment")
    proc = subprocess.run([sys.executable, str(REPO / "p4" / "tests" / "run_ptf.py"), "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"PTF failed (exit code {proc.returncode}):\n{tail}"


@pytest.fixture
def veth():
    """A veth pair of this test; the switch gets one end."""
    tag = os.urandom(2).hex()
    a, b = f"p4d{tag}-1", f"p4e{tag}-1"
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    for name in (a, b):
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
    yield f"p4d{tag}", a
    subprocess.run(["ip", "link", "del", a], capture_output=True)


@pytest.fixture
def switch(veth, tmp_path):
    from mininet.link import Intf

    from statelab.fabric.bmv2 import Bmv2Fabric

    name, intf = veth
    sw = Bmv2Fabric(name, dpid="2", log_dir=tmp_path, rpc_timeout=3)
    Intf(intf, node=sw, port=1)
    yield sw
    sw.stop(deleteIntfs=False)
    sw.terminate()


def test_a_dead_switch_is_named_with_its_exit_code_and_log(switch):
    switch.start([])
    assert switch.dropped() == 0
    os.kill(switch.proc.pid, signal.SIGKILL)   # the process this test started
    switch.proc.wait(5)
    with pytest.raises(ProcessFailed) as err:
        switch.dropped()
    text = str(err.value)
    assert "simple_switch_grpc" in text and switch.name in text and "--grpc-server-addr" in text
    assert err.value.code == -signal.SIGKILL


def test_a_switch_that_cannot_start_shows_its_command_and_log(switch):
    switch.log_level = "chatty"   # simple_switch_grpc refuses an unknown log level
    with pytest.raises(ProcessFailed) as err:
        switch.start([])
    text = str(err.value)
    assert "--log-level chatty" in text and "exited with code" in text
    assert switch.proc.poll() is not None
