"""Tenant isolation at the fabric: ISO-1 .. ISO-3.

Every negative ("nothing crossed to another tenant") is paired with its positive ("the same
probe, within the sender's own tenant, did arrive"), as ptf pairs ``verify_packets`` with
``verify_no_other_packets``: a fabric that drops everything fails. A probe counts as sent only
when the kernel took it (:class:`~statelab.traffic.Injector`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from conformance.core import SKIP, Result, check, verdict
from conformance.load import Context, _ports, _sports, nothing_to_exercise, scenarios
from statelab.traffic import Injector, TcpStream, UdpStream, host_rx, quiet

POSITIVE_TIMEOUT = 3.0   # s: by then the probe must have arrived within the sender's tenant
NEGATIVE_TIMEOUT = 0.5   # s: after the positives arrived, how long another tenant is watched
PROBE_KINDS = ("icmp", "udp", "tcp-syn", "arp", "broadcast")


def tenant_rx(lab: Any, tenant: Any, counters: dict[str, dict[str, Any]], exclude: tuple[str, ...] = ()) -> int:
    """Packets a tenant's hosts and NF instances have received (``exclude``: names left out)."""
    hosts = sum(host_rx(lab, h.name) for h in tenant.hosts if h.name not in exclude)
    nfs = sum(counters.get(i.id, {}).get("rx", 0) for i in lab.iter_instances()
              if i.tenant.name == tenant.name and i.id not in exclude)
    return hosts + nfs


