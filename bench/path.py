"""One NF process on a veth pair, driven by a closed-loop generator: the packet-loop benches.

The NF (or the bare echo loop it is compared with) runs in a network namespace of its own, on
one end of a veth pair, exactly as the lab starts it (``python -m nfs.<kind> --iface ...``); its
state server, when it has one, is a redis-server in the same namespace (loopback only) with the
lab's tenant ACL. The generator sits on the other end, in the bench's namespace, and keeps a
fixed number of frames outstanding (sent, not yet back): the rate it sees is the rate of the
NF, not of the generator's pacing. Every process is started here and ended by PID; the
namespace (and with it the veth pair) is deleted at the end, also after an error.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from nfs.mmsg import packet_socket

ROOT = Path(__file__).resolve().parents[1]
ETH_P_NSH = 0x894F
PACKET_IGNORE_OUTGOING = 23
ECHO = ROOT / "bench" / "echo.py"


class BenchError(RuntimeError):
    pass


def _run(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:
        raise BenchError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")


class NfPath:
    """A namespace with one NF end of a veth pair (and a Redis), and the generator's end.

    Args:
        tag: a short name, unique among the benches running at once.
    """

    def __init__(self, tag: str = "b") -> None:
        pid = os.getpid() % 100000
        self.ns = f"slbench{tag}{pid}"
        self.gen_if = f"slg{tag}{pid}"[:15]
        self.nf_if = f"sln{tag}{pid}"[:15]
        self.dir = Path(tempfile.mkdtemp(prefix="statelab-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.redis: Optional[subprocess.Popen] = None
        self.replica: Optional[subprocess.Popen] = None
        self.redis_port = 0
        self.password = "bench-" + os.urandom(8).hex()

    def __enter__(self) -> "NfPath":
        _run("ip", "netns", "add", self.ns)
        try:
            _run("ip", "link", "add", self.gen_if, "mtu", "1600", "type", "veth", "peer", "name", self.nf_if,
                 "mtu", "1600", "netns", self.ns)
            _run("ip", "link", "set", self.gen_if, "up")
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.nf_if, "up")
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
            for dev, ns in ((self.gen_if, None), (self.nf_if, self.ns)):  # no IPv6 chatter in the counts
                pre = ["ip", "netns", "exec", ns] if ns else []
                subprocess.run(pre + ["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"],
                               capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs + [r for r in (self.redis, self.replica) if r is not None]:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []
        self.redis = self.replica = None
        subprocess.run(["ip", "netns", "delete", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.gen_if], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)  # configs, logs, a replica's dump.rdb

    # -- the state server ------------------------------------------------------------------

    def start_redis(self, tenant: str) -> str:
        """A redis-server on the namespace's loopback with the lab's ACL for ``tenant``; its URL."""
        from statelab.lab import tenant_acl

        if self.redis is not None:
            return self.state_url(tenant)
        acl = self.dir / "users.acl"
        acl.write_text(tenant_acl(tenant, self.password) + "\nuser default on nopass ~* &* +@all\n")
        self.redis_port = 6399
        self.sock_path = self.dir / "redis.sock"
        self.redis = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port),
             "--unixsocket", str(self.sock_path), "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--aclfile", str(acl)],
            stdout=open(self.dir / "redis.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.admin().ping():
                    break
            except Exception:
                if self.redis.poll() is not None:
                    raise BenchError(f"redis-server exited {self.redis.returncode}: "
                                     f"{(self.dir / 'redis.log').read_text()[-600:]}")
                time.sleep(0.02)
        else:
            raise BenchError("redis-server did not answer within 10 s")
        from nfs.state import SCRIPTS
        for s in SCRIPTS.values():
            self.admin().script_load(s.lua)
        return self.state_url(tenant)

    def start_replica(self) -> None:
        """A replica of the state server on the namespace's loopback, acknowledging its writes
        (a write followed by WAIT 1 returns 1) before this returns."""
        if self.replica is not None:
            return
        self.replica = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port + 1),
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--replicaof", "127.0.0.1",
             str(self.redis_port)],
            stdout=open(self.dir / "replica.log", "w"), stderr=subprocess.STDOUT)
        admin = self.admin()
        deadline = time.monotonic() + 10
        while True:
            if self.replica.poll() is not None:
                raise BenchError(f"the replica exited {self.replica.returncode}: "
                                 f"{(self.dir / 'replica.log').read_text()[-600:]}")
            admin.set("bench:replicated", "1", px=1000)
            if admin.execute_command("WAIT", 1, 100) >= 1:
                return
            if time.monotonic() > deadline:
                raise BenchError("the replica acknowledged nothing within 10 s")

    def state_url(self, tenant: str) -> str:
        return f"redis://tenant-{tenant}@127.0.0.1:{self.redis_port}/0"

    def admin(self):
        import redis
        return redis.Redis(unix_socket_path=str(self.sock_path))

    def commands(self) -> dict[str, int]:
        """Commands the state server has run, by name (INFO commandstats)."""
        stats = self.admin().info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

    def flush(self) -> None:
        self.admin().flushall()
        self.admin().config_resetstat()

    # -- the NF ------------------------------------------------------------------------------

    def start_nf(self, kind: str, config: dict[str, Any], state: Optional[str], batch: int = 64) -> "NfProc":
        """``python -m nfs.<kind>`` (``echo``: the bare echo loop) on the namespace's end."""
        counters = self.dir / f"{kind}-{len(self.procs)}.json"
        if kind == "echo":
            argv = [sys.executable, str(ECHO), self.nf_if]
        else:
            cfg = self.dir / f"{kind}-{len(self.procs)}.yaml"
            cfg.write_text(yaml.safe_dump(config))
            argv = [sys.executable, "-m", f"nfs.{kind}", "--iface", self.nf_if, "--instance", f"bench-{kind}",
                    "--config", str(cfg), "--counters", str(counters), "--batch", str(batch)]
            if state:
                pw = self.dir / "password"
                pw.write_text(self.password)
                pw.chmod(0o600)
                argv += ["--state", state, "--state-password-file", str(pw)]
        log = open(self.dir / f"{kind}-{len(self.procs)}.log", "w")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns] + argv, cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.procs.append(p)
        proc = NfProc(p, counters if kind != "echo" else None, Path(log.name))
        proc.wait_ready()
        return proc


