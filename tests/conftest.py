"""Fixtures shared by the tests: a real Redis on loopback with one ACL user per tenant."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from nfs.state import SCRIPTS
from statelab.lab import tenant_acl

TENANTS = ("red", "blue")


@dataclass(frozen=True)
class RedisServer:
    """A redis-server the tests started; ``url(tenant)`` has that tenant's ACL credentials."""

    port: int
    passwords: dict[str, str]
    proc: subprocess.Popen

    def url(self, tenant: str) -> str:
        return f"redis://tenant-{tenant}:{self.passwords[tenant]}@127.0.0.1:{self.port}/0"

    @contextlib.contextmanager
    def seen(self) -> Iterator[dict[str, Any]]:
        """What the server itself saw inside the block: ``{"read_events": socket reads (a
        round trip is one, or more when a pipeline arrives in pieces), "commands": {name: calls}}``
        (INFO's own reads and calls left out). Counted by the server, so commands a client
        library adds on its own (e.g. SCRIPT EXISTS) show."""
        admin = self.admin()

        def now() -> tuple[int, dict[str, int]]:
            stats = admin.info("stats")["total_reads_processed"]
            calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in admin.info("commandstats").items()}
            return stats, calls

        admin.ping()  # connected before the first reading
        reads0, calls0 = now()
        out: dict[str, Any] = {}
        yield out
        reads1, calls1 = now()
        out["read_events"] = reads1 - reads0 - 2  # the second INFO of the first reading, the first of the last
        out["commands"] = {k: n - calls0.get(k, 0) for k, n in calls1.items()
                           if k != "info" and n != calls0.get(k, 0)}

    def admin(self):
        import redis
        return redis.Redis(port=self.port, username="admin", password=self.passwords["admin"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, ended by PID after the session."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed: sudo apt-get install redis-server (or scripts/install.sh)")
    d: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    pw = {name: secrets.token_hex(8) for name in ("admin", *TENANTS)}
    users = [f"user admin on >{pw['admin']} ~* &* +@all"] + [tenant_acl(t, pw[t]) for t in TENANTS]  # the lab's
    conf = d / "redis.conf"
    conf.write_text("\n".join(["bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no",
                               f"dir {d}", "user default off", *users, ""]))
    log = open(d / "redis.log", "wb")
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    server = RedisServer(port, pw, proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.admin().ping():
                break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {proc.poll()}): "
                                   f"{(d / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
    for script in SCRIPTS.values():  # as the lab does: tenants may run the NFs' scripts, not load them
        server.admin().script_load(script.lua)
    yield server
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def redis_clean(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, emptied before the test."""
    redis_server.admin().flushall()
    return redis_server


@pytest.fixture
def nf_process(tmp_path: Path):
    """Factory of real NF processes on veth pairs (needs root); all closed after the test."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root (veth pairs and AF_PACKET sockets): run with sudo")
    from tests.nfharness import NFProcess

    made: list[NFProcess] = []

    def make(kind: str, config: dict, state_url, **kw) -> NFProcess:
        p = NFProcess(kind, config, state_url, tmp_path, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
