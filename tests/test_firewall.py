"""The stateful firewall: rules for new connections, shared connection tracking, timers, bad input.

In-process tests run on LocalState and on a real Redis (two NF objects with two clients stand
for two instances); process tests run real ``python -m nfs.firewall`` processes on veth pairs.
"""

from __future__ import annotations

import random
import socket
import time
from typing import Any, Optional

import jsonschema
import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.packet import fuzz

from nfs import nsh
from nfs.firewall import CONFIG_SCHEMA, Firewall, conn_key
from nfs.runtime import Drop
from nfs.state import LocalState, RedisState, StateUnavailable
from tests.nfharness import nsh_frame

ETH = Ether(src="02:00:00:01:00:01", dst="02:00:00:01:00:02")
CLIENT, SERVER, ROUTER = "10.0.0.1", "203.0.113.9", "198.51.100.1"
OUT, IN = 0, 1
CONFIG: dict[str, Any] = {
    "default": "deny",
    "rules": [
        {"action": "deny", "direction": "outbound", "proto": "tcp", "dst": "203.0.113.66"},
        {"action": "allow", "direction": "outbound"},
        {"action": "allow", "direction": "inbound", "proto": "tcp", "dst": "10.0.0.0/24",
         "dport": "8000-8080"},
    ],
}
WEB = conn_key(6, CLIENT, 40000, SERVER, 80)


def tcp(flags: str, direction: int = OUT, sport: int = 40000, dport: int = 80, payload: bytes = b"",
        client: str = CLIENT, server: str = SERVER) -> tuple[bytes, int]:
    """A TCP segment of the client<->server connection, sent in ``direction``."""
    src, dst = (client, server) if direction == OUT else (server, client)
    ports = (sport, dport) if direction == OUT else (dport, sport)
    segment = TCP(sport=ports[0], dport=ports[1], flags=flags) / payload
    return raw(ETH / IP(src=src, dst=dst) / segment), direction


def udp(direction: int = OUT, sport: int = 5353, dport: int = 53) -> tuple[bytes, int]:
    src, dst = (CLIENT, SERVER) if direction == OUT else (SERVER, CLIENT)
    ports = (sport, dport) if direction == OUT else (dport, sport)
    return raw(ETH / IP(src=src, dst=dst) / UDP(sport=ports[0], dport=ports[1]) / b"q"), direction


def frame(inner: bytes, direction: int) -> nsh.NshFrame:
    """The NSH frame the fabric would hand the NF (tenant 1: SPI 2 outbound, 3 inbound)."""
    return nsh.parse(nsh_frame(inner, spi=2 | direction))


HANDSHAKE = [tcp("S"), tcp("SA", IN), tcp("A")]


class Pool:
    """Firewall instances of one pool sharing one state server (Redis or one LocalState store)."""

    def __init__(self, backend: str, redis_server: Any) -> None:
        self.backend = backend
        self.redis = redis_server
        self.store: dict = {}

    def state(self) -> Any:
        if self.backend == "redis":
            return RedisState(self.redis.url("red"), "red", "fw")
        return LocalState("red", "fw", store=self.store)

    def nf(self, config: Optional[dict[str, Any]] = None, name: str = "fw-1") -> Firewall:
        lab = {"statelab": {"tenant": "red", "tenant_id": 1, "pool": "fw"}}
        url = self.redis.url("red") if self.backend == "redis" else None
        fw = Firewall({**(CONFIG if config is None else config), **lab}, url, name)
        if self.backend == "local":
            fw._state = self.state()  # instances of one process share the store, as Redis would
        return fw

    def peek(self, key: str) -> tuple[Optional[bytes], int]:
        """The stored entry and its remaining TTL in ms."""
        b = self.state().batch()
        value, pttl = b.get(key), b.pttl(key)
        b.execute()
        return value.value, pttl.value


@pytest.fixture(params=["local", "redis"])
def pool(request) -> Pool:
    return Pool(request.param, request.getfixturevalue("redis_clean") if request.param == "redis" else None)


def run(fw: Firewall, *packets: tuple[bytes, int]) -> list:
    """Process ``packets`` as one batch; return the verdicts."""
    return fw.process([frame(inner, d) for inner, d in packets])


def passes(fw: Firewall, *packets: tuple[bytes, int]) -> bool:
    """True if every packet comes back byte-for-byte unchanged (a firewall rewrites nothing)."""
    return run(fw, *packets) == [inner for inner, _ in packets]


