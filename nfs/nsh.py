"""NSH (RFC 8300) framing as the fabric sends it to an NF and the NF returns it.

The fabric sends ``Ethernet(type 0x894F) / NSH(MD type 1) / inner Ethernet frame`` on an NF's
one-arm link. This module splits such a frame into its parts and rebuilds the frame the NF
returns: outer MAC addresses swapped, service index decremented, context headers unchanged.
It is on every NF's per-packet path, so it works on ``bytes`` with ``struct`` rather than
dissecting with scapy; ``tests/test_nsh.py`` checks it byte-exact against scapy's NSH layer.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

ETH_P_NSH = 0x894F
ETH_HLEN = 14
NSH_NEXT_PROTO_ETHERNET = 3
NSH_MD_TYPE_1 = 1
_NSH_MD1_WORDS = 6  # 8-byte base + service path header, 16-byte fixed context

_BASE = struct.Struct("!BBBB")   # ver/O/U/TTL(hi), TTL(lo)/length, MD type, next protocol
_PATH = struct.Struct("!I")      # SPI (24 bits) | SI (8 bits)
_C1 = struct.Struct("!I")


class Malformed(ValueError):
    """A frame that is not a well-formed NSH frame; ``reason`` names the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NshFrame(NamedTuple):
    """One frame received from the fabric (a tuple: built once per packet, so no dataclass).

    Attributes:
        outer: the outer Ethernet header (14 bytes).
        header: the whole NSH header (base, service path and context headers).
        spi: service path identifier.
        si: service index.
        tenant: tenant id carried in the first context word (C1).
        inner: the inner Ethernet frame the NF processes.
    """

    outer: bytes
    header: bytes
    spi: int
    si: int
    tenant: int
    inner: bytes


def parse(frame: bytes) -> NshFrame:
    """Split a frame from the fabric into outer header, NSH header and inner frame.

    Args:
        frame: the whole frame as read from the NF's data interface.

    Returns:
        The parsed frame.

    Raises:
        Malformed: with the drop-counter name as ``reason``.
    """
    if len(frame) < ETH_HLEN:
        raise Malformed("truncated_ethernet")
    if frame[12:14] != b"\x89\x4f":
        raise Malformed("not_nsh")
    if len(frame) < ETH_HLEN + 8:
        raise Malformed("truncated_nsh")
    b0, b1, md_type, next_proto = _BASE.unpack_from(frame, ETH_HLEN)
    if b0 >> 6 != 0:
        raise Malformed("nsh_version")
    if b0 & 0x20:
        raise Malformed("nsh_oam")
    length = (b1 & 0x3F) * 4
    if md_type != NSH_MD_TYPE_1 or (b1 & 0x3F) != _NSH_MD1_WORDS:
        raise Malformed("nsh_md_type")
    if len(frame) < ETH_HLEN + length:
        raise Malformed("truncated_nsh")
    if next_proto != NSH_NEXT_PROTO_ETHERNET:
        raise Malformed("nsh_next_protocol")
    (path,) = _PATH.unpack_from(frame, ETH_HLEN + 4)
    spi, si = path >> 8, path & 0xFF
    if si == 0:
        raise Malformed("nsh_si_zero")
    inner = frame[ETH_HLEN + length:]
    if len(inner) < ETH_HLEN:
        raise Malformed("truncated_inner")
    (tenant,) = _C1.unpack_from(frame, ETH_HLEN + 8)
    return NshFrame(frame[:ETH_HLEN], frame[ETH_HLEN:ETH_HLEN + length], spi, si, tenant, inner)


def reply(received: NshFrame, inner: bytes, spi: int | None = None, si: int | None = None) -> bytes:
    """Build the frame an NF sends back to the fabric after processing ``received``.

    The outer MAC addresses are swapped, the service index is decremented (RFC 8300 §2.3:
    the service function decrements it), everything else in the NSH header is kept.

    Args:
        received: the frame the NF was given.
        inner: the (possibly rewritten) inner Ethernet frame to return.
        spi, si: another service path and index to continue on (a reply the NF generated,
            sent back along the reverse chain); default: the same path, index - 1.

    Returns:
        The frame to write to the data interface.
    """
    outer = received.outer[6:12] + received.outer[0:6] + received.outer[12:14]
    header = received.header
    spi = received.spi if spi is None else spi
    si = received.si - 1 if si is None else si
    path = _PATH.pack((spi << 8) | si)
    return outer + header[:4] + path + header[8:] + inner
