"""statelab's benchmark: ``sudo make bench`` (= ``.venv/bin/python -m bench``).

Prints a table and writes every figure to JSON (``--json``, default ``reports/bench.json``):

- P1: packets/s of each stateful NF with its state in Redis ÷ the same NF with in-process
  state (``LocalState``), TCP and UDP, over established flows (bench/loop.py);
- P2: the Redis-backed firewall ÷ the bare Python echo loop (bench/echo.py), and ``forward``
  (the runtime alone) ÷ the echo loop;
- the connection-setup rate (``new-udp``: every frame a new flow) the same two ways;
- the cost per packet in state-server commands, counted by the server (``INFO commandstats``);
- each NF's state operations on one Redis, with a replica, on a 3-node cluster: ops/s and
  p99 per batch, as ratios to one Redis (bench/state_ops.py);
- P3: the UDP outage per flow when an instance is SIGKILLed, P4: ``scale_out()`` until the new
  instance's first frame, in a lab of the reference topology (bench/failover.py);
- P5: the wall time of ``pytest conformance/`` on the reference topology (``--no-suite``: left out).

Ratios are of two things run side by side in one run, alternating, ``--repeat`` times each
(the median of each side is taken): the machine is shared and noisy, so there are no
thresholds here, only figures. Needs root (namespaces, veth pairs, the lab).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import failover, loop, state_ops
from bench.path import Generator, NfPath

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"P1": 0.9, "P2": 0.7, "forward": 0.95, "P3_ms": 10, "P4_ms": 100, "P5_s": 180}


def _pair(path: NfPath, gen: Generator, a: tuple[str, str, str], b: tuple[str, str, str], repeat: int,
          rounds: int) -> dict[str, Any]:
    """Run ``a`` and ``b`` alternately ``repeat`` times; their median rates and the ratio b/a."""
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for _ in range(repeat):
        for side, (kind, proto, state) in (("a", a), ("b", b)):
            runs[side].append(loop.measure(path, gen, kind, proto, state, rounds=rounds))
    med = {side: statistics.median(r["pps"] for r in rs) for side, rs in runs.items()}
    out = {"a": "/".join(a), "b": "/".join(b), "a_pps": med["a"], "b_pps": med["b"],
           "ratio": round(med["b"] / med["a"], 3) if med["a"] else None,
           "lost": sum(r["lost"] for rs in runs.values() for r in rs), "runs": runs}
    cmds = [r["commands_per_packet"] for r in runs["b"] if "commands_per_packet" in r]
    if cmds:
        out["server_commands_per_packet"] = statistics.median(cmds)
        out["server_commands"] = runs["b"][-1]["server_commands"]
    return out


def packet_loop(repeat: int, rounds: int, progress: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"P1": {}, "P2": {}}
    with NfPath("m") as path:
        gen = Generator(path.gen_if)
        try:
            for kind in ("firewall", "nat", "lb"):
                for proto in ("tcp", "udp", "new-udp"):
                    progress(f"P1: {kind} {proto}, redis ÷ in-process")
                    out["P1"][f"{kind}/{proto}"] = _pair(path, gen, (kind, proto, "local"),
                                                         (kind, proto, "redis"), repeat, rounds)
            out["state_server"] = {}
            for kind in ("firewall", "nat", "lb"):
                for proto in ("tcp", "udp"):
                    progress(f"state server: {kind} {proto}, Redis with a replica (WAIT 1) ÷ one Redis")
                    out["state_server"][f"{kind}/{proto}"] = _pair(path, gen, (kind, proto, "redis"),
                                                                   (kind, proto, "redis-replica"), repeat, rounds)
            for kind, state in (("firewall", "redis"), ("forward", "none")):
                for proto in ("tcp", "udp"):
                    progress(f"P2: {kind} {proto} ÷ echo loop")
                    out["P2"][f"{kind}/{proto}"] = _pair(path, gen, ("echo", proto, "none"),
                                                         (kind, proto, state), repeat, rounds)
        finally:
            gen.close()
    return out


def suite_seconds(progress: Any) -> dict[str, Any]:
    progress("P5: pytest conformance/ on the reference topology (ovs)")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "conformance", "--target", "ovs",
                          "--topology", "topologies/conformance.yaml", "--report",
                          str(ROOT / "reports" / "bench-suite")], cwd=ROOT, capture_output=True, text=True)
    return {"seconds": round(time.monotonic() - t0, 1), "exit_code": res.returncode,
            "summary": (res.stdout.strip().splitlines() or [""])[-1]}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2],
            "load_before": os.getloadavg()}


def table(res: dict[str, Any]) -> str:
    rows = [("figure", "measured", "goal")]
    for name, r in res.get("P1", {}).items():
        rows.append((f"P1 {name}: redis ÷ in-process ({r['b_pps']:.0f} / {r['a_pps']:.0f} pps)",
                     f"{r['ratio']:.2f}", f"≥ {GOALS['P1']}"))
    for name, r in res.get("P2", {}).items():
        goal = GOALS["forward"] if name.startswith("forward") else GOALS["P2"]
        rows.append((f"P2 {name} ÷ echo loop ({r['b_pps']:.0f} / {r['a_pps']:.0f} pps)", f"{r['ratio']:.2f}",
                     f"≥ {goal}"))
    for name, r in res.get("state_server", {}).items():
        rows.append((f"state server {name}: with a replica (WAIT 1) ÷ one Redis ({r['b_pps']:.0f} / "
                     f"{r['a_pps']:.0f} pps)", f"{r['ratio']:.2f}", ""))
    rows += state_ops.rows(res.get("state_ops", {}))
    for name, r in res.get("P1", {}).items():
        if "server_commands_per_packet" in r:
            rows.append((f"state-server commands per packet, {name}", f"{r['server_commands_per_packet']:.3f}", ""))
    for kind, r in res.get("failover", {}).items():
        p3, p4 = r["P3"], r["P4"]
        rows.append((f"P3 {kind}: max UDP outage per flow on SIGKILL (mean {p3['mean_outage_ms']} ms, "
                     f"step {p3['step_ms']} ms)", f"{p3['max_outage_ms']} ms", f"≤ {GOALS['P3_ms']} ms"))
        rows.append((f"P4 {kind}: scale_out() to first frame (returned after {p4['returned_ms']} ms)",
                     f"{p4['first_packet_ms']} ms", f"≤ {GOALS['P4_ms']} ms"))
    if "P5" in res:
        rows.append(("P5 pytest conformance/ (ovs, reference topology)", f"{res['P5']['seconds']} s",
                     f"≤ {GOALS['P5_s']} s"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows)


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description="statelab's benchmark (needs root)")
    ap.add_argument("--json", type=Path, default=ROOT / "reports" / "bench.json", help="where the figures go")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side of a ratio (alternating)")
    ap.add_argument("--rounds", type=int, default=40, help="measured packets per flow (1000 flows)")
    ap.add_argument("--state-seconds", type=float, default=2.0,
                    help="seconds per run of each NF's state operations on each state server")
    ap.add_argument("--no-lab", action="store_true", help="leave out P3/P4 (the lab)")
    ap.add_argument("--no-suite", action="store_true", help="leave out P5 (the conformance suite's run time)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench: needs root (network namespaces, veth pairs, a lab): sudo make bench",
              file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(f"== {line}", flush=True)

    res: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "goals": GOALS, "command": "sudo make bench"}
    res.update(packet_loop(args.repeat, args.rounds, progress))
    res["state_ops"] = state_ops.measure(seconds=args.state_seconds, repeat=args.repeat, progress=progress)
    if not args.no_lab:
        res["failover"] = failover.measure(progress)
    if not args.no_suite:
        res["P5"] = suite_seconds(progress)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