def reason(fw: Firewall, pkt: tuple[bytes, int]) -> Optional[str]:
    (verdict,) = run(fw, pkt)
    return verdict.reason if isinstance(verdict, Drop) else None


# -- semantics ---------------------------------------------------------------------------

def test_connection_lifecycle_on_alternating_instances(pool: Pool) -> None:
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    steps = [(a, tcp("S"), b"SYN_SENT", 120_000), (b, tcp("SA", IN), b"SYN_RECV", 60_000),
             (a, tcp("A"), b"ESTABLISHED", 432_000_000),
             (b, tcp("PA", IN, payload=b"hello"), b"ESTABLISHED", None),
             (a, tcp("FA"), b"FIN_WAIT", 120_000), (b, tcp("FA", IN), b"TIME_WAIT", 120_000),
             (a, tcp("A"), b"TIME_WAIT", None)]
    for nf, pkt, state, ttl in steps:
        assert passes(nf, pkt), (pkt, reason(nf, pkt))
        value, pttl = pool.peek(WEB)
        assert value == state + b" 10.0.0.1:40000"
        if ttl is not None:
            assert ttl - 2000 < pttl <= ttl


def test_new_connections_follow_the_rules_first_match_wins(pool: Pool) -> None:
    fw = pool.nf()
    assert reason(fw, tcp("S", IN, sport=22)) == "denied_by_rule"           # default deny inbound
    assert reason(fw, tcp("S", server="203.0.113.66")) == "denied_by_rule"  # deny before allow outbound
    assert reason(fw, tcp("S", IN, sport=8080)) is None                     # published port range
    assert reason(fw, tcp("S", IN, sport=8081)) == "denied_by_rule"
    assert reason(fw, udp(IN, sport=8080)) == "denied_by_rule"              # rule says tcp
    assert reason(fw, tcp("S", IN, sport=8080, client="10.0.1.1")) == "denied_by_rule"  # dst CIDR
    assert pool.peek(conn_key(6, CLIENT, 22, SERVER, 80)) == (None, -2)    # a denied SYN leaves no entry
    allow_all = pool.nf({"default": "allow", "rules": [{"action": "deny", "proto": "udp", "dport": 53}]})
    assert reason(allow_all, udp()) == "denied_by_rule"
    assert reason(allow_all, udp(dport=54)) is None
    assert reason(allow_all, tcp("S", IN, sport=22)) is None


def test_denied_connection_return_traffic_does_not_pass(pool: Pool) -> None:
    fw = pool.nf()
    assert reason(fw, tcp("S", IN, sport=22)) == "denied_by_rule"
    assert reason(fw, tcp("SA", OUT, sport=22)) == "no_connection"


def test_mid_stream_packets_without_connection(pool: Pool) -> None:
    strict, loose = pool.nf(), pool.nf({**CONFIG, "loose": True}, name="fw-loose")
    for pkt in (tcp("A"), tcp("PA", IN), tcp("SA", IN), tcp("FA"), tcp("R", IN)):
        assert reason(strict, pkt) == "no_connection"
    assert reason(loose, tcp("SA")) == "no_connection"   # a SYN-ACK is never picked up
    assert reason(loose, tcp("A", IN, sport=22)) == "denied_by_rule"
    assert passes(loose, tcp("PA", payload=b"x"))        # outbound: allowed by rule, picked up
    assert pool.peek(WEB)[0] == b"ESTABLISHED 10.0.0.1:40000"
    assert passes(strict, tcp("A", IN))                  # now tracked for every instance


def test_invalid_tcp_is_dropped_and_changes_nothing(pool: Pool) -> None:
    fw = pool.nf()
    assert passes(fw, tcp("S"))
    for pkt in (tcp("SA"), tcp("A"), tcp("A", IN), tcp("S", IN), tcp("SF"), tcp(""), tcp("F"), tcp("SR")):
        assert reason(fw, pkt) == "invalid_state", pkt
    assert pool.peek(WEB)[0] == b"SYN_SENT 10.0.0.1:40000"
    assert passes(fw, tcp("S"), tcp("SA", IN), tcp("SA", IN), tcp("A"))  # retransmissions pass
    assert reason(fw, tcp("S")) == "invalid_state"       # no SYN inside an established connection


def test_rst_removes_the_entry(pool: Pool) -> None:
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    assert passes(a, *HANDSHAKE)
    assert passes(b, tcp("RA", IN))
    assert pool.peek(WEB) == (None, -2)
    assert reason(a, tcp("A")) == "no_connection"
    assert reason(b, tcp("R")) == "no_connection"


