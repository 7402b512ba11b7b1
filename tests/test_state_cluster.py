"""The state client on a Redis Cluster: each operation goes to the node that holds its key's
hash slot, one pipeline per node sent before any reply is read; every node's cache is kept
right by that node's invalidations; a slot that moved fails one batch closed and the next
reads the slot map again; a node that is gone fails closed. Three real redis-server cluster
nodes on loopback, with the lab's tenant ACL, ended by PID."""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import redis
from redis.crc import key_slot

from bench.state_ops import LoopbackServers
from nfs.state import ClusterState, StateUnavailable, open_state
from tests.test_state_replicas import _until

NODES = 3


@dataclass
class Cluster:
    servers: LoopbackServers
    url_: str
    ports: list[int]

    @property
    def procs(self) -> list[subprocess.Popen]:
        return self.servers.procs

    def admin(self, port: int) -> redis.Redis:
        return self.servers.admin(port)

    def url(self) -> str:
        return self.url_

    def owner(self, key: str) -> int:
        """The port of the node holding ``key`` now (as the first node sees it)."""
        slot = key_slot(key.encode())
        for lo, hi, (_, port, *_), *_ in self.admin(self.ports[0]).execute_command("CLUSTER", "SLOTS"):
            if lo <= slot <= hi:
                return int(port)
        raise AssertionError(f"slot {slot} has no owner")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three cluster nodes as the lab makes them (bench.state_ops.LoopbackServers)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed: sudo apt-get install redis-server (or scripts/install.sh)")
    with LoopbackServers("red", tmp_path) as servers:
        url, ports = servers.cluster(NODES)
        yield Cluster(servers, url, ports)


def _keys_on_every_node(c: Cluster, prefix: str, n: int = 60) -> list[str]:
    keys = [f"k{i}" for i in range(n)]
    assert {c.owner(prefix + k) for k in keys} == set(c.ports)  # the batch below does touch every node
    return keys


def test_one_batch_spreads_over_the_nodes_and_reads_back(cluster: Cluster) -> None:
    st = open_state(cluster.url(), "red", "fw")
    assert isinstance(st, ClusterState)
    keys = _keys_on_every_node(cluster, st.prefix)
    b = st.batch()
    sets = [b.set(k, f"v{k}", ttl=30) for k in keys]
    incr = b.incrby("n", 7)
    cas = b.script("cas", ["c"], ["", "new", 30000])
    b.execute()
    assert all(r.value is True for r in sets) and incr.value == 7 and cas.value == 1
    assert st.round_trips == NODES  # one pipeline per node: the batch touched all three
    for port in cluster.ports:  # each key on the node that holds its slot, nowhere else
        admin = cluster.admin(port)
        mine = [k for k in keys if cluster.owner(st.prefix + k) == port]
        assert mine and admin.dbsize() >= len(mine)
        assert all(admin.get(st.prefix + k) == f"v{k}" for k in mine)
    other = ClusterState(cluster.url(), "red", "fw", cache=False)
    b = other.batch()
    gets = [b.get(k) for k in keys]
    ttl = b.pttl(keys[0])
    b.execute()
    assert [g.value for g in gets] == [f"v{k}".encode() for k in keys] and 0 < ttl.value <= 30000


def test_each_nodes_cache_is_invalidated_by_that_node(cluster: Cluster) -> None:
    a, b = ClusterState(cluster.url(), "red", "fw"), ClusterState(cluster.url(), "red", "fw")
    keys = _keys_on_every_node(cluster, a.prefix, 30)
    w = b.batch()
    for k in keys:
        w.set(k, "1", ttl=60)
    w.execute()
    for _ in range(2):  # the second batch is answered from the cache, no round trip
        r = a.batch()
        got = [(r.get(k), r.pttl(k)) for k in keys]
        r.execute()
        assert all(g.value == b"1" for g, _ in got)
    trips = a.round_trips
    assert a.cache_hits >= 2 * len(keys) and trips == NODES
    w = b.batch()
    for k in keys:
        w.set(k, "2", ttl=60)
    w.execute()

    def fresh() -> bool:  # each batch first applies the invalidations that have arrived
        r = a.batch()
        got = [r.get(k) for k in keys]
        r.execute()
        return [g.value for g in got] == [b"2"] * len(keys)
    _until("a reads every node's new values", fresh, timeout=5)
    assert a.invalidations >= len(keys)


