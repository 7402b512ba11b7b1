"""The shared load harness of the conformance checks: scenarios derived from the topology,
traffic under load with an event in the middle, and the figures every family records.

Definitions: RFC 2544 (trial, loss), RFC 4737 (reordering), RFC 6201/6412 (outage = lost /
offered rate), RFC 9411 (a connection ended by RST is a failure).
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from conformance.core import SKIP, Result
from nfs.mmsg import packet_socket
from statelab.timeline import Timeline
from statelab.traffic import TcpStream, UdpStream

LOAD_SECONDS = 5.0
EVENT_AT = 1.5
UDP_FLOWS = 64
UDP_RATE = 400.0
TCP_CONNECTIONS = 12
TCP_STALL = 5.0  # s without an echo: a broken connection (an NF failover costs milliseconds)
TCP_PPS = 80.0  # switch packets/s one echo-verified connection costs (1 KB each way every 50 ms, ACKs)


@dataclass(frozen=True)
class LoadProfile:
    """How hard a check drives one chain: chosen per target from the switch's capacity, so a
    slow software switch is never asked for a load it cannot carry (which would read as loss)."""

    udp_rate: float
    tcp_connections: int
    switch_pps: float  # what the fabric must forward for it (every pass through the switch)

    @classmethod
    def for_chain(cls, fabric: Any, hops: int) -> "LoadProfile":
        """The load for a chain of ``hops`` pools on ``fabric`` (its ``capacity_pps``: packets/s
        it forwards loss-free, None for fast enough); half the capacity is kept in reserve."""
        passes = 1 + hops  # in from the host, then back from every NF
        capacity = getattr(fabric, "capacity_pps", None)
        udp, tcp = UDP_RATE, TCP_CONNECTIONS
        if capacity:
            budget = capacity / 2 / passes
            udp = min(UDP_RATE, round(budget / 2, 1))
            tcp = max(2, min(TCP_CONNECTIONS, int(budget / 2 / TCP_PPS)))
        return cls(udp, tcp, round(passes * (udp + tcp * TCP_PPS), 1))
_ports = itertools.count(6000, 2)
_sports = itertools.count(20000, 100)


@dataclass
class Context:
    """What a check gets: the lab, where its pictures go, and optionally which pools to use.

    Attributes:
        lab: the running lab.
        out: directory for PNG timelines (None: no pictures).
        only: ``"tenant/pool"`` names to limit per-pool checks to (None: every pool).
    """

    lab: Any
    out: Optional[Path]
    only: Optional[frozenset[str]] = None

    def png(self, name: str) -> Optional[Path]:
        return self.out / f"{name}.png" if self.out else None

    def pools(self, kind: Optional[str] = None, one_per_kind: bool = False) -> list[tuple["Scenario", Any]]:
        """(scenario, pool) pairs to exercise: every pool in use, or one per NF kind."""
        pairs = [(sc, p) for sc, p in pools_in_use(self.lab.topo)
                 if (self.only is None or f"{sc.tenant}/{p.name}" in self.only)
                 and (kind is None or p.kind == kind)]
        if not one_per_kind:
            return pairs
        out, kinds = [], set()
        for sc, p in pairs:
            if p.kind not in kinds:
                kinds.add(p.kind)
                out.append((sc, p))
        return out


# -- traffic scenarios derived from the topology --------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """How to drive traffic through one tenant's chains: from an inside host to a server."""

    tenant: str
    client: str
    servers: tuple[str, ...]
    dst_ip: str
    tcp_port: Optional[int]      # the port the client connects to (None: next free)
    server_port: Optional[int]   # the port the servers listen on (LB backends)
    udp: bool                    # whether UDP reaches a server


def scenarios(topo: Any) -> list[Scenario]:
    """One scenario per tenant that has an inside and an outside host."""
    out = []
    for t in topo.tenants:
        inside = [h for h in t.hosts if h.zone == "inside"]
        outside = [h for h in t.hosts if h.zone == "outside"]
        if not inside or not outside:
            continue
        lbs = [p for p in t.chain("outbound") if p.kind == "lb" and p.config.get("services")]
        if lbs:
            svc = lbs[0].config["services"][0]
            backend_ips = {b.rsplit(":", 1)[0] for b in svc["backends"]}
            servers = tuple(h.name for h in t.hosts if str(h.ip.ip) in backend_ips)
            port = int(svc["backends"][0].rsplit(":", 1)[1])
            out.append(Scenario(t.name, inside[0].name, servers, svc["vip"], int(svc["port"]), port,
                                False))
        else:
            out.append(Scenario(t.name, inside[0].name, (outside[0].name,), str(outside[0].ip.ip),
                                None, None, True))
    return out


