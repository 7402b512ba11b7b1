"""Router NF: forwards a tenant's IPv4 packets by longest-prefix match (RFC 1812).

For each packet the router looks up the destination in its (read-only) route table, decrements
the TTL with the header checksum recomputed (RFC 1812 §5.3.1) and rewrites the Ethernet header:
destination MAC = the next hop's MAC, source MAC = the router's own. A packet it cannot
forward gets an ICMP error back to its sender (RFC 792, quoting the IP header and the first 8
bytes of data): *time exceeded* (type 11 code 0) when the TTL is 1 or less, *destination
unreachable / net unreachable* (type 3 code 0) when no route matches. No ICMP error is sent
about an ICMP error, a non-first fragment, a link-layer broadcast or multicast frame, a
directed broadcast of a connected network, or a packet whose source is not one host
(RFC 1812 §4.3.2.7). The router answers ICMP echo requests sent to its own address
(RFC 1812 §4.3.3.6) and forwards nothing else addressed to it, nor limited broadcast or
multicast (§5.3.5; it does no multicast routing), nor packets from martian sources (§5.3.7).

The router checks the IPv4 header (RFC 1812 §4.2.2.5: its checksum too) but not the TCP, UDP
or ICMP checksum of a packet it forwards: that checksum is end to end, between the hosts, and
a router neither checks nor changes it (the TTL decrement rewrites only the header checksum).
A transit packet with a bad transport checksum is forwarded as it came; one addressed to the
router itself (an echo request) is dropped as ``bad_l4_checksum`` (RFC 1122 §3.2.2).

The router keeps no per-flow state, so it never talks to the state server: every instance of
a pool routes every packet the same way, and a killed instance loses nothing.

Pool config (see :data:`CONFIG_SCHEMA`)::

    config:
      mac: "02:00:00:00:00:fe"        # the router's MAC (source of what it sends)
      address: 10.0.0.254             # the router's IP (source of its ICMP messages)
      routes:
        - {prefix: 10.0.0.0/24, mac: "02:00:00:00:00:02"}                  # connected
        - {prefix: 10.1.0.0/16, via: 10.0.0.2, mac: "02:00:00:01:00:02"}   # via a next hop
        - {prefix: 0.0.0.0/0, via: 10.0.0.1, mac: "02:00:00:01:00:01"}     # default route
"""

from __future__ import annotations

import ipaddress
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from nfs import nsh
from nfs.nsh import ETH_HLEN, Malformed
from nfs.packet import (ETH_P_IP, IPV4_PATTERN, MAC_PATTERN, PROTO_ICMP, Packet, build_icmp, build_ipv4,
                        parse)
from nfs.runtime import Drop, NetworkFunction, Reply, Verdict, main


CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "router pool config",
    "description": "An IPv4 router: longest-prefix-match routes, its own MAC and address.",
    "type": "object",
    "additionalProperties": False,
    "required": ["mac", "address", "routes"],
    "properties": {
        "mac": {
            "type": "string", "pattern": f"^{MAC_PATTERN}$",
            "description": "the router's MAC, source MAC of every packet it sends; quote it, "
                           "e.g. \"02:00:00:00:00:fe\" (YAML reads some unquoted MACs as numbers)",
        },
        "address": {
            "type": "string", "pattern": f"^{IPV4_PATTERN}$",
            "description": "the router's IPv4 address, source of the ICMP messages it sends, "
                           "e.g. 10.0.0.254",
        },
        "routes": {
            "type": "array",
            "description": "the route table; the longest matching prefix wins, "
                           "e.g. [{prefix: 0.0.0.0/0, via: 10.0.0.1, mac: \"02:00:00:01:00:01\"}]",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["prefix", "mac"],
                "properties": {
                    "prefix": {
                        "type": "string", "pattern": f"^{IPV4_PATTERN}/([0-9]|[12][0-9]|3[0-2])$",
                        "description": "destination network with no host bits set, e.g. 10.1.0.0/16",
                    },
                    "via": {
                        "type": "string", "pattern": f"^{IPV4_PATTERN}$",
                        "description": "next-hop IPv4 address, e.g. 10.0.0.2; "
                                       "leave it out for a connected network",
                    },
                    "mac": {
                        "type": "string", "pattern": f"^{MAC_PATTERN}$",
                        "description": "MAC the packets of this route are sent to (the next hop's, "
                                       "or the hosts' on a connected network), e.g. \"02:00:00:01:00:02\"",
                    },
                },
            },
        },
    },
}