def test_syn_after_close_opens_a_new_connection(pool: Pool) -> None:
    fw = pool.nf()
    assert passes(fw, *HANDSHAKE, tcp("FA", IN), tcp("FA"))
    assert pool.peek(WEB)[0] == b"TIME_WAIT 10.0.0.1:40000"
    assert reason(fw, tcp("S", IN)) == "denied_by_rule"  # reopening is a new connection for the rules
    assert passes(fw, tcp("S"))
    assert pool.peek(WEB)[0] == b"SYN_SENT 10.0.0.1:40000"


def test_udp_pseudo_connection(pool: Pool) -> None:
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    key = conn_key(17, CLIENT, 5353, SERVER, 53)
    assert passes(a, udp())
    assert pool.peek(key)[0] == b"UDP 10.0.0.1:5353" and 28_000 < pool.peek(key)[1] <= 30_000
    assert passes(b, udp(IN))
    assert pool.peek(key)[0] == b"UDP_STREAM 10.0.0.1:5353" and 178_000 < pool.peek(key)[1] <= 180_000
    assert passes(a, udp(), udp(IN))
    assert reason(b, udp(IN, sport=5354)) == "denied_by_rule"  # another port is another flow


def test_icmp_echo_is_keyed_by_identifier(pool: Pool) -> None:
    fw = pool.nf()
    ping = raw(ETH / IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=77, seq=1) / b"ping")
    pong = raw(ETH / IP(src=SERVER, dst=CLIENT) / ICMP(type=0, id=77, seq=1) / b"ping")
    other = raw(ETH / IP(src=SERVER, dst=CLIENT) / ICMP(type=0, id=78, seq=1) / b"ping")
    assert reason(fw, (pong, IN)) == "no_connection"
    assert passes(fw, (ping, OUT), (pong, IN))
    assert pool.peek(conn_key(1, CLIENT, 77, SERVER, 77))[0] == b"ICMP 10.0.0.1:77"
    assert reason(fw, (other, IN)) == "no_connection"
    inbound_ping = raw(ETH / IP(src=SERVER, dst=CLIENT) / ICMP(type=8, id=79))
    assert reason(fw, (inbound_ping, IN)) == "denied_by_rule"


def test_icmp_errors_pass_only_for_tracked_connections(pool: Pool) -> None:
    fw = pool.nf()
    assert passes(fw, tcp("S"), udp())

    def error(icmp_type: int, quoted: Any) -> tuple[bytes, int]:
        return raw(ETH / IP(src=ROUTER, dst=CLIENT) / ICMP(type=icmp_type, code=1) /
                   IPerror(src=CLIENT, dst=SERVER) / quoted), IN

    assert passes(fw, error(3, TCPerror(sport=40000, dport=80, flags="S")))
    assert passes(fw, error(11, UDPerror(sport=5353, dport=53)))
    assert reason(fw, error(3, TCPerror(sport=40001, dport=80))) == "no_connection"
    assert reason(fw, (raw(ETH / IP(src=ROUTER, dst=CLIENT) / ICMP(type=3)), IN)) == "no_connection"
    assert pool.peek(WEB)[0] == b"SYN_SENT 10.0.0.1:40000"  # an error does not change the entry


def test_non_ip_and_fragments(pool: Pool) -> None:
    default = pool.nf()
    strict = pool.nf({**CONFIG, "allow_non_ip": False, "allow_fragments": True}, name="fw-2")
    arp = (raw(ETH / ARP(pdst=CLIENT)), IN)
    later_fragment = (raw(ETH / IP(src=SERVER, dst=CLIENT, proto=17, frag=185) / (b"x" * 64)), IN)
    assert passes(default, arp)
    assert reason(strict, arp) == "non_ip"
    assert reason(default, later_fragment) == "fragment"
    assert passes(strict, later_fragment)
    first_fragment = (raw(ETH / IP(src=SERVER, dst=CLIENT, flags="MF") / UDP(sport=53, dport=5353) / b"a"), IN)
    assert reason(default, first_fragment) == "denied_by_rule"  # tracked like any first packet


def test_ttl_expiry_ends_the_connection(pool: Pool) -> None:
    fw = pool.nf({**CONFIG, "timeouts": {"established": 0.3, "udp": 0.3}})
    assert passes(fw, *HANDSHAKE, udp())
    time.sleep(0.5)
    assert pool.peek(WEB) == (None, -2)
    assert reason(fw, tcp("PA", IN, payload=b"late")) == "no_connection"
    assert reason(fw, udp(IN)) == "denied_by_rule"  # an expired flow's reply is a new inbound flow


