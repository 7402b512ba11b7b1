"""The benchmark's one command runs and its JSON holds every figure (P1, P2, commands per
packet; short runs: the figures' values are bench/'s business, not a test's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.root
def test_bench_packet_loop_writes_every_figure(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("redis-server") is None:
        pytest.skip("needs root and redis-server")
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "bench", "--repeat", "1", "--rounds", "2", "--no-lab", "--no-suite",
                          "--state-seconds", "0.2",
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    got = json.loads(out.read_text())
    assert set(got["P1"]) == {f"{k}/{p}" for k in ("firewall", "nat", "lb") for p in ("tcp", "udp", "new-udp")}
    assert set(got["P2"]) == {f"{k}/{p}" for k in ("firewall", "forward") for p in ("tcp", "udp")}
    assert set(got["state_server"]) == {f"{k}/{p}" for k in ("firewall", "nat", "lb") for p in ("tcp", "udp")}
    for name, r in {**got["P1"], **got["P2"], **got["state_server"]}.items():
        assert r["lost"] == 0 and r["a_pps"] > 0 and r["b_pps"] > 0 and r["ratio"] > 0, (name, r)
    for name, r in got["P1"].items():  # counted on the server; a new flow costs commands
        assert r["server_commands_per_packet"] >= (1 if name.endswith("new-udp") else 0), (name, r)
    assert "P1 firewall/tcp" in res.stdout and got["machine"]["cpus"]
    ops = got["state_ops"]["kinds"]
    assert set(ops) == {"firewall", "nat", "ipsec", "lb"}
    for kind, r in ops.items():
        for server in ("one", "replica", "cluster"):
            assert r[server]["ops_per_s"] > 0 and r[server]["p99_ms"] >= r[server]["p50_ms"] > 0, (kind, server, r)
        assert r["cluster_ops_ratio"] > 0 and r["replica_p99_ratio"] > 0
    assert "state ops ipsec on a 3-node cluster" in res.stdout
