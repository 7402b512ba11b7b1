"""Run real NF processes on veth pairs and talk NSH to them, as the fabric would.

For the tests of issue "shared state / crash safety / bad input": each :class:`NFProcess` is a
real ``python -m nfs.<kind>`` process on one end of a veth pair; the test holds the other end
with an AF_PACKET socket. Both ends stay in the root namespace so the NF reaches the test
Redis on 127.0.0.1. Needs root (tests that use it are marked ``root``). Every interface and
process is ended by name/PID in close().

Nothing here waits for quiet: the NF's runtime counts every frame it receives (``rx``) and
sends (``tx``) and rewrites its counters file several times a second with the time
(``updated``). :meth:`NFProcess.counters` waits, up to a deadline, for a file written after the
last frame was sent that counts all frames sent; :meth:`NFProcess.receive` then reads exactly
the ``tx`` frames the NF sent back. A slow machine makes a test slower, not wrong; past the
deadline the test fails naming the NF and showing the tail of its log.

Each NFProcess writes a token of its own into the last context word (C4) of every NSH frame it
sends; an NF keeps the NSH header in what it sends back, so a frame coming back without the
token was never sent by the test: some other process put it on this veth. That fails the test
with the frame shown, instead of passing for an extra reply.
"""

from __future__ import annotations

import itertools
import secrets
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from nfs import nsh
from nfs.mmsg import packet_socket

REPO = Path(__file__).resolve().parents[1]
FABRIC_MAC = bytes.fromhex("025e00000001")
_C4 = slice(14 + 8 + 12, 14 + 8 + 16)  # the last context word of an MD type 1 NSH header
DEADLINE = 20.0  # seconds an NF may take to show it processed what it was sent
_serial = itertools.count(1)


def nsh_frame(inner: bytes, spi: int = 2, si: int = 255, tenant: int = 1,
              dst_mac: bytes = bytes.fromhex("024e46000001")) -> bytes:
    """Wrap an inner Ethernet frame the way the fabric does (MD type 1, C1 = tenant)."""
    import struct
    header = struct.pack("!BBBBI", 0x0F, 0xC6, 1, 3, (spi << 8) | si) + struct.pack("!I", tenant) + bytes(12)
    return dst_mac + FABRIC_MAC + b"\x89\x4f" + header + inner


