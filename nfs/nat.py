"""Source NAT with port translation (NAPT) for a tenant's inside hosts, keeping no state of its own.

Outbound packets (sent by an inside host) get their source address and port (ICMP echo: the
identifier) rewritten to a public address and port; inbound packets addressed to a public
address and port get the reverse translation, and inbound packets with no mapping are dropped
(``no_mapping``). It follows:

- RFC 3022 (traditional NAT, NAPT) and RFC 4787 / RFC 5382 / RFC 5508 (behaviour for UDP, TCP,
  ICMP): endpoint-independent mapping (REQ-1: a mapping depends only on the inside address,
  port and protocol, never on the destination); "paired" address pooling (RFC 4787 REQ-2: an
  inside address always gets the same public address, chosen by a hash); timers that cannot be
  configured below the RFC minimums (RFC 4787 REQ-5: UDP 2 min; RFC 5382 REQ-5: TCP
  established 2 h 4 min, transitory 4 min; RFC 5508: ICMP query 60 s); mappings refreshed
  by outbound traffic (RFC 4787 REQ-6), for TCP by traffic in either direction; hairpinning for
  TCP and UDP (RFC 4787 REQ-9); ICMP errors translated together with the packet they quote
  (RFC 5508 error payload translation, RFC 5382 REQ-8), a quote with a bad IPv4 header
  checksum dropped, quoted transport checksums updated incrementally (RFC 1624) because a
  quote is often cut short.
- Filtering is endpoint-independent (RFC 4787 REQ-8 allows it): any outside host may reach a
  live mapping. Stateful filtering is the firewall's job in the chain.
- Not translated, dropped and counted: fragments (``fragment``: translating non-first
  fragments needs reassembly state), protocols other than TCP/UDP/ICMP
  (``unsupported_protocol``), ICMP other than echo and errors (``unsupported_icmp``),
  non-IPv4 frames (``not_ipv4``).

State (keys under ``t:{tenant}:{pool}:``), see also docs for vendors:

- ``map:{proto}:{inside ip}:{inside port}`` -> ``"{public ip}:{public port}"``
- ``rev:{proto}:{public ip}:{public port}`` -> ``"{inside ip}:{inside port}"``, the port claim.
  It lives :data:`CLAIM_MARGIN` seconds longer than its mapping, so a mapping never points at
  a port someone else may claim.

A new mapping takes three round trips for a whole batch: read everything, claim candidate ports
(``SET NX`` on ``rev``, so two instances never hand out the same port), then ``SET NX`` the
``map`` (if another instance won the race for the same inside endpoint, use its mapping and
release the claim: a fourth round trip, rare). Candidate ports come from a hash of the inside
endpoint (instances rarely collide) and probing (1, then 4, 16 and 64 more candidates) before
``ports_exhausted``. A packet of a known flow costs only reads; TTLs are extended when less than
half of the lifetime is left.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import jsonschema

from nfs import nsh
from nfs.nsh import Malformed
from nfs.packet import (IPV4_PATTERN, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN, Packet,
                        checksum, ip_bytes, parse)
from nfs.runtime import Drop, NetworkFunction, Verdict, main
from nfs.state import Batch, Ref

PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}
ICMP_ECHO = (0, 8)
ICMP_ERRORS = (3, 4, 11, 12)  # unreachable, source quench, time exceeded, parameter problem
PROBES = (1, 4, 16, 64)       # candidate ports claimed per round for one new mapping
CLAIM_MARGIN = 5.0            # seconds a port claim outlives its mapping

TIMEOUT_DEFAULTS = {"udp": 300, "tcp_established": 7440, "tcp_transitory": 240, "icmp": 60}
_TIMEOUTS = {  # name: (RFC minimum in seconds, what it is)
    "udp": (120, "UDP mapping idle timeout; RFC 4787 REQ-5: at least 120 s"),
    "tcp_established": (7440, "TCP mapping idle timeout once a connection is established; "
                              "RFC 5382 REQ-5: at least 7440 s (2 h 4 min)"),
    "tcp_transitory": (240, "TCP mapping idle timeout during handshake and after FIN/RST; "
                            "RFC 5382 REQ-5: at least 240 s"),
    "icmp": (60, "ICMP echo mapping idle timeout; RFC 5508: at least 60 s"),
}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "nat pool config",
    "description": "Source NAT with port translation (NAPT) for the tenant's inside hosts.",
    "type": "object",
    "additionalProperties": False,
    "required": ["public"],
    "properties": {
        "public": {
            "description": "The tenant's public IPv4 addresses; an inside address always gets "
                           "the same one (paired pooling).",
            "type": "array", "minItems": 1, "uniqueItems": True,
            "items": {"description": "A public IPv4 address, e.g. 203.0.113.1.",
                      "type": "string", "pattern": f"^{IPV4_PATTERN}$"},
        },
        "ports": {
            "description": "Range of public ports (and ICMP echo identifiers) handed out: "
                           "[lowest, highest], both included.",
            "type": "array", "minItems": 2, "maxItems": 2, "default": [1024, 65535],
            "prefixItems": [{**_PORT, "description": "Lowest public port."},
                            {**_PORT, "description": "Highest public port."}],
        },
        "timeouts": {
            "description": "Mapping idle timeouts in seconds; smaller values than the RFCs "
                           "allow are rejected.",
            "type": "object",
            "additionalProperties": False,
            "properties": {name: {"description": f"{why}; default {TIMEOUT_DEFAULTS[name]}.",
                                  "type": "number", "minimum": minimum,
                                  "default": TIMEOUT_DEFAULTS[name]}
                           for name, (minimum, why) in _TIMEOUTS.items()},
        },
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(CONFIG_SCHEMA)


def _hash(text: str) -> int:
    """A hash that is the same in every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _split(value: bytes) -> tuple[str, int]:
    addr, port = value.decode().rsplit(":", 1)
    return addr, int(port)