class NfProc:
    def __init__(self, popen: subprocess.Popen, counters: Optional[Path], log: Path) -> None:
        self.popen, self.counters, self.log = popen, counters, log

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise BenchError(f"NF exited {self.popen.returncode}: {self.log.read_text()[-800:]}")
            if "ready on" in self.log.read_text():
                return
            time.sleep(0.01)
        raise BenchError(f"NF not ready within {timeout} s: {self.log.read_text()[-800:]}")

    def read_counters(self) -> dict[str, Any]:
        return json.loads(self.counters.read_text()) if self.counters and self.counters.exists() else {}

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Generator:
    """The generator's end: sends pre-built NSH frames, ``window`` outstanding, counts returns."""

    def __init__(self, iface: str) -> None:
        self.sock = packet_socket(iface, ETH_P_NSH)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.sock.setblocking(False)
        from nfs import mmsg
        self.ring = mmsg.Ring(self.sock, 256, 2048)

    def close(self) -> None:
        self.sock.close()

    def drive(self, frames: Sequence[bytes], window: int = 256, stall: float = 1.0,
              keep: bool = False) -> dict[str, Any]:
        """Send every frame, never more than ``window`` unanswered; return what came back.

        A frame that does not come back within ``stall`` seconds of the last return counts as
        lost (the NF dropped it) and frees its slot.

        Returns:
            ``sent``, ``received``, ``lost``, ``seconds`` (first send to last return), ``pps``
            (received per second) and, with ``keep``, the returned frames.
        """
        ring = self.ring
        total = len(frames)
        sent = received = lost = 0
        back: list[bytes] = []
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        last = t0
        while received + lost < total:
            room = min(window - (sent - received - lost), total - sent, ring.slots)
            if room > 0:
                n, failed = ring.send(frames[sent:sent + room])
                sent += n + len(failed)
                lost += len(failed)
            got = ring.recv()
            if got:
                received += len(got)
                last = time.perf_counter()
                if keep:
                    back.extend(got)
                continue
            if not poll.poll(50):
                if time.perf_counter() - last > stall:
                    lost += sent - received - lost
                    last = time.perf_counter()
        seconds = last - t0
        out = {"sent": sent, "received": received, "lost": lost, "seconds": round(seconds, 4),
               "pps": round(received / seconds) if seconds > 0 else 0,
               "generator_cpu": round((time.process_time() - cpu0) / max(seconds, 1e-9), 2)}
        if keep:
            out["frames"] = back
        return out