class NFProcess:
    """One NF process on a veth pair.

    Args:
        kind: NF kind (module ``nfs.<kind>``).
        config: the pool config (the ``statelab`` section is added: tenant, tenant_id, pool).
        state_url: the ``--state`` URL.
        tmp: a directory for config, counters and log.
        tenant: tenant name; tenant_id: its id; pool: pool name.
        chains: the tenant's chains as the lab writes them (default: this pool alone, both ways).
    """

    def __init__(self, kind: str, config: dict[str, Any], state_url: Optional[str], tmp: Path,
                 tenant: str = "red", tenant_id: int = 1, pool: Optional[str] = None,
                 chains: Optional[dict[str, list[str]]] = None) -> None:
        n = next(_serial)
        tag = secrets.token_hex(3)
        self.name = f"{kind}-{tag}-{n}"
        self.ours, self.theirs = f"nft{tag}x", f"nft{tag}y"
        subprocess.run(["ip", "link", "add", self.ours, "type", "veth", "peer", "name", self.theirs],
                       check=True, capture_output=True)
        for ifname in (self.ours, self.theirs):  # before the links are up: no IPv6 chatter at all
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], capture_output=True)
            subprocess.run(["ip", "link", "set", ifname, "mtu", "1600", "up"], check=True, capture_output=True)
        self.config_path = tmp / f"{self.name}.yaml"
        pool = pool or kind
        self.config_path.write_text(yaml.safe_dump({**config, "statelab": {
            "tenant": tenant, "tenant_id": tenant_id, "pool": pool,
            "chains": chains or {"outbound": [pool], "inbound": [pool]}}}))
        self.counters_path = tmp / f"{self.name}.counters.json"
        self.log_path = tmp / f"{self.name}.log"
        argv = [sys.executable, "-m", f"nfs.{kind}", "--iface", self.theirs, "--instance", self.name,
                "--config", str(self.config_path), "--counters", str(self.counters_path)]
        if state_url:
            argv += ["--state", state_url]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.sock = packet_socket(self.ours)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: keep every reply
        self.sent = 0          # frames sent to the NF
        self.sent_at = 0.0     # wall-clock time of the last one (the counters' "updated" clock)
        self.received = 0      # NSH frames read back from the NF
        self.token = secrets.token_bytes(4)
        deadline = time.monotonic() + 15
        while not self.counters_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"NF {self.name} did not start (exit {self.proc.poll()}):\n"
                                   + self.log_path.read_text()[-2000:])
            time.sleep(0.02)

    def send(self, frame: bytes) -> None:
        if frame[12:14] == b"\x89\x4f" and len(frame) >= _C4.stop and frame[16] == 1:
            frame = frame[:_C4.start] + self.token + frame[_C4.stop:]  # MD type 1: mark it ours
        self.sock.send(frame)
        self.sent += 1
        self.sent_at = time.time()

    def send_bursts(self, frames: list[bytes], burst: int = 100, pause: float = 0.02) -> None:
        """Send many frames in bursts of ``burst`` with a short pause between them: a test of
        robustness, not of buffer sizes."""
        for i, frame in enumerate(frames):
            self.send(frame)
            if i % burst == burst - 1:
                time.sleep(pause)

    def _fail(self, what: str) -> AssertionError:
        return AssertionError(f"NF {self.name} (pid {self.proc.pid}, exit {self.proc.poll()}): {what}\n"
                              + self.log_path.read_text()[-2000:])

    def counters(self, deadline: float = DEADLINE) -> dict[str, Any]:
        """The NF's counters once it has processed every frame sent to it.

        Waits for a counters file written after the last send whose ``rx`` counts all frames
        sent (``rx`` may count more: a veth's own first frames). A process that has exited
        writes no more: its last file is returned.

        Args:
            deadline: seconds to wait at most; then AssertionError with the NF's log tail.
        """
        end = time.monotonic() + deadline
        while True:
            c = json.loads(self.counters_path.read_text())  # replaced atomically by the NF
            if c["updated"] > self.sent_at and c["rx"] >= self.sent:
                return c
            if self.proc.poll() is not None:
                return c
            if time.monotonic() > end:
                raise self._fail(f"counted rx={c['rx']} of the {self.sent} frames sent, {deadline:g} s after")
            time.sleep(0.02)

    def receive(self, deadline: float = DEADLINE) -> list[bytes]:
        """Every NSH frame the NF has sent back for the frames sent so far (and not read yet):
        as many as its ``tx`` counter says, waiting for them up to ``deadline`` seconds."""
        want = self.counters(deadline)["tx"] - self.received
        out: list[bytes] = []
        end = time.monotonic() + deadline
        while len(out) < want:
            left = end - time.monotonic()
            if left <= 0:
                raise self._fail(f"sent back {want} frames (its tx counter), {len(out)} arrived")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            data, addr = self.sock.recvfrom(65535)
            if addr[2] != socket.PACKET_OUTGOING and data[12:14] == b"\x89\x4f":
                out.append(data)  # only NSH: what an NF sends back
        self.received += len(out)
        foreign = [f for f in out if f[_C4] != self.token]
        if foreign:
            raise self._fail(f"sent back {len(foreign)} of {len(out)} frames that no frame of this test "
                             f"caused (NSH C4 is not {self.token.hex()}): another process sent into "
                             f"veth {self.ours}; the first: {foreign[0][:80].hex()}")
        return out

    def exchange(self, inner: bytes, deadline: float = DEADLINE, **nsh_fields: Any) -> Optional[nsh.NshFrame]:
        """Send one inner frame wrapped in NSH; return the NF's reply (parsed) or None if it
        dropped the frame (its counters show it processed the frame and sent nothing)."""
        self.send(nsh_frame(inner, **nsh_fields))
        replies = self.receive(deadline)
        assert len(replies) <= 1, f"{len(replies)} replies to one packet"
        return nsh.parse(replies[0]) if replies else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()
        subprocess.run(["ip", "link", "del", self.ours], capture_output=True)
