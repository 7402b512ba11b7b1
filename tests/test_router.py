"""The router NF: longest-prefix match, TTL and MAC rewrite byte-exact, ICMP errors (RFC 792,
RFC 1812), no state, bad input; in process and as real processes."""

from __future__ import annotations

import ipaddress
import random

import jsonschema
import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw, fuzz

from nfs import nsh
from nfs.runtime import Reply
from nfs.router import CONFIG_SCHEMA, Route, Router, RouteTable
from nfs.runtime import Drop
from nfs.state import LocalState
from tests.nfharness import nsh_frame

ROUTER_MAC, ROUTER_IP = "02:00:00:00:00:fe", "10.0.0.254"
HOST_MAC, HOST_IP = "02:00:00:00:00:05", "10.0.0.5"
CONNECTED_MAC, NH2_MAC, NH3_MAC, DEFAULT_MAC = ("02:00:00:00:00:02", "02:00:00:01:00:02",
                                                "02:00:00:01:00:03", "02:00:00:01:00:01")
CONFIG = {
    "mac": ROUTER_MAC,
    "address": ROUTER_IP,
    "routes": [
        {"prefix": "10.0.0.0/24", "mac": CONNECTED_MAC},
        {"prefix": "10.1.0.0/16", "via": "10.0.0.2", "mac": NH2_MAC},
        {"prefix": "10.1.2.0/24", "via": "10.0.0.3", "mac": NH3_MAC},
        {"prefix": "0.0.0.0/0", "via": "10.0.0.1", "mac": DEFAULT_MAC},
    ],
}
NO_DEFAULT = {**CONFIG, "routes": CONFIG["routes"][:3]}


def frame(dst: str, l4=None, ttl: int = 64, src: str = HOST_IP, eth_dst: str = ROUTER_MAC, **ip):
    return Ether(src=HOST_MAC, dst=eth_dst) / IP(src=src, dst=dst, ttl=ttl, **ip) / (
        l4 if l4 is not None else UDP(sport=4000, dport=53) / b"query")


def route(nf: Router, pkt) -> object:
    """One packet through the NF the way the runtime hands it over (a Reply unwrapped: what
    the router itself sends back toward the sender)."""
    verdict = nf.process([nsh.parse(nsh_frame(raw(pkt)))])[0]
    return verdict.frame if isinstance(verdict, Reply) else verdict


def forwarded(pkt, mac: str) -> bytes:
    """What the router must send: TTL - 1, checksum recomputed, MACs rewritten."""
    want = pkt.copy()
    want[Ether].src, want[Ether].dst = ROUTER_MAC, mac
    want[IP].ttl, want[IP].chksum = pkt[IP].ttl - 1, None
    return raw(want)


def icmp_from_router(pkt, icmp_type: int, code: int) -> bytes:
    """The ICMP error the router must send about ``pkt``: IP header + 8 bytes quoted (RFC 792)."""
    orig = raw(pkt[IP])
    quote = orig[:IP(orig).ihl * 4 + 8]
    return raw(Ether(src=ROUTER_MAC, dst=HOST_MAC) / IP(src=ROUTER_IP, dst=pkt[IP].src, ttl=64, id=0) /
               ICMP(type=icmp_type, code=code) / Raw(quote))


@pytest.fixture
def router() -> Router:
    return Router(CONFIG, None, "red-rt-1")


# -- 1. semantics, byte-exact ------------------------------------------------------------

@pytest.mark.parametrize("dst, mac", [("10.1.2.3", NH3_MAC),      # /24 beats /16 and /0
                                      ("10.1.9.9", NH2_MAC),      # /16
                                      ("10.0.0.77", CONNECTED_MAC),
                                      ("203.0.113.9", DEFAULT_MAC)])
@pytest.mark.parametrize("l4", [TCP(sport=40000, dport=80, flags="S", seq=1) / b"x",
                                UDP(sport=4000, dport=53) / b"query",
                                ICMP(type=8, id=7, seq=1) / b"ping"], ids=["tcp", "udp", "icmp"])
