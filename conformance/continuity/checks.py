"""State continuity across crashes: CONT-1 .. CONT-5 of NF instances, CONT-6 of the state
server's primary (RFC 4303: ESP sequence numbers never reused, replay window; RFC 4787/5382:
the NAT mapping stays the same)."""

from __future__ import annotations

import itertools
import struct
import time
from typing import Any, Optional

from conformance.core import SKIP, Result, check, verdict
from conformance.load import (Context, FabricTap, Load, Scenario, busiest, collect, exercised,
                              nothing_to_exercise, plot, pool_label, under_load)

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


def kill_proof(load: Load, f: dict[str, Any], label: str, problems: list[str]) -> None:
    """Record what the kill proved: the killed instance's rate just before it, and whether the
    load ran through the pool at all; a kill of an idle instance proves nothing (a problem)."""
    f["killed"] = load.event_result
    f["killed_rate_before_pps"] = load.rate_before(load.event_result)
    if not exercised(f):
        problems.append(f"{label}: traffic could not be driven through the pool "
                        f"({f.get('pool_packets', 0)} packets reached its instances)")
    elif f["killed_rate_before_pps"] <= 0:
        problems.append(f"{label}: the killed instance {load.event_result} carried no traffic just "
                        f"before the kill, so the kill proved nothing")


@check("CONT-1")
def cont_1(ctx: Context) -> Result:
    """Killing (SIGKILL) an instance of any NF kind under load MUST break no TCP connection;
    the outage of each UDP flow is recorded in ms.

    For one pool of each NF kind: the instance that carried the most packets is killed mid-run;
    its pool fails over to the survivors. Outage per flow = lost / offered rate (RFC 6201).
    """
    per_kind: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    first_png = None
    pairs = ctx.pools(one_per_kind=True)
    if not pairs:
        return nothing_to_exercise(ctx)
    for sc, pool in pairs:
        load = _kill_busiest(ctx, sc, pool)
        f = load.figures()
        kill_proof(load, f, pool_label(sc, pool), problems)
        if load.udp:
            outages = [x["outage_ms"] for x in load.udp["flows"].values()]
            f["mean_outage_ms"] = round(sum(outages) / len(outages), 1) if outages else 0.0
        png = plot(ctx, load, f"CONT-1-{pool.kind}", f"CONT-1 SIGKILL of {load.event_result} under load", f)
        first_png = first_png or png
        per_kind[pool.kind] = f
        if f.get("tcp_broken", 0):
            problems.append(f"{pool.kind}: {f['tcp_broken']} TCP connections broken {f.get('tcp_errors', '')}")
    figures = collect(per_kind, ("tcp_broken", "udp_lost", "pool_packets"))
    figures["kinds_exercised"] = len(per_kind)
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
        return Result(SKIP, details="the topology has no firewall pool that traffic can be driven through")
    sc, pool = found
    before = {i.id: i.counters().get("drops", {}).get("no_connection", 0) for i in lab.pool_instances(sc.tenant, pool.name)}
    load = _kill_busiest(ctx, sc, pool, udp=False)
    f = load.figures()
    problems: list[str] = []
    kill_proof(load, f, pool_label(sc, pool), problems)
    counters = lab.settled_counters()
    f["survivor_no_connection_drops"] = sum(counters.get(i, {}).get("drops", {}).get("no_connection", 0) - n
                                            for i, n in before.items() if i in counters and i != load.event_result)
    png = plot(ctx, load, "CONT-2-firewall", f"CONT-2 SIGKILL of firewall {load.event_result}", f)
    ok = f.get("tcp_broken", 0) == 0 and f["survivor_no_connection_drops"] == 0 and not problems
    return verdict(ok, f, "; ".join([*problems, f"{f.get('tcp_broken')} connections broken "
                                     f"{f.get('tcp_errors', '')}, survivors dropped "
                                     f"{f['survivor_no_connection_drops']} packets as unknown connections"]), png)


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
        return Result(SKIP, details="the topology has no nat pool that traffic can be driven through")
    sc, pool = found
    load = _kill_busiest(ctx, sc, pool)
    f = load.figures()
    problems: list[str] = []
    kill_proof(load, f, pool_label(sc, pool), problems)
    remapped = {k: v["sources"] for k, v in (load.udp or {"flows": {}})["flows"].items() if len(v["sources"]) > 1}
    f["flows_remapped"] = len(remapped)
    if remapped:
        f["remapped"] = dict(itertools.islice(remapped.items(), 5))
    png = plot(ctx, load, "CONT-3-nat", f"CONT-3 SIGKILL of NAT {load.event_result}", f)
    ok = not remapped and f.get("tcp_broken", 0) == 0 and not problems
    return verdict(ok, f, "; ".join([*problems, f"{len(remapped)} flows changed external address:port, "
                                                f"{f.get('tcp_broken')} TCP connections broken"]), png)


