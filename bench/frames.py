"""The frames the packet-loop benches send: NSH-wrapped TCP and UDP flows, as the fabric sends them.

Built with ``struct`` (scapy would take seconds for a hundred thousand frames); the codec the
NFs parse them with is tested byte-exact against scapy, and the NFs check every checksum, so a
wrong frame here shows as drops, never as a faster NF.
"""

from __future__ import annotations

import struct

from nfs.packet import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_PSH, TCP_SYN, build_ipv4, checksum, ip_bytes

OUTER = bytes.fromhex("020000ff0001" "020000ff0002" "894f")
INNER_MACS = bytes.fromhex("020000000002" "020000000001" "0800")
CLIENT, SERVER = "10.0.0.1", "10.0.1.2"
PAYLOAD = 64


def nsh(spi: int, inner: bytes, tenant: int = 1, si: int = 255) -> bytes:
    """``inner`` in an NSH MD type 1 header (tenant id in C1) behind the fabric's outer Ethernet."""
    return (OUTER + bytes([0x0F, 0xC6, 0x01, 0x03]) + struct.pack("!I", (spi << 8) | si)
            + struct.pack("!I", tenant) + bytes(12) + inner)


def _l4(src: str, dst: str, proto: int, segment: bytearray, csum_at: int) -> bytes:
    pseudo = ip_bytes(src) + ip_bytes(dst) + struct.pack("!BBH", 0, proto, len(segment))
    struct.pack_into("!H", segment, csum_at, checksum(pseudo + bytes(segment)) or 0xFFFF)
    return INNER_MACS + build_ipv4(src, dst, proto, bytes(segment))


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = bytes(PAYLOAD)) -> bytes:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    return _l4(src, dst, PROTO_UDP, seg, 6)


def tcp(src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int,
        payload: bytes = b"") -> bytes:
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4,
                                flags, 65535, 0, 0) + payload)
    return _l4(src, dst, PROTO_TCP, seg, 16)


class Flows:
    """``n`` flows between CLIENT and SERVER (client ports 20000 + i); outbound on SPI 2, the
    replies on SPI 3 (the firewall's and NAT's direction is the SPI's low bit)."""

    OUT, IN = 2, 3
    C_ISN, S_ISN = 1000, 500000

    def __init__(self, n: int) -> None:
        self.n = n

    def sport(self, i: int) -> int:
        return 20000 + i

    def udp_out(self) -> list[bytes]:
        return [nsh(self.OUT, udp(CLIENT, self.sport(i), SERVER, 5001)) for i in range(self.n)]

    def udp_in(self) -> list[bytes]:
        return [nsh(self.IN, udp(SERVER, 5001, CLIENT, self.sport(i))) for i in range(self.n)]

    def tcp_handshake(self, replies: bool = True) -> list[list[bytes]]:
        """The three phases of every flow's handshake (SYN; SYN-ACK; ACK), each a list of frames;
        without ``replies`` only the SYNs (the NAT sees one direction here)."""
        c, s = self.C_ISN, self.S_ISN
        syn = [nsh(self.OUT, tcp(CLIENT, self.sport(i), SERVER, 80, c, 0, TCP_SYN)) for i in range(self.n)]
        if not replies:
            return [syn]
        synack = [nsh(self.IN, tcp(SERVER, 80, CLIENT, self.sport(i), s, c + 1, TCP_SYN | TCP_ACK))
                  for i in range(self.n)]
        ack = [nsh(self.OUT, tcp(CLIENT, self.sport(i), SERVER, 80, c + 1, s + 1, TCP_ACK)) for i in range(self.n)]
        return [syn, synack, ack]

    def tcp_data(self, rounds: int, replies: bool = True) -> list[bytes]:
        """``rounds`` data segments on every flow, round robin, each (with ``replies``) followed
        by its acknowledgement from the server: the sequence numbers a real transfer has."""
        out = []
        c, s = self.C_ISN + 1, self.S_ISN + 1
        data = bytes(PAYLOAD)
        for k in range(rounds):
            for i in range(self.n):
                seq = c + k * PAYLOAD
                out.append(nsh(self.OUT, tcp(CLIENT, self.sport(i), SERVER, 80, seq, s, TCP_PSH | TCP_ACK, data)))
                if replies:
                    out.append(nsh(self.IN, tcp(SERVER, 80, CLIENT, self.sport(i), s, seq + PAYLOAD, TCP_ACK)))
        return out