def test_forwards_by_longest_prefix_with_ttl_and_macs_rewritten(router, dst, mac, l4) -> None:
    pkt = frame(dst, l4, ttl=64)
    assert route(router, pkt) == forwarded(pkt, mac)


def test_ttl_2_leaves_with_ttl_1_and_options_kept(router) -> None:
    pkt = frame("10.1.2.3", ttl=2, options=[IPOption_RR(routers=["192.0.2.1"])], tos=0x10, flags="DF")
    out = route(router, pkt)
    assert out == forwarded(pkt, NH3_MAC)
    assert Ether(out)[IP].ttl == 1


@pytest.mark.parametrize("ttl", [1, 0])
@pytest.mark.parametrize("l4", [TCP(sport=40000, dport=80, flags="S") / (b"y" * 100),
                                UDP(sport=33434, dport=33434),     # traceroute probe
                                ICMP(type=8, id=9, seq=3) / b"ping"], ids=["tcp", "udp", "echo"])
def test_ttl_expired_gets_time_exceeded_to_sender(router, ttl, l4) -> None:
    pkt = frame("10.1.2.3", l4, ttl=ttl)
    out = route(router, pkt)
    assert out == icmp_from_router(pkt, 11, 0)
    reply = Ether(out)
    assert (reply[ICMP].type, reply[ICMP].code, reply[IP].dst) == (11, 0, HOST_IP)


def test_quote_covers_options_plus_8_bytes(router) -> None:
    pkt = frame("10.1.2.3", TCP(sport=1, dport=2) / (b"z" * 50), ttl=1, options=[IPOption_RR()])
    out = route(router, pkt)
    assert out == icmp_from_router(pkt, 11, 0)
    assert len(Ether(out)[ICMP].payload) == IP(raw(pkt[IP])).ihl * 4 + 8 > 28


def test_no_route_gets_net_unreachable() -> None:
    nf = Router(NO_DEFAULT, None, "red-rt-1")
    pkt = frame("203.0.113.9", TCP(sport=40000, dport=443, flags="S"))
    assert route(nf, pkt) == icmp_from_router(pkt, 3, 0)


def test_no_route_wins_over_ttl() -> None:  # as Linux: the route lookup comes first
    nf = Router(NO_DEFAULT, None, "red-rt-1")
    pkt = frame("203.0.113.9", ttl=1)
    assert route(nf, pkt) == icmp_from_router(pkt, 3, 0)


@pytest.mark.parametrize("pkt, reason", [
    # an ICMP error about an ICMP error (RFC 1812 §4.3.2.7)
    (frame("10.1.2.3", ICMP(type=3, code=1) / IP(src="10.1.2.3", dst=HOST_IP) / UDP(), ttl=1), "ttl_exceeded"),
    (frame("10.1.2.3", ICMP(type=11, code=0) / IP(src="10.1.2.3", dst=HOST_IP) / UDP(), ttl=1), "ttl_exceeded"),
    # a non-first fragment
    (frame("10.1.2.3", Raw(b"f" * 16), ttl=1, proto=17, frag=3), "ttl_exceeded"),
    # sent to a link-layer broadcast or multicast address
    (frame("10.1.2.3", ttl=1, eth_dst="ff:ff:ff:ff:ff:ff"), "ttl_exceeded"),
    (frame("10.1.2.3", ttl=1, eth_dst="01:00:5e:00:00:05"), "ttl_exceeded"),
    # a directed broadcast of a connected network
    (frame("10.0.0.255", ttl=1), "ttl_exceeded"),
    # to multicast or limited broadcast: not forwarded at all, never an ICMP error
    (frame("224.0.0.5", ttl=1), "not_unicast"),
    (frame("239.1.2.3", ttl=64), "not_unicast"),
    (frame("255.255.255.255", ttl=1), "not_unicast"),
    # from an address that is not one host (RFC 1812 §5.3.7)
    (frame("10.1.2.3", src="0.0.0.0"), "martian_source"),
    (frame("10.1.2.3", src="127.0.0.1"), "martian_source"),
    (frame("10.1.2.3", src="224.0.0.1", ttl=1), "martian_source"),
    (frame("10.1.2.3", src="255.255.255.255", ttl=1), "martian_source"),
])
def test_no_icmp_error_about_errors_fragments_broadcast_multicast(router, pkt, reason) -> None:
    assert route(router, pkt) == Drop(reason)