def nothing_to_exercise(ctx: "Context") -> Result:
    """SKIP, with the reason: no pool of the topology can be driven with traffic."""
    reasons = []
    for t in ctx.lab.topo.tenants:
        zones = {h.zone for h in t.hosts}
        if not t.pools:
            reasons.append(f"tenant {t.name} has no NF pool")
        elif not {"inside", "outside"} <= zones:
            reasons.append(f"tenant {t.name} has no {'outside' if 'inside' in zones else 'inside'} host "
                           f"to drive traffic through its chain")
    if ctx.only is not None:
        reasons.append(f"limited to pools {sorted(ctx.only)}")
    return Result(SKIP, {"pools": 0}, "nothing to exercise: " + ("; ".join(reasons) or "no pool in a chain"))


def pools_in_use(topo: Any) -> list[tuple[Scenario, Any]]:
    """Every (scenario, pool) pair: each pool of each tenant's chains, once."""
    out = []
    for sc in scenarios(topo):
        t = topo.tenant(sc.tenant)
        seen = set()
        for pool in t.chain("outbound") + t.chain("inbound"):
            if pool.name not in seen:
                seen.add(pool.name)
                out.append((sc, pool))
    return out


# -- load with an event in the middle --------------------------------------------------------

@dataclass
class Load:
    """The outcome of a load run: per-flow UDP figures, TCP results, timeline, event time."""

    udp: Optional[dict[str, Any]]
    tcp: Optional[dict[str, Any]]
    timeline: Timeline
    event_at: float
    event_result: Any
    nf_drops: dict[str, int]
    event_ms: float = 0.0
    started: frozenset[str] = frozenset()
    profile: Optional[LoadProfile] = None

    def pool_packets(self) -> int:
        """Packets the followed instances received during the load (all of them together)."""
        total = 0
        for iid, series in self.timeline.samples.items():
            if series:
                total += series[-1][1] - (series[0][1] if iid in self.started else 0)
        return total

    def rate_before(self, iid: str, window: float = 0.5) -> float:
        """Packets/s instance ``iid`` received in the ``window`` s before the event."""
        series = [(t, rx) for t, rx in self.timeline.samples.get(iid, []) if t <= self.event_at]
        recent = [(t, rx) for t, rx in series if t >= self.event_at - window]
        if len(recent) < 2:
            recent = series[-2:]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return round((recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0]), 1)

    def window(self) -> Optional[tuple[float, float]]:
        """(start, end) of the UDP load, wall-clock seconds (None without UDP)."""
        if self.udp is None:
            return None
        sent = self.udp["sent"]
        return sent["start"], sent["start"] + sent["duration"]

    def losses(self) -> list[tuple[float, int]]:
        """Datagrams lost per 100 ms of sending: what the sender offered in each 100 ms less what
        the sink received of those (both ends count by the datagram's send time)."""
        if self.udp is None:
            return []
        offered = self.udp["sent"].get("by_send_time", {})
        received = self.udp["received"].get("by_send_time", {})
        return [(float(b), max(0, n - received.get(b, 0))) for b, n in offered.items()]

    def delivered_after(self, t: float) -> Optional[int]:
        """UDP datagrams sent at or after wall-clock time ``t`` that reached the sink."""
        if self.udp is None:
            return None
        bins = self.udp["received"].get("by_send_time", {})
        return sum(n for start, n in bins.items() if float(start) >= t)

    def figures(self) -> dict[str, Any]:
        f: dict[str, Any] = {}
        if self.udp is not None:
            flows = self.udp["flows"].values()
            f.update(udp_flows=len(flows), udp_sent=sum(x["sent"] for x in flows),
                     udp_send_errors=self.udp["sent"].get("send_errors", 0),
                     udp_lost=sum(x["lost"] for x in flows), udp_duplicates=sum(x["duplicates"] for x in flows),
                     udp_reordered=sum(x["reordered"] for x in flows),
                     max_outage_ms=max((x["outage_ms"] for x in flows), default=0.0),
                     flows_with_loss=sum(1 for x in flows if x["lost"] > 0))
        if self.tcp is not None:
            s = self.tcp["sender"]
            f.update(tcp_connections=s["connections"], tcp_broken=s["connections"] - s["ok"],
                     tcp_max_wait_ms=max((r.get("max_wait_ms", 0.0) for r in s["results"]), default=0.0))
            errors = sorted({r["error"] for r in s["failed"] if r.get("error")})
            if errors:
                f["tcp_errors"] = errors
        f["pool_packets"] = self.pool_packets()
        if self.profile is not None:
            f["offered_udp_pps"] = self.profile.udp_rate if self.udp is not None else 0
            f["offered_switch_pps"] = self.profile.switch_pps
        if self.nf_drops:
            f["nf_drops"] = self.nf_drops
        return f