def _port_offsets(p: Packet) -> tuple[int, int]:
    """Offsets of the source and destination "port" (for ICMP echo both are the identifier)."""
    if p.proto == PROTO_ICMP:
        return p.l4 + 4, p.l4 + 4
    return p.l4, p.l4 + 2


def _port_at(p: Packet, offset: int) -> int:
    return struct.unpack_from("!H", p.buf, offset)[0]


def _csum_adjust(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: the checksum after 16-bit-aligned ``old`` bytes became ``new``."""
    total = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        total += (~struct.unpack_from("!H", old, i)[0] & 0xFFFF) + struct.unpack_from("!H", new, i)[0]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class _Claim:
    """A mapping being created for one inside endpoint during one batch."""

    proto: str
    ip: str
    port: int
    public_ip: str
    ttl: float
    tried: int = 0                       # candidates claimed so far
    rounds: int = 0                      # claim rounds done
    port_claimed: Optional[int] = None
    ours: bool = False                   # we set the claim, so we release it if unused
    result: Optional[str] = None         # "public ip:port" once mapped
    exhausted: bool = False
    refs: list[Any] = field(default_factory=list)

    @property
    def inside(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def map_key(self) -> str:
        return f"map:{self.proto}:{self.ip}:{self.port}"

    def rev_key(self, port: int) -> str:
        return f"rev:{self.proto}:{self.public_ip}:{port}"

    @property
    def pending(self) -> bool:
        return self.result is None and not self.exhausted


@dataclass
class _Job:
    """One packet that needs state: what to look up, and how to rewrite it afterwards."""

    kind: str                      # "out", "in", "out_error", "in_error"
    p: Packet
    key: str                       # the map (outbound) or rev (inbound) key to read
    ttl: float = 0.0
    quote: Optional[Packet] = None
    hairpin: Optional[str] = None  # rev key of the destination of an outbound hairpin packet

    @property
    def refreshes(self) -> bool:
        """Outbound traffic refreshes its mapping (RFC 4787 REQ-6); inbound only for TCP."""
        return self.kind == "out" or (self.kind == "in" and self.p.proto == PROTO_TCP)


class Nat(NetworkFunction):
    """NAPT with endpoint-independent mapping; every mapping lives in the state server.

    Args:
        config: the pool config (see :data:`CONFIG_SCHEMA`).
        state_url: the state server URL.
        instance: this instance's id.

    Raises:
        ValueError: the config does not match :data:`CONFIG_SCHEMA` or its port range is empty.
    """

    kind = "nat"

    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str) -> None:
        super().__init__(config, state_url, instance)
        errors = sorted(_VALIDATOR.iter_errors(self.config), key=lambda e: list(e.absolute_path))
        if errors:
            raise ValueError("nat config: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path)) or 'config'}: {e.message}" for e in errors))
        self.public: tuple[str, ...] = tuple(self.config["public"])
        self.public_set = frozenset(self.public)
        lo, hi = self.config.get("ports", [1024, 65535])
        if lo > hi:
            raise ValueError(f"nat config: ports: lowest port {lo} is above highest port {hi}")
        self.port_lo, self.port_count = lo, hi - lo + 1
        self.timeouts: dict[str, float] = {**TIMEOUT_DEFAULTS, **self.config.get("timeouts", {})}

    # -- per packet -----------------------------------------------------------------

    def _ttl(self, p: Packet) -> float:
        if p.proto == PROTO_UDP:
            return self.timeouts["udp"]
        if p.proto == PROTO_ICMP:
            return self.timeouts["icmp"]
        if p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST):
            return self.timeouts["tcp_transitory"]
        return self.timeouts["tcp_established"]

    def _classify(self, frame: nsh.NshFrame) -> Union[_Job, Drop]:
        p = parse(frame.inner)
        if p.ip is None:
            return Drop("not_ipv4")
        if p.is_fragment:
            return Drop("fragment")
        if p.l4 is None or p.proto not in PROTO_NAMES:
            return Drop("unsupported_protocol")
        outbound = frame.spi & 1 == 0
        name = PROTO_NAMES[p.proto]
        if p.proto == PROTO_ICMP and p.icmp_type in ICMP_ERRORS:
            return self._classify_error(p, outbound)
        if p.proto == PROTO_ICMP and p.icmp_type not in ICMP_ECHO:
            return Drop("unsupported_icmp")
        sport_at, dport_at = _port_offsets(p)
        if outbound:
            hairpin = None
            if p.dst in self.public_set:
                if p.proto == PROTO_ICMP:
                    return Drop("no_mapping")  # nobody behind a public address answers pings
                hairpin = f"rev:{name}:{p.dst}:{_port_at(p, dport_at)}"
            key = f"map:{name}:{p.src}:{_port_at(p, sport_at)}"
            return _Job("out", p, key, self._ttl(p), hairpin=hairpin)
        if p.dst not in self.public_set:
            return Drop("no_mapping")
        return _Job("in", p, f"rev:{name}:{p.dst}:{_port_at(p, dport_at)}", self._ttl(p))

    def _classify_error(self, p: Packet, outbound: bool) -> Union[_Job, Drop]:
        """An ICMP error: the quoted packet went the other way through this NAT."""
        q = _quote(p)
        if (q is None or q.l4 is None or q.is_fragment or q.proto not in PROTO_NAMES
                or q.l4 + 8 > p.end or (q.proto == PROTO_ICMP and q.icmp_type not in ICMP_ECHO)
                or checksum(bytes(q.buf[q.ip:q.ip + q.ihl])) != 0):
            return Drop("bad_icmp_quote")
        sport_at, dport_at = _port_offsets(q)
        name = PROTO_NAMES[q.proto]
        if outbound:  # an inside host answers an inbound-translated packet
            return _Job("out_error", p, f"map:{name}:{q.dst}:{_port_at(q, dport_at)}", quote=q)
        if p.dst not in self.public_set or q.src not in self.public_set:
            return Drop("no_mapping")
        return _Job("in_error", p, f"rev:{name}:{q.src}:{_port_at(q, sport_at)}", quote=q)

    # -- per batch ------------------------------------------------------------------

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        """Translate a batch: one round trip of reads, more only to create or refresh mappings.

        Args:
            packets: the batch; ``spi & 1`` gives the direction (0 outbound, 1 inbound).

        Returns:
            The rewritten inner frames, or ``Drop`` verdicts.
        """
        verdicts: list[Optional[Verdict]] = [None] * len(packets)
        jobs: list[tuple[int, _Job]] = []
        for i, frame in enumerate(packets):
            try:
                job = self._classify(frame)
            except Malformed as err:
                job = Drop(err.reason)
            if isinstance(job, Drop):
                verdicts[i] = job
            else:
                jobs.append((i, job))
        if not jobs:
            return verdicts  # type: ignore[return-value]

        batch = self.state.batch()
        gets: dict[str, Ref] = {}
        pttls: dict[str, Ref] = {}
        for _, job in jobs:
            for key in (job.key, job.hairpin):
                if key is not None and key not in gets:
                    gets[key] = batch.get(key)
            if job.refreshes and job.key not in pttls:
                pttls[job.key] = batch.pttl(job.key)
        batch.execute()

        claims: dict[str, _Claim] = {}
        refresh: dict[str, tuple[str, float]] = {}  # map key -> (rev key, ttl)
        for _, job in jobs:
            value = gets[job.key].value
            if job.kind == "out" and value is None:
                self._want_claim(claims, job)
            elif job.refreshes and value is not None:
                self._want_refresh(refresh, job, value.decode(), pttls[job.key].value)
        self._establish(list(claims.values()), refresh)

        for i, job in jobs:
            verdicts[i] = self._rewrite(job, gets, claims)
        return verdicts  # type: ignore[return-value]

    def _want_claim(self, claims: dict[str, _Claim], job: _Job) -> None:
        claim = claims.get(job.key)
        if claim is None:
            _, proto, ip, port = job.key.split(":")
            public_ip = self.public[_hash(ip) % len(self.public)]  # paired pooling
            claims[job.key] = _Claim(proto, ip, int(port), public_ip, job.ttl)
        else:
            claim.ttl = max(claim.ttl, job.ttl)

    @staticmethod
    def _want_refresh(refresh: dict[str, tuple[str, float]], job: _Job, value: str, pttl_ms: int) -> None:
        """Extend a mapping when less than half of the lifetime this packet calls for is left."""
        name = PROTO_NAMES[job.p.proto]
        if job.kind == "out":
            mkey, rkey, left = job.key, f"rev:{name}:{value}", pttl_ms / 1000
        else:
            mkey, rkey, left = f"map:{name}:{value}", job.key, pttl_ms / 1000 - CLAIM_MARGIN
        if 0 <= left < job.ttl / 2 and refresh.get(mkey, ("", 0.0))[1] < job.ttl:
            refresh[mkey] = (rkey, job.ttl)

    def _candidates(self, claim: _Claim, n: int) -> list[int]:
        seq = (self.port_lo + _hash(f"{claim.map_key}:{i}") % self.port_count
               for i in range(claim.tried, claim.tried + n))
        return list(dict.fromkeys(seq))

    def _establish(self, claims: list[_Claim], refresh: dict[str, tuple[str, float]]) -> None:
        """Refresh TTLs and create mappings: claim ports, then set the maps, in few round trips."""
        batch = self.state.batch()
        for mkey, (rkey, ttl) in refresh.items():
            batch.expire(mkey, ttl)
            batch.expire(rkey, ttl + CLAIM_MARGIN)
        releases: list[str] = []
        while True:
            for key in releases:
                batch.delete(key)
            releases = []
            pending = [c for c in claims if c.pending]
            for c in pending:
                self._add_step(batch, c)
            if not len(batch):
                return
            batch.execute()
            for c in pending:
                releases += self._settle(c)

    def _add_step(self, batch: Batch, c: _Claim) -> None:
        if c.port_claimed is None:  # claim candidate ports
            ports = self._candidates(c, PROBES[c.rounds])
            c.tried += PROBES[c.rounds]
            c.rounds += 1
            c.refs = [(port, batch.set(c.rev_key(port), c.inside, ttl=c.ttl + CLAIM_MARGIN, nx=True),
                       batch.get(c.rev_key(port))) for port in ports]
        else:  # publish the mapping, or learn the one another instance published first
            c.refs = [batch.set(c.map_key, f"{c.public_ip}:{c.port_claimed}", ttl=c.ttl, nx=True),
                      batch.get(c.map_key)]

    def _settle(self, c: _Claim) -> list[str]:
        """Take the results of a claim's step; return the port claims to release."""
        inside = c.inside.encode()
        if c.port_claimed is None:
            held = [(port, won.value) for port, won, now in c.refs if now.value == inside]
            if not held:  # every candidate belongs to someone else
                c.exhausted = c.rounds == len(PROBES)
                return []
            c.port_claimed, c.ours = held[0]  # the same endpoint's claim by another instance counts
            return [c.rev_key(port) for port, won in held[1:] if won]
        mine = f"{c.public_ip}:{c.port_claimed}"
        now = c.refs[1].value
        c.result = now.decode() if now is not None else mine
        return [c.rev_key(c.port_claimed)] if c.result != mine and c.ours else []

    def _rewrite(self, job: _Job, gets: dict[str, Ref], claims: dict[str, _Claim]) -> Verdict:
        p = job.p
        value = gets[job.key].value
        if job.kind == "out" and value is None:
            claim = claims[job.key]
            if claim.result is None:
                return Drop("ports_exhausted")
            value = claim.result.encode()
        if value is None:
            return Drop("no_mapping")
        addr, port = _split(value)
        if job.kind in ("out", "in"):
            sport_at, dport_at = _port_offsets(p)
            at = (12, sport_at) if job.kind == "out" else (16, dport_at)
            p.buf[p.ip + at[0]:p.ip + at[0] + 4] = ip_bytes(addr)
            struct.pack_into("!H", p.buf, at[1], port)
            if job.hairpin is not None:
                target = gets[job.hairpin].value
                if target is None:
                    return Drop("no_mapping")
                taddr, tport = _split(target)
                p.buf[p.ip + 16:p.ip + 20] = ip_bytes(taddr)
                struct.pack_into("!H", p.buf, dport_at, tport)
        else:
            out = job.kind == "out_error"
            p.buf[p.ip + (12 if out else 16):p.ip + (16 if out else 20)] = ip_bytes(addr)
            _rewrite_quote(p, job.quote, source=not out, addr=addr, port=port)
        p.fix_checksums()
        return bytes(p.buf)


def _quote(p: Packet) -> Optional[Packet]:
    """The packet quoted in ICMP error ``p`` (offsets valid in ``p.buf``), or None.

    Parses a zero-padded copy: ``Packet.inner_ip`` raises IndexError on a TCP quote shorter than
    13 bytes (the usual IP header + 8 bytes). The caller checks the quote's real length.
    """
    padded = bytearray(p.buf[:p.end]) + bytes(20)
    return Packet(padded, p.ethertype, p.ip, p.ihl, p.l4, p.proto, p.end).inner_ip()


def _rewrite_quote(p: Packet, q: Packet, source: bool, addr: str, port: int) -> None:
    """Rewrite the source (or destination) address and port of the packet quoted in ICMP error
    ``p``: full IPv4 header checksum, incremental transport checksum (the quote may be cut)."""
    addr_at = q.ip + (12 if source else 16)
    port_at = _port_offsets(q)[0 if source else 1]
    old = bytes(p.buf[addr_at:addr_at + 4]) + bytes(p.buf[port_at:port_at + 2])
    new = ip_bytes(addr) + struct.pack("!H", port)
    p.buf[addr_at:addr_at + 4] = new[:4]
    p.buf[port_at:port_at + 2] = new[4:]
    struct.pack_into("!H", p.buf, q.ip + 10, 0)
    struct.pack_into("!H", p.buf, q.ip + 10, checksum(bytes(p.buf[q.ip:q.ip + q.ihl])))
    if q.proto == PROTO_ICMP:  # no pseudo-header: only the identifier counts
        sum_at, old, new = q.l4 + 2, old[4:], new[4:]
    else:
        sum_at = q.l4 + (16 if q.proto == PROTO_TCP else 6)
    if sum_at + 2 > p.end:
        return  # the quote stops before the checksum
    (csum,) = struct.unpack_from("!H", p.buf, sum_at)
    if q.proto == PROTO_UDP and csum == 0:
        return  # sent without checksum
    csum = _csum_adjust(csum, old, new)
    struct.pack_into("!H", p.buf, sum_at, 0xFFFF if q.proto == PROTO_UDP and csum == 0 else csum)


if __name__ == "__main__":
    sys.exit(main(Nat))