def test_entry_is_rewritten_only_below_half_its_timeout(pool: Pool) -> None:
    fw = pool.nf({**CONFIG, "timeouts": {"established": 1.0}})
    assert passes(fw, *HANDSHAKE)
    trips = fw.state.round_trips
    assert passes(fw, tcp("PA", payload=b"a"), tcp("A", IN))
    assert fw.state.round_trips == trips + 1  # read only: no write while the TTL is fresh
    time.sleep(0.6)
    assert pool.peek(WEB)[1] < 500
    assert passes(fw, tcp("PA", IN, payload=b"b"))
    assert fw.state.round_trips == trips + 3  # read, then one refreshing write
    assert 800 < pool.peek(WEB)[1] <= 1000


def test_a_batch_costs_two_round_trips(pool: Pool) -> None:
    fw = pool.nf()
    syns = [tcp("S", sport=port) for port in range(41000, 41032)]
    assert passes(fw, *syns, *HANDSHAKE, tcp("PA", payload=b"x"), tcp("A", IN))  # handshake in order
    assert fw.state.round_trips == 2
    assert pool.peek(WEB)[0] == b"ESTABLISHED 10.0.0.1:40000"
    assert passes(fw, *syns)                # retransmitted SYNs change nothing:
    assert fw.state.round_trips == 3        # one read-only round trip


def test_lost_race_is_read_again(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A and B each see one FIN of the same connection at once: the result is TIME_WAIT, as in series."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    assert passes(a, *HANDSHAKE)
    execute = a.state._execute
    interfered = []

    def racing(ops):
        if any(op == "script" for op, _, _ in ops) and not interfered:
            interfered.append(1)
            assert passes(b, tcp("FA", IN))  # B writes between A's read and A's write
        return execute(ops)

    monkeypatch.setattr(a.state, "_execute", racing)
    assert passes(a, tcp("FA"))
    assert interfered and pool.peek(WEB)[0] == b"TIME_WAIT 10.0.0.1:40000"


def test_bad_input_is_dropped_with_its_reason(pool: Pool) -> None:
    fw = pool.nf()
    good = tcp("S")[0]
    bad_ip_sum = bytearray(good)
    bad_ip_sum[24] ^= 0xFF
    bad_tcp_sum = raw(ETH / IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=80, flags="S", chksum=1))
    bad_version = bytearray(good)
    bad_version[14] = 0x65
    bad_offset = raw(ETH / IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=80, flags="S", dataofs=15))
    short_tcp = raw(ETH / IP(src=CLIENT, dst=SERVER, proto=6) / bytes(10))
    bad = [short_tcp, bytes(bad_ip_sum), bad_tcp_sum, bytes(bad_version), bad_offset, good[:20], good]
    verdicts = run(fw, *[(b, OUT) for b in bad])
    assert [v.reason if isinstance(v, Drop) else v for v in verdicts] == [
        "truncated_tcp", "bad_ip_checksum", "bad_l4_checksum", "bad_ip_version", "bad_tcp_offset",
        "truncated_ipv4", good]


def test_fails_closed_without_state() -> None:
    state = LocalState("red", "fw")
    fw = Firewall(CONFIG, None, "fw-1")
    fw._state = state
    assert passes(fw, *HANDSHAKE)
    state.available = False
    for pkt in (tcp("PA", payload=b"x"), tcp("A", IN), tcp("S", sport=1234)):
        with pytest.raises(StateUnavailable):  # the runtime drops the whole batch
            run(fw, pkt)


