"""The NAPT NF: translations byte-exact against scapy, mappings shared by instances and processes,
no public port handed out twice, crash safety, ICMP errors, bad input, failing closed, config."""

from __future__ import annotations

import contextlib

import copy
import random
import time
from typing import Any, Callable, Optional

import jsonschema
import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw, fuzz

from nfs import nsh, packet
from nfs.nat import CONFIG_SCHEMA, Nat
from nfs.runtime import Drop
from nfs.state import LocalState, RedisState, StateUnavailable
from tests.nfharness import nsh_frame

PUB, PUB2 = "203.0.113.1", "203.0.113.2"
IN1, IN2 = "10.0.0.1", "10.0.0.2"
REMOTE, REMOTE2, ROUTER = "198.51.100.7", "198.51.100.8", "192.0.2.254"
OUT, IN = 2, 3  # service path ids of tenant 1: outbound (spi & 1 == 0), inbound
ETH = Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02")
CONFIG: dict[str, Any] = {"public": [PUB]}
RANGE = (20000, 20299)  # 300 ports for 200 endpoints: hash collisions happen, probing must cope


class Pool:
    """NAT instances of one pool sharing one state: a real Redis, or one in-process store."""

    def __init__(self, backend: str, redis: Any = None, clock: Optional[Callable[[], float]] = None) -> None:
        self.backend, self.redis = backend, redis
        self.store: dict[str, Any] = {}
        self.clock = clock or time.monotonic

    def nat(self, config: Optional[dict[str, Any]] = None, name: str = "a") -> Nat:
        config = {**(config or CONFIG), "statelab": {"tenant": "red", "tenant_id": 1, "pool": "nat"}}
        if self.backend in ("redis", "cached"):  # cached: as the NF process opens it
            nf = Nat(config, self.redis.url("red"), name)
            if self.backend == "redis":
                nf._state = RedisState(self.redis.url("red"), "red", "nat", cache=False)
            return nf
        nf = Nat(config, None, name)
        nf._state = LocalState("red", "nat", store=self.store, clock=self.clock)
        return nf

    def claims(self) -> dict[str, str]:
        """Every live port claim: rev key (relative) -> inside endpoint."""
        prefix = "t:red:nat:"
        if self.backend != "local":
            r = self.redis.admin()
            return {k.decode()[len(prefix):]: r.get(k).decode() for k in r.keys(prefix + "rev:*")}
        now = self.clock()
        return {k[len(prefix):]: v.decode() for k, (v, exp) in self.store.items()
                if k.startswith(prefix + "rev:") and (not exp or exp > now)}


@pytest.fixture(params=["local", "redis", "cached"])
def pool(request) -> Pool:
    if request.param != "local":
        return Pool(request.param, request.getfixturevalue("redis_clean"))
    return Pool("local")


def frame(pkt: Any, spi: int) -> nsh.NshFrame:
    return nsh.NshFrame(b"", b"", spi, 255, 1, raw(pkt))


def out(nf: Nat, pkt: Any) -> Any:
    return nf.process([frame(pkt, OUT)])[0]


def inb(nf: Nat, pkt: Any) -> Any:
    return nf.process([frame(pkt, IN)])[0]


def src_of(verdict: bytes) -> tuple[str, int]:
    """(source address, source port or echo identifier) of a translated frame."""
    t = packet.parse(verdict).five_tuple()
    return t[0], t[3]


def udp_out(ip: str, port: int, dst: str = REMOTE, dport: int = 53, payload: bytes = b"query") -> Any:
    return ETH / IP(src=ip, dst=dst) / UDP(sport=port, dport=dport) / payload


L4_OUT = {"udp": lambda s: UDP(sport=s, dport=53) / b"query",
          "tcp": lambda s: TCP(sport=s, dport=80, flags="S", seq=1000, options=[("MSS", 1460)]),
          "icmp": lambda s: ICMP(type=8, id=s, seq=1) / b"ping"}
L4_IN = {"udp": lambda d: UDP(sport=53, dport=d) / b"answer",
         "tcp": lambda d: TCP(sport=80, dport=d, flags="SA", seq=5, ack=1001),
         "icmp": lambda d: ICMP(type=0, id=d, seq=1) / b"ping"}