def raw_counters(lab: Any) -> dict[str, dict[str, Any]]:
    return {i.id: i.counters() for i in lab.iter_instances()}


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` s passed; return whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def paired_probe(lab: Any, injector: Injector, frames: list[bytes], expected: int, own: Any,
                 others: list[Any], exclude: tuple[str, ...]) -> dict[str, Any]:
    """Send ``frames``; the sender's tenant ``own`` must receive at least ``expected`` packets
    within :data:`POSITIVE_TIMEOUT`, then the ``others`` nothing for :data:`NEGATIVE_TIMEOUT`.

    Returns:
        ``{"sent", "expected", "arrived", "leaked": {tenant: packets}}``.
    """
    counters = raw_counters(lab)
    before_own = tenant_rx(lab, own, counters, exclude)
    before = {t.name: tenant_rx(lab, t, counters) for t in others}
    sent = injector.send(frames)
    arrived = [0]

    def own_arrived() -> bool:
        arrived[0] = tenant_rx(lab, own, raw_counters(lab), exclude) - before_own
        return arrived[0] >= expected

    wait_until(own_arrived, POSITIVE_TIMEOUT)
    time.sleep(NEGATIVE_TIMEOUT)
    settled = lab.settled_counters()
    leaked = {t.name: tenant_rx(lab, t, settled) - before[t.name] for t in others}
    return {"sent": sent, "expected": expected, "arrived": arrived[0],
            "leaked": {k: v for k, v in leaked.items() if v}}


def probe_frame(kind: str, src: Any, src_mac: str, gw_mac: str, dst_ip: str) -> bytes:
    """One isolation probe from host ``src`` (spec) toward ``dst_ip``."""
    from scapy.compat import raw
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether

    ip = IP(src=str(src.ip.ip), dst=dst_ip)
    if kind == "icmp":
        return raw(Ether(src=src_mac, dst=gw_mac) / ip / ICMP(id=0x150, seq=1))
    if kind == "udp":
        return raw(Ether(src=src_mac, dst=gw_mac) / ip / UDP(sport=40009, dport=9) / b"iso-probe")
    if kind == "tcp-syn":
        return raw(Ether(src=src_mac, dst=gw_mac) / ip / TCP(sport=40022, dport=22, flags="S", seq=1))
    if kind == "arp":
        return raw(Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff") /
                   ARP(op=1, hwsrc=src_mac, psrc=str(src.ip.ip), pdst=dst_ip))
    if kind == "broadcast":
        bcast = str(src.ip.network.broadcast_address)
        return raw(Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=str(src.ip.ip), dst=bcast) /
                   UDP(sport=40009, dport=9) / b"iso-probe")
    raise ValueError(kind)


def _chain_of(tenant: Any, host: Any) -> tuple[str, ...]:
    return tuple(tenant.chain("outbound" if host.zone == "inside" else "inbound"))


def _arrives_within(kind: str, tenant: Any, sender: Any, dst_ip: str) -> bool:
    """Whether a probe of ``kind`` toward ``dst_ip`` must arrive somewhere in the sender's own
    tenant: at the first NF of its chain, or at one of its hosts."""
    peers = [h for h in tenant.hosts if h.name != sender.name]
    if kind in ("arp", "broadcast"):
        return bool(peers) or bool(_chain_of(tenant, sender))
    return bool(_chain_of(tenant, sender)) or any(str(h.ip.ip) == dst_ip for h in peers)


@check("ISO-1")
def iso_1(ctx: Context) -> Result:
    """Nothing sent by one tenant MUST be delivered to another tenant, even with identical
    address spaces (ICMP, TCP, UDP, ARP and broadcast), while the same probes arrive within
    the sender's own tenant.

    Every tenant's first host sends ICMP echo, UDP, TCP SYNs, ARP requests and a subnet
    broadcast toward every address the other tenants use. Positive half: within
    POSITIVE_TIMEOUT the sender's own tenant (its other hosts, or the first NF pool of its
    chain) received at least as many packets as probes that must arrive there. Negative half:
    for NEGATIVE_TIMEOUT after that, the other tenants' hosts and NF instances receive nothing.
    """
    lab, topo = ctx.lab, ctx.lab.topo
    if len(topo.tenants) < 2:
        return Result(SKIP, details="the topology has one tenant: nothing to isolate")
    from statelab.lab import gateway_mac

    rounds: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    overlapping = 0
    for own in topo.tenants:
        sender = own.hosts[0]
        others = [t for t in topo.tenants if t is not own]
        targets = sorted({str(h.ip.ip) for t in others for h in t.hosts})
        own_ips = {str(h.ip.ip) for h in own.hosts}
        overlapping += sum(1 for ip in targets if ip in own_ips)
        quiet(lab, list(lab.hosts))
        src_mac = lab.host(sender.name).MAC()
        with Injector(lab, sender.name) as injector:
            for kind in PROBE_KINDS:
                frames = [probe_frame(kind, sender, src_mac, gateway_mac(own.id), ip) for ip in targets]
                if kind == "broadcast":
                    frames = frames[:1]
                expected = sum(1 for ip in targets[:len(frames)] if _arrives_within(kind, own, sender, ip))
                r = paired_probe(lab, injector, frames, expected, own, others, (sender.name,))
                rounds[f"{sender.name}/{kind}"] = r
                if r["sent"] != len(frames):
                    problems.append(f"{sender.name}: only {r['sent']} of {len(frames)} {kind} probes were sent")
                if r["arrived"] < r["expected"]:
                    problems.append(f"{sender.name} {kind}: {r['arrived']} of {r['expected']} probes arrived "
                                    f"within tenant {own.name} (the positive half failed)")
                for t, n in r["leaked"].items():
                    problems.append(f"{sender.name} {kind}: {n} packets reached tenant {t}")
    figures = {"probes_sent": sum(r["sent"] for r in rounds.values()),
               "probes_expected_within": sum(r["expected"] for r in rounds.values()),
               "arrived_within_tenant": sum(r["arrived"] for r in rounds.values()),
               "overlapping_addresses": overlapping,
               "leaked_packets": sum(sum(r["leaked"].values()) for r in rounds.values()),
               "positive_timeout_s": POSITIVE_TIMEOUT, "negative_timeout_s": NEGATIVE_TIMEOUT,
               "leaks": {k: r["leaked"] for k, r in rounds.items() if r["leaked"]}, "rounds": rounds}
    if figures["probes_expected_within"] == 0:
        return Result(SKIP, figures, "no probe could be checked within its own tenant (no tenant has a "
                                     "second host or a chain)")
    return verdict(not problems, figures, "; ".join(problems))


def _nsh(spi: int, si: int, c1: int, inner: bytes, dst: str = "ff:ff:ff:ff:ff:ff", src: Optional[str] = None) -> bytes:
    from scapy.compat import raw
    from scapy.contrib.nsh import NSH
    from scapy.layers.l2 import Ether

    eth = Ether(dst=dst, type=0x894F) if src is None else Ether(dst=dst, src=src, type=0x894F)
    return raw(eth / NSH(mdtype=1, nextproto=3, spi=spi, si=si, context_header=c1.to_bytes(4, "big") + bytes(12))
               / inner)


def _legit_return(lab: Any, inst: Any) -> Optional[tuple[int, int]]:
    """(spi, si) with which instance ``inst`` may hand a packet back to the fabric."""
    from statelab.fabric import FIRST_SI
    for path, hop in lab.plan.positions(inst.key):
        return path.spi, FIRST_SI - hop - 1
    return None


@check("ISO-2")
def iso_2(ctx: Context) -> Result:
    """Frames arriving with another tenant's tag or a forged NSH header MUST be dropped (and
    counted by the fabric), while the same frame sent legitimately arrives within the sender's
    tenant.

    For every ordered pair of tenants (a, b): from a's host, 802.1Q frames tagged with b's id
    and with every VLAN id b's hosts have on a trunk, and NSH frames claiming b's service
    paths and context; from one of a's NF instances, NSH frames claiming b's paths (and a's
    own path with b's tenant id). On every trunk port: untagged frames and frames tagged with a
    VLAN id no host has there. Negative half: no other tenant's hosts or NF instances receive
    any of them, and the fabric's drop counters grow by at least the number of forged frames.
    Positive half: the same frame sent legitimately (untagged from a's host; with the
    instance's own path, index and tenant from the NF; tagged with a host's VLAN on a trunk)
    arrives within the sender's tenant.
    """
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1Q, Ether

    from statelab.lab import gateway_mac

    lab, topo = ctx.lab, ctx.lab.topo
    if len(topo.tenants) < 2:
        return Result(SKIP, details="the topology has one tenant: nothing to isolate")
    pairs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for a in topo.tenants:
        for b in topo.tenants:
            if a is b:
                continue
            sender = a.hosts[0]
            victim = b.hosts[-1]
            src_mac = lab.host(sender.name).MAC()
            inner = (Ether(src=src_mac, dst=gateway_mac(a.id)) /
                     IP(src=str(sender.ip.ip), dst=str(victim.ip.ip)) / UDP(sport=40010, dport=9) / b"iso-2")
            tags = sorted({b.id} | {h.vlan for h in b.hosts if h.vlan is not None})
            forged_host = [raw(Ether(src=src_mac, dst=dst) / Dot1Q(vlan=tag) / inner[IP])
                           for tag in tags for dst in ("ff:ff:ff:ff:ff:ff", gateway_mac(b.id))]
            forged_host += [_nsh(b.id << 1 | d, si, b.id, raw(inner), src=src_mac)
                            for d in (0, 1) for si in (255, 254, 253)]
            quiet(lab, list(lab.hosts))
            rec: dict[str, Any] = {}
            dropped = lab.fabric.dropped()
            with Injector(lab, sender.name) as injector:  # the forged frames, then the legitimate one
                r = paired_probe(lab, injector, forged_host + [raw(inner)],
                                 1 if _arrives_within("udp", a, sender, str(victim.ip.ip)) else 0,
                                 a, [b], (sender.name,))
            rec["host"] = {"forged_sent": min(r["sent"], len(forged_host)), "leaked": r["leaked"],
                           "legit_expected": r["expected"], "legit_arrived": r["arrived"]}
            forged_sent = rec["host"]["forged_sent"]
            a_nf = next((i for i in lab.iter_instances() if i.tenant.name == a.name and i.alive()
                         and i.in_pool), None)
            if a_nf is not None:
                legit = _legit_return(lab, a_nf)
                forged_nf = [_nsh(b.id << 1 | d, si, b.id, raw(inner)) for d in (0, 1) for si in (255, 254, 253)]
                if legit is not None:  # a's own path and index, but b's tenant id
                    forged_nf.append(_nsh(legit[0], legit[1], b.id, raw(inner)))
                own_path = [_nsh(legit[0], legit[1], a.id, raw(inner))] if legit else []
                with Injector(lab, a_nf.id) as injector:
                    r = paired_probe(lab, injector, forged_nf + own_path, len(own_path), a, [b], (a_nf.id,))
                rec["nf"] = {"instance": a_nf.id, "forged_sent": min(r["sent"], len(forged_nf)),
                             "leaked": r["leaked"], "legit_expected": r["expected"], "legit_arrived": r["arrived"]}
                forged_sent += rec["nf"]["forged_sent"]
            drops = [0]

            def counted() -> bool:
                drops[0] = lab.fabric.dropped() - dropped
                return drops[0] >= forged_sent

            wait_until(counted, POSITIVE_TIMEOUT)
            rec["forged_sent"], rec["fabric_drops"] = forged_sent, drops[0]
            label = f"{a.name}->{b.name}"
            pairs[label] = rec
            for where in ("host", "nf"):
                r = rec.get(where)
                if r is None:
                    continue
                for t, n in r["leaked"].items():
                    problems.append(f"{label}: {n} forged frames from a{' n NF' if where == 'nf' else ''} "
                                    f"{where} port reached tenant {t}")
                if r["legit_arrived"] < r["legit_expected"]:
                    problems.append(f"{label}: the legitimate frame from the {where} port did not arrive "
                                    f"within {a.name} (the positive half failed)")
            if drops[0] < forged_sent:
                problems.append(f"{label}: the fabric counted {drops[0]} drops for {forged_sent} forged frames")
    trunks = _trunk_probes(lab, problems)
    figures = {"tenant_pairs": len(pairs), "trunks": trunks,
               "trunk_forged_frames": sum(r["forged_sent"] for r in trunks.values()),
               "trunk_fabric_drops": sum(r["fabric_drops"] for r in trunks.values()),
               "forged_frames": sum(r["forged_sent"] for r in pairs.values()),
               "fabric_drops": sum(r["fabric_drops"] for r in pairs.values()),
               "delivered_to_other_tenant": sum(sum(r[w]["leaked"].values()) for r in pairs.values()
                                                for w in ("host", "nf") if w in r),
               "legit_arrived": sum(r[w]["legit_arrived"] for r in pairs.values() for w in ("host", "nf") if w in r),
               "legit_expected": sum(r[w]["legit_expected"] for r in pairs.values() for w in ("host", "nf") if w in r),
               "pairs": pairs}
    return verdict(not problems, figures, "; ".join(problems))


class RawPort:
    """Raw frames sent from a root-namespace interface (a trunk switch's uplink)."""

    def __init__(self, ifname: str) -> None:
        import socket
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind((ifname, 0))

    def send(self, frames: list[bytes]) -> int:
        return sum(1 for f in frames if self.sock.send(f) == len(f))

    def __enter__(self) -> "RawPort":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()


def _trunk_probes(lab: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """On each trunk port: untagged frames and frames with a VLAN id no tenant has there are
    dropped and counted; the same frame tagged with a host's VLAN arrives within its tenant."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1Q, Ether

    from statelab.lab import gateway_mac

    out: dict[str, dict[str, Any]] = {}
    topo = lab.topo
    for trunk in sorted(lab.trunks):
        behind = [(t, h) for t, h in topo.hosts() if h.trunk == trunk]
        vlans = {h.vlan for _, h in behind}
        unused = next(v for v in range(4094, 0, -1) if v not in vlans)
        own, host = behind[0]
        peer = next((h for h in own.hosts if h.name != host.name), host)
        inner = (Ether(src=lab.host(host.name).MAC(), dst=gateway_mac(own.id)) /
                 IP(src=str(host.ip.ip), dst=str(peer.ip.ip)) / UDP(sport=40011, dport=9) / b"iso-2 trunk")
        forged = [raw(inner), raw(Ether(src=inner.src, dst=inner.dst) / Dot1Q(vlan=unused) / inner[IP])]
        legit = raw(Ether(src=inner.src, dst=inner.dst) / Dot1Q(vlan=host.vlan) / inner[IP])
        others = [t for t in topo.tenants if t is not own]
        quiet(lab, list(lab.hosts))
        dropped = lab.fabric.dropped()
        with RawPort(lab.trunk_uplink(trunk)) as port:
            r = paired_probe(lab, port, forged + [legit], 1 if _arrives_within("udp", own, host, str(peer.ip.ip))
                             else 0, own, others, (host.name,))
        drops = [0]

        def counted() -> bool:
            drops[0] = lab.fabric.dropped() - dropped
            return drops[0] >= len(forged)

        wait_until(counted, POSITIVE_TIMEOUT)
        out[trunk] = {"forged_sent": min(r["sent"], len(forged)), "fabric_drops": drops[0], "leaked": r["leaked"],
                      "legit_expected": r["expected"], "legit_arrived": r["arrived"], "unused_vlan": unused}
        for t, n in r["leaked"].items():
            problems.append(f"trunk {trunk}: {n} untagged or foreign-tagged frames reached tenant {t}")
        if r["arrived"] < r["expected"]:
            problems.append(f"trunk {trunk}: the frame tagged with {host.name}'s VLAN {host.vlan} did not arrive "
                            f"within {own.name} (the positive half failed)")
        if drops[0] < len(forged):
            problems.append(f"trunk {trunk}: the fabric counted {drops[0]} drops for {len(forged)} untagged or "
                            f"foreign-tagged frames")
    return out


@check("ISO-3")
def iso_3(ctx: Context) -> Result:
    """An NF instance MUST receive only the tenants its pool serves.

    Traffic runs in every tenant that has a chain to drive; afterwards every instance's
    per-tenant receive counters (the tenant id in the NSH context header) must name only its
    own tenant, and every pool the traffic was driven through must have received it.
    """
    lab = ctx.lab
    driven = scenarios(lab.topo)
    pairs = ctx.pools()
    if not pairs:
        return nothing_to_exercise(ctx)
    before = {i.id: i.counters().get("rx_by_tenant", {}).get(str(i.tenant.id), 0) for i in lab.iter_instances()}
    for sc in driven:
        port = next(_ports)
        if sc.udp:
            UdpStream(lab, sc.client, sc.servers[0], sc.dst_ip, flows=16, rate=400, packets=3, port=port,
                      first_sport=next(_sports)).result()
        TcpStream(lab, sc.client, sc.servers[0], sc.dst_ip, connections=2, nbytes=2048, duration=0,
                  port=sc.tcp_port or port + 1, sinks=sc.servers, sink_port=sc.server_port).result()
    foreign: dict[str, dict[str, int]] = {}
    counters = lab.settled_counters()
    own_packets: dict[str, int] = {}
    for inst in lab.iter_instances():
        by_tenant = counters.get(inst.id, {}).get("rx_by_tenant", {})
        wrong = {t: n for t, n in by_tenant.items() if int(t) != inst.tenant.id}
        if wrong:
            foreign[inst.id] = wrong
        label = f"{inst.tenant.name}/{inst.pool.name}"
        own_packets[label] = (own_packets.get(label, 0) + by_tenant.get(str(inst.tenant.id), 0)
                              - before.get(inst.id, 0))
    idle = [f"{sc.tenant}/{p.name}" for sc, p in pairs if own_packets.get(f"{sc.tenant}/{p.name}", 0) <= 0]
    figures = {"instances": len(counters), "pools_driven": len(pairs),
               "pools_without_traffic": idle, "own_tenant_packets": sum(own_packets.values()),
               "instances_with_foreign_traffic": len(foreign),
               "foreign_packets": sum(sum(w.values()) for w in foreign.values()), "foreign": foreign}
    problems = [f"instances received other tenants' packets: {foreign}"] if foreign else []
    if idle:
        problems.append(f"traffic could not be driven through pools {idle}")
    return verdict(not problems, figures, "; ".join(problems))
