"""Each NF's state operations straight through ``nfs.state``, on three state servers side by
side in one run: one Redis, one Redis with a replica (every batch that writes ends in
``WAIT 1``), and a 3-node Redis Cluster. Servers on loopback, with the lab's tenant ACL,
ended by PID.

Per NF kind one batch is what one batch of that NF costs the server for ``BATCH`` packets
of established flows (no client cache: the server's work is what is measured):

- firewall: GET + PTTL of each connection, then a compare-and-set of each (``cas``);
- nat: GET of each forward mapping, PEXPIRE of each (the idle timer);
- ipsec: INCRBY of the SA's sequence counter (one claim per batch), ``replay`` per packet;
- lb: GET of each connection, SET NX of one new connection in eight.

Figures per kind and server: operations/s and the p50/p99 latency of a batch; ratios of the
replica and the cluster to one Redis. ``python -m bench.state_ops [--seconds S]``, and in
``python -m bench`` (section ``state_ops``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from nfs.state import SCRIPTS, Batch, ClusterState, RedisState, StateClient

BATCH = 64
FLOWS = 1000
KINDS = ("firewall", "nat", "ipsec", "lb")
SERVERS = ("one", "replica", "cluster")
CLUSTER_NODES = 3


class BenchError(RuntimeError):
    pass


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LoopbackServers:
    """redis-server processes on 127.0.0.1 as the lab configures them (admin + tenant ACL):
    :meth:`single`, :meth:`replicated` (a primary and its replica, acknowledging writes before
    it returns) and :meth:`cluster` (``nodes`` primaries with equal slot ranges, ok on every
    node before it returns). Every process ended by PID on :meth:`close`."""

    def __init__(self, tenant: str = "red", directory: Optional[Path] = None) -> None:
        if shutil.which("redis-server") is None:
            raise BenchError("redis-server not installed: sudo apt-get install redis-server (or scripts/install.sh)")
        self.tenant = tenant
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="statelab-state-")
        self.dir = directory if directory is not None else Path(self._tmp.name)
        self.pw = {"admin": secrets.token_hex(8), tenant: secrets.token_hex(8)}
        self.procs: list[subprocess.Popen] = []

    def admin(self, port: int):
        import redis
        return redis.Redis(port=port, username="admin", password=self.pw["admin"], socket_timeout=2,
                           decode_responses=True)

    def _start(self, port: int, extra: list[str], cluster: bool = False) -> None:
        from statelab.lab import tenant_acl
        conf = self.dir / f"redis-{port}.conf"
        own = self.dir / f"redis-{port}"  # its own: a replica writes the RDB it syncs there (dump.rdb)
        own.mkdir()
        conf.write_text("\n".join(["bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no", f"dir {own}",
                                   "user default off", f"user admin on >{self.pw['admin']} ~* &* +@all",
                                   tenant_acl(self.tenant, self.pw[self.tenant], cluster=cluster), *extra, ""]))
        log = open(self.dir / f"redis-{port}.log", "wb")
        self.procs.append(subprocess.Popen(["redis-server", str(conf)], stdout=log, stderr=subprocess.STDOUT))
        log.close()
        self._until(f"redis-server on port {port} answers", lambda: self.admin(port).ping(), port)

    def _until(self, what: str, ok: Callable[[], Any], port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return
            except Exception:
                pass
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                log = self.dir / f"redis-{port}.log"
                raise BenchError(f"not within {timeout:.0f}s: {what}; log: "
                                 f"{log.read_text()[-600:] if log.exists() else '(none)'}")
            time.sleep(0.02)

    def _load_scripts(self, port: int) -> None:
        for script in SCRIPTS.values():
            self.admin(port).script_load(script.lua)

    def _url(self, scheme: str, ports: list[int], tail: str) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        return f"{scheme}://tenant-{self.tenant}:{self.pw[self.tenant]}@{hosts}/{tail}"

    def single(self) -> str:
        port, = free_ports(1)
        self._start(port, [])
        self._load_scripts(port)
        return self._url("redis", [port], "0")

    def replicated(self) -> str:
        primary, replica = free_ports(2)
        self._start(primary, [])
        self._start(replica, ["masteruser admin", f"masterauth {self.pw['admin']}",
                              f"replicaof 127.0.0.1 {primary}"])
        admin = self.admin(primary)  # one connection: WAIT counts its own writes
        self._until("the replica acknowledges its primary's writes",
                    lambda: admin.set("probe", "1", px=1000) and admin.execute_command("WAIT", 1, 100) == 1, replica)
        for port in (primary, replica):
            self._load_scripts(port)
        return self._url("redis", [primary], "0?wait=1")

    def cluster(self, nodes: int = CLUSTER_NODES) -> tuple[str, list[int]]:
        """A cluster of ``nodes``; its URL and its nodes' ports."""
        from statelab.lab import CLUSTER_SLOTS, slot_ranges
        free = free_ports(2 * nodes)
        ports, buses = free[:nodes], free[nodes:]
        for port, bus in zip(ports, buses):
            self._start(port, ["cluster-enabled yes", f"cluster-config-file nodes-{port}.conf",
                               f"cluster-port {bus}", "cluster-node-timeout 5000"], cluster=True)
        for (lo, hi), port in zip(slot_ranges(nodes), ports):
            self.admin(port).execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for port, bus in zip(ports[1:], buses[1:]):
            self.admin(ports[0]).execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        for port in ports:
            def ok(port: int = port) -> bool:
                info = self.admin(port).cluster("info")
                return (info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == nodes
                        and int(info["cluster_slots_ok"]) == CLUSTER_SLOTS)
            self._until(f"node {port} sees the cluster ok", ok, port)
            self._load_scripts(port)
        return self._url("redis+cluster", ports, ""), ports

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LoopbackServers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _workload(kind: str, st: StateClient) -> Callable[[int], int]:
    """``f(round) -> operations``: fill and execute one batch of ``kind``'s state operations."""
    def firewall(n: int) -> int:
        flows = [f"ct:{(n * BATCH + i) % FLOWS}" for i in range(BATCH)]
        b = st.batch()
        got = [b.get(k) for k in flows] + [b.pttl(k) for k in flows]
        b.execute()
        w = st.batch()
        for k, ref in zip(flows, got):
            w.script("cas", [k], [ref.value or b"", f"est:{n}", 300_000])
        w.execute()
        return 3 * BATCH

    def nat(n: int) -> int:
        b = st.batch()
        for i in range(BATCH):
            k = f"fwd:udp:10.0.0.1:{(n * BATCH + i) % FLOWS}"
            b.get(k)
            b.expire(k, 300)
        b.execute()
        return 2 * BATCH

    def ipsec(n: int) -> int:
        b = st.batch()
        b.incrby("seq:4097", BATCH)
        for i in range(BATCH):
            b.script("replay", ["replay:4097"], [n * BATCH + i + 1, 1024])
        b.execute()
        return BATCH + 1

    def lb(n: int) -> int:
        b: Batch = st.batch()
        for i in range(BATCH):
            b.get(f"conn:tcp:10.0.0.1:{(n * BATCH + i) % FLOWS}:10.0.0.9:80")
        for i in range(0, BATCH, 8):
            b.set(f"conn:tcp:10.0.0.2:{n * BATCH + i}:10.0.0.9:80", "10.0.0.3:80", ttl=60, nx=True)
        b.execute()
        return BATCH + BATCH // 8
    return {"firewall": firewall, "nat": nat, "ipsec": ipsec, "lb": lb}[kind]


