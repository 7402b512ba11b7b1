"""The conformance checks can fail: each one, run against a deliberately broken lab, says FAIL
with the figure that shows why.

Two broken labs, both built from the reference topology:

- a fabric that misbehaves (flows and group buckets added behind the controller's back) and a
  state server whose ACL was widened: for ISO-1 .. ISO-4;
- NFs that keep their state in their own memory (``tests/brokennfs/``, named as
  the pools' ``command`` like a vendor NF would be): for SCALE-1/2 and CONT-1 .. CONT-5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conformance.load import Context
from conformance.core import FAIL, PASS, SKIP, Result, registry
from conformance.plugin import running_lab
from statelab.spec import Topology, load

pytestmark = pytest.mark.root
REFERENCE = Path(__file__).resolve().parents[1] / "topologies" / "conformance.yaml"
# Each NF kind with its state in process memory; the LB's twin keeps its connection table there
# and drops mid-stream segments of connections it did not see open (tests/brokennfs/lb_local.py).
BROKEN = {kind: (sys.executable, "-m", "tests.brokennfs.localstate", kind)
          for kind in ("firewall", "nat", "ipsec", "router", "forward")}
BROKEN["lb"] = (sys.executable, "-m", "tests.brokennfs.lb_local")


def variant(name: str, tenants: set[str], local_state: bool = False,
            commands: dict[str, tuple[str, ...]] | None = None, inside_only: bool = False) -> Topology:
    """The reference topology, cut down to ``tenants``, optionally with local-state NFs, other
    commands for some pools (``{"tenant/pool": argv}``) or only the inside hosts."""
    topo = load(REFERENCE)
    kept = []
    for t in topo.tenants:
        if t.name not in tenants:
            continue
        if local_state:
            t = dataclasses.replace(t, pools=tuple(dataclasses.replace(p, command=BROKEN[p.kind]) for p in t.pools))
        if commands:
            t = dataclasses.replace(t, pools=tuple(dataclasses.replace(p, command=commands.get(f"{t.name}/{p.name}",
                                                                                               p.command))
                                                   for p in t.pools))
        if inside_only:
            t = dataclasses.replace(t, hosts=tuple(h for h in t.hosts if h.zone == "inside"))
        kept.append(t)
    return dataclasses.replace(topo, name=name, tenants=tuple(kept))


def run(lab: Any, check_id: str, only: set[str] | None = None) -> Result:
    return registry()[check_id].func(Context(lab, None, frozenset(only) if only else None))


def ofctl(lab: Any, *args: str) -> None:
    subprocess.run(["ovs-ofctl", "-O", "OpenFlow15", *args], check=True, capture_output=True)


@contextlib.contextmanager
def extra_flow(lab: Any, flow: str) -> Iterator[None]:
    """A flow added behind the controller's back (cookie 0xbad), removed afterwards."""
    ofctl(lab, "add-flow", lab.fabric.name, f"cookie=0xbad,{flow}")
    try:
        yield
    finally:
        ofctl(lab, "del-flows", lab.fabric.name, "cookie=0xbad/-1")


def port_of(lab: Any, host: str) -> int:
    mac = lab.host(host).MAC()
    return next(hp.port for hp in lab.plan.host_ports if hp.mac == mac)


# -- a misbehaving fabric and state server ---------------------------------------------------

@pytest.fixture(scope="module")
def fabric_lab() -> Iterator[Any]:
    yield from running_lab(variant("cf-fabric", {"red", "blue"}))


def test_iso_1_fails_when_the_fabric_leaks_a_tenant(fabric_lab) -> None:
    lab = fabric_lab
    with extra_flow(lab, f"table=40,priority=200,reg0=1,ip,nw_dst=10.0.0.2,"
                         f"actions=output:{port_of(lab, 'r2')},output:{port_of(lab, 'b2')}"):
        result = run(lab, "ISO-1")
    assert result.verdict == FAIL
    assert result.figures["leaked_packets"] > 0
    assert any("blue" in leaked for leaked in result.figures["leaks"].values())


def test_iso_1_fails_when_the_fabric_drops_everything(fabric_lab) -> None:
    with extra_flow(fabric_lab, "table=0,priority=300,actions=drop"):
        result = run(fabric_lab, "ISO-1")
    assert result.verdict == FAIL
    assert result.figures["leaked_packets"] == 0
    assert result.figures["arrived_within_tenant"] < result.figures["probes_expected_within"]


