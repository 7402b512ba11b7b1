"""Zero-downtime scaling: SCALE-1, SCALE-2."""

from __future__ import annotations

import time
from typing import Any, Callable

from conformance.core import Result, check, verdict
from conformance.load import (Context, FabricTap, collect, first_packet_ms, flows_moved, nothing_to_exercise,
                              pool_label, pool_outcome, ip_flow, under_load)

MIN_FLOWS_FOR_SHARE = 24  # distinct flows a pool must carry before a new member must get some: (2/3)^24 < 1e-4
MOVE_SETTLE = 0.3  # s after a new member joined before flows are compared with where they went before


def tapped_load(ctx: Context, sc: Any, pool: Any, event: Callable[[FabricTap], Any]) -> tuple[Any, FabricTap]:
    """Load through ``sc`` with ``event(tap)`` in the middle, while a tap on the pool's members
    records which flow went where (``event`` may add members to the tap)."""
    members = [i for i in ctx.lab.pool_instances(sc.tenant, pool.name) if i.in_pool]
    tap = FabricTap(ctx.lab, members, ip_flow)
    try:
        load = under_load(ctx, sc, lambda: event(tap), [f"{sc.tenant}-{pool.name}-"])
    finally:
        tap.stop()
        tap.close()
    return load, tap


def share_checked(f: dict[str, Any], tap: FabricTap, figure: str) -> bool:
    """Record the flows the pool carried; whether there were enough that one member (new or
    drained) must have had some: with fewer (one ESP flow per SA) it may hold none, noted in
    ``figure``."""
    f["pool_flows"] = len({key for _, _, key, _ in tap.captured})
    if f["pool_flows"] < MIN_FLOWS_FOR_SHARE:
        f[figure] = (f"not checked: the pool carried {f['pool_flows']} flow(s), and one member holds "
                     f"only its share of them")
        return False
    return True


@check("SCALE-1")
def scale_1(ctx: Context) -> Result:
    """Scaling out any NF pool under load MUST lose, duplicate or break nothing, and the new
    instance MUST carry flows afterwards.

    For each pool of each tenant's chains: UDP flows and echo-verified TCP connections run
    through the chain; an instance is added mid-run. Per flow 0 lost and 0 duplicated, no TCP
    connection reset or stalled, the new instance received packets (where its pool carried
    at least MIN_FLOWS_FOR_SHARE flows: it takes only its share), and no flow moved
    between the old members (seen on the fabric's member ports: flows moved, beside the ideal
    1/(n+1), recorded). Reaction time: from the scale-out call until the first counter sample
    (every 0.2 s) that shows the new instance received a packet; it must exist (the instance
    got traffic) and is recorded.
    """
    lab = ctx.lab
    per_pool: dict[str, dict[str, Any]] = {}
    problems = []
    first_png = None
    pairs = ctx.pools()
    if not pairs:
        return nothing_to_exercise(ctx)
    for sc, pool in pairs:
        t0 = time.time()
        old = [i for i in lab.pool_instances(sc.tenant, pool.name) if i.in_pool]
        joined: list[float] = []

        def grow(tap: FabricTap) -> Any:
            inst = lab.control.scale_out(sc.tenant, pool.name)[0]
            tap.add(inst)
            joined.append(time.time())
            return inst

        load, tap = tapped_load(ctx, sc, pool, grow)
        new = load.event_result
        f = load.figures()
        f.update(flows_moved(tap, load.event_at, joined[0] + MOVE_SETTLE if joined else float("inf"), len(old)))
        f["flows_moved_ideal"] = round(1 / (len(old) + 1), 3)
        if f["flows_moved_between_old"]:
            problems.append(f"{pool_label(sc, pool)}: {f['flows_moved_between_old']} flows moved between the "
                            f"old members on a scale-out (only the new member's share may move)")
        f["scale_out_ms"] = round((lab.control.events[-1][0] - load.event_at) * 1000, 1) if lab.control.events else None
        f["new_instance"] = new.id
        f["new_instance_packets"] = load.timeline.carried(new.id, load.event_at)
        first_rx = new.counters().get("first_rx")  # the NF's own record of its first frame
        f["reaction_ms"] = (round((first_rx - load.event_at) * 1000, 1) if first_rx is not None
                            else first_packet_ms(load.timeline, new.id, load.event_at))
        png = pool_outcome(ctx, "SCALE-1", "scale-out", sc, pool, load, f, per_pool, problems)
        first_png = first_png or png
        if share_checked(f, tap, "new_instance_share") and (not f["new_instance_packets"]
                                                           or f["reaction_ms"] is None):
            problems.append(f"{pool_label(sc, pool)}: the new instance {new.id} carried no packet of the "
                            f"{f['pool_flows']} flows its pool carried")
        lab.control.scale_in(sc.tenant, pool.name)  # back to the topology's size
        f["seconds"] = round(time.time() - t0, 1)
    figures = collect(per_pool, ("udp_lost", "udp_duplicates", "tcp_broken", "pool_packets"))
    figures["pools_exercised"] = len(per_pool)
    compared = sum(p.get("flows_compared", 0) for p in per_pool.values())
    figures["flows_moved_fraction"] = (round(sum(p.get("flows_moved", 0) for p in per_pool.values()) / compared, 3)
                                       if compared else None)
    figures["flows_moved_ideal"] = round(sum(p["flows_moved_ideal"] * p.get("flows_compared", 0)
                                             for p in per_pool.values()) / compared, 3) if compared else None
    figures["reaction_ms_max"] = max((p["reaction_ms"] or 0.0 for p in per_pool.values()), default=None)
    figures["reaction_ms_definition"] = ("scale_out() call until the new instance received its first frame "
                                         "(the time its runtime records, first_rx)")
    return verdict(not problems, figures, "; ".join(problems), first_png)


