"""Tenant isolation at the fabric: ISO-1 .. ISO-3."""

from __future__ import annotations

import time
from typing import Any

from conformance.core import SKIP, Result, check, verdict
from conformance.load import Context, _ports, _sports, scenarios
from statelab.traffic import TcpStream, UdpStream, host_rx, quiet

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