def test_iso_2_fails_when_the_fabric_drops_everything(fabric_lab) -> None:
    with extra_flow(fabric_lab, "table=0,priority=300,actions=drop"):
        result = run(fabric_lab, "ISO-2")
    assert result.verdict == FAIL
    assert result.figures["delivered_to_other_tenant"] == 0
    assert result.figures["legit_arrived"] < result.figures["legit_expected"]


def test_iso_2_fails_when_the_fabric_trusts_a_vlan_tag(fabric_lab) -> None:
    lab = fabric_lab
    with extra_flow(lab, f"table=0,priority=200,in_port={port_of(lab, 'r1')},dl_vlan=2,"
                         f"actions=pop_vlan,set_field:2->reg0,set_field:4->reg1,goto_table:10"):
        result = run(lab, "ISO-2")
    assert result.verdict == FAIL
    assert result.figures["delivered_to_other_tenant"] > 0


def test_iso_2_fails_when_the_fabric_takes_untagged_frames_on_a_trunk(fabric_lab) -> None:
    lab = fabric_lab
    trunk_port = next(hp.port for hp in lab.plan.host_ports if hp.vlan is not None)
    with extra_flow(lab, f"table=0,priority=200,in_port={trunk_port},vlan_tci=0x0000/0x1000,"
                         f"actions=set_field:2->reg0,set_field:4->reg1,goto_table:10"):
        result = run(lab, "ISO-2")
    assert result.verdict == FAIL
    assert any(r["leaked"] or r["fabric_drops"] < r["forged_sent"] for r in result.figures["trunks"].values())


def test_iso_3_fails_when_a_pool_gets_another_tenants_traffic(fabric_lab) -> None:
    lab = fabric_lab
    red_fw = lab.pool_instances("red", "fw")[0]
    group = lab.fabric.group_of((2, "fw"))
    ofctl(lab, "insert-buckets", lab.fabric.name,
          f"group_id={group},command_bucket_id=last,bucket=bucket_id:999,weight:10000,"
          f"actions=set_field:{red_fw.member.port}->reg3,resubmit(,50)")
    try:
        result = run(lab, "ISO-3")
    finally:
        ofctl(lab, "remove-buckets", lab.fabric.name, f"group_id={group},command_bucket_id=999")
    assert result.verdict == FAIL
    assert result.figures["foreign_packets"] > 0
    assert red_fw.id in result.figures["foreign"]


def test_iso_4_fails_when_a_tenant_user_may_read_every_key(fabric_lab) -> None:
    lab = fabric_lab
    from statelab.lab import TENANT_COMMANDS
    # red's user widened to every key on its own server, and a red user on blue's server
    # (as if the two shared one): each is a FAIL naming it
    red, blue = lab.redis(server="red"), lab.redis(server="blue")
    red.execute_command("ACL", "SETUSER", "tenant-red", "allkeys")
    try:
        widened = run(lab, "ISO-4")
    finally:
        red.execute_command("ACL", "SETUSER", "tenant-red", "resetkeys", "~t:red:*")
    blue.execute_command("ACL", "SETUSER", "tenant-red", "on", f">{lab.passwords['red']}", "~*", "+get")
    try:
        shared = run(lab, "ISO-4")
    finally:
        blue.execute_command("ACL", "DELUSER", "tenant-red")
    assert widened.verdict == FAIL
    assert widened.figures["allowed"] > 0
    assert any(op.startswith("red GET t:blue:") for op in widened.figures["allowed_operations"])
    assert shared.verdict == FAIL
    assert any(op.startswith("red AUTH at blue's server") and "b'x'" in op
               for op in shared.figures["allowed_operations"]), shared.figures["allowed_operations"]
    # and a server that refuses everything, the tenant's own keys too, fails the positive half
    red.execute_command("ACL", "SETUSER", "tenant-red", "-@all")
    try:
        closed = run(lab, "ISO-4")
    finally:
        red.execute_command("ACL", "SETUSER", "tenant-red", *(f"+{c}" for c in TENANT_COMMANDS))
    assert closed.verdict == FAIL
    assert closed.figures["allowed"] == 0
    assert any(x.startswith("red:") for x in closed.figures["own_operations_broken"])


