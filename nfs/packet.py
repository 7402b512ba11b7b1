"""Ethernet/IPv4/TCP/UDP/ICMP view of an inner frame, for NFs that read and rewrite headers.

On the per-packet path, so it works on a ``bytearray`` with ``struct`` (scapy builds the test
packets and checks our output byte-exact in ``tests/test_packet.py``). :func:`parse` raises
:class:`~nfs.nsh.Malformed` with a drop reason for anything it cannot trust: truncated
headers, bad IPv4 header checksum, IP options that overrun, a TCP data offset past the end.
Setters keep the IPv4 header checksum and the TCP/UDP/ICMP checksum right (full recompute:
simple and obviously correct).
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from typing import Optional

from nfs.nsh import ETH_HLEN, Malformed

_LITTLE = sys.byteorder == "little"
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ESP = 1, 6, 17, 50

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# For the NFs' config schemas (JSON Schema "pattern"; unanchored, so they compose).
IPV4_PATTERN = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
MAC_PATTERN = r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``.

    Sums 16-bit words in the machine's byte order (C speed through a memoryview) and swaps the
    result's bytes: the one's-complement sum does not depend on byte order (RFC 1071 §2(B)).
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    return ((total & 0xFF) << 8) | (total >> 8) if _LITTLE else total


def ip_str(raw: bytes) -> str:
    """Dotted quad of 4 address bytes (what ``str(IPv4Address)`` gives, at a tenth of the cost)."""
    if len(raw) != 4:
        raise ValueError(f"an IPv4 address has 4 bytes, not {len(raw)}")
    return "%d.%d.%d.%d" % tuple(raw)


def ip_bytes(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


class Packet:
    """A parsed inner frame. Offsets index into ``buf``; ``l4`` is None for non-TCP/UDP/ICMP.

    Attributes:
        buf: the whole frame (mutable).
        ethertype: Ethernet type.
        ip: offset of the IPv4 header (or None for non-IPv4 frames).
        l4: offset of the transport header (None for fragments after the first, other protos).
        proto: IP protocol number.
    """

    __slots__ = ("buf", "ethertype", "ip", "ihl", "l4", "proto", "end")

    def __init__(self, buf: bytearray, ethertype: int, ip: Optional[int], ihl: int,
                 l4: Optional[int], proto: int, end: int) -> None:
        self.buf = buf
        self.ethertype = ethertype
        self.ip = ip
        self.ihl = ihl
        self.l4 = l4
        self.proto = proto
        self.end = end

    # -- Ethernet --------------------------------------------------------------------

    @property
    def eth_dst(self) -> bytes:
        return bytes(self.buf[0:6])

    @eth_dst.setter
    def eth_dst(self, mac: bytes) -> None:
        self.buf[0:6] = mac

    @property
    def eth_src(self) -> bytes:
        return bytes(self.buf[6:12])

    @eth_src.setter
    def eth_src(self, mac: bytes) -> None:
        self.buf[6:12] = mac

    # -- IPv4 ------------------------------------------------------------------------

    def _need_ip(self) -> int:
        if self.ip is None:
            raise ValueError("not an IPv4 packet")
        return self.ip

    @property
    def src(self) -> str:
        return ip_str(self.buf[self._need_ip() + 12:self.ip + 16])

    @property
    def dst(self) -> str:
        return ip_str(self.buf[self._need_ip() + 16:self.ip + 20])

    @property
    def ttl(self) -> int:
        return self.buf[self._need_ip() + 8]

    @property
    def is_fragment(self) -> bool:
        """True for any fragment (first or not)."""
        (frag,) = struct.unpack_from("!H", self.buf, self._need_ip() + 6)
        return bool(frag & 0x3FFF)

    def set_src(self, addr: str) -> None:
        self.buf[self._need_ip() + 12:self.ip + 16] = ip_bytes(addr)
        self.fix_checksums()

    def set_dst(self, addr: str) -> None:
        self.buf[self._need_ip() + 16:self.ip + 20] = ip_bytes(addr)
        self.fix_checksums()

    def set_ttl(self, ttl: int) -> None:
        self.buf[self._need_ip() + 8] = ttl
        self.fix_checksums(l4=False)

    # -- TCP / UDP -------------------------------------------------------------------

    @property
    def sport(self) -> int:
        """TCP/UDP source port (0 without a transport header, e.g. a later fragment)."""
        if self.l4 is None or self.proto not in (PROTO_TCP, PROTO_UDP):
            return 0
        return struct.unpack_from("!H", self.buf, self.l4)[0]

    @property
    def dport(self) -> int:
        """TCP/UDP destination port (0 without a transport header)."""
        if self.l4 is None or self.proto not in (PROTO_TCP, PROTO_UDP):
            return 0
        return struct.unpack_from("!H", self.buf, self.l4 + 2)[0]

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes (0 for unfragmented packets and first fragments)."""
        (frag,) = struct.unpack_from("!H", self.buf, self._need_ip() + 6)
        return (frag & 0x1FFF) * 8

    def set_sport(self, port: int) -> None:
        struct.pack_into("!H", self.buf, self.l4, port)
        self.fix_checksums()

    def set_dport(self, port: int) -> None:
        struct.pack_into("!H", self.buf, self.l4 + 2, port)
        self.fix_checksums()

    @property
    def tcp_flags(self) -> int:
        return self.buf[self.l4 + 13] if self.proto == PROTO_TCP and self.l4 is not None else 0

    # -- ICMP ------------------------------------------------------------------------

    @property
    def icmp_type(self) -> int:
        return self.buf[self.l4] if self.proto == PROTO_ICMP and self.l4 is not None else -1

    @property
    def icmp_code(self) -> int:
        return self.buf[self.l4 + 1] if self.proto == PROTO_ICMP and self.l4 is not None else -1

    @property
    def icmp_id(self) -> int:
        """Identifier of an echo request/reply (0 for other ICMP types)."""
        if self.icmp_type in (0, 8):
            return struct.unpack_from("!H", self.buf, self.l4 + 4)[0]
        return 0

    def set_icmp_id(self, ident: int) -> None:
        struct.pack_into("!H", self.buf, self.l4 + 4, ident)
        self.fix_checksums()

    # -- checksums -------------------------------------------------------------------

    def fix_checksums(self, l4: bool = True) -> None:
        """Recompute the IPv4 header checksum and (if ``l4``) the transport checksum."""
        ip = self._need_ip()
        struct.pack_into("!H", self.buf, ip + 10, 0)
        struct.pack_into("!H", self.buf, ip + 10, checksum(bytes(self.buf[ip:ip + self.ihl])))
        if not l4 or self.l4 is None:
            return
        seg = self.l4
        if self.proto == PROTO_ICMP:
            struct.pack_into("!H", self.buf, seg + 2, 0)
            struct.pack_into("!H", self.buf, seg + 2, checksum(bytes(self.buf[seg:self.end])))
            return
        off = seg + (16 if self.proto == PROTO_TCP else 6)
        if self.proto == PROTO_UDP and struct.unpack_from("!H", self.buf, off)[0] == 0:
            return  # UDP without checksum stays without
        struct.pack_into("!H", self.buf, off, 0)
        pseudo = bytes(self.buf[ip + 12:ip + 20]) + struct.pack("!BBH", 0, self.proto, self.end - seg)
        value = checksum(pseudo + bytes(self.buf[seg:self.end]))
        if self.proto == PROTO_UDP and value == 0:
            value = 0xFFFF
        struct.pack_into("!H", self.buf, off, value)

    def l4_checksum_ok(self) -> bool:
        """True if the TCP/UDP/ICMP checksum is right (a UDP checksum of 0 means none)."""
        seg = self.l4
        if self.proto == PROTO_ICMP:
            return checksum(bytes(self.buf[seg:self.end])) == 0
        if self.proto == PROTO_UDP and struct.unpack_from("!H", self.buf, seg + 6)[0] == 0:
            return True
        pseudo = bytes(self.buf[self.ip + 12:self.ip + 20]) + struct.pack("!BBH", 0, self.proto, self.end - seg)
        return checksum(pseudo + bytes(self.buf[seg:self.end])) == 0

    def five_tuple(self) -> tuple[str, str, int, int, int]:
        """(src, dst, proto, sport, dport); for ICMP echo the identifier is both ports."""
        if self.proto == PROTO_ICMP:
            return (self.src, self.dst, self.proto, self.icmp_id, self.icmp_id)
        return (self.src, self.dst, self.proto, self.sport, self.dport)

    def inner_ip(self) -> Optional["Packet"]:
        """The IPv4 packet quoted inside an ICMP error (RFC 792), headers only, or None."""
        if self.proto != PROTO_ICMP or self.icmp_type not in (3, 4, 5, 11, 12):
            return None
        start = self.l4 + 8
        try:
            return _parse_ip(self.buf, start, ETH_P_IP, quoted=True, limit=self.end)
        except Malformed:
            return None

    def bytes(self) -> bytes:
        return bytes(self.buf[:self.end])


