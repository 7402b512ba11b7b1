"""The state client with a replicated state server: it finds the primary through Sentinel,
every batch that writes waits for a replica (WAIT) or fails closed, and when the primary is
SIGKILLed it fails closed until the Sentinel has promoted the replica, then goes on counting
from where the wire already is. Real redis-server and Sentinel processes on loopback, ended by
PID."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from bench.state_ops import free_ports as _free_ports
from nfs.state import SCRIPTS, RedisState, StateUnavailable
from statelab.lab import sentinel_service, tenant_acl

SERVICE = sentinel_service("red")


def _until(what: str, ok: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


@dataclass
class Replicated:
    """A primary, its replica and one Sentinel (quorum 1), as the lab configures them."""

    dir: Path
    ports: dict[str, int]
    pw: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def admin(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, username="admin", password=self.pw["admin"], socket_timeout=2,
                           decode_responses=True)

    def start(self, name: str, replica_of: int | None = None) -> None:
        port = self.ports[name]
        lines = ["bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no", f"dir {self.dir}",
                 "repl-diskless-sync yes", "repl-diskless-sync-delay 0", "masteruser admin",
                 f"masterauth {self.pw['admin']}", "user default off",
                 f"user admin on >{self.pw['admin']} ~* &* +@all", tenant_acl("red", self.pw["red"])]
        if replica_of:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        conf = self.dir / f"{name}-{port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.procs[name] = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        _until(f"{name} ready", lambda: self.admin(port).info("replication").get("master_link_status", "up") == "up")
        if replica_of:  # as the lab waits: until a write on the primary is acknowledged
            primary = self.admin(replica_of)  # one connection: WAIT counts its own writes
            _until(f"{name} acknowledges its primary's writes",
                   lambda: primary.set("probe", "1", px=1000) and primary.execute_command("WAIT", 1, 100) == 1)
        for script in SCRIPTS.values():
            self.admin(port).script_load(script.lua)

    def primary(self) -> int:
        return int(self.admin(self.ports["sentinel"]).sentinel_get_master_addr_by_name(SERVICE)[1])

    def url(self) -> str:
        return f"redis+sentinel://tenant-red:{self.pw['red']}@127.0.0.1:{self.ports['sentinel']}/{SERVICE}?wait=1"


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[Replicated]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed: sudo apt-get install redis-server (or scripts/install.sh)")
    a, b, s = _free_ports(3)
    r = Replicated(tmp_path, {"a": a, "b": b, "sentinel": s}, {n: secrets.token_hex(8) for n in ("admin", "red")})
    try:
        r.start("a")
        r.start("b", replica_of=a)
        conf = tmp_path / "sentinel.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {s}", f"dir {tmp_path}", "sentinel resolve-hostnames no",
            "user default on nopass -@all +ping +hello +sentinel|get-master-addr-by-name",
            f"user admin on >{r.pw['admin']} ~* &* +@all",
            f"sentinel monitor {SERVICE} 127.0.0.1 {a} 1", f"sentinel auth-user {SERVICE} admin",
            f"sentinel auth-pass {SERVICE} {r.pw['admin']}", f"sentinel down-after-milliseconds {SERVICE} 300",
            f"sentinel failover-timeout {SERVICE} 3000", ""]))
        with open(tmp_path / "sentinel.log", "wb") as log:
            r.procs["sentinel"] = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                                   stdout=log, stderr=subprocess.STDOUT)
        _until("the Sentinel knows the replica", lambda: len(r.admin(s).sentinel_slaves(SERVICE)) == 1)
        yield r
    finally:
        for p in r.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
            p.wait(10)


def _run(state: RedisState, fill: Callable[[Any], list[Any]]) -> list[Any]:
    b = state.batch()
    refs = fill(b)
    b.execute()
    return [r.value for r in refs]


def test_primary_found_through_the_sentinel_and_writes_wait_for_the_replica(replicated: Replicated) -> None:
    state = RedisState(replicated.url(), "red", "gw")
    calls0 = replicated.admin(replicated.ports["a"]).info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
    assert _run(state, lambda b: [b.incrby("seq:1", 100)]) == [100]
    assert _run(state, lambda b: [b.get("seq:1")]) == [b"100"]      # a read-only batch: no WAIT
    calls = replicated.admin(replicated.ports["a"]).info("commandstats")["cmdstat_wait"]["calls"] - calls0
    assert calls == 1
    assert state.round_trips == 2                                      # WAIT rides in the same pipeline
    assert replicated.admin(replicated.ports["b"]).get("t:red:gw:seq:1") == "100"


def test_a_batch_no_replica_acknowledges_fails_closed(replicated: Replicated) -> None:
    state = RedisState(replicated.url(), "red", "gw")
    _run(state, lambda b: [b.incrby("seq:1", 1)])
    replica = replicated.procs["b"]
    replica.send_signal(signal.SIGSTOP)                                # it cannot acknowledge
    try:
        with pytest.raises(StateUnavailable) as err:
            _run(state, lambda b: [b.incrby("seq:1", 1)])
        assert err.value.reason == "state_unreplicated" and state.unreplicated == 1
    finally:
        replica.send_signal(signal.SIGCONT)
    assert _run(state, lambda b: [b.incrby("seq:1", 1)]) == [3]        # the refused claim is skipped, never reused


def test_primary_killed_fails_closed_then_counts_on_from_the_promoted_replica(replicated: Replicated) -> None:
    state = RedisState(replicated.url(), "red", "gw")
    top = max(_run(state, lambda b: [b.incrby("seq:1", 100)])[0] for _ in range(20))
    assert top == 2000
    replicated.procs["a"].send_signal(signal.SIGKILL)
    replicated.procs["a"].wait()
    failed_closed = 0
    deadline = time.monotonic() + 15
    while replicated.primary() != replicated.ports["b"]:      # no primary: every batch fails closed
        with pytest.raises(StateUnavailable):
            _run(state, lambda b: [b.incrby("seq:1", 100)])
        failed_closed += 1
        assert time.monotonic() < deadline, "the Sentinel promoted no replica"
    assert failed_closed > 0
    replicated.start("a", replica_of=replicated.ports["b"])   # as the lab heals: a replica again
    while True:
        try:
            got = _run(state, lambda b: [b.incrby("seq:1", 100)])[0]
            break
        except StateUnavailable as err:  # the new primary's replica is still syncing
            assert time.monotonic() < deadline, f"no batch went through after the failover: {err}"
            time.sleep(0.02)
    assert got > top                                 # every claim acknowledged before was on the replica
    assert got % 100 == 0


def test_a_plain_url_may_wait_for_the_servers_replicas(replicated: Replicated) -> None:
    """``redis://...?wait=1``: WAIT on a primary named directly (no Sentinel), as the benchmark
    measures it."""
    url = f"redis://tenant-red:{replicated.pw['red']}@127.0.0.1:{replicated.ports['a']}/0?wait=1"
    state = RedisState(url, "red", "gw")
    assert state.wait_replicas == 1

    def waits() -> int:
        return replicated.admin(replicated.ports["a"]).info("commandstats")["cmdstat_wait"]["calls"]
    before = waits()
    assert _run(state, lambda b: [b.incrby("n", 1)]) == [1]
    assert waits() == before + 1
    assert RedisState(url.replace("?wait=1", ""), "red", "gw").wait_replicas == 0


def test_sentinel_url_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="host:port"):
        RedisState("redis+sentinel://u@localhost/svc", "red", "gw")
    with pytest.raises(ValueError, match="redis\\+sentinel://user@host:port"):
        RedisState("redis+sentinel://u@127.0.0.1:1/", "red", "gw")
    with pytest.raises(ValueError, match="only redis://"):
        RedisState("rediss://u@127.0.0.1:1/0", "red", "gw")
