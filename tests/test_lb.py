"""The L4 load balancer NF: VIP -> backend rewrites byte-exact (TCP, UDP), the backend choice
stored once and kept by every instance (CONT-5), batching, TTL refresh, bad input, failing
closed; in process on Redis and on LocalState, and as real processes."""

from __future__ import annotations

import random
import socket

import jsonschema
import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw, fuzz

from nfs import nsh
from nfs.lb import CONFIG_SCHEMA, LoadBalancer, Service, choose_backend
from nfs.runtime import Drop
from nfs.state import LocalState, RedisState, StateUnavailable
from tests.nfharness import nsh_frame

VIP, CLIENT, OTHER = "198.51.100.10", "203.0.113.7", "203.0.113.99"
B1, B2, B9 = ("10.0.0.2", 8080), ("10.0.0.3", 8080), ("10.0.0.9", 8080)
DNS = ("10.0.0.2", 5353)
CLIENT_MAC, LB_MAC = "02:00:00:00:01:07", "02:00:00:00:00:fe"
CONFIG = {
    "services": [
        {"vip": VIP, "port": 80, "proto": "tcp", "backends": ["10.0.0.2:8080", "10.0.0.3:8080"]},
        {"vip": VIP, "port": 53, "proto": "udp", "backends": ["10.0.0.2:5353"]},
    ],
    "timeouts": {"tcp": 3600, "udp": 120},
}
# A pool member whose backend list changed (a new, different one): new connections go to
# 10.0.0.9, but every stored connection must keep its backend. With the same list as CONFIG a
# test could not tell a kept choice from one computed again by the same hash.
CHANGED = {**CONFIG, "services": [{**CONFIG["services"][0], "backends": ["10.0.0.9:8080"]},
                                  CONFIG["services"][1]]}


def to_vip(cport: int = 40000, flags: str = "S", payload: bytes = b"", proto: str = "tcp",
           client: str = CLIENT, vport: int = 80):
    l4 = (TCP(sport=cport, dport=vport, flags=flags, seq=1000, ack=0 if flags == "S" else 5000,
              options=[("MSS", 1460)] if flags == "S" else [])
          if proto == "tcp" else UDP(sport=cport, dport=vport))
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=client, dst=VIP, id=7, flags="DF") / l4 / payload


def from_backend(backend, cport: int = 40000, flags: str = "SA", payload: bytes = b"", proto: str = "tcp",
                 client: str = CLIENT):
    l4 = (TCP(sport=backend[1], dport=cport, flags=flags, seq=5000, ack=1001) if proto == "tcp"
          else UDP(sport=backend[1], dport=cport))
    return Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=backend[0], dst=client, id=9) / l4 / payload


def with_dst(pkt, ep) -> bytes:
    """``pkt`` as the LB must send it to backend ``ep``: checksums recomputed, nothing else changed."""
    want = pkt.copy()
    want[IP].dst, want[IP].chksum = ep[0], None
    want[IP].payload.dport, want[IP].payload.chksum = ep[1], None
    return raw(want)


def with_src(pkt, ep) -> bytes:
    want = pkt.copy()
    want[IP].src, want[IP].chksum = ep[0], None
    want[IP].payload.sport, want[IP].payload.chksum = ep[1], None
    return raw(want)


def dst_of(out: bytes) -> tuple[str, int]:
    p = Ether(out)
    return p[IP].dst, p[IP].payload.dport


def wrap(*pkts) -> list[nsh.NshFrame]:
    return [nsh.parse(nsh_frame(p if isinstance(p, bytes) else raw(p))) for p in pkts]


