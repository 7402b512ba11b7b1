"""The conformance checks: tenant isolation, zero-downtime scaling, state continuity.

Each check runs real traffic in a running lab and returns a :class:`~conformance.core.Result`
with its figures. Definitions: RFC 2544 (trial, loss), RFC 4737 (reordering), RFC 6201/6412
(outage = lost / offered rate), RFC 9411 (a connection ended by RST is a failure), RFC 4303
(ESP sequence numbers never reused, replay window), RFC 4787/5382 (NAT mapping stays the same).
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import redis

from conformance.core import SKIP, Result, check, verdict
from statelab.timeline import Timeline
from statelab.traffic import TcpStream, UdpStream, host_rx, quiet

LOAD_SECONDS = 5.0
EVENT_AT = 1.5
UDP_FLOWS = 64
UDP_RATE = 400.0
TCP_CONNECTIONS = 12
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

    def figures(self) -> dict[str, Any]:
        f: dict[str, Any] = {}
        if self.udp is not None:
            flows = self.udp["flows"].values()
            f.update(udp_flows=len(flows), udp_sent=sum(x["sent"] for x in flows),
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
        if self.nf_drops:
            f["nf_drops"] = self.nf_drops
        return f


def under_load(ctx: Context, sc: Scenario, event: Callable[[], Any], follow: list[str],
               udp: bool = True, tcp: bool = True, duration: float = LOAD_SECONDS,
               at: float = EVENT_AT) -> Load:
    """Run UDP flows and TCP connections through ``sc`` for ``duration`` s; call ``event`` at ``at`` s.

    Args:
        ctx: the check's context.
        sc: the tenant scenario.
        event: what happens under load (scale out, kill, ...); its return value is kept.
        follow: instance id prefixes the timeline follows.
        udp, tcp: which traffic to run.
    """
    lab = ctx.lab
    port = next(_ports)
    drops_before = _drops(lab)
    with Timeline(lab, follow) as tl:
        u = (UdpStream(lab, sc.client, sc.servers[0], sc.dst_ip, flows=UDP_FLOWS, rate=UDP_RATE,
                       duration=duration, port=port, first_sport=next(_sports))
             if udp and sc.udp else None)
        t = (TcpStream(lab, sc.client, sc.servers[0], sc.dst_ip, connections=TCP_CONNECTIONS,
                       duration=duration, port=sc.tcp_port or port + 1, sinks=sc.servers,
                       sink_port=sc.server_port)
             if tcp else None)
        time.sleep(at)
        event_at = time.time()
        event_result = event()
        udp_res = u.result() if u else None
        tcp_res = t.result() if t else None
    after = _drops(lab)
    nf_drops = {k: n - drops_before.get(k, 0) for k, n in after.items() if n != drops_before.get(k, 0)}
    return Load(udp_res, tcp_res, tl, event_at, event_result, nf_drops)


def _drops(lab: Any) -> dict[str, int]:
    """Every live instance's drop counters, as ``{"instance/reason": n}``."""
    return {f"{iid}/{reason}": n for iid, c in lab.settled_counters().items()
            for reason, n in c.get("drops", {}).items()}


def busiest(lab: Any, tenant: str, pool: str) -> Any:
    """The in-pool instance of a pool that has received the most packets."""
    counters = lab.settled_counters()
    live = [i for i in lab.pool_instances(tenant, pool) if i.in_pool and i.alive()]
    return max(live, key=lambda i: counters.get(i.id, {}).get("rx", 0))


def first_packet_ms(tl: Timeline, iid: str, since: float) -> Optional[float]:
    """Milliseconds from ``since`` until instance ``iid`` was first seen receiving."""
    for t, rx in tl.samples.get(iid, []):
        if t >= since and rx > 0:
            return round((t - since) * 1000, 1)
    return None


def _pool_label(sc: Scenario, pool: Any) -> str:
    return f"{sc.tenant}/{pool.name} ({pool.kind})"


