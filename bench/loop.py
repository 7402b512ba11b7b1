"""P1 and P2: packets per second of one NF process, Redis-backed beside in-process state and
beside the bare echo loop, over the same frames in one run.

Every measurement: start the NF on the veth pair, establish the flows (handshakes, first
packets; not timed), then drive the measured frames with a fixed number outstanding and count
what comes back. The state server's own command counters give the cost per packet in server
commands (``INFO commandstats``, reset before the measured phase).
"""

from __future__ import annotations

from typing import Any, Optional

from bench.frames import Flows
from bench.path import BenchError, Generator, NfPath

TENANT = "bench"
CONFIGS: dict[str, dict[str, Any]] = {
    "forward": {},
    "echo": {},
    "firewall": {"rules": [{"action": "allow", "direction": "outbound"}]},
    "nat": {"public": ["198.51.100.1"]},
    "lb": {"services": [{"vip": "10.0.1.2", "port": 80, "proto": "tcp", "backends": ["10.0.2.1:8080", "10.0.2.2:8080"]},
                        {"vip": "10.0.1.2", "port": 5001, "proto": "udp", "backends": ["10.0.2.1:53", "10.0.2.2:53"]}]},
}


def _config(kind: str, pool: str) -> dict[str, Any]:
    return {**CONFIGS[kind], "statelab": {"tenant": TENANT, "tenant_id": 1, "pool": pool,
                                          "chains": {"outbound": [pool], "inbound": [pool]}}}


def _phases(kind: str, proto: str, flows: Flows, rounds: int) -> tuple[list[list[bytes]], list[bytes]]:
    """(setup phases, measured frames) of ``kind`` on ``proto``."""
    replies = kind not in ("nat", "lb")  # their replies come from another address: one direction here
    if proto == "new-udp":  # every frame a new flow: the connection-setup rate
        return [], Flows(min(flows.n * rounds, 45000)).udp_out()
    if proto == "udp":
        setup = [flows.udp_out()] + ([flows.udp_in()] if replies else [])
        return setup, flows.udp_out() * rounds
    setup = flows.tcp_handshake(replies)
    return setup, flows.tcp_data(rounds, replies)


def measure(path: NfPath, gen: Generator, kind: str, proto: str, state: str, flows: int = 1000,
            rounds: int = 40, window: int = 256, batch: int = 64) -> dict[str, Any]:
    """One NF (``state`` "redis", "redis-replica": Redis with a replica acknowledging every
    batch that writes, "local" or "none") over ``flows`` established flows."""
    pool = f"{kind}-{proto}-{state}"
    url: Optional[str] = None
    if state in ("redis", "redis-replica"):
        url = path.start_redis(TENANT)  # loads the NF scripts once; FLUSHALL keeps them
        if state == "redis-replica":
            path.start_replica()
            url += "?wait=1"
        path.flush()
    elif state == "local":
        url = "local:"
    nf = path.start_nf(kind, _config(kind, pool), url, batch=batch)
    try:
        f = Flows(flows)
        setup, work = _phases(kind, proto, f, rounds)
        for phase in setup:
            got = gen.drive(phase, window)
            if got["lost"]:
                raise BenchError(f"{kind} ({state} state) dropped {got['lost']} of {len(phase)} setup frames: "
                                 f"{nf.read_counters().get('drops')}; log {nf.log}")
        if state.startswith("redis"):
            path.admin().config_resetstat()
        got = gen.drive(work, window)
        out = {k: got[k] for k in ("sent", "received", "lost", "seconds", "pps", "generator_cpu")}
        if state.startswith("redis"):
            cmds = path.commands()
            cmds.pop("config|resetstat", None)
            cmds.pop("info", None)
            out["server_commands"] = cmds
            out["commands_per_packet"] = round(sum(cmds.values()) / max(1, got["received"]), 4)
        nf.stop()
        counters = nf.read_counters()
        if counters.get("batches"):
            out["mean_batch"] = round(counters["rx"] / counters["batches"], 1)
        if got["lost"]:
            out["drops"] = counters.get("drops")
        return out
    finally:
        nf.stop()