class Clock:
    """A clock the test moves (LocalState TTLs)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pool:
    """Makes LB instances that share one state: Redis (one client each) or one LocalState store."""

    def __init__(self, backend: str, url: str | None) -> None:
        self.backend, self.url = backend, url
        self.store: dict = {}
        self.clock = Clock()
        self.made = 0

    def client(self):
        if self.backend != "local":  # "cached": as the NF process opens it
            return RedisState(self.url, "red", "lb", cache=self.backend == "cached")
        return LocalState("red", "lb", store=self.store, clock=self.clock)

    def nf(self, config: dict = CONFIG) -> LoadBalancer:
        self.made += 1
        nf = LoadBalancer({**config, "statelab": {"tenant": "red", "pool": "lb"}}, self.url, f"red-lb-{self.made}")
        nf._state = self.client()  # the runtime opens it from --state; here the test picks the backend
        return nf

    def get(self, key: str):
        b = self.client().batch()
        v, t = b.get(key), b.pttl(key)
        b.execute()
        return v.value, t.value


@pytest.fixture(params=["redis", "cached", "local"])
def pool(request) -> Pool:
    if request.param != "local":
        return Pool(request.param, request.getfixturevalue("redis_clean").url("red"))
    return Pool("local", None)


def run(nf: LoadBalancer, *pkts) -> list:
    return nf.process(wrap(*pkts))


# -- 1. semantics, byte-exact ------------------------------------------------------------

def test_tcp_connection_rewritten_both_ways_byte_exact(pool) -> None:
    nf = pool.nf()
    syn = to_vip(40000, "S")
    out, = run(nf, syn)
    backend = dst_of(out)
    assert backend in (B1, B2)
    assert out == with_dst(syn, backend)
    value, ttl = pool.get(f"conn:tcp:{CLIENT}:40000:{VIP}:80")
    assert value == f"{backend[0]}:{backend[1]}".encode() and 3590_000 < ttl <= 3600_000
    value, ttl = pool.get(f"rev:tcp:{backend[0]}:{backend[1]}:{CLIENT}:40000")
    assert value == f"{VIP}:80".encode() and 3590_000 < ttl <= 3600_000

    synack = from_backend(backend, 40000, "SA")
    assert run(nf, synack) == [with_src(synack, (VIP, 80))]
    data = to_vip(40000, "PA", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert run(nf, data) == [with_dst(data, backend)]
    answer = from_backend(backend, 40000, "PA", b"HTTP/1.1 200 OK\r\n\r\n" + bytes(range(256)) * 4)
    assert run(nf, answer) == [with_src(answer, (VIP, 80))]


def test_udp_rewritten_both_ways_byte_exact(pool) -> None:
    nf = pool.nf()
    query = to_vip(5000, proto="udp", vport=53, payload=b"\x12\x34 dns query")
    assert run(nf, query) == [with_dst(query, DNS)]
    answer = from_backend(DNS, 5000, proto="udp", payload=b"\x12\x34 dns answer")
    assert run(nf, answer) == [with_src(answer, (VIP, 53))]
    assert 110_000 < pool.get(f"conn:udp:{CLIENT}:5000:{VIP}:53")[1] <= 120_000


def test_udp_without_checksum_stays_without(pool) -> None:
    nf = pool.nf()
    query = to_vip(5001, proto="udp", vport=53, payload=b"q")
    query[UDP].chksum = 0
    out, = run(nf, query)
    assert Ether(out)[UDP].chksum == 0
    want = query.copy()
    want[IP].dst, want[IP].chksum, want[UDP].dport = DNS[0], None, DNS[1]
    assert out == raw(want)


def test_connections_spread_over_backends_and_each_keeps_one(pool) -> None:
    nf = pool.nf()
    ports = range(20000, 20200)
    first = [dst_of(o) for o in run(nf, *(to_vip(p, "S") for p in ports))]
    assert 60 <= first.count(B1) <= 140 and first.count(B1) + first.count(B2) == 200
    again = [dst_of(o) for o in run(nf, *(to_vip(p, "A", b"more") for p in ports))]
    assert again == first


def test_packets_for_no_service_pass_unchanged_or_are_dropped(pool) -> None:
    others = [to_vip(40000, vport=443),                                      # no service on that port
              to_vip(40000, proto="udp", vport=80),                          # service is TCP only
              Ether() / IP(src=CLIENT, dst=VIP) / ICMP(type=8),               # ICMP to the VIP
              Ether() / IP(src=CLIENT, dst=OTHER) / TCP(sport=1, dport=80),   # not to a VIP
              from_backend(B1, 41000),                                        # backend, no stored connection
              Ether() / ARP(pdst=VIP)]
    assert run(pool.nf(), *others) == [raw(p) for p in others]
    assert run(pool.nf({**CONFIG, "pass_other": False}), *others) == [Drop("no_service")] * len(others)


def test_a_reply_is_rewritten_only_for_its_own_client(pool) -> None:
    nf = pool.nf()
    backend = dst_of(run(nf, to_vip(40000))[0])
    stranger = from_backend(backend, 40000, client=OTHER)  # same ports, another client
    assert run(nf, stranger) == [raw(stranger)]


def test_fragments_to_a_vip_are_dropped(pool) -> None:
    first = to_vip(40000, "PA", b"x" * 64)
    first[IP].flags = "MF"
    later = Ether() / IP(src=CLIENT, dst=VIP, proto=6, frag=10) / Raw(b"y" * 32)
    assert run(pool.nf(), first, later) == [Drop("fragment"), Drop("fragment")]


def test_stored_choice_wins_over_a_changed_backend_list(pool) -> None:
    old = pool.nf()
    backend = dst_of(run(old, to_vip(40000))[0])
    new = pool.nf(CHANGED)
    data = to_vip(40000, "A", b"still me")
    assert run(new, data) == [with_dst(data, backend)]
    reply = from_backend(backend, 40000, "A", b"ok")
    assert run(new, reply) == [with_src(reply, (VIP, 80))]
    assert dst_of(run(new, to_vip(40001))[0]) == B9  # new connections follow the new list


def test_lost_race_the_first_stored_choice_wins(pool) -> None:
    """Two instances with different lists get a connection's first packet at the same time:
    B stores its choice between A's read and A's claim; A must follow B's choice."""
    a, b = pool.nf({**CONFIG, "services": [{**CONFIG["services"][0], "backends": ["10.0.0.2:8080"]}]}), pool.nf(CHANGED)
    syn = to_vip(40000)
    execute, calls = a.state._execute, []

    def b_in_between(ops):
        result = execute(ops)
        if not calls:
            calls.append(run(b, syn))
        return result

    a.state._execute = b_in_between
    assert run(a, syn) == [with_dst(syn, B9)]
    assert calls == [[with_dst(syn, B9)]]
    assert pool.get(f"rev:tcp:10.0.0.9:8080:{CLIENT}:40000")[0] == f"{VIP}:80".encode()
    assert pool.get(f"rev:tcp:10.0.0.2:8080:{CLIENT}:40000")[0] is None
    assert a.state.round_trips == 3


