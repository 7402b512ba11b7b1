"""Fixtures shared by the tests: a real Redis on loopback with one ACL user per tenant."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

TENANTS = ("red", "blue")


@dataclass(frozen=True)
class RedisServer:
    """A redis-server the tests started; ``url(tenant)`` has that tenant's ACL credentials."""

    port: int
    passwords: dict[str, str]
    proc: subprocess.Popen

    def url(self, tenant: str) -> str:
        return f"redis://tenant-{tenant}:{self.passwords[tenant]}@127.0.0.1:{self.port}/0"

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
    users = [f"user admin on >{pw['admin']} ~* &* +@all"] + [
        f"user tenant-{t} on >{pw[t]} resetkeys ~t:{t}:* resetchannels +@all -@admin -@dangerous -scan -randomkey"
        for t in TENANTS]
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
