"""The NF runtime as a real process on a veth pair: forwarding, bad input, SIGTERM."""

from __future__ import annotations

import signal

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import fuzz

from tests.nfharness import nsh_frame

INNER = raw(Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02") /
            IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"hello")


@pytest.mark.root
def test_forward_returns_frame_with_index_decremented(nf_process) -> None:
    nf = nf_process("forward", {}, None)
    reply = nf.exchange(INNER, spi=6, si=254, tenant=3)
    assert reply is not None
    assert (reply.spi, reply.si, reply.tenant, reply.inner) == (6, 253, 3, INNER)
    c = nf.counters()
    assert (c["rx"], c["tx"], c["rx_by_tenant"]) == (1, 1, {"3": 1})


@pytest.mark.root
def test_garbage_is_dropped_and_counted_and_the_process_survives(nf_process) -> None:
    nf = nf_process("forward", {}, None)
    frames = [bytes(range(n % 256)) * 2 for n in range(1, 400)]           # garbage, mostly not NSH
    frames += [nsh_frame(raw(fuzz(Ether() / IP() / UDP())))[:n] for n in range(14, 60)]  # truncated
    frames += [raw(fuzz(Ether(type=0x894F) / IP())) for _ in range(1000)]  # bogus NSH
    nf.send_bursts([f[:1600] if len(f) >= 14 else f + bytes(14 - len(f)) for f in frames])
    nf.receive()
    assert nf.alive()
    assert nf.exchange(INNER) is not None  # still forwarding
    c = nf.counters()
    assert c["rx"] == len(frames) + 1
    assert c["dropped"] + c["tx"] == c["rx"]
    assert c["dropped"] >= len(frames) - 50  # a fuzzed header may happen to be valid NSH


@pytest.mark.root
def test_sigterm_drains_and_exits_0(nf_process) -> None:
    nf = nf_process("forward", {}, None)
    nf.send(nsh_frame(INNER))
    nf.proc.send_signal(signal.SIGTERM)
    assert nf.proc.wait(5) == 0
    assert nf.counters()["state"] == "stopped"