# -- translation, byte-exact ------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
def test_outbound_source_and_reply_destination_are_rewritten_byte_exact(pool, proto) -> None:
    nf = pool.nat()
    v = out(nf, ETH / IP(src=IN1, dst=REMOTE, id=7) / L4_OUT[proto](5000))
    addr, port = src_of(v)
    assert addr == PUB and 1024 <= port <= 65535
    assert v == raw(ETH / IP(src=PUB, dst=REMOTE, id=7) / L4_OUT[proto](port))
    back = inb(nf, ETH / IP(src=REMOTE, dst=PUB, id=9) / L4_IN[proto](port))
    assert back == raw(ETH / IP(src=REMOTE, dst=IN1, id=9) / L4_IN[proto](5000))


def test_mapping_is_endpoint_independent_and_shared_by_instances(pool) -> None:
    a, b = pool.nat(name="a"), pool.nat(name="b")
    first = src_of(out(a, udp_out(IN1, 5000, REMOTE, 53)))
    assert src_of(out(b, udp_out(IN1, 5000, REMOTE2, 53))) == first        # other destination
    assert src_of(out(a, udp_out(IN1, 5000, REMOTE, 123))) == first        # other destination port
    others = {src_of(out(b, udp_out(IN1, 5001))), src_of(out(a, udp_out(IN2, 5000)))}
    assert first not in others and len(others) == 2
    # filtering is endpoint-independent too: a host never contacted reaches the mapping
    back = inb(b, ETH / IP(src=ROUTER, dst=PUB) / UDP(sport=9, dport=first[1]) / b"x")
    assert back == raw(ETH / IP(src=ROUTER, dst=IN1) / UDP(sport=9, dport=5000) / b"x")


def test_each_inside_address_keeps_one_public_address(pool) -> None:
    nf = pool.nat({"public": [PUB, PUB2]})
    by_host: dict[str, set[str]] = {}
    for i in range(40):
        ip = f"10.0.1.{i % 8}"
        by_host.setdefault(ip, set()).add(src_of(out(nf, udp_out(ip, 4000 + i)))[0])
    assert all(len(addrs) == 1 for addrs in by_host.values())      # paired pooling, RFC 4787 REQ-2
    assert set().union(*by_host.values()) == {PUB, PUB2}             # both addresses are used


def test_inbound_without_mapping_is_dropped(pool) -> None:
    nf = pool.nat()
    out(nf, udp_out(IN1, 5000))
    assert inb(nf, ETH / IP(src=REMOTE, dst=PUB) / UDP(sport=53, dport=4000)) == Drop("no_mapping")
    assert inb(nf, ETH / IP(src=REMOTE, dst=IN1) / UDP(sport=53, dport=5000)) == Drop("no_mapping")
    tcp_to_udp_port = src_of(out(nf, udp_out(IN1, 5001)))[1]
    assert inb(nf, ETH / IP(src=REMOTE, dst=PUB) / TCP(sport=80, dport=tcp_to_udp_port)) == Drop("no_mapping")
    assert inb(nf, ETH / IP(src=REMOTE, dst=PUB) / ICMP(type=0, id=1)) == Drop("no_mapping")


def test_hairpinning_between_two_inside_hosts(pool) -> None:
    nf = pool.nat()
    pub1 = src_of(out(nf, udp_out(IN1, 5000)))
    pub2 = src_of(out(nf, udp_out(IN2, 6000)))
    v = out(nf, ETH / IP(src=IN2, dst=PUB) / UDP(sport=6000, dport=pub1[1]) / b"hi")
    assert v == raw(ETH / IP(src=PUB, dst=IN1) / UDP(sport=pub2[1], dport=5000) / b"hi")
    v = out(nf, ETH / IP(src=IN1, dst=PUB) / UDP(sport=5000, dport=pub2[1]) / b"ho")
    assert v == raw(ETH / IP(src=PUB, dst=IN2) / UDP(sport=pub1[1], dport=6000) / b"ho")
    assert out(nf, ETH / IP(src=IN1, dst=PUB) / UDP(sport=5000, dport=4000)) == Drop("no_mapping")


# -- ICMP errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("quote", [28, None], ids=["ip+8", "whole"])
@pytest.mark.parametrize("proto,icmp_type,code",
                         [("udp", 3, 3), ("tcp", 11, 0), ("icmp", 11, 0), ("tcp", 3, 4)])