def test_no_unreachable_about_an_icmp_error() -> None:
    nf = Router(NO_DEFAULT, None, "red-rt-1")
    pkt = frame("203.0.113.9", ICMP(type=3, code=3) / IP(src="203.0.113.9", dst=HOST_IP) / UDP())
    assert route(nf, pkt) == Drop("no_route")


def test_first_fragment_still_gets_time_exceeded(router) -> None:
    pkt = frame("10.1.2.3", UDP(sport=5, dport=6, chksum=0x1234) / (b"q" * 32), ttl=1, flags="MF")
    assert route(router, pkt) == icmp_from_router(pkt, 11, 0)


def test_answers_echo_to_its_own_address_and_drops_the_rest(router) -> None:
    ping = frame(ROUTER_IP, ICMP(type=8, id=0x4242, seq=7) / b"are you there", ttl=1)
    want = Ether(src=ROUTER_MAC, dst=HOST_MAC) / IP(src=ROUTER_IP, dst=HOST_IP, ttl=64, id=0) / \
        ICMP(type=0, id=0x4242, seq=7) / b"are you there"
    assert route(router, ping) == raw(want)
    assert route(router, frame(ROUTER_IP, TCP(sport=1, dport=22, flags="S"))) == Drop("for_router")


@pytest.mark.parametrize("pkt", [Ether(src=HOST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.0.254"),
                                 Ether(src=HOST_MAC, dst=ROUTER_MAC) / IPv6(dst="2001:db8::1") / UDP()],
                         ids=["arp", "ipv6"])
def test_non_ipv4_is_dropped(router, pkt) -> None:
    assert route(router, pkt) == Drop("not_ipv4")


def test_lookup_matches_brute_force_longest_prefix() -> None:
    rng = random.Random(1812)
    nets = {ipaddress.IPv4Network((rng.getrandbits(32), n), strict=False) for n in rng.choices(range(33), k=300)}
    table = RouteTable(Route(net, bytes(6)) for net in nets)
    probes = [rng.getrandbits(32) for _ in range(2000)]
    probes += [int(net.network_address) for net in nets] + [int(net.broadcast_address) for net in nets]
    for addr in probes:
        matching = [n for n in nets if ipaddress.IPv4Address(addr) in n]
        want = max(matching, key=lambda n: n.prefixlen) if matching else None
        got = table.lookup(addr)
        assert (got.prefix if got else None) == want, ipaddress.IPv4Address(addr)


def test_config_schema_accepts_the_documented_form_and_rejects_typos() -> None:
    jsonschema.Draft202012Validator.check_schema(CONFIG_SCHEMA)
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA)
    validator.validate(CONFIG)
    for bad in ({**CONFIG, "rutes": []},
                {**CONFIG, "mac": 1234},
                {**CONFIG, "routes": [{"prefix": "10.1.0.0/33", "mac": NH2_MAC}]},
                {**CONFIG, "routes": [{"prefix": "10.1.0.0/16", "via": "10.0.0.300", "mac": NH2_MAC}]},
                {k: v for k, v in CONFIG.items() if k != "address"}):
        assert not validator.is_valid(bad), bad


@pytest.mark.parametrize("routes, words", [
    ([{"prefix": "10.1.0.1/16", "mac": NH2_MAC}], "host bits"),
    ([{"prefix": "10.1.0.0/16", "mac": "02:00"}], "not a MAC"),
    ([{"prefix": "10.1.0.0/16", "mac": NH2_MAC}, {"prefix": "10.1.0.0/16", "mac": NH3_MAC}], "twice"),
])
def test_bad_routes_fail_at_start_with_the_route_named(routes, words) -> None:
    with pytest.raises(ValueError, match=words):
        Router({**CONFIG, "routes": routes}, None, "red-rt-1")