def test_a_moved_slot_fails_one_batch_closed_then_the_map_is_read_again(cluster: Cluster) -> None:
    st = ClusterState(cluster.url(), "red", "fw", cache=False)
    b = st.batch()
    b.set("moving", "x", ttl=30)
    b.execute()
    key = st.prefix + "moving"
    slot, old = key_slot(key.encode()), cluster.owner(key)
    new = next(p for p in cluster.ports if p != old)
    cluster.admin(old).delete(key)  # an empty slot can be handed over without MIGRATE
    new_id = cluster.admin(new).execute_command("CLUSTER", "MYID")
    for port in [new, old] + [p for p in cluster.ports if p not in (new, old)]:
        cluster.admin(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", new_id)
    _until("every node sees the slot's new owner", lambda: all(
        any(lo <= slot <= hi and int(n[1]) == new for lo, hi, n, *_ in cluster.admin(p).execute_command("CLUSTER", "SLOTS"))
        for p in cluster.ports))
    b = st.batch()
    ref = b.set("moving", "y", ttl=30)
    with pytest.raises(StateUnavailable) as err:
        b.execute()
    assert err.value.reason == "state_moved" and "MOVED" in str(err.value)
    b = st.batch()
    ref = b.set("moving", "y", ttl=30)
    b.execute()
    assert ref.value is True and cluster.admin(new).get(key) == "y"


def test_a_node_that_is_gone_fails_closed_and_the_rest_is_untouched(cluster: Cluster) -> None:
    st = ClusterState(cluster.url(), "red", "fw", timeout=0.3)
    keys = _keys_on_every_node(cluster, st.prefix, 30)
    st.connect()  # connected to every node before it is needed
    dead = cluster.ports[2]
    cluster.procs[2].send_signal(signal.SIGKILL)
    cluster.procs[2].wait()
    b = st.batch()
    for k in keys:
        b.set(k, "x", ttl=30)
    with pytest.raises(StateUnavailable):
        b.execute()
    live = [k for k in keys if cluster.owner(st.prefix + k) != dead]
    b = st.batch()
    refs = [b.get(k) for k in live]
    b.execute()  # until the cluster itself marks the node failed (node timeout), the rest answers
    assert all(r.value in (b"x", None) for r in refs)


def test_a_script_over_two_hash_slots_is_refused_before_sending(cluster: Cluster) -> None:
    st = ClusterState(cluster.url(), "red", "fw")
    b = st.batch()
    b.script("cas", ["a", "b-other-slot"], ["", "v", 0])
    with pytest.raises(ValueError, match="hash tag"):
        b.execute()


def test_cluster_urls() -> None:
    with pytest.raises(ValueError, match="redis\\+cluster://"):
        ClusterState("redis+cluster://u@/", "red", "fw")
    with pytest.raises(ValueError, match="host:port"):
        ClusterState("redis+cluster://u@localhost/", "red", "fw")
    with pytest.raises(StateUnavailable, match="no cluster node gave a slot map"):
        ClusterState("redis+cluster://u:p@127.0.0.1:1/", "red", "fw", timeout=0.2).connect()


def test_the_suite_takes_its_state_servers_from_the_command_line() -> None:
    from conformance.plugin import state_override
    assert state_override(None) == {}
    assert state_override("cluster=3") == {"state_cluster": 3, "state_replicas": 0}
    assert state_override("replicas=2") == {"state_replicas": 2, "state_cluster": 0}
    assert state_override("single") == {"state_replicas": 0, "state_cluster": 0}
    for bad in ("cluster=2", "cluster", "replicas=9", "sharded=3"):
        with pytest.raises(pytest.UsageError, match="single, replicas=N"):
            state_override(bad)
