"""The default lab on Open vSwitch: reachability through the chain, isolation, pools, ACLs."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import redis

from statelab.traffic import host_rx, quiet, run_tcp, run_udp
from tests.integration.conftest import delivered, nf_rx, sent

pytestmark = pytest.mark.root


def pool_ids(lab, tenant: str, pool: str) -> list[str]:
    return [i.id for i in lab.pool_instances(tenant, pool) if i.in_pool]


def test_ping_within_tenant_passes_every_pool_of_the_chain(lab) -> None:
    before = nf_rx(lab)
    out = lab.host("r1").cmd("ping -c 3 -i 0.2 -W 2 10.0.0.2")
    assert " 0% packet loss" in out, out
    after = nf_rx(lab)
    for pool in ("fw", "mon"):
        # 3 requests (outbound: fw, mon) and 3 replies (inbound: mon, fw) each pass the pool once
        seen = sum(after[i] - before[i] for i in pool_ids(lab, "red", pool))
        assert seen >= 6, (pool, before, after)
    assert all(after[i] == before[i] for i in after if i.startswith("blue-"))


def test_udp_flows_reach_through_every_instance(lab) -> None:
    before = nf_rx(lab)
    res = run_udp(lab, "r1", "r2", "10.0.0.2", flows=64, packets=5)
    assert delivered(res) == sent(res) == 320
    assert all(f["duplicates"] == 0 for f in res["received"]["flows"].values())
    after = nf_rx(lab)
    for iid in pool_ids(lab, "red", "fw") + pool_ids(lab, "red", "mon"):
        assert after[iid] > before[iid], f"{iid} carried none of 64 flows: {after}"
    assert all(after[i] == before[i] for i in after if i.startswith("blue-"))


def test_inbound_direction_reaches_inside_host(lab) -> None:
    res = run_udp(lab, "b2", "b1", "10.0.0.1", flows=16, packets=5)
    assert delivered(res) == sent(res) == 80


def test_tcp_streams_arrive_intact(lab) -> None:
    res = run_tcp(lab, "r1", "r2", "10.0.0.2", connections=8, nbytes=200_000)
    assert res["ok"] == 8, res["failed"]


def test_nothing_crosses_between_tenants_with_identical_addresses(lab) -> None:
    quiet(lab, ["r1", "r2"])
    red_before = {h: host_rx(lab, h) for h in ("r1", "r2")}
    blue_before = host_rx(lab, "b2")
    b1 = lab.host("b1")
    # ICMP: delivered to blue's 10.0.0.2 (b2) only
    assert " 0% packet loss" in b1.cmd("ping -c 2 -i 0.2 -W 2 10.0.0.2")
    # ARP and broadcast: an unknown neighbour and the subnet broadcast
    b1.cmd("ping -c 2 -i 0.2 -W 1 10.0.0.99; ping -b -c 2 -i 0.2 -W 1 10.0.0.255")
    # UDP to 10.0.0.2 with a sink listening only in red's r2: it must get nothing
    res = run_udp(lab, "b1", "r2", "10.0.0.2", flows=8, packets=5, port=5101)
    assert delivered(res) == 0, res["received"]
    # TCP: the only listener on 10.0.0.2:5102 is red's r2; blue's b2 refuses the connection
    tcp = run_tcp(lab, "b1", "r2", "10.0.0.2", connections=2, nbytes=1000, port=5102, timeout=2)
    assert tcp["ok"] == 0
    assert all("refused" in f["error"] for f in tcp["failed"]), tcp["failed"]
    assert {h: host_rx(lab, h) for h in ("r1", "r2")} == red_before
    assert host_rx(lab, "b2") > blue_before


def test_state_server_keeps_each_tenant_to_its_own_keys(lab) -> None:
    red, blue = lab.redis("red"), lab.redis("blue")
    red.set("t:red:fw:probe", "1")
    blue.set("t:blue:fw:probe", "2")
    assert red.get("t:red:fw:probe") == b"1"
    with pytest.raises(redis.exceptions.NoPermissionError):
        red.get("t:blue:fw:probe")
    with pytest.raises(redis.exceptions.NoPermissionError):
        red.set("t:blue:fw:probe", "stolen")
    with pytest.raises(redis.exceptions.NoPermissionError):
        red.keys("*")
    assert lab.redis().get("t:blue:fw:probe") == b"2"


def test_scale_out_new_instance_takes_a_share_of_new_flows(lab) -> None:
    old = pool_ids(lab, "red", "fw")
    (new,) = lab.control.scale_out("red", "fw")
    try:
        before = nf_rx(lab)
        res = run_udp(lab, "r1", "r2", "10.0.0.2", flows=96, packets=4, first_sport=30000)
        assert delivered(res) == sent(res)
        after = nf_rx(lab)
        assert after[new.id] > 0, "the new instance received no flow"
        assert all(after[i] > before[i] for i in old), "an old instance lost all its flows"
        assert after[new.id] < sent(res) * 2, "the new instance took more than the pool's traffic"
    finally:
        assert lab.control.scale_in("red", "fw") == [new.id]
    assert pool_ids(lab, "red", "fw") == old


def test_scale_out_takes_the_warm_standby_and_starts_the_next(lab) -> None:
    from statelab.cli import pools_table
    (spare,) = [i for i in lab.pool_instances("red", "fw") if i.standby]
    assert spare.alive() and not spare.in_pool and spare.counters().get("rx") == 0  # ready, sent nothing
    assert f"{spare.id:18} standby" in pools_table(lab)
    (new,) = lab.control.scale_out("red", "fw")
    try:
        assert new is spare and new.in_pool and not new.standby
        (after,) = [i for i in lab.pool_instances("red", "fw") if i.standby]
        assert after is not new and after.alive()
        res = run_udp(lab, "r1", "r2", "10.0.0.2", flows=96, packets=4, first_sport=34000)
        assert delivered(res) == sent(res)
        assert new.counters().get("first_rx") and after.counters().get("rx") == 0
    finally:
        assert lab.control.scale_in("red", "fw") == [new.id]


def test_scale_in_drains_and_keeps_delivering(lab) -> None:
    (new,) = lab.control.scale_out("blue", "mon")
    assert lab.control.scale_in("blue", "mon") == [new.id]
    assert new.proc.returncode == 0
    res = run_udp(lab, "b1", "b2", "10.0.0.2", flows=32, packets=4, first_sport=31000)
    assert delivered(res) == sent(res)


def test_after_kill_the_survivors_carry_all_flows(lab) -> None:
    victim, *survivors = pool_ids(lab, "red", "mon")
    lab.control.kill(victim)
    assert victim not in lab.instances
    before = nf_rx(lab)
    res = run_udp(lab, "r1", "r2", "10.0.0.2", flows=64, packets=4, first_sport=32000)
    assert delivered(res) == sent(res)
    after = nf_rx(lab)
    assert sum(after[i] - before[i] for i in survivors) >= sent(res)
    lab.control.scale_out("red", "mon")


def test_an_instance_that_dies_on_its_own_is_failed_over(lab) -> None:
    victim = lab.pool_instances("blue", "fw")[0]
    os.kill(victim.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while victim.in_pool and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not victim.in_pool, "the liveness watcher did not take the dead instance out"
    res = run_udp(lab, "b1", "b2", "10.0.0.2", flows=64, packets=4, first_sport=33000)
    assert delivered(res) == sent(res)


FORGED = {
    "another tenant's path": (4, 254, 2),   # blue's outbound path (spi 4), blue's id in C1
    "own path, other tenant in C1": (2, 254, 2),
    "own path, index out of place": (2, 200, 1),
}


@pytest.mark.parametrize("spi,si,c1", FORGED.values(), ids=FORGED.keys())
def test_fabric_drops_forged_nsh_from_an_nf_port(lab, spi: int, si: int, c1: int) -> None:
    """Frames a (compromised) red NF sends with a forged NSH header never reach anyone."""
    inst = lab.pool_instances("red", "fw")[0]
    script = ("from scapy.all import Ether, IP, UDP, sendp; from scapy.contrib.nsh import NSH; "
              f"sendp(Ether(dst='02:5e:00:00:00:01')/NSH(mdtype=1, nextproto=3, spi={spi}, si={si}, "
              f"context_header=({c1}).to_bytes(4, 'big')+bytes(12))/Ether(dst='02:00:00:02:00:02')/"
              "IP(src='10.0.0.1', dst='10.0.0.2')/UDP(dport=9), iface='eth0', count=5, verbose=False)")
    hosts = ("r1", "r2", "b1", "b2")
    quiet(lab, hosts)
    before = {h: host_rx(lab, h) for h in hosts}
    dropped = lab.fabric.dropped()
    inst.node.cmd(f'{sys.executable} -c "{script}"')
    deadline = time.monotonic() + 10  # the switch updates its flow statistics lazily
    while (now := lab.fabric.dropped()) < dropped + 5:
        assert time.monotonic() < deadline, (
            f"the fabric counted {now - dropped} of the 5 forged frames as dropped within 10 s:\n"
            + lab.fabric.dump())
        time.sleep(0.1)
    assert {h: host_rx(lab, h) for h in hosts} == before  # counted as dropped: none can arrive later
