"""L4 load balancer NF: spreads connections to a virtual IP:port over backends, statelessly.

A TCP or UDP packet to a service's VIP:port gets its destination rewritten to the backend of
its connection; a packet from that backend back to the client gets its source rewritten to the
VIP:port (full NAT of one side, with the IPv4 and TCP/UDP checksums recomputed, RFC 791/793/768).
Which backend serves a connection is decided once, by highest-random-weight hashing of the
connection's 5-tuple over the service's backends, and stored in the state server with
set-if-absent, so every instance sends the connection to the same backend, even an instance
started after the one that chose it was killed, or one whose backend list has since changed:
the stored choice wins.

State keys (all under the tenant's ``t:{tenant}:{pool}:`` prefix)::

    conn:{proto}:{client ip}:{client port}:{vip}:{vport}   -> "{backend ip}:{backend port}"
    rev:{proto}:{backend ip}:{backend port}:{client ip}:{client port} -> "{vip}:{vport}"

Both live for the protocol's idle timeout. Reading a key also reads its remaining lifetime;
both keys are refreshed only when a tenth of the timeout has passed since they were last
written, so a busy connection costs one write per tenth of its timeout, not one per packet.
A batch of packets costs one round trip to the state server, plus one more when it holds new
connections or connections due for a refresh.

Anything else (not TCP/UDP to a service, not from a stored backend connection) passes
unchanged, or is dropped as ``no_service`` with ``pass_other: false``. Fragments addressed to a
VIP are dropped (``fragment``): their ports are not in every fragment and the transport
checksum cannot be fixed on a part of a datagram.

Pool config (see :data:`CONFIG_SCHEMA`)::

    config:
      services:
        - {vip: 198.51.100.10, port: 80, proto: tcp, backends: ["10.0.0.2:8080", "10.0.0.3:8080"]}
        - {vip: 198.51.100.10, port: 53, proto: udp, backends: ["10.0.0.2:53"]}
      timeouts: {tcp: 3600, udp: 120}     # idle timeouts in seconds (these are the defaults)
      pass_other: true                    # the default
"""

from __future__ import annotations

import hashlib
import ipaddress
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from nfs import nsh
from nfs.nsh import Malformed
from nfs.packet import IPV4_PATTERN, PROTO_TCP, PROTO_UDP, Packet, parse
from nfs.runtime import Drop, NetworkFunction, Verdict, main
from nfs.state import Batch, Ref


CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lb pool config",
    "description": "An L4 load balancer: services (VIP, port, protocol) and their backends.",
    "type": "object",
    "additionalProperties": False,
    "required": ["services"],
    "properties": {
        "services": {
            "type": "array",
            "description": "the load-balanced services, e.g. [{vip: 198.51.100.10, port: 80, "
                           "proto: tcp, backends: [\"10.0.0.2:8080\", \"10.0.0.3:8080\"]}]",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["vip", "port", "backends"],
                "properties": {
                    "vip": {"type": "string", "pattern": f"^{IPV4_PATTERN}$",
                            "description": "the virtual IPv4 address clients connect to, e.g. 198.51.100.10"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                             "description": "the service's port on the VIP, e.g. 80"},
                    "proto": {"enum": ["tcp", "udp"], "default": "tcp",
                              "description": "transport protocol: tcp (the default) or udp"},
                    "backends": {
                        "type": "array", "minItems": 1, "uniqueItems": True,
                        "description": "the servers behind the VIP as \"ip:port\", "
                                       "e.g. [\"10.0.0.2:8080\", \"10.0.0.3:8080\"]",
                        "items": {"type": "string", "pattern": f"^{IPV4_PATTERN}:[0-9]{{1,5}}$",
                                  "description": "one backend as \"ip:port\", e.g. \"10.0.0.2:8080\""},
                    },
                },
            },
        },
        "timeouts": {
            "type": "object",
            "additionalProperties": False,
            "description": "idle timeouts of a connection in seconds, e.g. {tcp: 3600, udp: 120}",
            "properties": {
                "tcp": {"type": "number", "exclusiveMinimum": 0, "default": 3600,
                        "description": "TCP idle timeout in seconds (default 3600)"},
                "udp": {"type": "number", "exclusiveMinimum": 0, "default": 120,
                        "description": "UDP idle timeout in seconds (default 120)"},
            },
        },
        "pass_other": {
            "type": "boolean", "default": True,
            "description": "true (default): packets for no service pass unchanged; false: they are "
                           "dropped and counted as no_service",
        },
    },
}

PROTOS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTOS.items()}
DEFAULT_TIMEOUTS = {"tcp": 3600.0, "udp": 120.0}
REFRESH_FRACTION = 0.1  # refresh a connection's keys once this share of its timeout has passed

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Service:
    """A VIP:port of one protocol and the backends behind it."""

    proto: int
    vip: str
    port: int
    backends: tuple[Endpoint, ...]