ICMP_ECHO_REPLY, ICMP_UNREACHABLE, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})  # RFC 792 error messages
ICMP_TTL = 64
_EMPTY_ICMP_REST = bytes(4)  # the unused word of time exceeded / unreachable (RFC 792)


def parse_mac(text: str) -> bytes:
    """``"02:00:00:01:00:02"`` -> 6 bytes.

    Args:
        text: a MAC address, six colon-separated hex octets.

    Raises:
        ValueError: not such a MAC address.
    """
    if not isinstance(text, str) or not re.fullmatch(MAC_PATTERN, text):
        raise ValueError(f"{text!r} is not a MAC address such as \"02:00:00:01:00:02\"")
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Route:
    """One route: packets to ``prefix`` go to ``mac`` (the next hop ``via``, or connected)."""

    prefix: ipaddress.IPv4Network
    mac: bytes
    via: Optional[ipaddress.IPv4Address] = None


class RouteTable:
    """Longest-prefix match over a fixed set of routes.

    One hash table per prefix length in use, searched from the longest length down: at most
    33 dict lookups, usually a handful. Built once from the config (read-only).

    Args:
        routes: the routes; two with the same prefix are an error.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        by_len: dict[int, dict[int, Route]] = {}
        for route in routes:
            table = by_len.setdefault(route.prefix.prefixlen, {})
            net = int(route.prefix.network_address)
            if net in table:
                raise ValueError(f"route {route.prefix} is given twice")
            table[net] = route
        self._levels = [(int(ipaddress.IPv4Network(f"0.0.0.0/{n}").netmask), by_len[n])
                        for n in sorted(by_len, reverse=True)]
        self.routes = [r for _, t in self._levels for r in t.values()]

    def lookup(self, addr: int) -> Optional[Route]:
        """The route with the longest prefix that contains ``addr`` (an int), or None."""
        for mask, table in self._levels:
            route = table.get(addr & mask)
            if route is not None:
                return route
        return None


def load_routes(items: Iterable[Mapping[str, Any]]) -> RouteTable:
    """Build the route table from the config's ``routes`` list.

    Args:
        items: mappings with ``prefix``, ``mac`` and optional ``via``.

    Raises:
        ValueError: naming the bad route and what is wrong with it.
    """
    routes = []
    for i, item in enumerate(items):
        try:
            prefix = ipaddress.IPv4Network(str(item["prefix"]))
            via = ipaddress.IPv4Address(str(item["via"])) if item.get("via") is not None else None
            routes.append(Route(prefix, parse_mac(item["mac"]), via))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"router config: routes[{i}] {dict(item) if isinstance(item, Mapping) else item!r}: "
                             f"{err!s} (write e.g. {{prefix: 10.1.0.0/16, via: 10.0.0.2, "
                             f"mac: \"02:00:00:01:00:02\"}})") from None
    return RouteTable(routes)


def _not_one_host(addr: int) -> bool:
    """True for sources RFC 1812 §5.3.7 calls martian: 0/8, 127/8, multicast, class E, broadcast."""
    first = addr >> 24
    return first == 0 or first == 127 or first >= 224


class Router(NetworkFunction):
    """Routes IPv4 by longest-prefix match; answers with ICMP errors; keeps no state."""

    kind = "router"

    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str) -> None:
        super().__init__(config, state_url, instance)
        try:
            self.mac = parse_mac(self.config["mac"])
            self.address = ipaddress.IPv4Address(str(self.config["address"]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"router config needs 'mac' (e.g. \"02:00:00:00:00:fe\") and 'address' "
                             f"(e.g. 10.0.0.254): {err!s}") from None
        self.table = load_routes(self.config.get("routes") or [])
        self._address = int(self.address)
        self._directed_broadcasts = frozenset(
            int(r.prefix.broadcast_address) for r in self.table.routes
            if r.via is None and r.prefix.prefixlen <= 30)

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        return [self.route(p.inner) for p in packets]

    def route(self, frame: bytes) -> Verdict:
        """Route one inner Ethernet frame.

        Args:
            frame: the frame as received.

        Returns:
            The frame to send (the forwarded packet, or an ICMP message to the sender), or a Drop.
        """
        transport_sum_ok = True
        try:
            pkt = parse(frame)
        except Malformed as err:
            if err.reason != "bad_l4_checksum":
                return Drop(err.reason)
            pkt, transport_sum_ok = _with_bad_transport_checksum(frame), False
        if pkt.ip is None:
            return Drop("not_ipv4")
        src, dst = _addr(pkt, 12), _addr(pkt, 16)
        if _not_one_host(src):
            return Drop("martian_source")
        if dst == self._address:
            return self._local(pkt) if transport_sum_ok else Drop("bad_l4_checksum")
        if dst >> 28 == 0xE or dst == 0xFFFFFFFF:
            return Drop("not_unicast")
        route = self.table.lookup(dst)
        if route is None:
            return self._icmp_error(pkt, ICMP_UNREACHABLE, 0, "no_route")
        if pkt.ttl <= 1:
            return self._icmp_error(pkt, ICMP_TIME_EXCEEDED, 0, "ttl_exceeded")
        pkt.set_ttl(pkt.ttl - 1)
        pkt.eth_dst, pkt.eth_src = route.mac, self.mac
        return pkt.bytes()

    def _local(self, pkt: Packet) -> Verdict:
        """A packet addressed to the router: answer echo requests, drop the rest."""
        if pkt.icmp_type != ICMP_ECHO_REQUEST or pkt.is_fragment:
            return Drop("for_router")
        buf = pkt.buf
        reply = build_icmp(ICMP_ECHO_REPLY, 0, bytes(buf[pkt.l4 + 4:pkt.l4 + 8]), bytes(buf[pkt.l4 + 8:pkt.end]))
        return self._send_back(pkt, reply)

    def _icmp_error(self, pkt: Packet, icmp_type: int, code: int, reason: str) -> Verdict:
        """An ICMP error about ``pkt`` to its sender, or Drop(reason) where RFC 1812 forbids one."""
        if self._no_icmp_about(pkt):
            return Drop(reason)
        quote = bytes(pkt.buf[pkt.ip:min(pkt.ip + pkt.ihl + 8, pkt.end)])  # IP header + 8 bytes
        return self._send_back(pkt, build_icmp(icmp_type, code, _EMPTY_ICMP_REST, quote))

    def _no_icmp_about(self, pkt: Packet) -> bool:
        """RFC 1812 §4.3.2.7: no ICMP error about these packets."""
        if pkt.icmp_type in ICMP_ERROR_TYPES:
            return True
        (frag,) = struct.unpack_from("!H", pkt.buf, pkt.ip + 6)
        if frag & 0x1FFF:  # not the first fragment
            return True
        if pkt.buf[0] & 1:  # link-layer broadcast or multicast
            return True
        return _addr(pkt, 16) in self._directed_broadcasts

    def _send_back(self, pkt: Packet, icmp: bytes) -> Reply:
        """Wrap an ICMP message from the router to the sender of ``pkt``; it goes back along
        the reverse chain (so NATs and firewalls before the router see it as a reply)."""
        ip = build_ipv4(str(self.address), pkt.src, PROTO_ICMP, icmp, ttl=ICMP_TTL)
        return Reply(pkt.eth_src + self.mac + struct.pack("!H", ETH_P_IP) + ip)


def _with_bad_transport_checksum(frame: bytes) -> Packet:
    """The view of a frame that :func:`nfs.packet.parse` refused only for its TCP/UDP/ICMP
    checksum: its last check, so the IPv4 header, lengths and data offset are sound, and the
    packet is not a fragment (fragments' transport checksums are not checked)."""
    buf = bytearray(frame)
    ihl = (buf[ETH_HLEN] & 0xF) * 4
    total = int.from_bytes(buf[ETH_HLEN + 2:ETH_HLEN + 4], "big")
    return Packet(buf, ETH_P_IP, ETH_HLEN, ihl, ETH_HLEN + ihl, buf[ETH_HLEN + 9], ETH_HLEN + total)


def _addr(pkt: Packet, offset: int) -> int:
    """The IPv4 address at ``offset`` of the IP header (12 source, 16 destination) as an int."""
    return int.from_bytes(pkt.buf[pkt.ip + offset:pkt.ip + offset + 4], "big")


if __name__ == "__main__":
    sys.exit(main(Router))
