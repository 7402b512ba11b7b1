"""Soak: many faults in a row under steady load, every flow checked end to end.

``sudo .venv/bin/python -m bench.soak [--events 1000] [--seed 1] [--json FILE]``

The reference topology comes up (as lab ``soak``). UDP flows and echo-verified TCP connections
run through every tenant's chain, in rounds of ``--round`` seconds, while events follow one
another as fast as the lab performs them, each on a pool picked at random: scale-out,
scale-in (drain), or SIGKILL of a random in-pool instance (never the last one); when the
topology's state servers have replicas, also SIGKILL of the tenant's state primary (one event in
20: the lab waits for the promotion and starts the killed server again as a replica). Every round's
traffic is checked, and the run as a whole:

- TCP connections broken (the sender's echo check: a reset, a wrong byte, or a stall: 5 s
  without an echo, 15 s when state primaries are killed, as in CONT-6): must be 0;
- UDP datagrams duplicated: must be 0; lost: counted (a SIGKILL costs the datagrams the dead
  instance held, see CONT-1), not a failure;
- NAT mappings changed: a UDP flow whose datagrams reached the far host from more than one
  source address and port: must be 0;
- ESP (SPI, sequence number) pairs the fabric carried twice, on every link of every IPsec
  pool (including instances that joined later): must be 0;
- after teardown, what the lab recorded it created and still exists: must be nothing.

Prints the counts (and writes them to ``--json``); exits 1 if a must-be-0 count is not.
``tests/test_soak.py`` runs a short version (50 events) in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from conformance.continuity.checks import STATE_FAILOVER_STALL, EspCapture
from conformance.load import pools_in_use
from statelab.lab import Lab
from statelab.spec import load
from statelab.traffic import TcpStream, UdpStream

ROOT = Path(__file__).resolve().parents[1]
MAX_MEMBERS = 4
STATE_KILL_SHARE = 0.05  # of events, with replicas: SIGKILL of a state primary
UDP_FLOWS, UDP_RATE, TCP_CONNECTIONS = 16, 200.0, 4
MUST_BE_ZERO = ("tcp_broken", "udp_duplicates", "nat_remapped", "esp_duplicates", "leftovers")
_ports = itertools.count(9000, 2)


def _streams(lab: Any, scenarios: list[Any], seconds: float) -> list[tuple[str, Any, Any]]:
    out = []
    for sc in scenarios:
        port = next(_ports)
        udp = (UdpStream(lab, sc.client, sc.servers[0], sc.dst_ip, flows=UDP_FLOWS, rate=UDP_RATE,
                         duration=seconds, port=port, first_sport=20000 + port) if sc.udp else None)
        # a state primary's failover stalls a TCP connection for seconds (its writes fail
        # closed until a replica acknowledges again, ~3-4 s, and the sender backs off): as CONT-6
        stall = STATE_FAILOVER_STALL if lab.sentinel_ports else 5.0
        tcp = TcpStream(lab, sc.client, sc.servers[0], sc.dst_ip, connections=TCP_CONNECTIONS, duration=seconds,
                        port=sc.tcp_port or port + 1, sinks=sc.servers, sink_port=sc.server_port, stall=stall)
        out.append((sc.tenant, udp, tcp))
    return out


def _event(lab: Any, rng: random.Random, pairs: list[tuple[Any, Any]], tap: EspCapture) -> str:
    sc, pool = rng.choice(pairs)
    live = [i for i in lab.pool_instances(sc.tenant, pool.name) if i.in_pool]
    choices = ["scale-out"] if len(live) < MAX_MEMBERS else []
    if len(live) > 1:
        choices += ["scale-in", "kill"]
    if lab.sentinel_ports and rng.random() < STATE_KILL_SHARE:
        choices = ["state-kill"]
    what = rng.choice(choices)
    if what == "state-kill":
        lab.kill_state_primary(sc.tenant)
        return f"{what} {sc.tenant}"
    if what == "scale-out":
        (new,) = lab.control.scale_out(sc.tenant, pool.name)
        if pool.kind == "ipsec":
            tap.add(new)
    elif what == "scale-in":
        lab.control.scale_in(sc.tenant, pool.name)
    else:
        lab.control.kill(rng.choice(live).id)
    return f"{what} {sc.tenant}/{pool.name}"


def soak(events: int = 1000, seed: int = 1, round_seconds: float = 10.0,
         progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak; return its counts (see the module docstring)."""
    rng = random.Random(seed)
    topo = dataclasses.replace(load(ROOT / "topologies" / "conformance.yaml"), name="soak")
    counts: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    problems: list[str] = []
    log: list[tuple[float, str]] = []  # (time, event): to set against the duplicates' times
    started = time.monotonic()
    with Lab(topo, progress=progress) as lab:
        pairs = pools_in_use(lab.topo)
        scenarios = list({sc.tenant: sc for sc, _ in pairs}.values())
        esp = [i for sc, p in pairs if p.kind == "ipsec" for i in lab.pool_instances(sc.tenant, p.name) if i.in_pool]
        tap = EspCapture(lab, esp)
        try:
            done = rounds = 0
            while done < events:
                streams = _streams(lab, scenarios, round_seconds)
                end = time.monotonic() + round_seconds - 1.5  # the last events still see traffic after them
                while done < events and time.monotonic() < end:
                    what = _event(lab, rng, pairs, tap)
                    log.append((round(time.time(), 4), what))
                    counts[what.split()[0]] += 1
                    done += 1
                for tenant, udp, tcp in streams:
                    if udp is not None:
                        res = udp.result()
                        for fid, f in res["flows"].items():
                            totals["udp_sent"] += f["sent"]
                            totals["udp_lost"] += f["lost"]
                            totals["udp_duplicates"] += f["duplicates"]
                            if len(f.get("sources", [])) > 1:
                                totals["nat_remapped"] += 1
                                problems.append(f"round {rounds}: {tenant} UDP flow {fid} arrived from "
                                                f"{f['sources']}")
                    s = tcp.result()["sender"]
                    totals["tcp_connections"] += s["connections"]
                    broken = s["connections"] - s["ok"]
                    totals["tcp_broken"] += broken
                    if broken:
                        problems.append(f"round {rounds}: {tenant}: {broken} TCP connections broken "
                                        f"{sorted({r.get('error') for r in s['failed'] if r.get('error')})}")
                rounds += 1
                progress(f"soak: {done}/{events} events, {rounds} rounds, {dict(totals)}")
        finally:
            tap.stop()
            tap.close()
        seen = [key for _, _, key, _ in tap.captured]
        totals["esp_packets"] = len(seen)
        totals["esp_duplicates"] = len(seen) - len(set(seen))
        where: dict[Any, list[tuple[str, float]]] = {}
        for idx, at, key, _ in tap.captured:
            where.setdefault(key, []).append((tap.instances[idx].id, round(at, 4)))
        duplicates = [{"spi": k[0], "seq": k[1], "seen": v,
                       "events_before": [e for e in log if v[0][1] - 3 <= e[0] <= v[-1][1]]}
                      for k, v in where.items() if len(v) > 1][:20]
        totals["state_keys_at_end"] = sum(lab.redis(server=t.name).dbsize() for t in lab.topo.tenants)
        record = lab.record
    left = record.leftovers()
    totals["leftovers"] = len(left)
    problems += [f"left behind: {x}" for x in left]
    if totals["esp_duplicates"]:
        problems.append(f"{totals['esp_duplicates']} ESP (SPI, seq) pairs carried twice")
    return {"events": sum(counts.values()), "by_event": dict(counts), "rounds": rounds, "seed": seed,
            "esp_duplicate_pairs": duplicates, "event_log_tail": log[-40:],
            "seconds": round(time.monotonic() - started, 1),
            **{k: totals[k] for k in ("tcp_connections", "udp_sent", "udp_lost", *MUST_BE_ZERO)}, **totals,
            "passed": not any(totals[k] for k in MUST_BE_ZERO), "problems": problems[:50]}


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description="statelab's soak (needs root)")
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--round", type=float, default=10.0, help="seconds of traffic per round")
    ap.add_argument("--json", type=Path, default=ROOT / "reports" / "soak.json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.soak: needs root (a lab): sudo .venv/bin/python -m bench.soak", file=sys.stderr)
        return 2
    res = soak(args.events, args.seed, args.round, progress=lambda line: print(f"== {line}", flush=True))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    for k in ("events", "by_event", "rounds", "seconds", "tcp_connections", "tcp_broken", "udp_sent", "udp_lost",
              "udp_duplicates", "nat_remapped", "esp_packets", "esp_duplicates", "state_keys_at_end", "leftovers"):
        print(f"{k:18} {res.get(k, 0)}")
    for p in res["problems"]:
        print(f"problem: {p}")
    print("PASS" if res["passed"] else "FAIL", f"(figures: {args.json})")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