def _collect(per_pool: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Totals over pools of the given figures, plus the per-pool figures."""
    total = {k: sum(p.get(k, 0) for p in per_pool.values()) for k in keys}
    total["pools"] = per_pool
    return total


# -- ISO: tenant isolation ------------------------------------------------------------------

@check("ISO-1")
def iso_1(ctx: Context) -> Result:
    """Nothing sent by one tenant MUST be delivered to another tenant, even with identical
    address spaces (ICMP, TCP, UDP, ARP and broadcast).

    Every tenant's first inside host sends ICMP echo, UDP, TCP SYNs, ARP requests and a subnet
    broadcast to every address the other tenants use; the other tenants' hosts must receive
    nothing (their interfaces' receive counters stay the same).
    """
    lab, topo = ctx.lab, ctx.lab.topo
    if len(topo.tenants) < 2:
        return Result(SKIP, details="the topology has one tenant: nothing to isolate")
    leaked: dict[str, int] = {}
    probes = 0
    overlapping = 0
    for sender_t in topo.tenants:
        sender = sender_t.hosts[0].name
        others = [(t, h) for t in topo.tenants if t is not sender_t for h in t.hosts]
        own_ips = {str(h.ip.ip) for h in sender_t.hosts}
        overlapping += sum(1 for _, h in others if str(h.ip.ip) in own_ips)
        quiet(lab, [h.name for _, h in others])
        before = {h.name: host_rx(lab, h.name) for _, h in others}
        node = lab.host(sender)
        for _, h in others:
            ip = str(h.ip.ip)
            node.cmd(f"ping -c 1 -W 1 {ip}; ping -b -c 1 -W 1 {h.ip.network.broadcast_address}; "
                     f"echo probe > /dev/udp/{ip}/9; timeout 1 bash -c 'echo > /dev/tcp/{ip}/22'; "
                     f"ping -c 1 -W 1 {h.ip.network.network_address + 250}")
            probes += 5
        time.sleep(0.3)
        for _, h in others:
            delta = host_rx(lab, h.name) - before[h.name]
            if delta:
                leaked[f"{sender}->{h.name}"] = delta
    figures = {"probes": probes, "overlapping_addresses": overlapping, "leaked_packets": sum(leaked.values()),
               "leaks": leaked}
    return verdict(not leaked, figures, f"frames crossed tenants: {leaked}")


def _send_raw(node: Any, frames: list[bytes]) -> None:
    """Send raw Ethernet frames from a lab node's data interface (scapy inside the node)."""
    import sys
    script = ("import sys; from scapy.all import sendp; "
              "[sendp(bytes.fromhex(h), iface='eth0', verbose=False) for h in sys.argv[1:]]")
    node.cmd(f"{sys.executable} -c \"{script}\" {' '.join(f.hex() for f in frames)}")


@check("ISO-2")
def iso_2(ctx: Context) -> Result:
    """Frames arriving with another tenant's tag or a forged NSH header MUST be dropped.

    From one tenant's host: 802.1Q frames tagged with the other tenant's id, and NSH frames
    claiming the other tenant's service path and context; from one tenant's NF instance: NSH
    frames claiming the other tenant's path. The other tenant's hosts and NF instances must
    receive none of them.
    """
    from scapy.compat import raw
    from scapy.contrib.nsh import NSH
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1Q, Ether

    lab, topo = ctx.lab, ctx.lab.topo
    if len(topo.tenants) < 2:
        return Result(SKIP, details="the topology has one tenant: nothing to isolate")
    a, b = topo.tenants[0], topo.tenants[1]
    victim = b.hosts[-1]
    inner = Ether(dst="ff:ff:ff:ff:ff:ff") / IP(src=str(b.hosts[0].ip.ip), dst=str(victim.ip.ip)) / UDP(dport=9)
    forged_nsh = [raw(Ether(dst="ff:ff:ff:ff:ff:ff", type=0x894F) /
                      NSH(mdtype=1, nextproto=3, spi=b.id << 1 | d, si=si,
                          context_header=b.id.to_bytes(4, "big") + bytes(12)) / inner)
                  for d in (0, 1) for si in (255, 254, 253)]
    tagged = [raw(Ether(dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=b.id) / inner[IP]),
              raw(Ether(dst=lab.hosts[victim.name].MAC()) / Dot1Q(vlan=b.id) / inner[IP])]
    b_hosts = [h.name for h in b.hosts]
    quiet(lab, b_hosts)
    before_hosts = {h: host_rx(lab, h) for h in b_hosts}
    before_nf = {i.id: i.counters().get("rx", 0) for i in lab.iter_instances() if i.tenant.name == b.name}
    dropped = lab.fabric.dropped()
    _send_raw(lab.host(a.hosts[0].name), tagged + forged_nsh)
    sent = len(tagged) + len(forged_nsh)
    a_nf = [i for i in lab.iter_instances() if i.tenant.name == a.name and i.alive()]
    if a_nf:
        _send_raw(a_nf[0].node, forged_nsh)
        sent += len(forged_nsh)
    time.sleep(0.5)
    settled = lab.settled_counters()
    host_leak = {h: host_rx(lab, h) - before_hosts[h] for h in b_hosts if host_rx(lab, h) != before_hosts[h]}
    nf_leak = {i: settled.get(i, {}).get("rx", 0) - n for i, n in before_nf.items()
               if settled.get(i, {}).get("rx", 0) != n}
    figures = {"forged_frames": sent, "delivered_to_hosts": sum(host_leak.values()),
               "delivered_to_nfs": sum(nf_leak.values()), "fabric_drops": lab.fabric.dropped() - dropped}
    ok = not host_leak and not nf_leak
    return verdict(ok, figures, f"forged frames reached tenant {b.name}: hosts {host_leak}, NFs {nf_leak}")


@check("ISO-3")
def iso_3(ctx: Context) -> Result:
    """An NF instance MUST receive only the tenants its pool serves.

    Traffic runs in every tenant; afterwards every instance's per-tenant receive counters
    (the tenant id in the NSH context header) must name only its own tenant.
    """
    lab = ctx.lab
    for sc in scenarios(lab.topo):
        port = next(_ports)
        if sc.udp:
            UdpStream(lab, sc.client, sc.servers[0], sc.dst_ip, flows=16, rate=400, packets=3, port=port,
                      first_sport=next(_sports)).result()
        TcpStream(lab, sc.client, sc.servers[0], sc.dst_ip, connections=2, nbytes=2048, duration=0,
                  port=sc.tcp_port or port + 1, sinks=sc.servers, sink_port=sc.server_port).result()
    foreign: dict[str, dict[str, int]] = {}
    counters = lab.settled_counters()
    checked = 0
    for inst in lab.iter_instances():
        by_tenant = counters.get(inst.id, {}).get("rx_by_tenant", {})
        checked += 1
        wrong = {t: n for t, n in by_tenant.items() if int(t) != inst.tenant.id}
        if wrong:
            foreign[inst.id] = wrong
    figures = {"instances": checked, "instances_with_foreign_traffic": len(foreign),
               "foreign_packets": sum(sum(w.values()) for w in foreign.values()), "foreign": foreign}
    return verdict(not foreign, figures, f"instances received other tenants' packets: {foreign}")


@check("ISO-4")
def iso_4(ctx: Context) -> Result:
    """One tenant's state credentials MUST NOT read or write another tenant's keys.

    With each tenant's ACL user, GET, SET, DEL, EVAL on another tenant's key prefix and
    KEYS/SCAN/FLUSHALL are tried against the lab's state server; every one must be refused.
    """
    lab = ctx.lab
    tenants = [t.name for t in lab.topo.tenants]
    if len(tenants) < 2:
        return Result(SKIP, details="the topology has one tenant")
    allowed: list[str] = []
    attempts = 0
    lab.redis().set(f"t:{tenants[1]}:iso4:secret", "x")
    for a, b in itertools.permutations(tenants, 2):
        r = lab.redis(a)
        key = f"t:{b}:iso4:secret"
        tries = {
            "GET": lambda: r.get(key), "SET": lambda: r.set(key, "stolen"), "DEL": lambda: r.delete(key),
            "EVAL": lambda: r.eval("return redis.call('GET', KEYS[1])", 1, key),
            "KEYS": lambda: r.keys("*"), "SCAN": lambda: r.scan(0, match=f"t:{b}:*"),
            "FLUSHALL": lambda: r.flushall(),
        }
        for name, op in tries.items():
            attempts += 1
            try:
                op()
                allowed.append(f"{a} {name} {key}")
            except redis.exceptions.NoPermissionError:
                pass
            except redis.exceptions.ResponseError as err:
                if "NOPERM" not in str(err) and "permission" not in str(err).lower():
                    allowed.append(f"{a} {name}: {err}")
    figures = {"attempts": attempts, "allowed": len(allowed), "allowed_operations": allowed}
    return verdict(not allowed, figures, f"cross-tenant state access allowed: {allowed}")


# -- SCALE: zero-downtime scaling -------------------------------------------------------------

def _no_disruption(f: dict[str, Any]) -> bool:
    return (f.get("udp_lost", 0) == 0 and f.get("udp_duplicates", 0) == 0 and f.get("tcp_broken", 0) == 0)


def _plot(ctx: Context, load: Load, name: str, title: str, f: dict[str, Any]) -> Optional[Path]:
    png = ctx.png(name)
    if png:
        load.timeline.plot(png, title)
        f["timeline"] = str(png)
    return png


def _pool_outcome(ctx: Context, check_id: str, what: str, sc: Scenario, pool: Any, load: Load,
                  f: dict[str, Any], per_pool: dict[str, dict[str, Any]], problems: list[str]) -> Optional[Path]:
    """Plot a pool's timeline, file its figures, note any disruption; return the PNG."""
    label = _pool_label(sc, pool)
    png = _plot(ctx, load, f"{check_id}-{sc.tenant}-{pool.name}", f"{check_id} {what} of {label} under load", f)
    per_pool[label] = f
    if not _no_disruption(f):
        problems.append(f"{label}: lost {f.get('udp_lost')}, duplicated {f.get('udp_duplicates')}, "
                        f"TCP broken {f.get('tcp_broken')} {f.get('tcp_errors', '')}")
    return png


@check("SCALE-1")
def scale_1(ctx: Context) -> Result:
    """Scaling out any NF pool under load MUST lose, duplicate or break nothing, and the new
    instance MUST carry flows afterwards.

    For each pool of each tenant's chains: UDP flows and echo-verified TCP connections run
    through the chain; an instance is added mid-run. Per flow 0 lost and 0 duplicated, no TCP
    connection reset or stalled, the new instance received packets; reaction time (from the
    scale-out call until the new instance's first packet) recorded.
    """
    lab = ctx.lab
    per_pool: dict[str, dict[str, Any]] = {}
    problems = []
    first_png = None
    for sc, pool in ctx.pools():
        t0 = time.time()
        load = under_load(ctx, sc, lambda: lab.control.scale_out(sc.tenant, pool.name)[0],
                          [f"{sc.tenant}-{pool.name}-"])
        new = load.event_result
        f = load.figures()
        f["scale_out_ms"] = round((lab.control.events[-1][0] - load.event_at) * 1000, 1) if lab.control.events else None
        f["new_instance"] = new.id
        f["new_instance_packets"] = load.timeline.carried(new.id, load.event_at)
        f["reaction_ms"] = first_packet_ms(load.timeline, new.id, load.event_at)
        png = _pool_outcome(ctx, "SCALE-1", "scale-out", sc, pool, load, f, per_pool, problems)
        first_png = first_png or png
        if not f["new_instance_packets"]:
            problems.append(f"{_pool_label(sc, pool)}: the new instance {new.id} carried no packet")
        lab.control.scale_in(sc.tenant, pool.name)  # back to the topology's size
        f["seconds"] = round(time.time() - t0, 1)
    figures = _collect(per_pool, ("udp_lost", "udp_duplicates", "tcp_broken"))
    return verdict(not problems, figures, "; ".join(problems), first_png)


@check("SCALE-2")
def scale_2(ctx: Context) -> Result:
    """Scaling in (draining) any NF pool under load MUST lose, duplicate or break nothing.

    For each pool: an instance is added first; then, under load, it is taken out of the pool,
    drained and stopped (SIGTERM, exit 0). Per flow 0 lost and 0 duplicated, no TCP connection
    reset or stalled.
    """
    lab = ctx.lab
    per_pool: dict[str, dict[str, Any]] = {}
    problems = []
    first_png = None
    for sc, pool in ctx.pools():
        lab.control.scale_out(sc.tenant, pool.name)
        load = under_load(ctx, sc, lambda: lab.control.scale_in(sc.tenant, pool.name)[0],
                          [f"{sc.tenant}-{pool.name}-"])
        f = load.figures()
        f["removed_instance"] = load.event_result
        f["drain_ms"] = round((time.time() - load.event_at) * 1000, 1)
        png = _pool_outcome(ctx, "SCALE-2", "scale-in (drain)", sc, pool, load, f, per_pool, problems)
        first_png = first_png or png
    figures = _collect(per_pool, ("udp_lost", "udp_duplicates", "tcp_broken"))
    return verdict(not problems, figures, "; ".join(problems), first_png)


# -- CONT: state continuity across crashes ---------------------------------------------------

def _kill_busiest(ctx: Context, sc: Scenario, pool: Any, udp: bool = True, tcp: bool = True,
                  also_follow: tuple[str, ...] = ()) -> Load:
    lab = ctx.lab

    def kill() -> str:
        victim = busiest(lab, sc.tenant, pool.name)
        lab.control.kill(victim.id)
        return victim.id

    load = under_load(ctx, sc, kill, [f"{sc.tenant}-{pool.name}-", *also_follow], udp=udp, tcp=tcp)
    lab.control.scale_out(sc.tenant, pool.name)  # back to the topology's size
    return load


@check("CONT-1")
def cont_1(ctx: Context) -> Result:
    """Killing (SIGKILL) an instance of any NF kind under load MUST break no TCP connection;
    the outage of each UDP flow is recorded in ms.

    For one pool of each NF kind: the instance that carried the most packets is killed mid-run;
    its pool fails over to the survivors. Outage per flow = lost / offered rate (RFC 6201).
    """
    per_kind: dict[str, dict[str, Any]] = {}
    problems, first_png = [], None
    for sc, pool in ctx.pools(one_per_kind=True):
        load = _kill_busiest(ctx, sc, pool)
        f = load.figures()
        f["killed"] = load.event_result
        if load.udp:
            outages = [x["outage_ms"] for x in load.udp["flows"].values()]
            f["mean_outage_ms"] = round(sum(outages) / len(outages), 1) if outages else 0.0
        png = _plot(ctx, load, f"CONT-1-{pool.kind}", f"CONT-1 SIGKILL of {load.event_result} under load", f)
        first_png = first_png or png
        per_kind[pool.kind] = f
        if f.get("tcp_broken", 0):
            problems.append(f"{pool.kind}: {f['tcp_broken']} TCP connections broken {f.get('tcp_errors', '')}")
    figures = _collect(per_kind, ("tcp_broken", "udp_lost"))
    return verdict(not problems, figures, "; ".join(problems), first_png)


def _need(ctx: Context, kind: str) -> Optional[tuple[Scenario, Any]]:
    found = ctx.pools(kind)
    return found[0] if found else None


@check("CONT-2")
def cont_2(ctx: Context) -> Result:
    """Established connections through a firewall MUST keep passing on the surviving instances
    after the instance that saw their SYN is killed, with no new SYN.

    Echo-verified TCP connections are established, then the busiest firewall instance is
    killed; every connection must go on (the sender never reconnects) and no survivor may drop
    a packet as not belonging to a connection.
    """
    lab = ctx.lab
    found = _need(ctx, "firewall")
    if not found:
        return Result(SKIP, details="the topology has no firewall pool")
    sc, pool = found
    before = {i.id: i.counters().get("drops", {}).get("no_connection", 0) for i in lab.pool_instances(sc.tenant, pool.name)}
    load = _kill_busiest(ctx, sc, pool, udp=False)
    f = load.figures()
    f["killed"] = load.event_result
    counters = lab.settled_counters()
    f["survivor_no_connection_drops"] = sum(counters.get(i, {}).get("drops", {}).get("no_connection", 0) - n
                                            for i, n in before.items() if i in counters and i != load.event_result)
    png = _plot(ctx, load, "CONT-2-firewall", f"CONT-2 SIGKILL of firewall {load.event_result}", f)
    ok = f.get("tcp_broken", 0) == 0 and f["survivor_no_connection_drops"] == 0
    return verdict(ok, f, f"{f.get('tcp_broken')} connections broken {f.get('tcp_errors', '')}, survivors dropped "
                          f"{f['survivor_no_connection_drops']} packets as unknown connections", png)


@check("CONT-3")
def cont_3(ctx: Context) -> Result:
    """Each flow's external (translated) address and port MUST stay the same after a NAT
    instance is killed (RFC 4787 REQ-1, RFC 5382).

    UDP flows and TCP connections run through the NAT; the busiest NAT instance is killed;
    the server must see every UDP flow from a single external address:port and no TCP
    connection may break.
    """
    found = _need(ctx, "nat")
    if not found:
        return Result(SKIP, details="the topology has no nat pool")
    sc, pool = found
    load = _kill_busiest(ctx, sc, pool)
    f = load.figures()
    f["killed"] = load.event_result
    remapped = {k: v["sources"] for k, v in (load.udp or {"flows": {}})["flows"].items() if len(v["sources"]) > 1}
    f["flows_remapped"] = len(remapped)
    if remapped:
        f["remapped"] = dict(itertools.islice(remapped.items(), 5))
    png = _plot(ctx, load, "CONT-3-nat", f"CONT-3 SIGKILL of NAT {load.event_result}", f)
    ok = not remapped and f.get("tcp_broken", 0) == 0
    return verdict(ok, f, f"{len(remapped)} flows changed external address:port, "
                          f"{f.get('tcp_broken')} TCP connections broken", png)


class EspCapture:
    """Collect (SPI, sequence number) of every ESP packet the fabric sends to some NF ports.

    Runs in the root namespace on the fabric-side ends of the given instances' links.
    """

    def __init__(self, lab: Any, instances: list[Any]) -> None:
        self.socks = []
        for inst in instances:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.bind((f"s{lab.tag}-p{inst.member.port}", 0))
            self.socks.append(s)
        self.seen: list[tuple[int, int]] = []
        self.frames: list[tuple[Any, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from nfs import nsh
        while not self._stop.is_set():
            r, _, _ = select.select(self.socks, [], [], 0.1)
            for s in r:
                data, addr = s.recvfrom(65535)
                if addr[2] != socket.PACKET_OUTGOING:
                    continue  # only what the fabric sends toward the NF
                try:
                    inner = nsh.parse(data).inner
                except nsh.Malformed:
                    continue
                if inner[12:14] == b"\x08\x00" and inner[23] == 50:
                    ihl = (inner[14] & 0xF) * 4
                    spi, seq = struct.unpack_from("!II", inner, 14 + ihl)
                    self.seen.append((spi, seq))
                    self.frames.append((s, data))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def replay(self, count: int) -> int:
        """Send ``count`` captured frames again toward their NF; return how many were sent."""
        sent = 0
        for s, data in self.frames[:count]:
            s.send(data)
            sent += 1
        return sent

    def close(self) -> None:
        for s in self.socks:
            s.close()


@check("CONT-4")
def cont_4(ctx: Context) -> Result:
    """No (SPI, sequence number) MUST appear twice on the wire across the failover of an IPsec
    instance; a replayed packet MUST be dropped; packets after the failover MUST be accepted.

    UDP flows run through the encrypting and the decrypting gateway pools; the busiest
    encrypting instance is killed mid-run. Every ESP packet the fabric hands to the
    decrypting pool is captured; then some captured packets are sent again (replays).
    """
    lab = ctx.lab
    ipsec = ctx.pools("ipsec")
    if not ipsec:
        return Result(SKIP, details="the topology has no ipsec pool")
    sc = ipsec[0][0]
    t = lab.topo.tenant(sc.tenant)
    chain = t.chain("outbound")
    enc = next((p for p in chain if p.kind == "ipsec" and p.config.get("encrypt", "outbound") == "outbound"), None)
    dec = next((p for p in chain if p.kind == "ipsec" and p is not enc), None)
    if enc is None or dec is None:
        return Result(SKIP, details=f"tenant {sc.tenant} needs an encrypting and a decrypting ipsec pool "
                                    f"in its outbound chain")
    dec_instances = [i for i in lab.pool_instances(sc.tenant, dec.name) if i.in_pool]
    cap = EspCapture(lab, dec_instances)
    replay_before = sum(i.counters().get("drops", {}).get("replay", 0) for i in dec_instances)
    try:
        load = _kill_busiest(ctx, sc, enc, tcp=False, also_follow=(f"{sc.tenant}-{dec.name}-",))
        time.sleep(0.3)
        cap.stop()
        f = load.figures()
        f["killed"] = load.event_result
        f["esp_packets"] = len(cap.seen)
        f["duplicate_spi_seq"] = len(cap.seen) - len(set(cap.seen))
        f["replays_sent"] = cap.replay(10)
        time.sleep(0.6)
        counters = lab.settled_counters()
        f["replays_dropped"] = sum(counters.get(i.id, {}).get("drops", {}).get("replay", 0)
                                   for i in dec_instances) - replay_before
        f["decrypted_after_failover"] = sum(load.timeline.carried(i.id, load.event_at + 0.5) for i in dec_instances)
    finally:
        cap.close()
    png = _plot(ctx, load, "CONT-4-ipsec", f"CONT-4 SIGKILL of IPsec {load.event_result}", f)
    ok = (f["esp_packets"] > 0 and f["duplicate_spi_seq"] == 0 and f["replays_dropped"] >= f["replays_sent"] > 0
          and f["decrypted_after_failover"] > 0)
    return verdict(ok, f, f"{f['duplicate_spi_seq']} (SPI, seq) pairs sent twice; {f['replays_dropped']} of "
                          f"{f['replays_sent']} replays dropped; {f['decrypted_after_failover']} packets after failover",
                   png)


@check("CONT-5")
def cont_5(ctx: Context) -> Result:
    """Each connection through the load balancer MUST keep its backend when an LB instance is
    killed.

    Echo-verified TCP connections to the virtual IP run; the busiest LB instance is killed;
    no connection may break and every connection must be seen by exactly one backend.
    """
    found = _need(ctx, "lb")
    if not found:
        return Result(SKIP, details="the topology has no lb pool")
    sc, pool = found
    load = _kill_busiest(ctx, sc, pool, udp=False)
    f = load.figures()
    f["killed"] = load.event_result
    seen: dict[str, int] = {}
    for sink in load.tcp["sinks"]:
        for peer in set(sink["peers"]):
            seen[peer] = seen.get(peer, 0) + 1
    f["backends"] = len(load.tcp["sinks"])
    f["connections_seen_by_backends"] = len(seen)
    f["connections_moved"] = sum(1 for n in seen.values() if n > 1)
    png = _plot(ctx, load, "CONT-5-lb", f"CONT-5 SIGKILL of LB {load.event_result}", f)
    ok = f.get("tcp_broken", 0) == 0 and f["connections_moved"] == 0
    return verdict(ok, f, f"{f.get('tcp_broken')} connections broken {f.get('tcp_errors', '')}, "
                          f"{f['connections_moved']} moved to another backend", png)
