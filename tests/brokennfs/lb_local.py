"""A load balancer with its connection table in its own memory, as a classic stateful LB keeps it
(Linux IPVS without ``sloppy_tcp``, for one): only a SYN opens a connection, and a mid-stream
segment of a connection this instance never saw opened is dropped as ``unknown_connection``.

Our LB's backend choice is a deterministic hash, so an instance that takes over a connection
would pick the same backend; the table is what a failover loses, and this twin loses it every
time, so a check that kills an LB instance must see each connection it carried break.

``python -m tests.brokennfs.lb_local --iface ... --state URL ...`` (``--state`` is ignored).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional

import nfs.lb
from nfs.nsh import Malformed
from nfs.packet import PROTO_TCP, parse
from nfs.runtime import Drop, main

SYN, ACK = 0x02, 0x10


class LocalTableLoadBalancer(nfs.lb.LoadBalancer):
    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str) -> None:
        super().__init__(config, state_url, instance)
        self.opened: set[tuple[str, int, str, int]] = set()  # (client, port, vip, port) seen with SYN

    def _classify(self, i: int, frame: bytes, reads: Any, pending: list[Any]) -> Any:
        try:
            pkt = parse(frame)
        except Malformed:
            return super()._classify(i, frame, reads, pending)
        if pkt.ip is not None and pkt.proto == PROTO_TCP and not pkt.is_fragment and pkt.dst in self.vips:
            conn = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
            if pkt.tcp_flags & (SYN | ACK) == SYN:
                self.opened.add(conn)
            elif conn not in self.opened:
                return Drop("unknown_connection")
        return super()._classify(i, frame, reads, pending)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--state" in args:
        args[args.index("--state") + 1] = "local:"
    sys.exit(main(LocalTableLoadBalancer, args))