@pytest.mark.parametrize("config, words", [
    ({"rules": [{"action": "allow", "src": "10.0.0.1/24"}]}, "rule 1 src"),
    ({"rules": [{"action": "allow"}, {"action": "allow", "dport": "90-80"}]}, "rule 2"),
    ({"rules": [{"action": "allow", "port": 80}]}, "port"),
    ({"rules": [{"action": "deny", "proto": "icmp", "dport": 7}]}, "dport needs proto"),
    ({"default": "reject"}, "default"),
    ({"timeouts": {"established": 0}}, "established"),
])
def test_config_errors_name_the_problem(config: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Firewall(config, None, "fw-1")


def test_config_schema_is_strict_and_documented() -> None:
    jsonschema.Draft202012Validator.check_schema(CONFIG_SCHEMA)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False
            for name, prop in node.get("properties", {}).items():
                assert prop.get("description"), name
            for value in node.values():
                walk(value)
    walk(CONFIG_SCHEMA)


# -- real processes ----------------------------------------------------------------------

def _exchange(nf: Any, pkt: tuple[bytes, int], timeout: float = 1.0) -> Optional[bytes]:
    reply = nf.exchange(pkt[0], spi=2 | pkt[1], timeout=timeout)
    return None if reply is None else reply.inner


def test_processes_share_connections(nf_process, redis_clean) -> None:
    a = nf_process("firewall", CONFIG, redis_clean.url("red"))
    b = nf_process("firewall", CONFIG, redis_clean.url("red"))
    for nf, pkt in zip((a, b, a, b, a), (*HANDSHAKE, tcp("PA", IN, payload=b"hi"), tcp("FA"))):
        reply = nf.exchange(pkt[0], spi=2 | pkt[1])
        assert reply is not None and reply.inner == pkt[0] and reply.si == 254
    assert _exchange(b, tcp("S", IN, sport=22), timeout=0.5) is None
    assert _exchange(a, tcp("A", IN, sport=23), timeout=0.5) is None
    assert b.counters()["drops"] == {"denied_by_rule": 1}
    assert a.counters()["drops"] == {"no_connection": 1}


def test_established_connection_survives_the_kill_of_its_instance(nf_process, redis_clean) -> None:
    a = nf_process("firewall", CONFIG, redis_clean.url("red"))
    for pkt in HANDSHAKE:
        assert _exchange(a, pkt) == pkt[0]
    a.kill()
    b = nf_process("firewall", CONFIG, redis_clean.url("red"))
    for pkt in (tcp("PA", IN, payload=b"after"), tcp("PA", payload=b"crash"), tcp("FA", IN), tcp("FA")):
        assert _exchange(b, pkt) == pkt[0]  # no new SYN needed
    assert _exchange(b, tcp("S", IN, sport=22), timeout=0.5) is None


def test_fuzz_is_dropped_and_counted_and_the_process_survives(nf_process, redis_clean) -> None:
    nf = nf_process("firewall", CONFIG, redis_clean.url("red"))
    rnd = random.Random(7)
    templates = [(fuzz(Ether() / IP(version=4, src=CLIENT, dst=SERVER) / TCP()), 700),
                 (fuzz(Ether() / IP(version=4) / UDP()), 300),
                 (fuzz(Ether() / IP(version=4, proto=1) / ICMP() / IPerror() / TCPerror()), 300),
                 (Ether() / IP(src=SERVER, dst=CLIENT) / fuzz(TCP(dport=40000)), 300)]
    inner = [raw(template) for template, count in templates for _ in range(count)]  # new values each time
    for _ in range(300):  # one byte of a valid header changed: checksums must catch it
        flipped = bytearray(tcp("S")[0])
        flipped[rnd.randrange(14, len(flipped))] ^= 1 << rnd.randrange(8)
        inner.append(bytes(flipped))
    inner += [tcp("S")[0][:n] for n in range(20, 54)] + [raw(ETH / IP(proto=6) / bytes(n)) for n in range(20)]
    frames = [nsh_frame(f[:1500], spi=2 | (i & 1)) for i, f in enumerate(inner)]
    nf.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: keep every reply
    nf.send_bursts(frames)
    replies = [nsh.parse(r) for r in nf.receive(1.0)]
    assert nf.alive()
    assert _exchange(nf, tcp("S", sport=45000)) == tcp("S", sport=45000)[0]  # still works
    c = nf.counters()
    assert c["rx"] == len(frames) + 1 and c["tx"] == len(replies) + 1
    assert c["dropped"] + c["tx"] == c["rx"] and "nf_error" not in c["drops"]
    assert {r.inner for r in replies} <= {f[:1500] for f in inner}  # what passes is unchanged
    assert c["dropped"] > len(frames) * 3 // 4
    assert {"bad_ip_checksum", "bad_l4_checksum", "truncated_tcp", "bad_tcp_offset", "invalid_state",
            "denied_by_rule", "no_connection"} <= set(c["drops"])


def test_process_fails_closed_when_state_is_unreachable(nf_process) -> None:
    nf = nf_process("firewall", CONFIG, "redis://tenant-red:x@127.0.0.1:1/0")
    assert _exchange(nf, tcp("S"), timeout=0.5) is None
    assert nf.alive()
    assert nf.counters()["drops"] == {"state_unavailable": 1}
