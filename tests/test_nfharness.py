"""The NF test harness itself: it waits for what the NF processed, and it refuses frames that
no frame of the test caused (another process writing into the test's veth)."""

from __future__ import annotations

import socket

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.nfharness import nsh_frame

INNER = raw(Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02") /
            IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"hello")


@pytest.mark.root
def test_counts_every_reply_to_a_burst_and_nothing_more(nf_process) -> None:
    nf = nf_process("forward", {}, None)
    nf.send_bursts([nsh_frame(INNER, spi=6, tenant=3)] * 500, burst=250, pause=0)
    assert len(nf.receive()) == 500           # all of them, however slow the NF was
    assert nf.receive() == []                 # and nothing left over for the next exchange
    assert nf.exchange(INNER).inner == INNER


@pytest.mark.root
def test_a_frame_someone_else_sent_into_the_veth_fails_the_test(nf_process) -> None:
    nf = nf_process("forward", {}, None)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as other:
        other.bind((nf.ours, 0))
        other.send(nsh_frame(INNER))          # not through the harness: no token
    with pytest.raises(AssertionError, match="another process sent into veth"):
        nf.exchange(INNER)