# -- 2./3. any instance routes the same; 5. no state, so nothing to fail -----------------

MIX = [frame("10.1.2.3", TCP(sport=40000, dport=80, flags="S")), frame("10.1.2.3", ttl=1),
       frame("8.8.8.8", ICMP(type=8)), frame(ROUTER_IP, ICMP(type=8) / b"hi"), frame("224.0.0.1")]


def test_two_instances_route_every_packet_the_same() -> None:
    a, b = Router(CONFIG, None, "red-rt-1"), Router(CONFIG, None, "red-rt-2")
    frames = [nsh.parse(nsh_frame(raw(p))) for p in MIX]
    assert a.process(frames) == b.process(frames) == Router(CONFIG, None, "x").process(frames)


def test_keeps_no_state_so_a_state_outage_changes_nothing() -> None:
    nf = Router(CONFIG, None, "red-rt-1")
    down = LocalState("red", "rt")
    down.available = False
    nf._state = down
    assert [route(nf, p) for p in MIX] == [route(Router(CONFIG, None, "x"), p) for p in MIX]
    assert (down.ops, down.round_trips) == (0, 0)


# -- 4. bad input, in process ------------------------------------------------------------

def _bad_checksum(pkt, offset: int) -> bytes:
    b = bytearray(raw(pkt))
    b[offset] ^= 0xFF
    return bytes(b)


