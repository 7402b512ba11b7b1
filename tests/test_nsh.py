"""NSH codec of the NF runtime, byte-exact against scapy's NSH layer."""

from __future__ import annotations

import pytest
from scapy.compat import raw
from scapy.contrib.nsh import NSH
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nfs import nsh

INNER = Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02") / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1234, dport=5678) / b"payload"


def frame(spi: int = 3, si: int = 255, c1: int = 1, **kw) -> bytes:
    fields = dict(mdtype=1, nextproto=3, spi=spi, si=si, context_header=c1.to_bytes(4, "big") + bytes(12))
    fields.update(kw)
    return raw(Ether(src="02:5e:00:00:00:01", dst="02:4e:46:00:00:64") / NSH(**fields) / INNER)


def test_header_bytes_are_rfc8300_md_type_1() -> None:
    f = frame(spi=3, si=255, c1=1)
    # ver 0, TTL 63, length 6 words, MD type 1, next protocol 3 (Ethernet); SPI 3, SI 255; C1 = 1
    assert f[14:26] == bytes.fromhex("0fc60103" "000003ff" "00000001")


def test_parse_splits_frame() -> None:
    p = nsh.parse(frame(spi=3, si=254, c1=7))
    assert (p.spi, p.si, p.tenant) == (3, 254, 7)
    assert p.inner == raw(INNER)
    assert p.outer == bytes.fromhex("024e46000064" "025e00000001" "894f")


def test_reply_swaps_macs_and_decrements_index_only() -> None:
    received = frame(spi=3, si=255, c1=1)
    out = nsh.reply(nsh.parse(received), raw(INNER))
    expected = raw(Ether(dst="02:5e:00:00:00:01", src="02:4e:46:00:00:64") /
                   NSH(mdtype=1, nextproto=3, spi=3, si=254, context_header=bytes.fromhex("00000001") + bytes(12)) / INNER)
    assert out == expected
    assert NSH(out[14:]).si == 254


@pytest.mark.parametrize("data,reason", [
    (b"\x00" * 10, "truncated_ethernet"),
    (raw(INNER), "not_nsh"),
    (frame()[:20], "truncated_nsh"),
    (frame()[:30], "truncated_nsh"),
    (frame(mdtype=2, length=2), "nsh_md_type"),
    (frame(nextproto=1), "nsh_next_protocol"),
    (frame(si=0), "nsh_si_zero"),
    (frame(ver=1), "nsh_version"),
    (frame(oam=1), "nsh_oam"),
    (frame()[:40], "truncated_inner"),
])
def test_malformed_frames_name_their_drop_reason(data: bytes, reason: str) -> None:
    with pytest.raises(nsh.Malformed) as err:
        nsh.parse(data)
    assert err.value.reason == reason