def test_iso_4_fails_on_a_cluster_node_with_a_widened_acl_or_an_open_bus() -> None:
    """On a state cluster: a tenant user that may list the cluster's nodes on one node, and
    a cluster bus reachable from outside the state server, are each a FAIL naming it."""
    topo = dataclasses.replace(variant("cfliso4c", {"red", "blue"}), state_replicas=0, state_cluster=3)
    with contextlib.contextmanager(running_lab)(topo) as lab:
        last = lab.state_servers("red")[-1]
        lab.state_admin(last).execute_command("ACL", "SETUSER", "tenant-red", "+cluster|nodes")
        out = lab.state_node.cmd("nft delete table inet statelab_bus; echo rc=$?")
        assert out.strip().endswith("rc=0"), out
        result = run(lab, "ISO-4")
        assert result.verdict == FAIL
        allowed = result.figures["allowed_operations"]
        assert any(op.startswith(f"red CLUSTER NODES at its node {last}") for op in allowed), allowed
        assert any("cluster bus of red's node" in op and "opened" in op for op in allowed), allowed
        assert not any("CLUSTER NODES" in op for op in allowed if not op.startswith("red ")), allowed


def test_iso_4_fails_on_a_widened_replica_or_sentinel_acl() -> None:
    """With replicas: a tenant user that may reconfigure its replica, and a Sentinel that
    lists its primaries to anyone, are each a FAIL naming it."""
    topo = dataclasses.replace(variant("cfliso4r", {"red", "blue"}), state_replicas=1)
    with contextlib.contextmanager(running_lab)(topo) as lab:
        replica = next(p for p in lab.state_servers("red") if p != lab.state_port("red"))
        lab.state_admin(replica).execute_command("ACL", "SETUSER", "tenant-red", "+config|set")
        sentinel = lab.sentinel_ports[-1]
        lab.state_admin(sentinel).execute_command("ACL", "SETUSER", "default", "+sentinel|masters")
        result = run(lab, "ISO-4")
        assert result.verdict == FAIL
        allowed = result.figures["allowed_operations"]
        assert any(op.startswith(f"red CONFIG SET at its replica (port {replica})") for op in allowed), allowed
        assert any(op.startswith(f"red SENTINEL MASTERS at Sentinel {sentinel}") for op in allowed), allowed
        assert not any("CONFIG SET at its replica" in op for op in allowed if not op.startswith("red ")), allowed


# -- NFs that keep state in their own memory -------------------------------------------------

@pytest.fixture(scope="module")
def local_lab() -> Iterator[Any]:
    yield from running_lab(variant("cf-local", {"red", "green", "lbt"}, local_state=True))


@pytest.mark.parametrize("check_id", ["SCALE-1", "SCALE-2", "CONT-1"])
def test_fails_with_in_process_firewall_state(local_lab, check_id: str) -> None:
    result = run(local_lab, check_id, {"red/fw"})
    assert result.verdict == FAIL
    assert result.figures["tcp_broken"] > 0


def test_cont_2_fails_with_in_process_state(local_lab) -> None:
    result = run(local_lab, "CONT-2", {"red/fw"})
    assert result.verdict == FAIL
    assert result.figures["tcp_broken"] > 0 or result.figures["survivor_no_connection_drops"] > 0


def test_cont_3_fails_with_in_process_nat_mappings(local_lab) -> None:
    result = run(local_lab, "CONT-3", {"red/nat"})
    assert result.verdict == FAIL
    assert result.figures["flows_remapped"] > 0 or result.figures["tcp_broken"] > 0


def test_cont_4_fails_when_ipsec_counts_sequence_numbers_in_process(local_lab) -> None:
    result = run(local_lab, "CONT-4", {"green/gwa", "green/gwb"})
    assert result.verdict == FAIL
    assert result.figures["duplicate_spi_seq"] > 0


def test_cont_5_fails_with_in_process_lb_connections(local_lab) -> None:
    result = run(local_lab, "CONT-5", {"lbt/lb"})
    assert result.verdict == FAIL
    assert result.figures["tcp_broken"] > 0 or result.figures["connections_moved"] > 0


