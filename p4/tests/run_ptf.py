"""Run the PTF tests of p4/steering.p4 against simple_switch_grpc (root; ``make -C p4 ptf``).

Makes one veth pair per switch port (names carry a tag of this run, nothing else is touched),
starts the switch with statelab's bmv2 driver (:class:`statelab.fabric.bmv2.Bmv2Fabric`: its
own gRPC and Thrift ports, log in the run's directory), runs ``ptf`` on the other ends with
the switch's addresses as test parameters, and removes all of it afterwards, also on failure.

Usage: ``run_ptf.py [--log-dir DIR] [--log-level LEVEL] [PTF test names ...]``; the exit code
is PTF's (0: every test passed; 2: the toolchain is missing).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PORTS = (1, 2, 3, 4, 5, 6, 11, 12, 13, 14)   # steering_ptf.py's port map
MISSING = 2


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def make_veths(tag: str) -> list[tuple[int, str, str]]:
    """Create the veth pairs: (port, switch-side name, PTF-side name)."""
    pairs = []
    for port in PORTS:
        sw_if, ptf_if = f"p4s{tag}-{port}", f"p4t{tag}-{port}"
        _ip("link", "add", sw_if, "type", "veth", "peer", "name", ptf_if)
        pairs.append((port, sw_if, ptf_if))
        for name in (sw_if, ptf_if):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True)
            subprocess.run(["ethtool", "-K", name, "tx", "off"], capture_output=True)
            _ip("link", "set", name, "mtu", "1600", "up")
    return pairs


def remove_veths(tag: str) -> None:
    """Delete every interface of this run (deleting one end of a veth deletes both)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith((f"p4s{tag}-", f"p4t{tag}-")):
            _ip("link", "del", name, check=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=None, help="where logs go (default: /tmp/statelab-ptf-TAG)")
    parser.add_argument("--log-level", default="info", help="bmv2's log level (debug/trace log every packet)")
    parser.add_argument("tests", nargs="*", help="PTF test names (default: all)")
    args = parser.parse_args(argv)
    if shutil.which("simple_switch_grpc") is None:
        print("run_ptf: simple_switch_grpc not found (bmv2 with its P4Runtime server is not installed)",
              file=sys.stderr)
        return MISSING
    if os.geteuid() != 0:
        print("run_ptf: needs root (it creates veths and opens raw sockets)", file=sys.stderr)
        return MISSING
    sys.path.insert(0, str(REPO))
    from mininet.link import Intf
    from statelab.fabric.bmv2 import Bmv2Fabric

    tag = secrets.token_hex(2)
    log_dir = args.log_dir or Path(f"/tmp/statelab-ptf-{tag}")
    log_dir.mkdir(parents=True, exist_ok=True)
    switch = None
    try:
        pairs = make_veths(tag)
        switch = Bmv2Fabric(f"p4s{tag}", dpid="1", log_dir=log_dir, log_level=args.log_level)
        for port, sw_if, _ptf_if in pairs:
            Intf(sw_if, node=switch, port=port)
        switch.start([])
        params = (f"grpc='127.0.0.1:{switch.grpc_port}';device_id={switch.device_id};"
                  f"thrift={switch.thrift_port if switch.runtime_ports else None};tag='{tag}'")
        ptf = Path(sys.executable).parent / "ptf"
        command = [str(ptf) if ptf.exists() else "ptf", "--test-dir", str(HERE), "--pypath", str(REPO),
                   "--test-params", params, "--log-file", str(log_dir / "ptf.log"),
                   "--default-timeout", "2", "--default-negative-timeout", "0.3"]
        command += [f"--interface=0-{port}@{ptf_if}" for port, _sw_if, ptf_if in pairs]
        command += args.tests
        print(f"run_ptf: switch {switch.name} (gRPC {switch.grpc_port}, Thrift {switch.thrift_port}), "
              f"logs in {log_dir}", flush=True)
        code = subprocess.run(command, cwd=log_dir).returncode
        if switch.proc.poll() is not None:
            print(f"run_ptf: the switch died (exit code {switch.proc.returncode}); see {switch.log_path}",
                  file=sys.stderr)
            code = code or 1
        if code:
            print(f"run_ptf: failed; switch log {switch.log_path}, PTF log {log_dir / 'ptf.log'}", file=sys.stderr)
        return code
    finally:
        if switch is not None:
            switch.stop()
            switch.terminate()
        remove_veths(tag)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
