"""P3 and P4 in a running lab: the outage a SIGKILL causes, and how soon a new instance works.

The reference topology (``topologies/conformance.yaml``) comes up under the name ``bench`` on
the Open vSwitch fabric. For one pool of each NF kind whose tenant carries UDP end to end,
UDP flows run from the inside host to the outside host at a per-flow rate fine enough to
resolve the goal (``RATE / FLOWS`` datagrams per second per flow: 100/s is a 10 ms step), and:

- P3: the busiest instance is SIGKILLed; per flow, outage = datagrams lost / per-flow rate
  (RFC 6201 §4.2's loss-derived time), the maximum and mean over the flows;
- P4: ``scale_out()`` adds an instance; the time until it received its first frame, from
  its own counters (``first_rx``: the runtime records the moment and writes it at once), and
  until the call returned (ready and in the fabric).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any, Callable

from conformance.load import busiest, pools_in_use
from statelab.lab import Lab
from statelab.spec import load
from statelab.traffic import UdpStream

ROOT = Path(__file__).resolve().parents[1]
FLOWS = 16
RATE = 1600.0      # datagrams/s over all flows: 100 per flow, a 10 ms outage step
SECONDS = 3.0
EVENT_AT = 1.2     # seconds into the load
_ports = itertools.count(7000, 2)


def _under_udp(lab: Any, sc: Any, event: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    u = UdpStream(lab, sc.client, sc.servers[0], sc.dst_ip, flows=FLOWS, rate=RATE, duration=SECONDS,
                  port=next(_ports), first_sport=20000 + next(_ports))
    time.sleep(EVENT_AT)  # the event's place in the load, not a wait for a condition
    got = event()
    return u.result(), got


def _outage(res: dict[str, Any]) -> dict[str, Any]:
    flows = list(res["flows"].values())
    outages = [f["outage_ms"] for f in flows]
    return {"max_outage_ms": max(outages, default=0.0),
            "mean_outage_ms": round(sum(outages) / len(outages), 1) if outages else 0.0,
            "flows_with_loss": sum(1 for f in flows if f["lost"]), "lost": sum(f["lost"] for f in flows),
            "sent": sum(f["sent"] for f in flows), "step_ms": round(1000 * FLOWS / RATE, 1)}


def measure(progress: Callable[[str], None] = print) -> dict[str, Any]:
    """P3 and P4 for one pool of each NF kind with UDP end to end; per kind."""
    topo = dataclasses.replace(load(ROOT / "topologies" / "conformance.yaml"), name="bench")
    out: dict[str, Any] = {}
    with Lab(topo, progress=progress) as lab:
        kinds: set[str] = set()
        for sc, pool in pools_in_use(lab.topo):
            if pool.kind in kinds or not sc.udp:
                continue
            kinds.add(pool.kind)
            progress(f"P3/P4: {sc.tenant}/{pool.name} ({pool.kind})")

            def kill() -> str:
                victim = busiest(lab, sc.tenant, pool.name)
                lab.control.kill(victim.id)
                return victim.id
            res, victim = _under_udp(lab, sc, kill)
            at = {what: t for t, what, iid in lab.control.events if iid == victim}
            p3 = {"killed": victim, **_outage(res),
                  "kill_to_failover_ms": round((at["failover"] - at["kill"]) * 1000, 2)
                  if "failover" in at and "kill" in at else None}
            lab.control.scale_out(sc.tenant, pool.name)  # back to the topology's size

            def scale() -> dict[str, Any]:
                t0 = time.time()
                inst = lab.control.scale_out(sc.tenant, pool.name)[0]
                returned = time.time()
                deadline = returned + SECONDS
                first = None
                while time.time() < deadline and first is None:
                    first = inst.counters().get("first_rx")
                    if first is None:
                        time.sleep(0.005)
                return {"instance": inst.id, "returned_ms": round((returned - t0) * 1000, 1),
                        "first_packet_ms": round((first - t0) * 1000, 1) if first else None}
            res, p4 = _under_udp(lab, sc, scale)
            p4["udp_lost_during"] = _outage(res)["lost"]
            lab.control.scale_in(sc.tenant, pool.name)
            out[pool.kind] = {"pool": f"{sc.tenant}/{pool.name}", "P3": p3, "P4": p4}
    return out