def test_inbound_icmp_error_is_translated_with_its_quote(pool, proto, icmp_type, code, quote) -> None:
    nf = pool.nat()
    sent = IP(src=IN1, dst=REMOTE, id=7, ttl=9) / L4_OUT[proto](5000)
    translated = out(nf, ETH / sent)[14:]
    err = ETH / IP(src=ROUTER, dst=PUB) / ICMP(type=icmp_type, code=code) / Raw(translated[:quote])
    expected = ETH / IP(src=ROUTER, dst=IN1) / ICMP(type=icmp_type, code=code) / Raw(raw(sent)[:quote])
    assert inb(nf, err) == raw(expected)


@pytest.mark.parametrize("quote", [28, None], ids=["ip+8", "whole"])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_outbound_icmp_error_about_an_inbound_packet_is_translated(pool, proto, quote) -> None:
    nf = pool.nat()
    port = src_of(out(nf, ETH / IP(src=IN1, dst=REMOTE) / L4_OUT[proto](5000)))[1]
    arrived = IP(src=REMOTE, dst=PUB, id=3) / L4_IN[proto](port)
    delivered = inb(nf, ETH / arrived)[14:]
    err = ETH / IP(src=IN1, dst=REMOTE) / ICMP(type=3, code=3) / Raw(delivered[:quote])
    expected = ETH / IP(src=PUB, dst=REMOTE) / ICMP(type=3, code=3) / Raw(raw(arrived)[:quote])
    assert out(nf, err) == raw(expected)


def test_icmp_errors_without_mapping_or_with_a_bad_quote_are_dropped(pool) -> None:
    nf = pool.nat()
    port = src_of(out(nf, udp_out(IN1, 5000)))[1]
    good = raw(IP(src=PUB, dst=REMOTE) / UDP(sport=port, dport=53))
    bad_sum = bytearray(good)
    bad_sum[10] ^= 0xFF
    unknown = raw(IP(src=PUB, dst=REMOTE) / UDP(sport=port + 1, dport=53))

    def err(quote: bytes, dst: str = PUB) -> Any:
        return ETH / IP(src=ROUTER, dst=dst) / ICMP(type=3, code=3) / Raw(quote)
    assert inb(nf, err(unknown[:28])) == Drop("no_mapping")
    assert inb(nf, err(good[:28], dst=IN1)) == Drop("no_mapping")
    assert inb(nf, err(good[:24])) == Drop("bad_icmp_quote")
    assert inb(nf, err(bytes(bad_sum[:28]))) == Drop("bad_icmp_quote")
    assert out(nf, ETH / IP(src=IN2, dst=REMOTE) / ICMP(type=3, code=3) /
               IP(src=REMOTE, dst=IN2) / UDP(sport=53, dport=7000)) == Drop("no_mapping")
    assert inb(nf, err(good[:28])) != Drop("no_mapping")  # the good one still works


# -- state: TTLs, refresh, batching, races ------------------------------------------------------

def test_mapping_lifetimes_follow_the_configured_timeouts(pool) -> None:
    timeouts = {"udp": 150, "tcp_established": 8000, "tcp_transitory": 250, "icmp": 70}
    nf = pool.nat({"public": [PUB], "timeouts": timeouts})
    udp_port = src_of(out(nf, udp_out(IN1, 5000)))[1]
    out(nf, ETH / IP(src=IN1, dst=REMOTE) / TCP(sport=5000, dport=80, flags="S"))
    out(nf, ETH / IP(src=IN1, dst=REMOTE) / ICMP(type=8, id=5000))

    def lifetimes() -> list[float]:
        b = nf.state.batch()
        refs = [b.pttl(f"map:{p}:{IN1}:5000") for p in ("udp", "tcp", "icmp")]
        refs.append(b.pttl(f"rev:udp:{PUB}:{udp_port}"))
        b.execute()
        return [round(r.value / 1000) for r in refs]
    assert lifetimes() == [150, 250, 70, 155]  # the port claim outlives its mapping by 5 s
    out(nf, ETH / IP(src=IN1, dst=REMOTE) / TCP(sport=5000, dport=80, flags="A"))  # established
    assert lifetimes() == [150, 8000, 70, 155]
    claims = pool.claims()
    assert len(claims) == 3 and set(claims.values()) == {f"{IN1}:5000"}


