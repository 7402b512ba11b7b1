"""Stateful firewall: ordered per-tenant rules for new connections, connection tracking in the state server.

Rules are evaluated only for a packet that would *start* a connection (a TCP SYN, the first
UDP datagram or ICMP echo request of a flow, the first packet of another IP protocol); the
first rule that matches decides, ``default`` decides when none does. A packet of a tracked
connection passes in both directions whatever the rules say, on any instance of the pool,
because the tracking entry lives in the state server, not in the process (RFC 4787 §5 / RFC
5382 §4 "address and port-dependent filtering", RFC 6092 §3.2 for the stateful-filter
behaviour).

Connection tracking
    Key ``ct:{proto}:{ip}:{port}:{ip}:{port}`` with the two endpoints sorted, so both
    directions of a connection share one key (ICMP echo: the identifier is the port of both
    endpoints; other IP protocols: port 0). Value ``"{STATE} {originator ip}:{port}"``, e.g.
    ``"UDP 10.0.0.1:5353"``, and for TCP the record of :mod:`nfs.tcptrack` after it (23
    integers: state, both directions' window edges and scales, the last packet noted); its TTL
    is the timeout of the state.

TCP (RFC 9293, as Linux conntrack with ``nf_conntrack_tcp_loose=0``: see :mod:`nfs.tcptrack`)
    - flag combinations Linux accepts (SYN, SYN-ACK, RST, RST-ACK, ACK, FIN-ACK, each with or
      without URG/PSH/ECE/CWR) only; anything else is ``bad_tcp_flags``;
    - a SYN without an entry starts a connection if the rules allow it; so does a SYN after
      both FINs (TIME_WAIT) or after its own side's RST (either side may be the new
      originator);
    - every other packet is checked against the state table and both directions' windows:
      ``out_of_window`` (sequence number past what the receiver offered), ``bad_ack``
      (acknowledges data never sent, e.g. a SYN-ACK acknowledging more than the SYN),
      ``bad_rst`` (a RST behind what its receiver has acknowledged: blind, RFC 5961 §3),
      ``invalid_state`` (Linux's table says invalid, e.g. an ACK before the SYN-ACK);
      retransmissions of acknowledged data, and a SYN on a synchronised connection (RFC 5961
      §4: the endpoint answers with a challenge ACK), pass without changing the entry;
    - a RST that closes the connection moves it to CLOSE (10 s), or deletes it if the other
      side never answered; a RST in the window but not at the expected sequence number passes
      and closes nothing (RFC 5961 §3.2);
    - a non-SYN packet without an entry is dropped (``no_connection``) unless ``loose: true``,
      which picks an ACK up mid-stream as ESTABLISHED with its sender as originator (rules
      apply to it as to a new connection) and does not check its window.

UDP, ICMP echo, other protocols
    Pseudo-connections: UDP starts as ``UDP`` and becomes ``UDP_STREAM`` (longer timeout) once
    the responder has answered; ICMP echo (RFC 792) requests must come from the originator and
    replies from the responder; other protocols (ESP, GRE, ...) pass both ways once tracked.
    ICMP errors (types 3, 4, 5, 11, 12) pass only if the packet they quote belongs to a tracked
    connection; other ICMP types are judged by the rules on every packet and never tracked.

Timers
    Timeouts per state (seconds, Linux defaults; TCP also ``unacknowledged`` while data is in
    flight, ``max_retrans`` after three retransmissions, ``close`` after a RST, as Linux). A
    packet of a tracked connection rewrites the entry when the entry changes (for TCP: nearly
    every packet moves a window edge) or its remaining TTL is below half its timeout, so an
    idle connection expires between half its timeout and its timeout after its last packet.

State operations
    One pipelined round trip reads every key a batch touches (GET + PTTL); the packets of each
    connection are then run in arrival order over that view, and one more round trip writes
    the changes with the ``cas`` script (compare-and-set on the value read) or deletes the
    entry with the ``cad`` script (compare-and-delete, :data:`nfs.state.CAD`). A lost
    compare-and-set or compare-and-delete means another instance changed the connection in
    between: its packets are re-read and re-run (at most :data:`CAS_TRIES` times, then dropped
    as ``state_contention``), so instances handling one connection at once agree as if they
    had taken turns. Packets that need no state (ARP, fragments, rule-only ICMP, parse errors)
    never cost a state operation.

Non-IPv4 frames pass (``allow_non_ip``); non-first IPv4 fragments carry no ports and are
dropped as ``fragment`` unless ``allow_fragments`` (first fragments are tracked as usual).
Drop reasons: ``denied_by_rule``, ``no_connection``, ``invalid_state``, ``out_of_window``,
``bad_ack``, ``bad_rst``, ``bad_tcp_flags``, ``fragment``, ``non_ip``, ``state_contention`` and
the parse reasons of :mod:`nfs.packet`.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import jsonschema

from nfs import nsh, packet, tcptrack
from nfs.nsh import Malformed
from nfs.packet import PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from nfs.runtime import Drop, NetworkFunction, Verdict, main
from nfs.state import Batch, Ref
from nfs.tcptrack import ORIGINAL, REPLY, Segment, TcpConn

OUTBOUND, INBOUND = 0, 1
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ICMP_ERRORS = (3, 4, 5, 11, 12)
TCP_URG = 0x20
# Linux's tcp_valid_flags, over FIN/SYN/RST/ACK/URG (PSH, ECE and CWR are ignored).
VALID_TCP_FLAGS = frozenset({
    TCP_SYN, TCP_SYN | TCP_URG, TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK,
    TCP_FIN | TCP_ACK, TCP_FIN | TCP_ACK | TCP_URG, TCP_ACK, TCP_ACK | TCP_URG})
CAS_TRIES = 4

DEFAULT_TIMEOUTS: dict[str, float] = {
    "syn_sent": 120, "syn_recv": 60, "established": 432000, "fin_wait": 120,
    "close_wait": 60, "last_ack": 30, "time_wait": 120, "close": 10, "max_retrans": 300,
    "unacknowledged": 300, "udp": 30, "udp_stream": 180, "icmp": 30, "other": 600,
}
_TIMEOUT_TEXT = {
    "syn_sent": "TCP after the originator's SYN (and in simultaneous open)",
    "syn_recv": "TCP after the responder's SYN-ACK",
    "established": "TCP after the handshake (Linux: 5 days)",
    "fin_wait": "TCP after the first FIN",
    "close_wait": "TCP after the first FIN was acknowledged",
    "last_ack": "TCP after FINs from both sides, until the last one is acknowledged",
    "time_wait": "TCP after both FINs were acknowledged",
    "close": "TCP after a RST",
    "max_retrans": "TCP at most, after three retransmissions of one segment",
    "unacknowledged": "TCP at most, while data is in flight unacknowledged",
    "udp": "UDP flow seen in one direction only",
    "udp_stream": "UDP flow after traffic both ways",
    "icmp": "ICMP echo (keyed by identifier)",
    "other": "other IP protocols (ESP, GRE, ...)",
}
_PROTOS = {"tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP, "any": None}

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "firewall pool config",
    "description": "Settings of a stateful firewall pool (nfs.firewall).",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "rules": {
            "description": "Ordered rules for packets that start a connection; the first match decides.",
            "type": "array",
            "items": {"$ref": "#/$defs/rule"},
        },
        "default": {
            "description": "What happens to a new connection no rule matches (default deny).",
            "enum": ["allow", "deny"],
        },
        "loose": {
            "description": "Pick up TCP connections mid-stream (non-SYN packets); default false.",
            "type": "boolean",
        },
        "allow_non_ip": {
            "description": "Pass frames that are not IPv4 (ARP, ...); default true.",
            "type": "boolean",
        },
        "allow_fragments": {
            "description": "Pass IPv4 fragments after the first (they carry no ports); default false.",
            "type": "boolean",
        },
        "timeouts": {
            "description": "Idle timeouts in seconds per connection state (Linux conntrack defaults).",
            "type": "object",
            "additionalProperties": False,
            "properties": {
                name: {"description": f"{text}; default {DEFAULT_TIMEOUTS[name]:g} s.",
                       "type": "number", "exclusiveMinimum": 0}
                for name, text in _TIMEOUT_TEXT.items()
            },
        },
    },
    "$defs": {
        "rule": {
            "description": "One rule; fields left out match anything.",
            "type": "object",
            "additionalProperties": False,
            "required": ["action"],
            "properties": {
                "action": {"description": "allow or deny the new connection.", "enum": ["allow", "deny"]},
                "direction": {
                    "description": "outbound: sent by an inside host; inbound: sent by an outside host.",
                    "enum": ["outbound", "inbound"],
                },
                "proto": {
                    "description": "tcp, udp, icmp, any (default) or an IP protocol number.",
                    "anyOf": [{"enum": list(_PROTOS)}, {"type": "integer", "minimum": 0, "maximum": 255}],
                },
                "src": {"description": "Source address or CIDR of the first packet, e.g. 10.0.0.0/24.",
                        "type": "string"},
                "dst": {"description": "Destination address or CIDR of the first packet.", "type": "string"},
                "dport": {
                    "description": "Destination port (80) or range (\"8000-8080\"); only TCP and UDP match.",
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 65535},
                              {"type": "string", "pattern": "^[0-9]{1,5}-[0-9]{1,5}$"}],
                },
            },
        },
    },
}


@dataclass(frozen=True)
class Rule:
    """A compiled rule: addresses as (network, mask) integers, ports as an inclusive range."""

    allow: bool
    direction: Optional[int]
    proto: Optional[int]
    src: tuple[int, int]
    dst: tuple[int, int]
    ports: Optional[tuple[int, int]]

    def matches(self, direction: int, proto: int, src: int, dst: int, dport: int) -> bool:
        """True if a new connection's first packet matches.

        Args:
            direction: OUTBOUND or INBOUND.
            proto: IP protocol number.
            src: source address as an integer.
            dst: destination address as an integer.
            dport: destination port (0 for protocols without ports).
        """
        return ((self.direction is None or self.direction == direction)
                and (self.proto is None or self.proto == proto)
                and src & self.src[1] == self.src[0] and dst & self.dst[1] == self.dst[0]
                and (self.ports is None
                     or (proto in (PROTO_TCP, PROTO_UDP) and self.ports[0] <= dport <= self.ports[1])))


def _network(value: str, where: str) -> tuple[int, int]:
    try:
        net = ipaddress.IPv4Network(value)
    except ValueError as err:
        raise ValueError(f"{where}: {err}; write an IPv4 address or CIDR such as 10.0.0.0/24") from None
    return int(net.network_address), int(net.netmask)


def compile_rule(n: int, spec: Mapping[str, Any]) -> Rule:
    """Turn one (schema-valid) rule of the config into a :class:`Rule`.

    Args:
        n: the rule's position (for error messages, counted from 1).
        spec: the rule mapping.

    Raises:
        ValueError: an address or port range that the schema cannot check.
    """
    where = f"firewall rule {n}"
    proto = spec.get("proto", "any")
    ports = None
    if "dport" in spec and proto not in ("tcp", "udp", "any"):
        raise ValueError(f"{where}: dport needs proto tcp, udp or any, not {proto!r}")
    if "dport" in spec:
        lo, _, hi = str(spec["dport"]).partition("-")
        ports = (int(lo), int(hi or lo))
        if not ports[0] <= ports[1] <= 65535:
            raise ValueError(f"{where}: port range {spec['dport']!r} is not low-high within 0-65535")
    return Rule(
        allow=spec["action"] == "allow",
        direction={"outbound": OUTBOUND, "inbound": INBOUND, None: None}[spec.get("direction")],
        proto=_PROTOS[proto] if isinstance(proto, str) else int(proto),
        src=_network(spec.get("src", "0.0.0.0/0"), f"{where} src"),
        dst=_network(spec.get("dst", "0.0.0.0/0"), f"{where} dst"),
        ports=ports,
    )


@dataclass(frozen=True)
class Conn:
    """A connection-tracking entry: state, originator endpoint ``"ip:port"`` and, for TCP, the
    window-tracking record (whose state is the entry's state)."""

    state: str
    orig: str
    tcp: Optional[TcpConn] = None

    def encode(self) -> bytes:
        if self.tcp is not None:
            return f"{self.tcp.name} {self.orig} {self.tcp.encode()}".encode()
        return f"{self.state} {self.orig}".encode()

    @property
    def timeout_name(self) -> str:
        """The name of this entry's timeout in the config (``timeouts``)."""
        if self.tcp is not None:
            return tcptrack.TIMEOUT_OF[self.tcp.state]
        return self.state.lower()

    @classmethod
    def of_tcp(cls, orig: str, tcp: TcpConn) -> "Conn":
        return cls(tcp.name, orig, tcp)

    @classmethod
    def decode(cls, raw: Optional[bytes]) -> Optional["Conn"]:
        """The entry stored as ``raw``, or None if absent or unreadable (then it is replaced)."""
        if raw is None:
            return None
        state, _, rest = raw.decode("ascii", "replace").partition(" ")
        orig, _, record = rest.partition(" ")
        if not orig:
            return None
        if state in tcptrack.STATE_BY_NAME:
            tcp = TcpConn.decode(record)
            return cls(state, orig, tcp) if tcp is not None and tcp.name == state else None
        return cls(state, orig) if state in _OTHER_STATES and not record else None


_OTHER_STATES = frozenset({"UDP", "UDP_STREAM", "ICMP", "OTHER"})


@dataclass(frozen=True)
class _Step:
    """What one packet did: drop reason (None: it passes), the entry afterwards (None: no
    entry), the timer it starts (ms; None: the timer runs on) and a cut of the timer (ms)."""

    reason: Optional[str]
    conn: Optional[Conn]
    timeout: Optional[int] = None
    shorten: Optional[int] = None


@dataclass(frozen=True)
class _Item:
    """One packet that needs its connection's entry."""

    index: int
    frame: nsh.NshFrame
    pkt: packet.Packet
    kind: str       # tcp, udp, echo, other, or error (an ICMP error quoting the connection)
    key: str
    sender: str     # "ip:port" of the packet's sender
    direction: int


def conn_key(proto: int, src: str, sport: int, dst: str, dport: int) -> str:
    """The direction-independent key of a connection.

    Args:
        proto: IP protocol number.
        src: one endpoint's address; sport: its port (ICMP echo: identifier).
        dst: the other endpoint's address; dport: its port.
    """
    (a, ap), (b, bp) = sorted(((src, sport), (dst, dport)))
    return f"ct:{proto}:{a}:{ap}:{b}:{bp}"


def _fragment_offset(pkt: packet.Packet) -> int:
    return struct.unpack_from("!H", pkt.buf, pkt.ip + 6)[0] & 0x1FFF


class Firewall(NetworkFunction):
    """Stateful firewall; see the module docstring for rules, tracking and timers."""

    kind = "firewall"

    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str):
        super().__init__(config, state_url, instance)
        try:
            jsonschema.validate(self.config, CONFIG_SCHEMA)
        except jsonschema.ValidationError as err:
            raise ValueError(f"firewall config {err.json_path}: {err.message}") from None
        self.rules = [compile_rule(n, r) for n, r in enumerate(self.config.get("rules", []), 1)]
        self.default_allow = self.config.get("default", "deny") == "allow"
        self.loose = bool(self.config.get("loose", False))
        self.allow_non_ip = bool(self.config.get("allow_non_ip", True))
        self.allow_fragments = bool(self.config.get("allow_fragments", False))
        timeouts = {**DEFAULT_TIMEOUTS, **self.config.get("timeouts", {})}
        self.timeout_ms = {name: max(1, int(sec * 1000)) for name, sec in timeouts.items()}

    # -- the batch ---------------------------------------------------------------------

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        verdicts: list[Verdict] = [Drop("nf_error")] * len(packets)  # every slot is set below
        flows: dict[str, list[_Item]] = {}
        for i, frame in enumerate(packets):
            got = self._classify(i, frame)
            if isinstance(got, _Item):
                flows.setdefault(got.key, []).append(got)
            else:
                verdicts[i] = got
        if flows:
            self._track(flows, verdicts)
        return verdicts

    def _classify(self, i: int, frame: nsh.NshFrame) -> Union[Verdict, _Item]:
        """A verdict for a packet that needs no state, else what to look up for it."""
        try:
            pkt = packet.parse(frame.inner)
        except Malformed as err:
            return Drop(err.reason)
        if pkt.ip is None:
            return frame.inner if self.allow_non_ip else Drop("non_ip")
        if _fragment_offset(pkt):
            return frame.inner if self.allow_fragments else Drop("fragment")
        direction = frame.spi & 1
        kind = {PROTO_TCP: "tcp", PROTO_UDP: "udp"}.get(pkt.proto, "other")
        if pkt.proto == PROTO_ICMP:
            if pkt.icmp_type in ICMP_ERRORS:
                quoted = pkt.inner_ip()
                if quoted is None or (quoted.l4 is None and quoted.proto in (PROTO_TCP, PROTO_UDP)):
                    return Drop("no_connection")
                src, dst, proto, sport, dport = quoted.five_tuple()
                return _Item(i, frame, pkt, "error", conn_key(proto, src, sport, dst, dport), "", direction)
            if pkt.icmp_type not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
                return frame.inner if self._allowed(direction, pkt) else Drop("denied_by_rule")
            kind = "echo"
        src, dst, proto, sport, dport = pkt.five_tuple()
        key = conn_key(proto, src, sport, dst, dport)
        return _Item(i, frame, pkt, kind, key, f"{src}:{sport}", direction)

    def _allowed(self, direction: int, pkt: packet.Packet) -> bool:
        """The rules' verdict on a packet that starts a connection."""
        src = int.from_bytes(pkt.buf[pkt.ip + 12:pkt.ip + 16], "big")
        dst = int.from_bytes(pkt.buf[pkt.ip + 16:pkt.ip + 20], "big")
        dport = pkt.dport if pkt.l4 is not None else 0
        for rule in self.rules:
            if rule.matches(direction, pkt.proto, src, dst, dport):
                return rule.allow
        return self.default_allow

    def _track(self, flows: dict[str, list[_Item]], verdicts: list[Verdict]) -> None:
        """Read every connection of the batch, run its packets, write the changes; retry lost races."""
        pending = flows
        checked_again = False
        for _ in range(CAS_TRIES):
            reads = self.state.batch()
            got = {key: (reads.get(key), reads.pttl(key)) for key in pending}
            reads.execute()
            writes = self.state.batch()
            cas: dict[str, Ref] = {}
            for key, items in pending.items():
                ref = self._run(key, items, got[key][0].value, got[key][1].value, writes, verdicts)
                if ref is not None:
                    cas[key] = ref
            writes.execute()
            lost = {key: pending[key] for key, ref in cas.items() if not ref.value}
            if not checked_again:
                # a drop decided on a value no compare-and-set of ours confirmed may rest on a
                # cached value another instance has just changed: read those from the server
                # and decide again, once (a drop is rare; a wrong one can break a connection)
                checked_again = True
                doubtful = {key: items for key, items in pending.items() if key not in cas
                            and any(isinstance(verdicts[i.index], Drop) for i in items)}
                if doubtful and self.state.forget(list(doubtful)):
                    lost.update(doubtful)
            pending = lost
            if not pending:
                return
        for items in pending.values():
            for item in items:
                verdicts[item.index] = Drop("state_contention")

    def _run(self, key: str, items: list[_Item], raw: Optional[bytes], pttl: int, writes: Batch,
             verdicts: list[Verdict]) -> Optional[Ref]:
        """Run one connection's packets in order over its entry; queue the write it needs.

        Returns:
            The ref of the compare-and-set or compare-and-delete queued in ``writes``, or None
            if nothing was queued.
        """
        conn = Conn.decode(raw)
        timeout: Optional[int] = None
        shorten: Optional[int] = None
        for item in items:
            step = self._step(item, conn)
            verdicts[item.index] = Drop(step.reason) if step.reason else item.frame.inner
            conn = step.conn
            if step.timeout is not None:
                timeout, shorten = step.timeout, None  # the last packet that starts the timer wins
            if step.shorten is not None:
                shorten = step.shorten
        if conn is None:
            return writes.script("cad", [key], [raw]) if raw is not None else None
        value = conn.encode()
        running = pttl if pttl > 0 else self.timeout_ms[conn.timeout_name]
        ttl = running if timeout is None else timeout
        if shorten is not None and ttl > shorten and ttl >= tcptrack.INVALID_SHORTEN_MIN_MS:
            ttl = shorten
        if value != raw or ttl < running or (timeout is not None and running < timeout // 2):
            return writes.script("cas", [key], [raw if raw is not None else b"", value, ttl])
        return None

    # -- per packet --------------------------------------------------------------------

    def _new(self, item: _Item, state: str) -> _Step:
        """A packet that starts a (non-TCP) connection: the rules decide."""
        if not self._allowed(item.direction, item.pkt):
            return _Step("denied_by_rule", None)
        conn = Conn(state, item.sender)
        return _Step(None, conn, self.timeout_ms[conn.timeout_name])

    def _step(self, item: _Item, conn: Optional[Conn]) -> _Step:
        """One packet over its connection's entry."""
        if item.kind == "error":
            return _Step(None, conn) if conn is not None else _Step("no_connection", conn)
        if item.kind == "tcp":
            return self._tcp(item, conn)
        echo_request = item.pkt.icmp_type == ICMP_ECHO_REQUEST
        if conn is None:
            if item.kind == "echo" and not echo_request:
                return _Step("no_connection", conn)
            return self._new(item, {"udp": "UDP", "echo": "ICMP", "other": "OTHER"}[item.kind])
        from_orig = item.sender == conn.orig
        if item.kind == "udp" and not from_orig and conn.state == "UDP":
            conn = Conn("UDP_STREAM", conn.orig)
        if item.kind == "echo" and echo_request != from_orig:
            return _Step("invalid_state", conn)
        return _Step(None, conn, self.timeout_ms[conn.timeout_name])

    def _tcp(self, item: _Item, conn: Optional[Conn]) -> _Step:
        flags = item.pkt.tcp_flags
        if flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG) not in VALID_TCP_FLAGS:
            return _Step("bad_tcp_flags", conn)
        seg = Segment.from_packet(item.pkt)
        if conn is None or conn.tcp is None:
            return self._tcp_open(item, seg, conn)
        record = conn.tcp  # a fresh copy decoded for this batch: changed in place
        direction = ORIGINAL if item.sender == conn.orig else REPLY
        out = tcptrack.track(record, direction, seg, self.timeout_ms)
        if out.reopen:  # the old connection is over whatever the rules say about the new one
            return self._tcp_open(item, seg, None)
        after = None if out.kill else Conn.of_tcp(conn.orig, record)
        return _Step(out.reason, after, out.timeout, out.shorten)

    def _tcp_open(self, item: _Item, seg: Segment, conn: Optional[Conn]) -> _Step:
        """A TCP packet without a (usable) entry: a SYN the rules allow starts a connection."""
        record = tcptrack.new(seg, self.loose)
        if record is None:
            return _Step("no_connection", conn)
        if not self._allowed(item.direction, item.pkt):
            return _Step("denied_by_rule", conn)
        out = tcptrack.track(record, ORIGINAL, seg, self.timeout_ms)
        if out.reason or out.kill:
            return _Step(out.reason, conn)
        return _Step(None, Conn.of_tcp(item.sender, record), out.timeout)


if __name__ == "__main__":
    sys.exit(main(Firewall))
