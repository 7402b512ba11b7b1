"""The committed compiler outputs of p4/steering.p4 are what p4c makes of it, and hold every
table, action and counter the bmv2 driver names."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

P4_DIR = Path(__file__).resolve().parents[1] / "p4"
BUILD = P4_DIR / "build"


def _without_source_info(node):
    """bmv2 JSON minus source locations (they name p4c's install prefix for v1model.p4)."""
    if isinstance(node, dict):
        return {k: _without_source_info(v) for k, v in node.items() if k != "source_info"}
    if isinstance(node, list):
        return [_without_source_info(v) for v in node]
    return node


@pytest.mark.skipif(shutil.which("p4c-bm2-ss") is None,
                    reason="p4c-bm2-ss not installed (p4c from p4lang: Ubuntu package p4lang-p4c); "
                           "the committed p4/build outputs are not recompiled here")
def test_committed_outputs_match_a_fresh_build(tmp_path):
    proc = subprocess.run(["make", "-C", str(P4_DIR), f"BUILD={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fresh = json.loads((tmp_path / "steering.json").read_text())
    committed = json.loads((BUILD / "steering.json").read_text())
    assert _without_source_info(fresh) == _without_source_info(committed), \
        "p4/build/steering.json is stale: run `make -C p4` and commit p4/build"
    assert (tmp_path / "steering.p4info.txtpb").read_text() == (BUILD / "steering.p4info.txtpb").read_text(), \
        "p4/build/steering.p4info.txtpb is stale: run `make -C p4` and commit p4/build"


def test_p4info_has_what_the_driver_uses():
    pytest.importorskip("p4.v1.p4runtime_pb2", reason="the p4runtime package (PyPI) is not installed")
    from statelab.fabric import bmv2
    from statelab.fabric.p4rt import P4Info

    if not (BUILD / bmv2.P4_INFO).exists():
        pytest.fail(f"{BUILD / bmv2.P4_INFO} is missing: run `make -C p4` and commit p4/build")
    info = P4Info.from_file(BUILD / bmv2.P4_INFO)
    fields = {bmv2.T_CLASSIFY: {"port", "tagged", "vid"}, bmv2.T_NF_RETURN: {"port", "spi", "si", "c1"},
              bmv2.T_NEXT_HOP: {"spi", "si"}, bmv2.T_BUCKET: {"pool", "bucket"},
              bmv2.T_DELIVER: {"tenant", "ether_type", "eth_dst", "ip_dst"}}
    for table, names in fields.items():
        assert set(info.table(table).fields) == names, table
    params = {"host_frame": {"tenant", "spi"}, "nf_frame": set(), "accept_return": {"tenant"},
              "to_pool": {"pool"}, "end_of_chain": set(), "to_member": {"port", "mac"},
              "to_host": {"port", "mac", "vid"}, "to_port": {"port", "vid"}, "flood": {"group"},
              "drop": {"reason"}}
    for action, names in params.items():
        assert set(info.action(bmv2.ING + action).params) == names, action
    assert info.counter(bmv2.ING + "drops")[1] >= len(bmv2.DROP_REASONS)
    assert info.counter(bmv2.ING + "tenant_classified")[1] == 4096   # tenant ids 1..4095
    assert info.counter(bmv2.ING + "member_sent")[1] == 512          # every bmv2 port