def test_traffic_refreshes_mappings_without_a_write_per_packet() -> None:
    now = [1000.0]
    pool = Pool("local", clock=lambda: now[0])
    nf = pool.nat({"public": [PUB], "timeouts": {"udp": 200}})
    port = src_of(out(nf, udp_out(IN1, 5000)))[1]
    reply = ETH / IP(src=REMOTE, dst=PUB) / UDP(sport=53, dport=port)
    now[0] += 90                                         # 110 s left: more than half, no write
    ops, trips = nf.state.ops, nf.state.round_trips
    assert src_of(out(nf, udp_out(IN1, 5000)))[1] == port
    assert (nf.state.ops - ops, nf.state.round_trips - trips) == (2, 1)  # get + pttl
    now[0] += 20                                         # 90 s left: refreshed to 200 s
    out(nf, udp_out(IN1, 5000))
    assert nf.state.round_trips - trips == 3
    now[0] += 190
    assert inb(nf, reply) != Drop("no_mapping")          # inbound UDP does not refresh (REQ-6)...
    now[0] += 16
    assert inb(nf, reply) == Drop("no_mapping")          # ...gone 200 s (+5 s claim margin) after
    assert pool.claims() == {}
    # TCP: refreshed by traffic either way, established connections live 7440 s
    tport = src_of(out(nf, ETH / IP(src=IN1, dst=REMOTE) / TCP(sport=6000, dport=80, flags="S")))[1]
    tcp_in = ETH / IP(src=REMOTE, dst=PUB) / TCP(sport=80, dport=tport, flags="A")
    syn_ack = ETH / IP(src=REMOTE, dst=PUB) / TCP(sport=80, dport=tport, flags="SA")
    assert inb(nf, syn_ack) != Drop("no_mapping")
    now[0] += 200
    assert inb(nf, tcp_in) != Drop("no_mapping")        # 40 s left of 240: now 7440
    now[0] += 7000
    assert inb(nf, tcp_in) != Drop("no_mapping")
    now[0] += 7000
    assert inb(nf, tcp_in) != Drop("no_mapping")
    now[0] += 7446                                       # 7440 s + 5 s claim margin
    assert inb(nf, tcp_in) == Drop("no_mapping")


def test_a_batch_of_new_flows_takes_few_round_trips(pool) -> None:
    nf = pool.nat()
    flows = [frame(udp_out(IN1, 10000 + i), OUT) for i in range(64)]
    trips, ops = nf.state.round_trips, nf.state.ops
    with (pool.redis.seen() if pool.backend == "redis" else contextlib.nullcontext({})) as server:
        first = [src_of(v) for v in nf.process(flows)]
    assert nf.state.round_trips - trips <= 4  # read, claim, publish (+1 if two flows collided)
    if pool.backend == "redis":  # the server saw exactly the operations the client counted
        assert "script|exists" not in server["commands"]
        setup = {"hello", "auth", "client|setinfo", "client|tracking"}  # the first batch also opens the connection
        assert sum(n for k, n in server["commands"].items() if k not in setup) == nf.state.ops - ops
    assert len(set(first)) == 64
    trips, ops = nf.state.round_trips, nf.state.ops
    with (pool.redis.seen() if pool.backend != "local" else contextlib.nullcontext({})) as server:
        assert [src_of(v) for v in nf.process(flows)] == first
    if pool.backend == "cached":  # the mappings it just made are cached: the server sees nothing
        assert (nf.state.round_trips - trips, nf.state.ops - ops) == (0, 128)
        assert server["commands"] == {} and nf.state.cache_hits >= 128
        other = pool.nat(name="b")  # a second instance reads them once, then has them too
        with pool.redis.seen() as server:
            assert [src_of(v) for v in other.process(flows)] == first
            assert [src_of(v) for v in other.process(flows)] == first
        assert other.state.round_trips == 1
        assert server["commands"] == {"get": 64, "pttl": 64, "hello": 1, "client|tracking": 1}  # + connecting
        return
    assert (nf.state.round_trips - trips, nf.state.ops - ops) == (1, 128)
    if pool.backend == "redis":  # counted by the server too: nothing hidden
        assert server["commands"] == {"get": 64, "pttl": 64}
        assert 1 <= server["read_events"] <= 2


def test_packets_of_one_new_flow_in_one_batch_share_the_mapping(pool) -> None:
    nf = pool.nat()
    got = nf.process([frame(udp_out(IN1, 5000, dport=53 + i), OUT) for i in range(5)])
    assert len({src_of(v) for v in got}) == 1 and len(pool.claims()) == 1