def parse_endpoint(text: Any) -> Endpoint:
    """``"10.0.0.2:8080"`` (str or bytes) -> ``("10.0.0.2", 8080)``.

    Args:
        text: an IPv4 address and a port joined by ``:``.

    Raises:
        ValueError: not such an endpoint.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    ip, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not \"ip:port\" such as \"10.0.0.2:8080\"")
    return str(ipaddress.IPv4Address(ip)), int(port)


def load_services(items: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str, int], Service]:
    """Build the service table from the config's ``services`` list.

    Args:
        items: mappings with ``vip``, ``port``, ``backends`` and optional ``proto``.

    Returns:
        Services by (protocol number, VIP, port).

    Raises:
        ValueError: naming the bad service and what is wrong with it.
    """
    services: dict[tuple[int, str, int], Service] = {}
    for i, item in enumerate(items):
        try:
            proto = PROTOS[str(item.get("proto", "tcp"))]
            vip, port = parse_endpoint(f"{item['vip']}:{item['port']}")
            backends = tuple(parse_endpoint(b) for b in item["backends"])
            if not backends:
                raise ValueError("a service needs at least one backend")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"lb config: services[{i}] {item!r}: {err!s} (write e.g. {{vip: 198.51.100.10, "
                             f"port: 80, proto: tcp, backends: [\"10.0.0.2:8080\"]}})") from None
        if (proto, vip, port) in services:
            raise ValueError(f"lb config: services[{i}]: {item.get('proto', 'tcp')} {vip}:{port} is given twice")
        services[(proto, vip, port)] = Service(proto, vip, port, backends)
    return services


def _ep(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


def choose_backend(service: Service, client: Endpoint) -> Endpoint:
    """The backend for a new connection: highest random weight (rendezvous) hash of its 5-tuple.

    Deterministic across processes (BLAKE2b, not Python's salted ``hash``), so instances racing
    on the same new connection choose alike; adding a backend only takes new connections'
    share, never moves what the others would get.

    Args:
        service: the service the connection is for.
        client: the client's (ip, port).
    """
    flow = f"{service.proto}|{client[0]}|{client[1]}|{service.vip}|{service.port}|".encode()
    return max(service.backends, key=lambda b: hashlib.blake2b(flow + _ep(b).encode(), digest_size=8).digest())


@dataclass
class _Pending:
    """One packet waiting on the state server, within one call of process() only."""

    index: int
    pkt: Packet
    proto: str
    client: Endpoint
    value: Ref
    ttl: Ref
    service: Optional[Service] = None  # set for packets to a VIP, None for return traffic


@dataclass
class _Claim:
    """A new connection's backend claim (set-if-absent), within one call of process() only."""

    first: _Pending  # its first packet in the batch
    choice: Endpoint  # the backend this instance chose
    stored: Ref  # the key's value after the claim: ours, or the winner's


class LoadBalancer(NetworkFunction):
    """Rewrites connections to a VIP to their stored backend, and the replies back."""

    kind = "lb"

    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str) -> None:
        super().__init__(config, state_url, instance)
        self.services = load_services(self.config.get("services") or [])
        self.vips = frozenset(s.vip for s in self.services.values())
        timeouts = {**DEFAULT_TIMEOUTS, **(self.config.get("timeouts") or {})}
        self.timeouts = {PROTOS[name]: float(timeouts[name]) for name in PROTOS}
        self.pass_other = bool(self.config.get("pass_other", True))

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        verdicts: list[Optional[Verdict]] = [None] * len(packets)
        pending: list[_Pending] = []
        reads = self.state.batch()
        for i, frame in enumerate(packets):
            verdicts[i] = self._classify(i, frame.inner, reads, pending)
        reads.execute()

        # Second round trip: claim new connections, refresh the keys of those due for it.
        writes = self.state.batch()
        claims: dict[str, _Claim] = {}
        refreshed: set[str] = set()
        for p in pending:
            if p.value.value is None and p.service is None:  # no stored connection: other traffic
                verdicts[p.index] = self._other(p.pkt)
            elif p.value.value is None:
                key = self._conn_key(p)
                if key not in claims:
                    claims[key] = self._claim(p, writes)
            elif self._refresh_due(p) and self._flow_key(p) not in refreshed:
                refreshed.add(self._flow_key(p))
                self._refresh(p, writes)
        writes.execute()

        # Lost a race to an instance that chose another backend (its backend list differed):
        # the stored choice wins; move the reverse key to it (rare: a third round trip).
        fixes = self.state.batch()
        for claim in claims.values():
            stored = claim.stored.value
            if stored is not None and stored != _ep(claim.choice).encode():
                p = claim.first
                fixes.delete(self._rev_key(p.proto, claim.choice, p.client))
                try:
                    fixes.set(self._rev_key(p.proto, parse_endpoint(stored), p.client), self._vip(p), self._ttl(p))
                except ValueError:
                    pass  # a bad stored value: its packets are dropped as bad_state below
        fixes.execute()

        for p in pending:
            if verdicts[p.index] is None:
                stored = p.value.value if p.value.value is not None else claims[self._conn_key(p)].stored.value
                verdicts[p.index] = self._rewrite(p, stored)
        return verdicts  # type: ignore[return-value]  # every slot is filled by now

    # -- steps -------------------------------------------------------------------------

    def _classify(self, i: int, frame: bytes, reads: Batch, pending: list[_Pending]) -> Optional[Verdict]:
        """Decide at once, or queue the reads the packet needs and return None."""
        try:
            pkt = parse(frame)
        except Malformed as err:
            return Drop(err.reason)
        if pkt.ip is None or pkt.proto not in PROTO_NAMES:
            return self._other(pkt)
        src, dst = pkt.src, pkt.dst
        if dst in self.vips:
            service = None if pkt.is_fragment else self.services.get((pkt.proto, dst, pkt.dport))
            if service is None:
                return Drop("fragment") if pkt.is_fragment else self._other(pkt)
            proto = PROTO_NAMES[pkt.proto]
            key = f"conn:{proto}:{src}:{pkt.sport}:{dst}:{pkt.dport}"
            client = (src, pkt.sport)
        elif pkt.is_fragment:
            return self._other(pkt)
        else:  # maybe a reply from a backend to a client
            service, proto = None, PROTO_NAMES[pkt.proto]
            key = f"rev:{proto}:{src}:{pkt.sport}:{dst}:{pkt.dport}"
            client = (dst, pkt.dport)
        pending.append(_Pending(i, pkt, proto, client, reads.get(key), reads.pttl(key), service))
        return None

    def _claim(self, p: _Pending, writes: Batch) -> _Claim:
        """Choose a backend for a new connection; store it if no instance did first, read the winner."""
        assert p.service is not None
        choice = choose_backend(p.service, p.client)
        key = self._conn_key(p)
        writes.set(key, _ep(choice), self._ttl(p), nx=True)
        writes.set(self._rev_key(p.proto, choice, p.client), self._vip(p), self._ttl(p))
        return _Claim(p, choice, writes.get(key))

    def _rewrite(self, p: _Pending, stored: Optional[bytes]) -> Verdict:
        """Apply the stored endpoint: backend as destination, or VIP as source of a reply."""
        try:
            ip, port = parse_endpoint(stored)
        except ValueError:
            return Drop("bad_state")
        if p.service is not None:
            p.pkt.set_dst(ip)
            p.pkt.set_dport(port)
        else:
            p.pkt.set_src(ip)
            p.pkt.set_sport(port)
        return p.pkt.bytes()

    def _other(self, pkt: Packet) -> Verdict:
        return pkt.bytes() if self.pass_other else Drop("no_service")

    def _ttl(self, p: _Pending) -> float:
        return self.timeouts[PROTOS[p.proto]]

    def _refresh_due(self, p: _Pending) -> bool:
        remaining = p.ttl.value
        ttl_ms = self._ttl(p) * 1000
        return remaining is None or remaining < 0 or remaining < ttl_ms * (1 - REFRESH_FRACTION)

    def _refresh(self, p: _Pending, writes: Batch) -> None:
        """Give both keys of a known connection their full lifetime again."""
        try:
            there = parse_endpoint(p.value.value)
        except ValueError:
            return  # dropped as bad_state
        ttl = self._ttl(p)
        if p.service is not None:  # there = the backend
            writes.expire(self._conn_key(p), ttl)
            writes.set(self._rev_key(p.proto, there, p.client), self._vip(p), ttl)
        else:  # there = the VIP; the packet comes from the backend
            writes.expire(self._rev_key(p.proto, (p.pkt.src, p.pkt.sport), p.client), ttl)
            writes.expire(self._flow_key(p), ttl)

    @staticmethod
    def _vip(p: _Pending) -> str:
        assert p.service is not None
        return f"{p.service.vip}:{p.service.port}"

    @staticmethod
    def _conn_key(p: _Pending) -> str:
        assert p.service is not None
        return f"conn:{p.proto}:{_ep(p.client)}:{p.service.vip}:{p.service.port}"

    def _flow_key(self, p: _Pending) -> str:
        """The conn key of the connection a packet belongs to (either direction)."""
        if p.service is not None:
            return self._conn_key(p)
        return f"conn:{p.proto}:{_ep(p.client)}:{p.value.value.decode('ascii', 'replace')}"

    @staticmethod
    def _rev_key(proto: str, backend: Endpoint, client: Endpoint) -> str:
        return f"rev:{proto}:{_ep(backend)}:{_ep(client)}"


if __name__ == "__main__":
    sys.exit(main(LoadBalancer))