def test_one_round_trip_per_batch_and_two_with_new_connections(pool) -> None:
    nf = pool.nf()
    syns = [to_vip(p) for p in range(30000, 30040)]
    out = run(nf, *syns, from_backend(B1, 1), Ether() / IP(src=CLIENT, dst=OTHER) / ICMP())
    assert nf.state.round_trips == 2
    data = [to_vip(p, "A", b"d") for p in range(30000, 30040)]
    replies = [from_backend(dst_of(o), p, "A") for o, p in zip(out, range(30000, 30040))]
    out2 = run(nf, *data, *replies)
    assert nf.state.round_trips == 3
    assert all(Ether(o)[IP].src == VIP for o in out2[40:])


def test_two_packets_of_a_new_connection_in_one_batch(pool) -> None:
    nf = pool.nf()
    a, b = run(nf, to_vip(40000, "S"), to_vip(40000, "A", b"early data"))
    assert dst_of(a) == dst_of(b)
    assert nf.state.round_trips == 2


def test_ttl_refreshed_by_traffic_without_a_write_per_packet() -> None:
    pool = Pool("local", None)
    nf = pool.nf()
    conn = f"conn:udp:{CLIENT}:5000:{VIP}:53"
    rev = f"rev:udp:{DNS[0]}:{DNS[1]}:{CLIENT}:5000"
    run(nf, to_vip(5000, proto="udp", vport=53))
    ops = nf.state.ops
    pool.clock.now += 5  # less than a tenth of 120 s: reads only
    run(nf, to_vip(5000, proto="udp", vport=53), from_backend(DNS, 5000, proto="udp"))
    assert nf.state.ops - ops == 4 and pool.get(conn)[1] == 115_000
    for _ in range(10):  # only the server talks (a stream): its replies keep the connection alive
        pool.clock.now += 20
        answer = from_backend(DNS, 5000, proto="udp", payload=b"stream")
        assert run(nf, answer) == [with_src(answer, (VIP, 53))]
    assert pool.get(conn)[1] > 90_000 and pool.get(rev)[1] > 90_000
    pool.clock.now += 121  # idle past the timeout: gone
    assert pool.get(conn)[0] is None and pool.get(rev)[0] is None
    answer = from_backend(DNS, 5000, proto="udp")
    assert run(nf, answer) == [raw(answer)]