def test_two_instances_never_hand_out_the_same_port(pool) -> None:
    config = {"public": [PUB], "ports": list(RANGE)}
    a, b = pool.nat(config, "a"), pool.nat(config, "b")
    eps = [(f"10.0.{k // 50}.{k % 50 + 1}", 3000 + k) for k in range(200)]
    got: dict[tuple[str, int], tuple[str, int]] = {}
    for n in range(0, 200, 10):
        nf = (a, b)[n // 10 % 2]
        for ep, v in zip(eps[n:n + 10], nf.process([frame(udp_out(*ep), OUT) for ep in eps[n:n + 10]])):
            got[ep] = src_of(v)
    assert len(set(got.values())) == 200
    assert all(RANGE[0] <= port <= RANGE[1] for _, port in got.values())
    claims = pool.claims()
    assert claims == {f"rev:udp:{addr}:{port}": f"{ip}:{p}" for (ip, p), (addr, port) in got.items()}
    for n in range(0, 200, 10):  # each seen again by the other instance: the same mapping
        nf = (b, a)[n // 10 % 2]
        assert [src_of(v) for v in nf.process([frame(udp_out(*ep), OUT) for ep in eps[n:n + 10]])] == \
            [got[ep] for ep in eps[n:n + 10]]


def _interleave(nf: Nat, after: int, action: Callable[[], None]) -> None:
    """Run ``action`` (another instance's work) right after ``nf``'s ``after``-th round trip."""
    real = nf.state._execute
    count = [0]

    def hooked(ops):
        result = real(ops)
        count[0] += 1
        if count[0] == after:
            action()
        return result
    nf.state._execute = hooked


def test_race_for_one_endpoint_between_read_and_claim(pool) -> None:
    a, b = pool.nat(name="a"), pool.nat(name="b")
    theirs: list[tuple[str, int]] = []
    _interleave(a, 1, lambda: theirs.append(src_of(out(b, udp_out(IN1, 5000)))))
    assert [src_of(out(a, udp_out(IN1, 5000)))] == theirs
    assert list(pool.claims().values()) == [f"{IN1}:5000"]


def test_lost_race_for_the_mapping_releases_the_claimed_port(pool) -> None:
    a, c = pool.nat(name="a"), pool.nat(name="c")

    def other_instance_publishes() -> None:  # as if it had claimed port 30000 meanwhile
        batch = c.state.batch()
        batch.set(f"rev:udp:{PUB}:30000", f"{IN1}:5000", ttl=300, nx=True)
        batch.set(f"map:udp:{IN1}:5000", f"{PUB}:30000", ttl=300, nx=True)
        batch.execute()
    _interleave(a, 2, other_instance_publishes)  # after a's claim, before a publishes
    assert src_of(out(a, udp_out(IN1, 5000))) == (PUB, 30000)
    assert pool.claims() == {f"rev:udp:{PUB}:30000": f"{IN1}:5000"}


def test_probing_finds_the_last_free_port_then_ports_run_out(pool) -> None:
    config = {"public": [PUB], "ports": [20000, 20007]}
    a, c = pool.nat(config, "a"), pool.nat(config, "c")

    def others_take_all_but_one() -> None:
        batch = c.state.batch()
        for port in range(20000, 20007):
            batch.set(f"rev:udp:{PUB}:{port}", f"10.9.9.9:{port}", ttl=300, nx=True)
        batch.execute()
    _interleave(a, 1, others_take_all_but_one)
    assert src_of(out(a, udp_out(IN1, 5000))) == (PUB, 20007)
    assert out(a, udp_out(IN1, 5001)) == Drop("ports_exhausted")
    assert len(pool.claims()) == 8


def test_state_unavailable_forwards_nothing() -> None:
    nf = Pool("local").nat()
    known = udp_out(IN1, 5000)
    out(nf, known)
    nf.state.available = False
    with pytest.raises(StateUnavailable):  # the runtime drops the whole batch: fail closed
        nf.process([frame(known, OUT), frame(udp_out(IN2, 5000), OUT)])


# -- bad input -----------------------------------------------------------------------------------

def _corrupt(pkt: Any, offset: int) -> bytes:
    b = bytearray(raw(pkt))
    b[offset] ^= 0xFF
    return bytes(b)


BAD = {
    "truncated_ipv4": raw(udp_out(IN1, 5000))[:30],
    "bad_ip_checksum": _corrupt(udp_out(IN1, 5000), 24),
    "bad_l4_checksum": _corrupt(udp_out(IN1, 5000), 14 + 20 + 6),
    "bad_tcp_offset": raw(ETH / IP(src=IN1, dst=REMOTE) / TCP(sport=1, dport=2, dataofs=15)),
    "bad_ip_version": raw(ETH / IP(src=IN1, dst=REMOTE, version=6) / UDP()),
    "not_ipv4": raw(ETH / ARP(pdst=REMOTE)),
    "fragment": raw(ETH / IP(src=IN1, dst=REMOTE, flags="MF") / UDP(sport=5000) / (b"x" * 64)),
    "unsupported_protocol": raw(ETH / IP(src=IN1, dst=REMOTE, proto=47) / b"gre-ish"),
    "unsupported_icmp": raw(ETH / IP(src=IN1, dst=REMOTE) / ICMP(type=13)),
    "bad_icmp_quote": raw(ETH / IP(src=IN1, dst=REMOTE) / ICMP(type=3, code=3) / b"\x45\x00"),
}


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_packets_are_dropped_with_a_reason_and_the_batch_goes_on(pool, reason) -> None:
    nf = pool.nat()
    good = udp_out(IN1, 5000)
    verdicts = nf.process([frame(BAD[reason], OUT), frame(good, OUT), frame(BAD[reason], IN)])
    assert verdicts[0] == verdicts[2] == Drop(reason)
    assert src_of(verdicts[1])[0] == PUB


# -- config --------------------------------------------------------------------------------------

def test_config_schema_is_strict_and_documented() -> None:
    jsonschema.Draft202012Validator.check_schema(CONFIG_SCHEMA)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, path
            for name, sub in node.get("properties", {}).items():
                assert sub.get("description"), f"{path}.{name} has no description"
                walk(sub, f"{path}.{name}")
            walk(node.get("items"), path + "[]")
    walk(CONFIG_SCHEMA, "config")
    example = {"public": [PUB, PUB2], "ports": [1024, 65535],
               "timeouts": {"udp": 120, "tcp_established": 7440, "tcp_transitory": 240, "icmp": 60}}
    jsonschema.validate(example, CONFIG_SCHEMA)
    jsonschema.validate({"public": [PUB]}, CONFIG_SCHEMA)


@pytest.mark.parametrize("change", [
    {"timeouts": {"udp": 119}},                 # RFC 4787 REQ-5
    {"timeouts": {"tcp_established": 7439}},    # RFC 5382 REQ-5
    {"timeouts": {"tcp_transitory": 239}},      # RFC 5382 REQ-5
    {"timeouts": {"icmp": 59}},                 # RFC 5508
    {"timeouts": {"sctp": 300}},
    {"public": []}, {"public": ["300.1.1.1"]}, {"public": ["2001:db8::1"]},
    {"ports": [0, 100]}, {"ports": [1024, 65536]}, {"ports": [1024]}, {"ports": [1, 2, 3]},
    {"nat_type": "symmetric"},
], ids=str)
def test_config_outside_the_rfcs_is_rejected(change) -> None:
    config = {**copy.deepcopy(CONFIG), **change}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, CONFIG_SCHEMA)
    with pytest.raises(ValueError, match="nat config"):
        Nat(config, None, "x")


def test_missing_public_address_or_empty_port_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="'public' is a required property"):
        Nat({}, None, "x")
    with pytest.raises(ValueError, match="lowest port 2000 is above highest port 1000"):
        Nat({"public": [PUB], "ports": [2000, 1000]}, None, "x")