def _run(url: str, kind: str, seconds: float) -> dict[str, Any]:
    client = ClusterState if url.startswith("redis+cluster:") else RedisState
    st = client(url, "red", kind, cache=False)
    st.connect()
    work = _workload(kind, st)
    for n in range(20):  # the flows exist before the clock starts
        work(n)
    lat: list[float] = []
    ops, n = 0, 20
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b0 = time.perf_counter()
        ops += work(n)
        lat.append((time.perf_counter() - b0) * 1000)
        n += 1
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {"ops_per_s": round(ops / elapsed), "batches": len(lat), "p50_ms": round(lat[len(lat) // 2], 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3)}


def measure(seconds: float = 2.0, repeat: int = 3, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every kind on every server, alternating, ``repeat`` times; medians and ratios to one Redis."""
    out: dict[str, Any] = {"batch": BATCH, "flows": FLOWS, "cluster_nodes": CLUSTER_NODES, "kinds": {}}
    with LoopbackServers() as servers:
        urls = {"one": servers.single(), "replica": servers.replicated(), "cluster": servers.cluster()[0]}
        for kind in KINDS:
            progress(f"state operations: {kind} on one Redis, with a replica, on a {CLUSTER_NODES}-node cluster")
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
            for _ in range(repeat):
                for s in SERVERS:
                    runs[s].append(_run(urls[s], kind, seconds))
            med = {s: {f: statistics.median(r[f] for r in runs[s]) for f in ("ops_per_s", "p50_ms", "p99_ms")}
                   for s in SERVERS}
            out["kinds"][kind] = {
                **{s: med[s] for s in SERVERS},
                **{f"{s}_ops_ratio": round(med[s]["ops_per_s"] / med["one"]["ops_per_s"], 3) for s in SERVERS[1:]},
                **{f"{s}_p99_ratio": round(med[s]["p99_ms"] / med["one"]["p99_ms"], 3) for s in SERVERS[1:]},
                "runs": runs}
    return out


def rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Table rows for ``python -m bench``."""
    out = []
    for kind, r in res.get("kinds", {}).items():
        for s in SERVERS[1:]:
            what = "with a replica (WAIT 1)" if s == "replica" else f"on a {res['cluster_nodes']}-node cluster"
            out.append((f"state ops {kind} {what} ÷ one Redis: ops/s ({r[s]['ops_per_s']:.0f} / "
                        f"{r['one']['ops_per_s']:.0f}); p99 {r[s]['p99_ms']} / {r['one']['p99_ms']} ms",
                        f"{r[f'{s}_ops_ratio']:.2f} / {r[f'{s}_p99_ratio']:.2f}", ""))
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state_ops", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = measure(args.seconds, args.repeat, progress=lambda line: print(f"== {line}", flush=True))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    for name, value, _ in rows(res):
        print(f"{name:100} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
