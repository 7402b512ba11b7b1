"""The kept-open OpenFlow connection (statelab.fabric.openflow): its messages as Open vSwitch
decodes them, and, as root, a bucket removed from a real bridge's group, an error surfaced."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from statelab.fabric import openflow

needs_ofctl = pytest.mark.skipif(shutil.which("ovs-ofctl") is None,
                                 reason="ovs-ofctl not installed: sudo apt-get install openvswitch-switch")


def ofp_print(msg: bytes) -> str:
    return subprocess.run(["ovs-ofctl", "ofp-print", msg.hex()], capture_output=True, text=True,
                          check=True).stdout


@needs_ofctl
def test_messages_decode_in_open_vswitch_as_meant() -> None:
    assert ofp_print(openflow.remove_bucket(7, 3, 12)).split() == \
        "OFPT_GROUP_MOD (OF1.5) (xid=0x7): REMOVE_BUCKET command_bucket_id:12,group_id=3".split()
    assert "version bitmap: 0x06" in ofp_print(openflow.hello(1))
    insert = openflow.insert_bucket(8, 2, 40, 100, openflow.set_reg(3, 40) + openflow.resubmit(50))
    assert ofp_print(insert).split() == ("OFPT_GROUP_MOD (OF1.5) (xid=0x8): INSERT_BUCKET command_bucket_id:last,"
                                        "group_id=2,bucket=bucket_id:40,weight:100,actions=set_field:0x28->reg3,"
                                        "resubmit(,50)").split()
    assert ofp_print(openflow.message(openflow.OFPT_BARRIER_REQUEST, 9)).startswith("OFPT_BARRIER_REQUEST (OF1.5)")


def test_no_switch_is_a_clear_error(tmp_path) -> None:
    conn = openflow.Connection("nosuchbridge", run_dir=tmp_path)
    with pytest.raises(openflow.OpenFlowError, match="nosuchbridge.mgmt"):
        conn.send(lambda xid: openflow.remove_bucket(xid, 1, 1), "removing a bucket")


@pytest.mark.root
@needs_ofctl
def test_a_bucket_goes_and_a_refusal_is_raised_on_a_real_bridge() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bridge = f"oft{uuid.uuid4().hex[:6]}"
    subprocess.run(["ovs-vsctl", "add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev",
                    "protocols=OpenFlow15"], check=True)
    try:
        ofctl = ["ovs-ofctl", "-O", "OpenFlow15"]
        subprocess.run(ofctl + ["add-group", bridge, "group_id=1,type=select,bucket=bucket_id:5,actions=drop,"
                                "bucket=bucket_id:6,actions=drop"], check=True)
        conn = openflow.Connection(bridge)
        conn.send(lambda xid: openflow.remove_bucket(xid, 1, 5), "removing bucket 5")
        groups = subprocess.run(ofctl + ["dump-groups", bridge], capture_output=True, text=True).stdout
        assert "bucket_id:6" in groups and "bucket_id:5" not in groups
        with pytest.raises(openflow.OpenFlowError, match="refused"):
            conn.send(lambda xid: openflow.remove_bucket(xid, 99, 1), "removing from a group that is not there")
        conn.send(lambda xid: openflow.remove_bucket(xid, 1, 6), "the same connection goes on")
        assert "bucket_id" not in subprocess.run(ofctl + ["dump-groups", bridge], capture_output=True,
                                                 text=True).stdout
        conn.send(lambda xid: openflow.insert_bucket(xid, 1, 7, 100, openflow.set_reg(3, 7) + openflow.resubmit(50)),
                  "inserting bucket 7")
        groups = subprocess.run(ofctl + ["dump-groups", bridge], capture_output=True, text=True).stdout
        assert "bucket=bucket_id:7,weight:100,actions=load:0x7->NXM_NX_REG3[],resubmit(,50)" in groups \
            or "bucket=bucket_id:7,weight:100,actions=set_field:0x7->reg3,resubmit(,50)" in groups, groups
        conn.close()
    finally:
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", bridge], check=True)
