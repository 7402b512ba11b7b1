"""The NFs' header codec, byte-exact against scapy."""

from __future__ import annotations

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.l2 import ARP, Ether

from nfs import packet
from nfs.nsh import Malformed

ETH = Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02")


@pytest.mark.parametrize("l4", [TCP(sport=1234, dport=80, flags="S", seq=7) / b"xxx",
                                UDP(sport=5353, dport=53) / b"query",
                                ICMP(type=8, id=77, seq=1) / b"ping"])
def test_rewrites_match_scapy_byte_for_byte(l4) -> None:
    orig = ETH / IP(src="10.0.0.1", dst="10.0.0.2", ttl=64) / l4
    p = packet.parse(raw(orig))
    p.set_src("192.0.2.7")
    if p.proto == packet.PROTO_ICMP:
        p.set_icmp_id(4242)
    else:
        p.set_sport(40000)
    p.set_ttl(63)
    want = orig.copy()
    want[IP].src, want[IP].ttl, want[IP].chksum = "192.0.2.7", 63, None
    if ICMP in want:
        want[ICMP].id, want[ICMP].chksum = 4242, None
    else:
        want[IP].payload.sport, want[IP].payload.chksum = 40000, None
    assert p.bytes() == raw(want)


def test_five_tuple_and_flags() -> None:
    p = packet.parse(raw(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="SA")))
    assert p.five_tuple() == ("10.0.0.1", "10.0.0.2", 6, 1, 2)
    assert p.tcp_flags == packet.TCP_SYN | packet.TCP_ACK


def test_non_ip_frames_parse_without_ip() -> None:
    p = packet.parse(raw(ETH / ARP(pdst="10.0.0.2")))
    assert p.ip is None and p.ethertype == packet.ETH_P_ARP


def test_icmp_error_quotes_inner_packet() -> None:
    quoted = IPerror(src="10.0.0.1", dst="203.0.113.9") / TCPerror(sport=40000, dport=80)
    p = packet.parse(raw(ETH / IP(src="203.0.113.1", dst="10.0.0.1") / ICMP(type=3, code=1) / quoted))
    inner = p.inner_ip()
    assert inner is not None and (inner.src, inner.sport, inner.dport) == ("10.0.0.1", 40000, 80)


def _bad_ip_checksum() -> bytes:
    b = bytearray(raw(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP()))
    b[24] ^= 0xFF
    return bytes(b)


def _bad_udp_checksum() -> bytes:
    b = bytearray(raw(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / b"data"))
    b[-1] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("frame,reason", [
    (b"\x00" * 8, "truncated_inner"),
    (raw(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP())[:40], "bad_ip_total_length"),
    (raw(ETH)[:12] + b"\x08\x00" + b"\x45\x00", "truncated_ipv4"),
    (raw(ETH / IP(ihl=4)), "bad_ip_header_length"),
    (_bad_ip_checksum(), "bad_ip_checksum"),
    (_bad_udp_checksum(), "bad_l4_checksum"),
    (raw(ETH / IP(src="10.0.0.1", dst="10.0.0.2", proto=6) / b"abc"), "truncated_tcp"),
    (raw(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(dataofs=15)), "bad_tcp_offset"),
])
def test_malformed_headers_are_named(frame: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as err:
        packet.parse(frame)
    assert err.value.reason == reason


def test_icmp_error_quoting_only_eight_bytes_of_tcp() -> None:
    """The usual quote (RFC 792: IP header + 8 bytes) of a TCP segment, with Ethernet padding after it."""
    quoted = raw(IPerror(src="10.0.0.1", dst="203.0.113.9") / TCPerror(sport=40000, dport=80))[:28]
    frame = raw(ETH / IP(src="203.0.113.1", dst="10.0.0.1") / ICMP(type=11, code=0) / quoted) + b"\0" * 6
    inner = packet.parse(frame).inner_ip()
    assert inner is not None and (inner.sport, inner.dport, inner.end) == (40000, 80, len(frame) - 6)