GOOD = frame("10.1.2.3", TCP(sport=40000, dport=80, flags="S"))
BAD = {
    "truncated_inner": raw(GOOD)[:10],
    "truncated_ipv4": raw(GOOD)[:30],
    "bad_ip_version": raw(Ether(src=HOST_MAC) / IP(version=6, dst="10.1.2.3") / UDP()),
    "bad_ip_header_length": raw(Ether(src=HOST_MAC) / IP(ihl=15, dst="10.1.2.3") / UDP())[:40],
    "bad_ip_total_length": raw(Ether(src=HOST_MAC) / IP(len=400, dst="10.1.2.3") / UDP()),
    "bad_ip_checksum": _bad_checksum(GOOD, 24),
    "truncated_tcp": raw(Ether(src=HOST_MAC) / IP(dst="10.1.2.3", proto=6) / b"\x00\x01\x00\x02"),
    "bad_tcp_offset": raw(Ether(src=HOST_MAC) / IP(dst="10.1.2.3") / TCP(dataofs=15)),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_malformed_packets_are_dropped_with_their_reason(router, reason) -> None:
    out = router.process([nsh.NshFrame(b"", b"", 2, 255, 1, BAD[reason])])
    assert out == [Drop(reason)]


@pytest.mark.parametrize("l4, at", [(TCP(sport=40000, dport=80, flags="PA") / b"data", 16),
                                    (UDP(sport=4000, dport=53) / b"query", 6),
                                    (ICMP(type=8, id=7) / b"ping", 2)], ids=["tcp", "udp", "icmp"])
def test_transit_packets_with_bad_transport_checksums_are_forwarded(router, l4, at) -> None:
    """RFC 1812: the router checks the IP header, not the end-to-end checksum: forwarded as it
    came (TTL - 1, header checksum recomputed, the bad transport checksum left alone)."""
    bad = Ether(_bad_checksum(frame("10.1.2.3", l4), 14 + 20 + at))
    assert route(router, bad) == forwarded(bad, NH3_MAC)
    expired = Ether(_bad_checksum(frame("10.1.9.9", l4, ttl=1), 14 + 20 + at))
    assert route(router, expired) == icmp_from_router(expired, 11, 0)  # still told, quoting it


def test_bad_checksum_to_the_router_itself_is_dropped(router) -> None:
    ping = Ether(_bad_checksum(frame(ROUTER_IP, ICMP(type=8, id=7) / b"ping"), 14 + 20 + 2))
    assert route(router, ping) == Drop("bad_l4_checksum")  # RFC 1122 §3.2.2: silently discarded


def test_fuzzed_packets_never_raise(router) -> None:
    rng_layers = [Ether(src=HOST_MAC) / IP() / TCP(), Ether(src=HOST_MAC) / IP() / UDP(),
                  Ether(src=HOST_MAC) / IP() / ICMP(), Ether(src=HOST_MAC) / fuzz(IP()) / fuzz(ICMP())]
    frames = [nsh.NshFrame(b"", b"", 2, 255, 1, raw(fuzz(rng_layers[i % 4]))[:1500]) for i in range(2000)]
    out = router.process(frames)
    assert len(out) == len(frames)
    assert all(isinstance(v, (bytes, Drop)) for v in out)


# -- real processes -------------------------------------------------------------------------

@pytest.mark.root
def test_two_processes_route_the_same_and_a_killed_one_changes_nothing(nf_process, redis_clean) -> None:
    url = redis_clean.url("red")
    a, b = nf_process("router", CONFIG, url), nf_process("router", CONFIG, url)
    pkt1 = frame("10.1.2.3", TCP(sport=40000, dport=80, flags="S", seq=1))
    pkt2 = frame("10.1.2.3", TCP(sport=40000, dport=80, flags="A", seq=2, ack=9) / b"data")
    ra, rb = a.exchange(raw(pkt1)), b.exchange(raw(pkt1))
    assert ra is not None and rb is not None
    assert ra.inner == rb.inner == forwarded(pkt1, NH3_MAC)
    expired = frame("10.1.9.9", ttl=1)
    assert a.exchange(raw(expired)).inner == b.exchange(raw(expired)).inner == icmp_from_router(expired, 11, 0)
    a.kill()
    assert not a.alive()
    reply = b.exchange(raw(pkt2))
    assert reply is not None and reply.inner == forwarded(pkt2, NH3_MAC)
    assert b.counters()["tx"] == 3


@pytest.mark.root
def test_process_survives_garbage_and_fuzz_and_still_routes(nf_process) -> None:
    nf = nf_process("router", CONFIG, None)
    frames = [nsh_frame(BAD[reason]) for reason in sorted(BAD)] * 10
    frames += [nsh_frame(raw(fuzz(Ether(src=HOST_MAC) / IP() / (TCP(), UDP(), ICMP())[i % 3]))[:1500])
               for i in range(2500)]
    frames += [nsh_frame(raw(fuzz(Ether(src=HOST_MAC) / fuzz(IP()) / UDP()))[:1500]) for _ in range(500)]
    nf.send_bursts(frames)
    nf.receive()
    assert nf.alive()
    good = frame("10.1.2.3", UDP(sport=1, dport=2) / b"after the storm")
    reply = nf.exchange(raw(good))
    assert reply is not None and reply.inner == forwarded(good, NH3_MAC)
    bad_sum = Ether(_bad_checksum(good, 14 + 20 + 6))
    reply = nf.exchange(raw(bad_sum))
    assert reply is not None and reply.inner == forwarded(bad_sum, NH3_MAC)
    c = nf.counters()
    assert c["rx"] == len(frames) + 2
    assert c["dropped"] + c["tx"] == c["rx"]
    assert "nf_error" not in c["drops"]
    for reason in BAD:
        assert c["drops"].get(reason, 0) >= 10, (reason, c["drops"])


def test_icmp_the_router_generates_goes_back_along_the_reverse_chain() -> None:
    """Time exceeded is a Reply: the runtime sends it on the reverse path after the router's
    hop there, so NFs before the router (a NAT, a firewall) see it as coming back."""
    nf = Router({**CONFIG, "statelab": {"pool": "rt", "chains": {"outbound": ["fw", "rt"], "inbound": ["rt", "fw"]}}},
                None, "red-rt-1")
    expiring = frame("10.1.2.3", ttl=1)
    received = nsh.parse(nsh_frame(raw(expiring), spi=2, si=254))
    verdict = nf.process([received])[0]
    assert isinstance(verdict, Reply) and verdict.frame == route(Router(CONFIG, None, "x"), expiring)
    assert nf.reverse_path(received) == (3, 254)  # inbound path of tenant 1, after hop 0 (rt)