@check("SCALE-2")
def scale_2(ctx: Context) -> Result:
    """Scaling in (draining) any NF pool under load MUST lose, duplicate or break nothing.

    For each pool: an instance is added first; then, under load, it is taken out of the pool,
    drained and stopped (SIGTERM, exit 0). Per flow 0 lost and 0 duplicated, no TCP connection
    reset or stalled. Drain time: from taking the instance out of the pool until its process
    exited, recorded.
    """
    lab = ctx.lab
    per_pool: dict[str, dict[str, Any]] = {}
    problems = []
    first_png = None
    pairs = ctx.pools()
    if not pairs:
        return nothing_to_exercise(ctx)
    for sc, pool in pairs:
        lab.control.scale_out(sc.tenant, pool.name)
        load, tap = tapped_load(ctx, sc, pool, lambda _tap: lab.control.scale_in(sc.tenant, pool.name)[0])
        f = load.figures()
        f["removed_instance"] = load.event_result
        removed = load.event_result
        times = {what: at for at, what, iid in load.timeline.events if iid == removed}
        f["drain_ms"] = (round((times["stopped"] - times["scale-in"]) * 1000, 1)
                         if "stopped" in times and "scale-in" in times else None)
        f["removed_instance_rate_before"] = load.rate_before(removed)
        if share_checked(f, tap, "drained_instance_share") and f["removed_instance_rate_before"] <= 0:
            problems.append(f"{pool_label(sc, pool)}: the drained instance {removed} carried no traffic "
                            f"before it was taken out, so the drain proved nothing")
        png = pool_outcome(ctx, "SCALE-2", "scale-in (drain)", sc, pool, load, f, per_pool, problems)
        first_png = first_png or png
    figures = collect(per_pool, ("udp_lost", "udp_duplicates", "tcp_broken", "pool_packets"))
    figures["pools_exercised"] = len(per_pool)
    figures["drain_ms_max"] = max((p["drain_ms"] or 0.0 for p in per_pool.values()), default=None)
    return verdict(not problems, figures, "; ".join(problems), first_png)