def test_config_schema_and_errors() -> None:
    jsonschema.Draft202012Validator.check_schema(CONFIG_SCHEMA)
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA)
    validator.validate(CONFIG)
    validator.validate({"services": [{"vip": VIP, "port": 80, "backends": ["10.0.0.2:80"]}], "pass_other": False})
    svc = CONFIG["services"][0]
    for bad in ({**CONFIG, "timeout": {}}, {"services": [{**svc, "proto": "sctp"}]},
                {"services": [{**svc, "backends": []}]}, {"services": [{**svc, "backends": ["10.0.0.2"]}]},
                {"services": [{**svc, "vip": "198.51.100.300"}]}, {"services": [{**svc, "weight": 2}]}):
        assert not validator.is_valid(bad), bad
    with pytest.raises(ValueError, match=r"services\[0\].*ip:port"):
        LoadBalancer({"services": [{**svc, "backends": ["10.0.0.2"]}]}, None, "x")
    with pytest.raises(ValueError, match="twice"):
        LoadBalancer({"services": [svc, svc]}, None, "x")


def test_choice_is_deterministic_across_processes_and_hrw() -> None:
    svc = Service(6, VIP, 80, (B1, B2))
    grown = Service(6, VIP, 80, (B1, B2, B9))
    clients = [(CLIENT, p) for p in range(1000, 1600)]
    before = [choose_backend(svc, c) for c in clients]
    after = [choose_backend(grown, c) for c in clients]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert all(a == B9 for _, a in moved) and 100 < len(moved) < 300  # only the new member's share
    assert choose_backend(svc, (CLIENT, 1000)) == choose_backend(Service(6, VIP, 80, (B2, B1)), (CLIENT, 1000))


# -- 2./3. shared state across instances, CONT-5 ----------------------------------------

