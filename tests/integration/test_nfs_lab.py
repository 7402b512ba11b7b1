"""A lab with real NFs in a chain (topologies/nfs.yaml): firewall, NAT and router, two each."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from conformance.plugin import running_lab
from statelab.traffic import TcpStream, UdpStream

pytestmark = pytest.mark.root
NFS = Path(__file__).resolve().parents[2] / "topologies" / "nfs.yaml"


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    yield from running_lab(NFS)


def test_tcp_through_firewall_nat_and_router_arrives_from_the_public_address(lab) -> None:
    res = TcpStream(lab, "h1", "srv", "10.2.0.1", connections=6, nbytes=100_000, duration=0, port=7002).result()
    assert res["sender"]["ok"] == 6, res["sender"]["failed"]
    peers = res["sinks"][0]["peers"]
    assert len(peers) == 6 and all(p.startswith("203.0.113.7:") for p in peers)


def test_udp_flows_keep_one_public_mapping_each(lab) -> None:
    res = UdpStream(lab, "h1", "srv", "10.2.0.1", flows=32, rate=400, packets=5, port=7001).result()
    flows = res["flows"].values()
    assert sum(f["lost"] for f in flows) == 0
    assert all(len(f["sources"]) == 1 and f["sources"][0].startswith("203.0.113.7:") for f in flows)
    assert len({f["sources"][0] for f in flows}) == 32  # a public port per flow


def test_router_decrements_ttl_and_answers_ttl_1_with_time_exceeded(lab) -> None:
    out = lab.host("h1").cmd("ping -c 1 -W 2 -t 1 10.2.0.1")
    assert "Time to live exceeded" in out and "10.1.0.254" in out, out
    out = lab.host("h1").cmd("ping -c 1 -W 2 10.2.0.1")
    assert "ttl=63" in out, out  # the reply crossed the router once


def test_firewall_lets_nothing_in_that_inside_did_not_open(lab) -> None:
    before = sum(i.counters().get("dropped", 0) for i in lab.iter_instances())
    res = TcpStream(lab, "srv", "h1", "10.1.0.1", connections=2, nbytes=100, duration=0, port=7003,
                    stall=1).result()
    assert res["sender"]["ok"] == 0 and res["sinks"][0]["accepted"] == 0
    after = sum(c.get("dropped", 0) for c in lab.settled_counters().values())
    assert after > before
