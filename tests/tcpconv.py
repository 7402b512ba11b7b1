"""TCP conversations for the firewall tests: segments with the sequence numbers, windows and
options two endpoints would use, built with scapy.

A :class:`Conversation` keeps each side's next sequence number. ``seg("S")`` is the client's
SYN, ``seg("SA", IN)`` the server's SYN-ACK acknowledging it, ``seg("PA", payload=b"x")`` the
client's next data; a segment given an explicit ``seq`` (a retransmission, a forged or blind
segment) does not move the sender on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from scapy.compat import raw
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

OUT, IN = 0, 1  # client -> server, server -> client
MASK = 0xFFFFFFFF
CLIENT, SERVER = "10.0.0.1", "203.0.113.9"


@dataclass
class Conversation:
    """One TCP connection between ``client:sport`` and ``server:dport``.

    Attributes:
        isn: initial sequence numbers of client and server.
        win: window fields the client and the server send.
        macs: (source, destination) MAC of each direction's frames.
        next_id: the IPv4 identification of the next segment (each segment gets its own, so a
            capture can tell which of them arrived); shared through ``ids`` if given.
    """

    sport: int = 40000
    dport: int = 80
    client: str = CLIENT
    server: str = SERVER
    isn: tuple[int, int] = (1000, 5000)
    win: tuple[int, int] = (64240, 65160)
    macs: tuple[tuple[str, str], tuple[str, str]] = (("02:00:00:01:00:01", "02:00:00:01:00:02"),
                                                     ("02:00:00:01:00:02", "02:00:00:01:00:01"))
    ids: Optional[list[int]] = None
    nxt: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.nxt = list(self.isn)
        if self.ids is None:
            self.ids = [1]

    def seg(self, flags: str, direction: int = OUT, payload: bytes = b"", seq: Optional[int] = None,
            ack: Optional[int] = None, win: Optional[int] = None, options: Sequence = ()) -> tuple[bytes, int]:
        """One segment as ``(frame, direction)``.

        Args:
            flags: scapy's TCP flag letters, e.g. "S", "SA", "PA", "FA", "R".
            direction: OUT (client to server) or IN.
            payload: the data.
            seq: the sequence number; default the sender's next one (and the sender moves on).
            ack: the acknowledgement number; default what the sender has received (with "A").
            win: the window field; default the sender's.
            options: scapy TCP options, e.g. [("WScale", 7), ("SAckOK", b"")].
        """
        src, dst = (self.client, self.server) if direction == OUT else (self.server, self.client)
        sport, dport = (self.sport, self.dport) if direction == OUT else (self.dport, self.sport)
        s = self.nxt[direction] if seq is None else seq & MASK
        if ack is None:
            ack = self.nxt[1 - direction] if "A" in flags else 0
        ident = self.ids[0]
        self.ids[0] = ident % 0xFFFF + 1
        eth_src, eth_dst = self.macs[direction]
        pkt = (Ether(src=eth_src, dst=eth_dst) / IP(src=src, dst=dst, id=ident)
               / TCP(sport=sport, dport=dport, flags=flags, seq=s, ack=ack & MASK,
                     window=self.win[direction] if win is None else win, options=list(options))
               / payload)
        if seq is None:
            self.nxt[direction] = (s + len(payload) + ("S" in flags) + ("F" in flags)) & MASK
        return raw(pkt), direction

    def handshake(self, options: Sequence = (), reply_options: Sequence = ()) -> list[tuple[bytes, int]]:
        """SYN, SYN-ACK, ACK."""
        return [self.seg("S", options=options), self.seg("SA", IN, options=reply_options), self.seg("A")]


def ip_id(frame: bytes) -> int:
    """The IPv4 identification of an Ethernet frame (how a capture names a segment)."""
    return int.from_bytes(frame[18:20], "big")
