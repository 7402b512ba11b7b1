"""State continuity across instance crashes: CONT-1 .. CONT-5 (RFC 4303: ESP sequence numbers
never reused, replay window; RFC 4787/5382: the NAT mapping stays the same)."""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import time
from typing import Any, Optional

from conformance.core import SKIP, Result, check, verdict
from conformance.load import Context, Load, Scenario, busiest, collect, plot, under_load

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
        png = plot(ctx, load, f"CONT-1-{pool.kind}", f"CONT-1 SIGKILL of {load.event_result} under load", f)
        first_png = first_png or png
        per_kind[pool.kind] = f
        if f.get("tcp_broken", 0):
            problems.append(f"{pool.kind}: {f['tcp_broken']} TCP connections broken {f.get('tcp_errors', '')}")
    figures = collect(per_kind, ("tcp_broken", "udp_lost"))
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
    png = plot(ctx, load, "CONT-2-firewall", f"CONT-2 SIGKILL of firewall {load.event_result}", f)
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
    png = plot(ctx, load, "CONT-3-nat", f"CONT-3 SIGKILL of NAT {load.event_result}", f)
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
    png = plot(ctx, load, "CONT-4-ipsec", f"CONT-4 SIGKILL of IPsec {load.event_result}", f)
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
    png = plot(ctx, load, "CONT-5-lb", f"CONT-5 SIGKILL of LB {load.event_result}", f)
    ok = f.get("tcp_broken", 0) == 0 and f["connections_moved"] == 0
    return verdict(ok, f, f"{f.get('tcp_broken')} connections broken {f.get('tcp_errors', '')}, "
                          f"{f['connections_moved']} moved to another backend", png)
