"""Helpers shared by the integration tests (root, real OVS, Redis and Mininet)."""

from __future__ import annotations

import json
from typing import Any


def nf_rx(lab: Any) -> dict[str, int]:
    """Packets each NF instance has received so far (its runtime's counter)."""
    return {iid: c.get("rx", 0) for iid, c in lab.settled_counters().items()}


def quiet(lab: Any, *hosts: str) -> None:
    """Flush the hosts' neighbour tables, so they send no ARP probes of their own while watched."""
    for h in hosts:
        lab.host(h).cmd("ip neigh flush dev eth0")


def host_rx(lab: Any, host: str) -> int:
    """Packets a tenant host's data interface has received (kernel counter)."""
    out = lab.host(host).cmd("ip -s -j link show eth0")
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def delivered(result: dict[str, Any]) -> int:
    return result["received"]["total"]


def sent(result: dict[str, Any]) -> int:
    return sum(result["sent"]["sent"].values())