def test_cont_4_fails_when_ipsec_checks_only_the_windows_left_edge() -> None:
    left_edge = (sys.executable, "-m", "tests.brokennfs.ipsec_left_edge")
    topo = variant("cf-edge", {"green"}, commands={"green/gwa": left_edge, "green/gwb": left_edge})
    with contextlib.contextmanager(running_lab)(topo) as lab:
        result = run(lab, "CONT-4")
    assert result.verdict == FAIL
    assert result.figures["duplicate_spi_seq"] == 0          # sequence numbers still come from the server
    assert result.figures["replays_in_window_sent"] > 0
    assert result.figures["replays_dropped"] < result.figures["replays_in_window_sent"] + \
        result.figures["replays_too_old_sent"]


# -- a state primary that dies while its replica lags ------------------------------------------

@contextlib.contextmanager
def lagging_replica_on_kill(lab: Any, lag: float = 0.4) -> Iterator[None]:
    """Make each state-primary kill happen after ``lag`` s in which its replication stream
    reached no replica (nftables in the state server's namespace drops the primary's
    segments to its replicas, as a broken link would lose them): what the primary took in
    meanwhile is on it alone, and goes with it."""
    import time
    real = lab.kill_state_primary

    def nft(*args: str) -> None:
        out = lab.state_node.cmd("nft " + " ".join(shlex.quote(a) for a in args) + "; echo rc=$?")
        assert out.strip().endswith("rc=0"), out

    def kill(tenant: str) -> Any:
        primary = lab.state_port(tenant)
        links = [c["addr"] for c in lab._admin(primary).client_list(_type="replica")]
        nft("add table inet cflag")
        nft("add chain inet cflag out { type filter hook output priority 0 ; }")
        for addr in links:
            nft(f"add rule inet cflag out tcp sport {primary} tcp dport {addr.rsplit(':', 1)[1]} drop")
        try:
            time.sleep(lag)  # the lag itself: writes pile up on the primary only
            lab.state_procs[(tenant, primary)].send_signal(signal.SIGKILL)
            lab.state_procs[(tenant, primary)].wait()
            # held until the promotion: the dead primary's kernel would still deliver what it had
            # queued, and a replica takes it until it is told it is the primary
            return real(tenant)
        finally:
            nft("delete table inet cflag")

    lab.kill_state_primary = kill
    try:
        yield
    finally:
        del lab.kill_state_primary


@pytest.mark.parametrize("waits", [True, False], ids=["nfs-wait", "nfs-do-not-wait"])
def test_cont_6_fails_when_nfs_use_writes_no_replica_holds(waits: bool) -> None:
    """The same lagging replica: NFs that WAIT fail closed during the lag and reuse nothing
    (PASS); NFs that do not put sequence numbers on the wire that the promoted replica never
    saw, and hand them out again (FAIL)."""
    nowait = (sys.executable, "-m", "tests.brokennfs.nowait", "ipsec")
    topo = variant("cf-lag", {"green"}, commands=None if waits else {"green/gwa": nowait, "green/gwb": nowait})
    with contextlib.contextmanager(running_lab)(dataclasses.replace(topo, state_replicas=1)) as lab:
        with lagging_replica_on_kill(lab):
            result = run(lab, "CONT-6")
    green = result.figures["tenants"]["green"]
    if waits:
        assert result.verdict == PASS, result.details
        assert green["duplicate_spi_seq"] == 0 and green["esp_counter_on_new_primary"] >= green["esp_top_seq_on_wire"]
    else:
        assert result.verdict == FAIL, {k: green.get(k) for k in ("duplicate_spi_seq", "esp_top_seq_on_wire", "esp_counter_on_new_primary", "esp_packets", "promoted_ms", "nf_drops")}
        assert green["duplicate_spi_seq"] > 0 or green["esp_counter_on_new_primary"] < green["esp_top_seq_on_wire"]


# -- a topology with nothing to drive traffic through ----------------------------------------

PER_POOL = ["ISO-3", "SCALE-1", "SCALE-2", "CONT-1", "CONT-2", "CONT-3", "CONT-4", "CONT-5", "CONT-6"]


@pytest.fixture(scope="module")
def idle_lab() -> Iterator[Any]:
    yield from running_lab(variant("cf-idle", {"red", "green"}, inside_only=True))


@pytest.mark.parametrize("check_id", PER_POOL)
def test_per_pool_checks_skip_when_nothing_can_be_exercised(idle_lab, check_id: str) -> None:
    result = run(idle_lab, check_id)
    assert result.verdict == SKIP, result
    assert result.details