# -- real processes -------------------------------------------------------------------------------

def _translate_many(proc, inner: list[bytes], spi: int = OUT) -> None:
    for i, f in enumerate(inner):
        proc.send(nsh_frame(f, spi=spi))
        if i % 50 == 49:
            time.sleep(0.01)


def _replies(proc) -> dict[bytes, tuple[str, int]]:
    """Translated source of each reply to what was sent, by UDP payload (the test's flow id)."""
    got: dict[bytes, tuple[str, int]] = {}
    for f in proc.receive():
        inner = nsh.parse(f).inner
        p = packet.parse(inner)
        got[inner[p.l4 + 8:p.end]] = src_of(inner)
    return got


@pytest.mark.root
def test_instances_and_processes_together_never_hand_out_the_same_port(nf_process, redis_clean) -> None:
    config = {"public": [PUB], "ports": list(RANGE)}
    pool = Pool("redis", redis_clean)
    procs = [nf_process("nat", config, redis_clean.url("red")) for _ in range(2)]
    objs = [pool.nat(config, "a"), pool.nat(config, "b")]
    eps = {f"flow{k}".encode(): (f"10.1.{k // 50}.{k % 50 + 1}", 7000 + k) for k in range(200)}
    names = list(eps)
    for i, proc in enumerate(procs):  # the processes work while the in-process instances do
        _translate_many(proc, [raw(udp_out(*eps[n], payload=n)) for n in names[i * 50:(i + 1) * 50]])
    got: dict[bytes, tuple[str, int]] = {}
    for i, nf in enumerate(objs):
        for n0 in range(100 + i * 50, 150 + i * 50, 10):
            batch = names[n0:n0 + 10]
            for n, v in zip(batch, nf.process([frame(udp_out(*eps[n], payload=n), OUT) for n in batch])):
                got[n] = src_of(v)
    for proc in procs:
        got.update(_replies(proc))
    assert len(got) == 200 and len(set(got.values())) == 200
    assert pool.claims() == {f"rev:udp:{a}:{p}": "%s:%d" % eps[n] for n, (a, p) in got.items()}