def test_packet_1_on_a_packet_2_on_b_is_as_one_instance(pool) -> None:
    a, b, c = pool.nf(), pool.nf(CHANGED), pool.nf(CHANGED)
    syn = to_vip(40000)
    backend = dst_of(run(a, syn)[0])
    data = to_vip(40000, "A", b"payload")
    assert run(b, data) == [with_dst(data, backend)]
    reply = from_backend(backend, 40000, "A", b"reply")
    assert run(c, reply) == [with_src(reply, (VIP, 80))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cont5_every_connection_keeps_its_backend_across_instances_and_kills(pool, seed) -> None:
    """CONT-5 (property): whatever instance sees whichever packet, and however often the
    instance that chose a backend is killed (replaced by a fresh one, perhaps with another
    backend list), each connection keeps the backend it got first and its replies come from the VIP."""
    rng = random.Random(seed)
    configs = [CONFIG, CHANGED, {**CONFIG, "services": [{**CONFIG["services"][0],
                                                          "backends": ["10.0.0.3:8080", "10.0.0.2:8080"]}]}]
    instances = [pool.nf(rng.choice(configs)) for _ in range(3)]
    conns = rng.sample(range(10000, 60000), 40)
    chosen: dict[int, tuple[str, int]] = {}
    chooser: dict[int, int] = {}
    for _ in range(12):
        todo = rng.sample(conns, rng.randint(5, 20))
        i = rng.randrange(3)
        pkts = []
        for port in todo:
            if port in chosen and rng.random() < 0.5:
                pkts.append(from_backend(chosen[port], port, "A", b"r"))
            else:
                pkts.append(to_vip(port, "A" if port in chosen else "S", b"q"))
        for port, pkt, out in zip(todo, pkts, run(instances[i], *pkts)):
            assert isinstance(out, bytes), out
            if Ether(out)[IP].src == VIP:
                assert out == with_src(pkt, (VIP, 80))
            else:
                chosen.setdefault(port, dst_of(out))
                chooser.setdefault(port, i)
                assert out == with_dst(pkt, chosen[port]), port
        killed = rng.choice([chooser[p] for p in todo if p in chooser])
        instances[killed] = pool.nf(rng.choice(configs))  # SIGKILL: the object and all it held are gone
    assert len(chosen) > 20


# -- 4. bad input, 5. fail closed -----------------------------------------------------------

def _flip(pkt, offset: int) -> bytes:
    b = bytearray(raw(pkt))
    b[offset] ^= 0xFF
    return bytes(b)


BAD = {
    "truncated_inner": raw(to_vip())[:12],
    "truncated_ipv4": raw(to_vip())[:25],
    "bad_ip_version": raw(Ether() / IP(version=5, dst=VIP) / TCP(dport=80)),
    "bad_ip_total_length": raw(Ether() / IP(len=900, dst=VIP) / TCP(dport=80)),
    "bad_ip_checksum": _flip(to_vip(), 14 + 10),
    "bad_l4_checksum": _flip(to_vip(), 14 + 20 + 16),
    "truncated_tcp": raw(Ether() / IP(dst=VIP, proto=6) / b"\x9c\x40\x00\x50"),
    "truncated_udp": raw(Ether() / IP(dst=VIP, proto=17) / b"\x13\x88\x00\x35"),
    "bad_tcp_offset": raw(Ether() / IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, dataofs=2)),
}


def test_malformed_packets_are_dropped_with_their_reason(pool) -> None:
    nf = pool.nf()
    frames = [nsh.NshFrame(b"", b"", 2, 255, 1, inner) for inner in BAD.values()] + wrap(to_vip(40000))
    out = nf.process(frames)
    assert out[:-1] == [Drop(r) for r in BAD]
    assert dst_of(out[-1]) in (B1, B2)


def test_a_bogus_stored_value_drops_only_its_connection(pool) -> None:
    nf = pool.nf()
    b = nf.state.batch()
    b.set(f"conn:tcp:{CLIENT}:40000:{VIP}:80", "no-such-backend", 60)
    b.set(f"rev:tcp:10.0.0.2:8080:{CLIENT}:40001", "\xff:99999", 60)
    b.execute()
    out = run(nf, to_vip(40000, "A"), from_backend(B1, 40001), to_vip(40002))
    assert out[:2] == [Drop("bad_state"), Drop("bad_state")] and dst_of(out[2]) in (B1, B2)


def test_fuzzed_packets_never_raise(pool) -> None:
    nf = pool.nf()
    layers = [Ether() / IP(src=CLIENT, dst=VIP) / TCP(dport=80), Ether() / IP(dst=VIP) / UDP(dport=53),
              Ether() / IP(src="10.0.0.2", dst=CLIENT) / TCP(sport=8080), Ether() / IP() / TCP()]
    frames = wrap(*(raw(fuzz(layers[i % 4]))[:1500] for i in range(1200)))
    out = nf.process(frames)
    assert len(out) == len(frames) and all(isinstance(v, (bytes, Drop)) for v in out)


def test_state_unavailable_nothing_is_forwarded() -> None:
    pool = Pool("local", None)
    nf = pool.nf()
    backend = dst_of(run(nf, to_vip(40000))[0])
    nf.state.available = False
    for batch in ([to_vip(40000, "A")], [to_vip(40001)], [from_backend(backend, 40000)],
                  [Ether() / IP(src=CLIENT, dst=OTHER) / TCP(), to_vip(40000, "A")]):
        with pytest.raises(StateUnavailable):
            run(nf, *batch)
    nf.state.available = True
    data = to_vip(40000, "A")
    assert run(nf, data) == [with_dst(data, backend)]  # back: nothing was lost