def _parse_ip(buf: bytearray, ip: int, ethertype: int, quoted: bool = False,
              limit: Optional[int] = None) -> Packet:
    size = len(buf) if limit is None else limit
    if size < ip + 20:
        raise Malformed("truncated_ipv4")
    vihl = buf[ip]
    if vihl >> 4 != 4:
        raise Malformed("bad_ip_version")
    ihl = (vihl & 0xF) * 4
    if ihl < 20 or size < ip + ihl:
        raise Malformed("bad_ip_header_length")
    (total,) = struct.unpack_from("!H", buf, ip + 2)
    if not quoted:
        if total < ihl or size < ip + total:
            raise Malformed("bad_ip_total_length")
        if checksum(bytes(buf[ip:ip + ihl])) != 0:
            raise Malformed("bad_ip_checksum")
        end = ip + total
    else:
        end = size  # a quote: as much as the ICMP error carries
    proto = buf[ip + 9]
    (frag,) = struct.unpack_from("!H", buf, ip + 6)
    l4: Optional[int] = ip + ihl
    if frag & 0x1FFF:  # not the first fragment: no transport header here
        l4 = None
    elif proto == PROTO_TCP:
        if end < l4 + (8 if quoted else 20):
            raise Malformed("truncated_tcp")
        if not quoted:
            doff = (buf[l4 + 12] >> 4) * 4
            if doff < 20 or l4 + doff > end:
                raise Malformed("bad_tcp_offset")
    elif proto == PROTO_UDP:
        if end < l4 + 8:
            raise Malformed("truncated_udp")
    elif proto == PROTO_ICMP:
        if end < l4 + 8:
            raise Malformed("truncated_icmp")
    elif proto != PROTO_ESP:
        l4 = None
    pkt = Packet(buf, ethertype, ip, ihl, l4, proto, end)
    if not quoted and l4 is not None and proto != PROTO_ESP and not frag & 0x2000 and not pkt.l4_checksum_ok():
        raise Malformed("bad_l4_checksum")
    return pkt


def parse(frame: bytes) -> Packet:
    """Parse an inner Ethernet frame.

    Non-IPv4 frames (ARP, ...) parse with ``ip=None`` so an NF can decide what to do with them.

    Raises:
        Malformed: with the drop-counter name as ``reason``.
    """
    buf = bytearray(frame)
    if len(buf) < ETH_HLEN:
        raise Malformed("truncated_inner")
    (ethertype,) = struct.unpack_from("!H", buf, 12)
    if ethertype != ETH_P_IP:
        return Packet(buf, ethertype, None, 0, None, 0, len(buf))
    return _parse_ip(buf, ETH_HLEN, ethertype)


def build_ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 0) -> bytes:
    """An IPv4 header (no options, DF clear) with correct checksum, followed by ``payload``."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0,
                                ip_bytes(src), ip_bytes(dst)))
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return bytes(hdr) + payload


def build_icmp(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    """An ICMP message with correct checksum; ``rest`` is the 4 bytes after the checksum."""
    msg = bytearray(struct.pack("!BBH", icmp_type, code, 0) + rest + body)
    struct.pack_into("!H", msg, 2, checksum(bytes(msg)))
    return bytes(msg)
