"""Benchmark: what keeping state in Redis costs an NF, and what batching buys back.

Runs the firewall and the NAT over the same packets three ways, side by side in one run:
in-process state (LocalState, the stateful-NF baseline), Redis with batches of 64 packets
(one pipelined round trip per batch), and Redis one packet at a time; the Redis client's cache
is off here (``cache=False``), so this shows what batching alone buys (``python -m bench``
measures the NF processes as they run, cache on). Prints packets per
second and the ratios; no thresholds (the machine is shared and noisy).

    sudo .venv/bin/python bench/state_backends.py [--flows 200] [--packets 20]

Starts its own redis-server on 127.0.0.1 (a free port) and ends it by PID.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scapy.compat import raw  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from nfs import nsh  # noqa: E402
from nfs.firewall import Firewall  # noqa: E402
from nfs.nat import Nat  # noqa: E402
from nfs.runtime import Drop  # noqa: E402
from nfs.state import RedisState  # noqa: E402

CONFIGS = {
    "firewall": (Firewall, {"rules": [{"action": "allow", "direction": "outbound"}]}),
    "nat": (Nat, {"public": ["203.0.113.1"]}),
}


def frames(flows: int, packets: int) -> list[nsh.NshFrame]:
    """``packets`` UDP datagrams on each of ``flows`` flows, round robin, as the NF gets them."""
    out = []
    header = bytes.fromhex("0fc60103000002ff00000001") + bytes(12)  # MD type 1, spi 2, si 255, C1 1
    for seq in range(packets):
        for f in range(flows):
            inner = raw(Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02") /
                        IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=20000 + f, dport=5001) / bytes(32))
            out.append(nsh.parse(bytes(12) + b"\x89\x4f" + header + inner))
    return out


def run(make: Callable[[], Any], work: list[nsh.NshFrame], batch: int, url: str = "") -> float:
    """Packets per second of one NF instance over ``work`` in batches of ``batch``."""
    nf = make()
    if url:
        nf._state = RedisState(url, nf.tenant, nf.pool, cache=False)
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        verdicts = nf.process(work[i:i + batch])
        assert not any(isinstance(v, Drop) for v in verdicts), verdicts
    return len(work) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=200)
    ap.add_argument("--packets", type=int, default=20)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        work = frames(args.flows, args.packets)
        print(f"{len(work)} packets, {args.flows} flows; packets per second of one instance:")
        print(f"{'nf':9} {'in-process':>11} {'redis x64':>10} {'redis x1':>9} {'redis/local':>12} {'batching':>9}")
        for n, (kind, (cls, config)) in enumerate(CONFIGS.items()):
            conf = {**config, "statelab": {"tenant": "bench", "pool": f"{kind}{n}"}}
            local = run(lambda: cls(conf, "local:", "bench"), work, 64)
            conf_b = {**config, "statelab": {"tenant": "bench", "pool": f"{kind}{n}b"}}
            batched = run(lambda: cls(conf_b, url, "bench"), work, 64, url)
            conf_s = {**config, "statelab": {"tenant": "bench", "pool": f"{kind}{n}s"}}
            single = run(lambda: cls(conf_s, url, "bench"), work, 1, url)
            print(f"{kind:9} {local:11.0f} {batched:10.0f} {single:9.0f} {batched / local:12.2f} "
                  f"{batched / single:8.1f}x")
    finally:
        redis.terminate()
        redis.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