def under_load(ctx: Context, sc: Scenario, event: Callable[[], Any], follow: list[str],
               udp: bool = True, tcp: bool = True, duration: float = LOAD_SECONDS,
               at: float = EVENT_AT, tcp_stall: float = TCP_STALL) -> Load:
    """Run UDP flows and TCP connections through ``sc`` for ``duration`` s; call ``event`` at ``at`` s.

    Args:
        ctx: the check's context.
        sc: the tenant scenario.
        event: what happens under load (scale out, kill, ...); its return value is kept.
        follow: instance id prefixes the timeline follows.
        udp, tcp: which traffic to run.
        tcp_stall: seconds without an echo after which a TCP connection counts as broken.
    """
    lab = ctx.lab
    port = next(_ports)
    hops = max(len(lab.topo.tenant(sc.tenant).chain(d)) for d in ("outbound", "inbound"))
    profile = LoadProfile.for_chain(lab.fabric, hops)
    drops_before = drop_counters(lab)
    with Timeline(lab, follow) as tl:
        tl.sample()
        started = frozenset(tl.samples)
        u = (UdpStream(lab, sc.client, sc.servers[0], sc.dst_ip, flows=UDP_FLOWS, rate=profile.udp_rate,
                       duration=duration, port=port, first_sport=next(_sports))
             if udp and sc.udp else None)
        t = (TcpStream(lab, sc.client, sc.servers[0], sc.dst_ip, connections=profile.tcp_connections,
                       duration=duration, port=sc.tcp_port or port + 1, sinks=sc.servers,
                       sink_port=sc.server_port, stall=tcp_stall)
             if tcp else None)
        time.sleep(at)
        event_at = time.time()
        event_result = event()
        event_ms = round((time.time() - event_at) * 1000, 1)
        udp_res = u.result() if u else None
        tcp_res = t.result() if t else None
    after = drop_counters(lab)
    nf_drops = {k: n - drops_before.get(k, 0) for k, n in after.items() if n != drops_before.get(k, 0)}
    return Load(udp_res, tcp_res, tl, event_at, event_result, nf_drops, event_ms, started, profile)


def drop_counters(lab: Any) -> dict[str, int]:
    """Every live instance's drop counters, as ``{"instance/reason": n}``."""
    return {f"{iid}/{reason}": n for iid, c in lab.settled_counters().items()
            for reason, n in c.get("drops", {}).items()}


def busiest(lab: Any, tenant: str, pool: str, window: float = 0.4) -> Any:
    """The in-pool instance of a pool that receives the most packets now: its rate over the
    last ``window`` s (two readings of its counters), not its lifetime count."""
    live = [i for i in lab.pool_instances(tenant, pool) if i.in_pool and i.alive()]
    first = {i.id: i.counters() for i in live}
    time.sleep(window)  # the measurement window

    def rate(inst: Any) -> float:
        a, b = first[inst.id], inst.counters()
        dt = b.get("updated", 0) - a.get("updated", 0)
        return (b.get("rx", 0) - a.get("rx", 0)) / dt if dt > 0 else 0.0
    return max(live, key=rate)


def first_packet_ms(tl: Timeline, iid: str, since: float) -> Optional[float]:
    """Milliseconds from ``since`` until instance ``iid`` was first seen receiving."""
    for t, rx in tl.samples.get(iid, []):
        if t >= since and rx > 0:
            return round((t - since) * 1000, 1)
    return None


def pool_label(sc: Scenario, pool: Any) -> str:
    return f"{sc.tenant}/{pool.name} ({pool.kind})"