def _esp(inner: bytes) -> Optional[tuple[int, int]]:
    """(SPI, sequence number) of an inner IPv4 ESP frame, else None."""
    if inner[12:14] != b"\x08\x00" or inner[23] != 50:
        return None
    ihl = (inner[14] & 0xF) * 4
    return struct.unpack_from("!II", inner, 14 + ihl)


class EspCapture(FabricTap):
    """Every ESP packet the fabric hands to some NF instances, with (SPI, sequence number)."""

    def __init__(self, lab: Any, instances: list[Any]) -> None:
        super().__init__(lab, instances, _esp)

    @property
    def seen(self) -> list[tuple[int, int]]:
        return [key for _, _, key, _ in self.captured]

    def replays(self, window: int, count: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        """Frames to replay, each toward the *other* instance than the one that got it.

        Returns:
            (inside the window: the newest numbers below the top, each seen once so far;
            older than the window), each as ``(target instance index, frame)``.
        """
        if not self.captured:
            return [], []
        top = max(seq for _, _, (_, seq), _ in self.captured)
        once: dict[tuple[int, int], int] = {}
        for _, _, key, _ in self.captured:
            once[key] = once.get(key, 0) + 1

        def retarget(idx: int, frame: bytes) -> tuple[int, bytes]:
            other = (idx + 1) % len(self.socks)
            mac = bytes.fromhex(self.instances[other].member.mac.replace(":", ""))
            return other, mac + frame[6:]

        fresh = sorted((c for c in self.captured if c[2][1] < top and top - c[2][1] < window
                        and once[c[2]] == 1), key=lambda c: -c[2][1])[:count]
        old = [c for c in self.captured if top - c[2][1] >= window][:count]
        return ([retarget(i, f) for i, _, _, f in fresh], [retarget(i, f) for i, _, _, f in old])

    def send(self, frames: list[tuple[int, bytes]]) -> int:
        """Send frames toward the instances they name; return how many were sent."""
        sent = 0
        for idx, data in frames:
            if self.socks[idx].send(data) == len(data):
                sent += 1
        return sent

    def close(self) -> None:
        for s in self.socks:
            s.close()


STATE_FAILOVER_STALL = 15.0  # s without an echo that break a TCP connection in CONT-6
STATE_FAILOVER_LOAD_SECONDS = 10.0  # the promotion takes ~3 s: traffic must go on well after it


def _ipsec_pools(lab: Any, sc: Scenario) -> tuple[Any, Any]:
    """The encrypting and the decrypting ipsec pool of ``sc``'s outbound chain (None if absent)."""
    chain = lab.topo.tenant(sc.tenant).chain("outbound")
    enc = next((p for p in chain if p.kind == "ipsec" and p.config.get("encrypt", "outbound") == "outbound"), None)
    dec = next((p for p in chain if p.kind == "ipsec" and p is not enc), None)
    return enc, dec


@check("CONT-4")
def cont_4(ctx: Context) -> Result:
    """No (SPI, sequence number) MUST appear twice on the wire across the failover of an IPsec
    instance; a replayed packet MUST be dropped, also one inside the anti-replay window sent to
    another instance; packets sent after the failover MUST be delivered.

    UDP flows run through the encrypting and the decrypting gateway pools; the busiest
    encrypting instance is killed mid-run. Every ESP packet the fabric hands to the decrypting
    pool is captured; then captured packets are sent again, each to the other decrypting
    instance than the one that got it: the newest numbers below the top of the window (seen
    once), and numbers older than the window. Each replay must be dropped as ``replay`` by the
    instance that got it; datagrams sent after the kill must reach the far site.
    """
    lab = ctx.lab
    ipsec = ctx.pools("ipsec")
    if not ipsec:
        return Result(SKIP, details="the topology has no ipsec pool that traffic can be driven through")
    sc = ipsec[0][0]
    enc, dec = _ipsec_pools(lab, sc)
    if enc is None or dec is None:
        return Result(SKIP, details=f"tenant {sc.tenant} needs an encrypting and a decrypting ipsec pool "
                                    f"in its outbound chain")
    dec_instances = [i for i in lab.pool_instances(sc.tenant, dec.name) if i.in_pool]
    if len(dec_instances) < 2:
        return Result(SKIP, details=f"pool {sc.tenant}/{dec.name} needs two instances to replay across")
    window = int(dec.config.get("replay_window", 64))
    cap = EspCapture(lab, dec_instances)
    problems: list[str] = []
    try:
        load = _kill_busiest(ctx, sc, enc, tcp=False, also_follow=(f"{sc.tenant}-{dec.name}-",))
        cap.stop()
        f = load.figures()
        kill_proof(load, f, pool_label(sc, enc), problems)
        f["esp_packets"] = len(cap.seen)
        f["duplicate_spi_seq"] = len(cap.seen) - len(set(cap.seen))
        fresh, old = cap.replays(window, 10)
        before = [i.counters() for i in dec_instances]
        f["replays_in_window_sent"] = cap.send(fresh)
        f["replays_too_old_sent"] = cap.send(old)
        sent = f["replays_in_window_sent"] + f["replays_too_old_sent"]

        def drops_now() -> dict[str, int]:
            out: dict[str, int] = {}
            for inst, b in zip(dec_instances, before):
                for reason, n in inst.counters().get("drops", {}).items():
                    if n - b.get("drops", {}).get(reason, 0):
                        out[reason] = out.get(reason, 0) + n - b.get("drops", {}).get(reason, 0)
            return out

        deadline = time.monotonic() + 3.0
        while sum(drops_now().values()) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        f["replay_target_drops"] = drops_now()
        f["replays_dropped"] = f["replay_target_drops"].get("replay", 0)
        f["replay_window"] = window
        f["delivered_after_failover"] = load.delivered_after(load.event_at)
    finally:
        cap.close()
    png = plot(ctx, load, "CONT-4-ipsec", f"CONT-4 SIGKILL of IPsec {load.event_result}", f)
    if f["esp_packets"] == 0:
        problems.append("no ESP packet reached the decrypting pool")
    if f["duplicate_spi_seq"]:
        problems.append(f"{f['duplicate_spi_seq']} (SPI, seq) pairs sent twice")
    if f["replays_in_window_sent"] == 0:
        problems.append("no packet inside the window could be replayed")
    if f["replays_dropped"] < sent:
        problems.append(f"{f['replays_dropped']} of {sent} replays dropped as replay "
                        f"({f['replays_in_window_sent']} inside the window); drops by reason "
                        f"{f['replay_target_drops']}")
    if not f["delivered_after_failover"]:
        problems.append("no datagram sent after the failover was delivered")
    return verdict(not problems, f, "; ".join(problems), png)


@check("CONT-5")
def cont_5(ctx: Context) -> Result:
    """Each connection through the load balancer MUST keep its backend when an LB instance is
    killed.

    Echo-verified TCP connections to the virtual IP run; the busiest LB instance is killed;
    no connection may break and every connection must be seen by exactly one backend.
    """
    found = _need(ctx, "lb")
    if not found:
        return Result(SKIP, details="the topology has no lb pool that traffic can be driven through")
    sc, pool = found
    load = _kill_busiest(ctx, sc, pool, udp=False)
    f = load.figures()
    problems: list[str] = []
    kill_proof(load, f, pool_label(sc, pool), problems)
    seen: dict[str, int] = {}
    for sink in load.tcp["sinks"]:
        for peer in set(sink["peers"]):
            seen[peer] = seen.get(peer, 0) + 1
    clients = [r["local"] for r in load.tcp["sender"]["results"] if r.get("local")]
    f["backends"] = len(load.tcp["sinks"])
    f["connections_opened"] = len(clients)
    f["connections_seen_by_backends"] = sum(1 for c in clients if seen.get(c, 0) >= 1)
    f["connections_unseen"] = sum(1 for c in clients if seen.get(c, 0) == 0)
    f["connections_moved"] = sum(1 for c in clients if seen.get(c, 0) > 1)
    png = plot(ctx, load, "CONT-5-lb", f"CONT-5 SIGKILL of LB {load.event_result}", f)
    if not clients:
        problems.append("no connection was opened through the load balancer")
    ok = (f.get("tcp_broken", 0) == 0 and f["connections_moved"] == 0 and f["connections_unseen"] == 0
          and not problems)
    return verdict(ok, f, "; ".join([*problems, f"{f.get('tcp_broken')} connections broken "
                                     f"{f.get('tcp_errors', '')}, {f['connections_moved']} seen by more than "
                                     f"one backend, {f['connections_unseen']} by none"]), png)


@check("CONT-6")
def cont_6(ctx: Context) -> Result:
    """Killing (SIGKILL) a tenant's state-server primary under load MUST break no TCP
    connection, change no NAT mapping and reuse no ESP (SPI, sequence number); the replica the
    Sentinels promote MUST hold every sequence number already on the wire; the outage is
    recorded.

    For the first tenant with a NAT, with IPsec and with a firewall: UDP flows and TCP
    connections run through its chain while its primary is killed; the lab waits for the
    promotion and starts the killed server again as a replica. NFs must fail closed while no
    primary answers (drops counted) and forward again after it. A promotion takes seconds
    (Sentinel's detection and vote), and TCP's retransmission backoff doubles meanwhile, so a
    connection counts as broken here if it resets, returns a wrong byte or stalls for
    15 s (5 s in the instance checks).
    """
    lab = ctx.lab
    if not getattr(lab, "sentinel_ports", None):
        return Result(SKIP, details="the topology's state server has no replica, so there is no primary to "
                                    "fail over (state: {replicas: 1} gives each tenant one)")
    chosen: dict[str, tuple[Scenario, list[str]]] = {}
    for kind in ("nat", "ipsec", "firewall"):
        for sc, pool in ctx.pools(kind)[:1]:
            chosen.setdefault(sc.tenant, (sc, []))[1].append(kind)
    if not chosen:
        return Result(SKIP, details="the topology has no nat, ipsec or firewall pool that traffic can be driven through")
    per_tenant: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    first_png = None
    for tenant, (sc, kinds) in chosen.items():
        enc, dec = _ipsec_pools(lab, sc) if "ipsec" in kinds else (None, None)
        cap = EspCapture(lab, [i for i in lab.pool_instances(tenant, dec.name) if i.in_pool]) if dec else None
        try:
            load = under_load(ctx, sc, lambda: lab.kill_state_primary(tenant), [f"{tenant}-"],
                              duration=STATE_FAILOVER_LOAD_SECONDS, tcp_stall=STATE_FAILOVER_STALL)
        finally:
            if cap is not None:
                cap.stop()
                cap.close()
        f = load.figures()
        f.update(load.event_result)
        label = f"tenant {tenant} ({', '.join(kinds)})"
        if not exercised(f):
            problems.append(f"{label}: traffic could not be driven through its chain")
        f["fail_closed_drops"] = sum(n for k, n in load.nf_drops.items()
                                     if k.endswith(("/state_unavailable", "/state_unreplicated")))
        if f["fail_closed_drops"] == 0:
            problems.append(f"{label}: no NF dropped a packet for want of its state while the primary was "
                            f"down, so nothing shows the NFs depended on it")
        f["delivered_after_promotion"] = load.delivered_after(load.event_at + f["promoted_ms"] / 1000)
        if f.get("udp_flows") and not f["delivered_after_promotion"]:
            problems.append(f"{label}: no datagram sent after the promotion was delivered")
        if f.get("tcp_broken"):
            problems.append(f"{label}: {f['tcp_broken']} TCP connections broken {f.get('tcp_errors', '')}")
        if "nat" in kinds:
            remapped = {k: v["sources"] for k, v in (load.udp or {"flows": {}})["flows"].items()
                        if len(v["sources"]) > 1}
            f["flows_remapped"] = len(remapped)
            if remapped:
                f["remapped"] = dict(itertools.islice(remapped.items(), 5))
                problems.append(f"{label}: {len(remapped)} flows changed external address:port")
        if cap is not None and enc is not None:
            seen = cap.seen
            f["esp_packets"] = len(seen)
            f["duplicate_spi_seq"] = len(seen) - len(set(seen))
            spi = int(enc.config["sa_out"]["spi"])
            top = max((q for s_, q in seen if s_ == spi), default=0)
            stored = lab.redis(server=tenant).get(f"t:{tenant}:{enc.name}:seq:{spi}")
            f["esp_top_seq_on_wire"], f["esp_counter_on_new_primary"] = top, int(stored or 0)
            if not seen:
                problems.append(f"{label}: no ESP packet reached the decrypting pool")
            if f["duplicate_spi_seq"]:
                problems.append(f"{label}: {f['duplicate_spi_seq']} (SPI, seq) pairs sent twice")
            if f["esp_counter_on_new_primary"] < top:
                problems.append(f"{label}: the promoted primary's counter ({f['esp_counter_on_new_primary']}) is "
                                f"below sequence number {top}, already on the wire: it would be used again")
        png = plot(ctx, load, f"CONT-6-{tenant}", f"CONT-6 SIGKILL of {tenant}'s state primary "
                   f"(promoted after {f['promoted_ms']:.0f} ms)", f)
        first_png = first_png or png
        per_tenant[tenant] = f
    f_all: dict[str, Any] = {"tenants": per_tenant,
                             "max_promotion_ms": max(x["promoted_ms"] for x in per_tenant.values()),
                             "max_outage_ms": max(x.get("max_outage_ms", 0.0) for x in per_tenant.values())}
    summary = "; ".join(f"{t}: promoted after {x['promoted_ms']:.0f} ms, UDP outage {x.get('max_outage_ms', 0):.0f} ms, "
                        f"{x.get('tcp_broken', 0)} TCP broken" for t, x in per_tenant.items())
    return verdict(not problems, f_all, "; ".join(problems) or summary, first_png)