@pytest.mark.root
def test_two_processes_racing_for_the_same_endpoints_agree(nf_process, redis_clean) -> None:
    config = {"public": [PUB], "ports": list(RANGE)}
    p, q = (nf_process("nat", config, redis_clean.url("red")) for _ in range(2))
    flows = [raw(udp_out(f"10.2.0.{k + 1}", 8000 + k, payload=f"flow{k}".encode())) for k in range(100)]
    for i in range(0, 100, 25):  # each flow's first packet reaches both processes at once
        for f in flows[i:i + 25]:
            p.send(nsh_frame(f))
            q.send(nsh_frame(f))
        time.sleep(0.01)
    from_p, from_q = _replies(p), _replies(q)
    assert len(from_p) == len(from_q) == 100
    assert from_p == from_q and len(set(from_p.values())) == 100
    assert len(Pool("redis", redis_clean).claims()) == 100  # no claim leaked by a lost race


@pytest.mark.root
def test_flow_handled_by_two_processes_behaves_as_one(nf_process, redis_clean) -> None:
    p, q = (nf_process("nat", CONFIG, redis_clean.url("red")) for _ in range(2))
    sent = udp_out(IN1, 5000)
    first = p.exchange(raw(sent), spi=OUT)
    assert first is not None and first.si == 254
    port = src_of(first.inner)[1]
    assert first.inner == raw(ETH / IP(src=PUB, dst=REMOTE) / UDP(sport=port, dport=53) / b"query")
    back = q.exchange(raw(ETH / IP(src=REMOTE, dst=PUB) / UDP(sport=53, dport=port) / b"a"), spi=IN)
    assert back is not None
    assert back.inner == raw(ETH / IP(src=REMOTE, dst=IN1) / UDP(sport=53, dport=5000) / b"a")
    assert src_of(q.exchange(raw(sent), spi=OUT).inner) == (PUB, port)
    assert q.exchange(raw(ETH / IP(src=REMOTE, dst=PUB) / UDP(sport=53, dport=port ^ 1)), spi=IN) is None
    assert q.counters()["drops"] == {"no_mapping": 1}


@pytest.mark.root
def test_mappings_survive_the_instance_that_made_them_being_killed(nf_process, redis_clean) -> None:
    """CONT-3: each flow's public address and port are the same before and after the kill."""
    p, q = (nf_process("nat", CONFIG, redis_clean.url("red")) for _ in range(2))
    flows = {f"k{k}".encode(): (f"10.3.0.{k + 1}", 9000 + k) for k in range(20)}
    _translate_many(p, [raw(udp_out(*ep, payload=n)) for n, ep in flows.items()])
    before = _replies(p)
    assert len(before) == 20
    p.kill()
    _translate_many(q, [raw(udp_out(*ep, payload=n)) for n, ep in flows.items()])
    assert _replies(q) == before
    _translate_many(q, [raw(ETH / IP(src=REMOTE, dst=a) / UDP(sport=53, dport=port) / n)
                        for n, (a, port) in before.items()], spi=IN)
    arrived = {}
    for f in q.receive():
        inner = nsh.parse(f).inner
        t = packet.parse(inner).five_tuple()
        arrived[inner[14 + 28:]] = (t[1], t[4])
    assert arrived == flows