def collect(per_pool: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Totals over pools of the given figures, plus the per-pool figures."""
    total = {k: sum(p.get(k, 0) for p in per_pool.values()) for k in keys}
    total["pools"] = per_pool
    return total


def no_disruption(f: dict[str, Any]) -> bool:
    return (f.get("udp_lost", 0) == 0 and f.get("udp_duplicates", 0) == 0 and f.get("tcp_broken", 0) == 0)


def exercised(f: dict[str, Any]) -> bool:
    """Whether a load run put traffic through its pool (offered some, and the pool received it)."""
    offered = f.get("udp_sent", 0) + f.get("tcp_connections", 0)
    return offered > 0 and f.get("pool_packets", 0) > 0


def plot(ctx: Context, load: Load, name: str, title: str, f: dict[str, Any]) -> Optional[Path]:
    png = ctx.png(name)
    if png:
        load.timeline.plot(png, title, load.window(), load.losses())
        f["timeline"] = str(png)
    return png


def pool_outcome(ctx: Context, check_id: str, what: str, sc: Scenario, pool: Any, load: Load,
                  f: dict[str, Any], per_pool: dict[str, dict[str, Any]], problems: list[str]) -> Optional[Path]:
    """Plot a pool's timeline, file its figures, note any disruption; return the PNG."""
    label = pool_label(sc, pool)
    png = plot(ctx, load, f"{check_id}-{sc.tenant}-{pool.name}", f"{check_id} {what} of {label} under load", f)
    per_pool[label] = f
    if not exercised(f):
        problems.append(f"{label}: traffic could not be driven through the pool ({f.get('pool_packets', 0)} "
                        f"packets reached its instances, {f.get('udp_sent', 0)} datagrams and "
                        f"{f.get('tcp_connections', 0)} connections offered)")
    if not no_disruption(f):
        problems.append(f"{label}: lost {f.get('udp_lost')}, duplicated {f.get('udp_duplicates')}, "
                        f"TCP broken {f.get('tcp_broken')} {f.get('tcp_errors', '')}")
    return png


class FabricTap:
    """Frames the fabric hands to pool members, seen on the fabric-side ends of their links
    (root namespace).

    Args:
        lab: the running lab.
        instances: the members to watch (more with :meth:`add`).
        keep: ``f(inner frame) -> key or None``: what to record of a frame (None: skip it).

    Attributes:
        captured: ``(member index, time, key, raw frame)`` in arrival order.
    """

    def __init__(self, lab: Any, instances: list[Any], keep: Callable[[bytes], Any]) -> None:
        self.lab = lab
        self.keep = keep
        self.instances: list[Any] = []
        self.socks: list[socket.socket] = []
        self.captured: list[tuple[int, float, Any, bytes]] = []
        self._lock = threading.Lock()
        for inst in instances:
            self.add(inst)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statelab-tap", daemon=True)
        self._thread.start()

    def add(self, inst: Any) -> None:
        """Watch one more member (e.g. one that just joined)."""
        s = packet_socket(self.lab.fabric.port_name(inst.member))
        with self._lock:
            self.instances.append(inst)
            self.socks.append(s)

    def _run(self) -> None:
        from nfs import nsh
        dead: set[socket.socket] = set()
        while not self._stop.is_set():
            with self._lock:
                socks = [s for s in self.socks if s not in dead]
            try:
                r, _, _ = select.select(socks, [], [], 0.1)
            except (OSError, ValueError):  # a member's link went away (drained, killed)
                r = []
            for s in r:
                try:
                    data, addr = s.recvfrom(65535)
                except OSError:  # its interface was deleted: nothing more comes from it
                    dead.add(s)
                    continue
                if addr[2] != socket.PACKET_OUTGOING:
                    continue  # only what the fabric sends toward the NF
                try:
                    key = self.keep(nsh.parse(data).inner)
                except nsh.Malformed:
                    continue
                if key is not None:
                    self.captured.append((self.socks.index(s), time.time(), key, data))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        for s in self.socks:
            s.close()


def ip_flow(inner: bytes) -> Optional[tuple[bytes, int, bytes]]:
    """The 5-tuple (addresses, protocol, TCP/UDP ports) of an inner IPv4 frame, else None (a
    :class:`FabricTap` key): what the fabric hashes to choose an instance."""
    if inner[12:14] != b"\x08\x00" or len(inner) < 34:
        return None
    ihl = (inner[14] & 0xF) * 4
    ports = inner[14 + ihl:18 + ihl] if inner[23] in (6, 17) else b""
    return inner[26:34], inner[23], ports


def flows_moved(tap: FabricTap, before: float, after: float, new: Optional[int] = None) -> dict[str, Any]:
    """Which member each flow went to before ``before`` and after ``after`` (wall-clock times):
    the member that got most of its packets in each window.

    Args:
        tap: the capture.
        before, after: the two windows' edges.
        new: index in ``tap.instances`` of a member that joined between them.

    Returns:
        figures: flows compared, flows moved, moved to the new member, moved between the old,
        and flows seen at more than one member within one window (split).
    """
    seen: dict[Any, tuple[dict[int, int], dict[int, int]]] = {}
    for idx, at, key, _ in tap.captured:
        b, a = seen.setdefault(key, ({}, {}))
        window = b if at < before else a if at > after else None
        if window is not None:
            window[idx] = window.get(idx, 0) + 1
    compared = {k: (max(b, key=b.get), max(a, key=a.get)) for k, (b, a) in seen.items() if b and a}
    moved = [k for k, (b, a) in compared.items() if b != a]
    to_new = [k for k in moved if new is not None and compared[k][1] == new]
    return {"flows_compared": len(compared), "flows_moved": len(moved), "flows_moved_to_new": len(to_new),
            "flows_moved_between_old": len(moved) - len(to_new),
            "flows_split": sum(1 for b, a in seen.values() if len(b) > 1 or len(a) > 1),
            "flows_moved_fraction": round(len(moved) / len(compared), 3) if compared else None}