# -- real processes ------------------------------------------------------------------------

def burst(nf, pkts) -> dict[int, bytes]:
    """Send frames in one burst; the replies' inner frames by client port."""
    for p in pkts:
        nf.send(nsh_frame(raw(p)))
    out = {}
    for f in nf.receive():
        inner = nsh.parse(f).inner
        l4 = Ether(inner)[IP].payload
        out[l4.sport if Ether(inner)[IP].src == CLIENT else l4.dport] = inner
    return out


@pytest.mark.root
def test_two_processes_share_connections(nf_process, redis_clean) -> None:
    url = redis_clean.url("red")
    a, b = nf_process("lb", CONFIG, url, pool="lb"), nf_process("lb", CHANGED, url, pool="lb")
    syn = to_vip(40000)
    backend = dst_of(a.exchange(raw(syn)).inner)
    data = to_vip(40000, "A", b"hello")
    assert b.exchange(raw(data)).inner == with_dst(data, backend)
    reply = from_backend(backend, 40000, "A", b"world")
    assert b.exchange(raw(reply)).inner == with_src(reply, (VIP, 80))


@pytest.mark.root
def test_cont5_killing_the_chooser_loses_no_connection(nf_process, redis_clean) -> None:
    url = redis_clean.url("red")
    a, b = nf_process("lb", CONFIG, url, pool="lb"), nf_process("lb", CHANGED, url, pool="lb")
    ports = range(41000, 41030)
    chosen = {p: dst_of(out) for p, out in burst(a, [to_vip(p) for p in ports]).items()}
    assert sorted(chosen) == list(ports) and {B1, B2} == set(chosen.values())
    a.kill()
    assert not a.alive()
    data = {p: to_vip(p, "A", b"after the crash") for p in ports}
    got = burst(b, data.values())
    assert got == {p: with_dst(data[p], chosen[p]) for p in ports}
    replies = {p: from_backend(chosen[p], p, "A", b"ok") for p in ports}
    got = burst(b, replies.values())
    assert got == {p: with_src(replies[p], (VIP, 80)) for p in ports}


@pytest.mark.root
def test_process_fails_closed_when_state_is_unreachable(nf_process) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    nf = nf_process("lb", CONFIG, f"redis://tenant-red:x@127.0.0.1:{port}/0", pool="lb")
    for p in (to_vip(40000), to_vip(40001, proto="udp", vport=53), from_backend(B1, 40000)):
        nf.send(nsh_frame(raw(p)))
    assert nf.receive() == []
    c = nf.counters()
    assert c["drops"] == {"state_unavailable": 3} and c["tx"] == 0 and nf.alive()


@pytest.mark.root
def test_process_survives_garbage_and_fuzz_and_still_balances(nf_process, redis_clean) -> None:
    nf = nf_process("lb", CONFIG, redis_clean.url("red"), pool="lb")
    frames = [nsh_frame(v) for v in BAD.values()] * 10
    layers = [Ether() / IP(src=CLIENT, dst=VIP) / TCP(dport=80), Ether() / IP(src=CLIENT, dst=VIP) / UDP(dport=53),
              Ether() / IP(src="10.0.0.2", dst=CLIENT) / TCP(sport=8080), Ether() / fuzz(IP()) / TCP()]
    frames += [nsh_frame(raw(fuzz(layers[i % 4]))[:1500]) for i in range(3000)]
    nf.send_bursts(frames)
    nf.receive()
    assert nf.alive()
    syn = to_vip(45000)
    out = nf.exchange(raw(syn)).inner
    assert out == with_dst(syn, dst_of(out)) and dst_of(out) in (B1, B2)
    c = nf.counters()
    assert c["rx"] == len(frames) + 1 and c["dropped"] + c["tx"] == c["rx"]
    assert "nf_error" not in c["drops"] and "state_unavailable" not in c["drops"]
    for reason in BAD:
        assert c["drops"].get(reason, 0) >= 10, (reason, c["drops"])