def _with_sums(b: bytearray) -> bytes:
    """Make the IPv4 header checksum and the ICMP/TCP/UDP checksum right again after a mutation."""
    ihl = (b[14] & 0xF) * 4
    if ihl < 20 or len(b) < 14 + ihl:
        return bytes(b)
    b[24:26] = bytes(2)
    b[24:26] = packet.checksum(bytes(b[14:14 + ihl])).to_bytes(2, "big")
    l4, end, proto = 14 + ihl, min(14 + int.from_bytes(b[16:18], "big"), len(b)), b[23]
    at = {1: l4 + 2, 6: l4 + 16, 17: l4 + 6}.get(proto)
    if at is not None and at + 2 <= end:
        b[at:at + 2] = bytes(2)
        pseudo = b"" if proto == 1 else bytes(b[26:34]) + bytes([0, proto]) + (end - l4).to_bytes(2, "big")
        b[at:at + 2] = packet.checksum(pseudo + bytes(b[l4:end])).to_bytes(2, "big")
    return bytes(b)


def _mutants(n: int, port: int) -> list[bytes]:
    """Valid packets (to the known mapping ``port`` too) with a few random bytes changed, some cut
    short, checksums made right so that they get past the header checks into the NAT's logic."""
    rng = random.Random(4787)
    templates = [
        raw(udp_out(IN1, 5000)),
        raw(ETH / IP(src=REMOTE, dst=PUB) / TCP(sport=80, dport=port, flags="A") / b"data"),
        raw(ETH / IP(src=ROUTER, dst=PUB) / ICMP(type=3, code=3) / IP(src=PUB, dst=REMOTE) /
            UDP(sport=port, dport=53)),
        raw(ETH / IP(src=ROUTER, dst=PUB) / ICMP(type=11) / IP(src=PUB, dst=REMOTE) /
            TCP(sport=port, dport=80)),
        raw(ETH / IP(src=IN1, dst=REMOTE) / ICMP(type=3, code=3) / IP(src=REMOTE, dst=IN1) /
            UDP(sport=53, dport=5000)),
    ]
    mutants = []
    for _ in range(n):
        b = bytearray(rng.choice(templates))
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(14, len(b))] = rng.randrange(256)
        if rng.random() < 0.2:
            b = b[:rng.randrange(15, len(b))]
        mutants.append(_with_sums(b))
    return mutants


@pytest.mark.root
def test_fuzz_is_dropped_and_counted_and_the_process_survives(nf_process, redis_clean) -> None:
    nf = nf_process("nat", CONFIG, redis_clean.url("red"))
    port = src_of(nf.exchange(raw(udp_out(IN1, 5000)), spi=OUT).inner)[1]
    frames = [raw(fuzz(ETH / IP(src=IN1) / UDP())) for _ in range(100)]
    frames += [raw(fuzz(ETH / IP(dst=PUB) / TCP())) for _ in range(100)]
    frames += [raw(fuzz(ETH / IP(dst=PUB) / ICMP(type=3) / IP(src=PUB) / UDP())) for _ in range(100)]
    frames += _mutants(1800, port) + list(BAD.values())
    nf.send_bursts([nsh_frame(f[:1400], spi=OUT if i % 2 else IN) for i, f in enumerate(frames)])
    nf.receive()
    assert nf.alive()
    reply = nf.exchange(raw(udp_out(IN2, 5000)), spi=OUT)
    assert reply is not None and src_of(reply.inner)[0] == PUB
    c = nf.counters()
    assert c["rx"] == len(frames) + 2 and c["dropped"] + c["tx"] == c["rx"]
    assert "nf_error" not in c["drops"] and c["dropped"] > len(frames) // 3
    assert {"no_mapping", "bad_icmp_quote", "bad_ip_checksum"} <= set(c["drops"])


@pytest.mark.root
def test_process_without_state_server_forwards_nothing(nf_process) -> None:
    nf = nf_process("nat", CONFIG, "redis://tenant-red:wrong@127.0.0.1:1/0")
    assert nf.exchange(raw(udp_out(IN1, 5000)), spi=OUT) is None
    assert nf.alive() and nf.counters()["drops"] == {"state_unavailable": 1}
