"""The stateful firewall: rules for new connections, shared connection tracking, timers, bad input.

In-process tests run on LocalState and on a real Redis (two NF objects with two clients stand
for two instances); process tests run real ``python -m nfs.firewall`` processes on veth pairs.
"""

from __future__ import annotations

import random
import time
from typing import Any, Optional

import jsonschema
import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.packet import fuzz

from nfs import nsh
from nfs.firewall import CONFIG_SCHEMA, Conn, Firewall, conn_key
from nfs.runtime import Drop
from nfs.state import LocalState, RedisState, StateUnavailable
from tests.nfharness import nsh_frame
from tests.tcpconv import Conversation

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



class Pool:
    """Firewall instances of one pool sharing one state server (Redis or one LocalState store)."""

    def __init__(self, backend: str, redis_server: Any) -> None:
        self.backend = backend
        self.redis = redis_server
        self.store: dict = {}

    def state(self) -> Any:
        if self.backend != "local":  # "cached": as the NF process opens it
            return RedisState(self.redis.url("red"), "red", "fw", cache=self.backend == "cached")
        return LocalState("red", "fw", store=self.store)

    def nf(self, config: Optional[dict[str, Any]] = None, name: str = "fw-1") -> Firewall:
        lab = {"statelab": {"tenant": "red", "tenant_id": 1, "pool": "fw"}}
        url = self.redis.url("red") if self.backend != "local" else None
        fw = Firewall({**(CONFIG if config is None else config), **lab}, url, name)
        fw._state = self.state()  # local: instances of one process share the store, as Redis would
        return fw

    def peek(self, key: str) -> tuple[Optional[bytes], int]:
        """The stored entry and its remaining TTL in ms."""
        b = self.state().batch()
        value, pttl = b.get(key), b.pttl(key)
        b.execute()
        return value.value, pttl.value


@pytest.fixture(params=["local", "redis", "cached"])
def pool(request) -> Pool:
    return Pool(request.param, request.getfixturevalue("redis_clean") if request.param != "local" else None)


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

def entry(pool: Pool, key: str = WEB) -> tuple[Optional[Conn], int]:
    """The decoded entry of ``key`` (None if absent) and its remaining TTL in ms."""
    value, pttl = pool.peek(key)
    return Conn.decode(value), pttl


def state_of(pool: Pool, key: str = WEB) -> Optional[tuple[str, str]]:
    """(state, originator) of the entry of ``key``, or None if it has none."""
    conn, _ = entry(pool, key)
    return None if conn is None else (conn.state, conn.orig)


def test_connection_lifecycle_on_alternating_instances(pool: Pool) -> None:
    """Each packet on another instance; states and timers as Linux conntrack has them."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    steps = [(a, c.seg("S"), "SYN_SENT", 120_000), (b, c.seg("SA", IN), "SYN_RECV", 60_000),
             (a, c.seg("A"), "ESTABLISHED", 432_000_000),
             (b, c.seg("PA", IN, payload=b"hello"), "ESTABLISHED", 300_000),  # data in flight
             (a, c.seg("A"), "ESTABLISHED", 432_000_000),
             (a, c.seg("FA"), "FIN_WAIT", 120_000), (b, c.seg("FA", IN), "LAST_ACK", 30_000),
             (a, c.seg("A"), "TIME_WAIT", 120_000)]
    for nf, pkt, state, ttl in steps:
        assert passes(nf, pkt), (state, reason(nf, pkt))
        conn, pttl = entry(pool)
        assert (conn.state, conn.orig) == (state, "10.0.0.1:40000")
        assert ttl - 2000 < pttl <= ttl, (state, pttl)


def test_a_drop_on_a_stale_cached_entry_is_decided_again_on_the_server_value(redis_clean) -> None:
    """Another instance's write reaches a caching instance as an invalidation a moment later; a
    packet that the stale entry would drop (here an ACK of data only the other instance saw)
    is checked again against the server before it is dropped."""
    pool = Pool("cached", redis_clean)
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    for pkt in (c.seg("S"), c.seg("SA", IN), c.seg("A")):
        assert passes(a, pkt)
    key = a.state.key(WEB)
    stale = a.state.cache[key]
    assert passes(b, c.seg("PA", IN, payload=b"hello"))             # the server's data, through b only
    deadline = time.monotonic() + 5
    while key in a.state.cache:                                      # a hears of b's write ...
        a.state._poll_invalidations()
        assert time.monotonic() < deadline
    a.state.cache[key] = stale                                       # ... as if it had not yet
    trips = a.state.round_trips
    assert passes(a, c.seg("A")), reason(a, c.seg("A", ack=c.nxt[IN]))
    assert a.state.round_trips == trips + 2                          # the fresh read, then the write
    assert entry(pool)[0].state == "ESTABLISHED"


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
    assert reason(loose, tcp("SA")) == "no_connection"   # a SYN-ACK is never picked up,
    assert reason(loose, tcp("FA")) == "no_connection"   # nor a FIN (as in Linux)
    assert reason(loose, tcp("A", IN, sport=22)) == "denied_by_rule"
    assert passes(loose, tcp("PA", payload=b"x"))        # outbound: allowed by rule, picked up
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")
    assert entry(pool)[1] <= 300_000                     # no answer seen yet: the short timer
    assert passes(strict, tcp("A", IN, sport=40000))     # now tracked for every instance
    assert passes(strict, tcp("PA", IN, payload=b"y" * 100))  # a picked-up window is not checked


def test_invalid_tcp_is_dropped_and_changes_nothing(pool: Pool) -> None:
    fw = pool.nf()
    c = Conversation()
    syn = c.seg("S")
    assert passes(fw, syn)
    stored = pool.peek(WEB)[0]
    for flags in ("SF", "", "F", "SR", "FR", "SAR"):      # combinations Linux refuses
        assert reason(fw, c.seg(flags, seq=c.nxt[OUT])) == "bad_tcp_flags", flags
    assert reason(fw, c.seg("SA", seq=c.isn[OUT])) == "invalid_state"   # a SYN-ACK from the client
    assert reason(fw, c.seg("A")) == "invalid_state"                    # an ACK before the SYN-ACK
    assert reason(fw, c.seg("FA", seq=c.nxt[OUT])) == "invalid_state"   # a FIN before the SYN-ACK
    assert pool.peek(WEB)[0] == stored
    syn_ack = c.seg("SA", IN)
    assert passes(fw, syn, syn_ack, syn_ack, c.seg("A"))  # retransmissions pass
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")


def test_syn_ack_must_acknowledge_the_syn(pool: Pool) -> None:
    """RFC 9293 §3.10.7.3: SEG.ACK > SND.NXT is unacceptable; the right SYN-ACK still passes."""
    fw = pool.nf()
    c = Conversation()
    assert passes(fw, c.seg("S"))
    assert reason(fw, c.seg("SA", IN, seq=c.isn[IN], ack=c.nxt[OUT] + 1)) == "bad_ack"
    assert reason(fw, c.seg("SA", IN, seq=c.isn[IN], ack=c.nxt[OUT] + 100_000)) == "bad_ack"
    assert state_of(pool) == ("SYN_SENT", "10.0.0.1:40000")
    assert passes(fw, c.seg("SA", IN), c.seg("A"))
    assert state_of(pool)[0] == "ESTABLISHED"


def test_blind_reset_is_dropped_and_the_connection_goes_on(pool: Pool) -> None:
    """RFC 5961 §3: a RST must hit the window; in it but not exact, it closes nothing (the
    endpoint answers with a challenge ACK); exact, it closes the connection for every instance."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    assert passes(a, *c.handshake(), c.seg("PA", payload=b"x" * 100), c.seg("A", IN))
    expected = c.nxt[OUT]
    assert reason(b, c.seg("R", seq=expected - 5000)) == "bad_rst"            # behind the window
    assert reason(b, c.seg("R", seq=expected + 10_000_000)) == "out_of_window"  # past it
    assert reason(b, c.seg("R", IN, seq=c.nxt[IN] + 2**30)) == "out_of_window"
    assert passes(b, c.seg("R", seq=expected + 1000))                        # in it, not exact
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")
    assert passes(a, c.seg("PA", IN, payload=b"still here"), c.seg("A"))
    assert passes(b, c.seg("RA"))                                           # exact
    conn, pttl = entry(pool)
    assert conn.state == "CLOSE" and 8_000 < pttl <= 10_000


def test_reset_answering_the_syn_deletes_the_entry(pool: Pool) -> None:
    """Connection refused: the only answer was a RST, nothing stays (compare-and-delete)."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    assert passes(a, c.seg("S"))
    assert passes(b, c.seg("RA", IN, seq=0))
    assert pool.peek(WEB) == (None, -2)
    assert reason(a, c.seg("A")) == "no_connection"


def test_data_far_outside_the_window_is_dropped(pool: Pool) -> None:
    fw = pool.nf()
    c = Conversation()
    assert passes(fw, *c.handshake())
    stored = pool.peek(WEB)[0]
    assert reason(fw, c.seg("PA", payload=b"x", seq=c.nxt[OUT] + 1_000_000)) == "out_of_window"
    assert reason(fw, c.seg("PA", IN, payload=b"x", seq=c.nxt[IN] + 2**30)) == "out_of_window"
    assert reason(fw, c.seg("A", ack=c.nxt[IN] + 5000)) == "bad_ack"    # acknowledges unsent data
    assert pool.peek(WEB)[0] == stored
    assert passes(fw, c.seg("PA", payload=b"in the window"))


def test_retransmissions_pass(pool: Pool) -> None:
    """Data sent again passes; while it is unacknowledged the entry has Linux's short timer;
    a retransmission of data acknowledged more than a window ago passes and changes nothing."""
    fw = pool.nf()
    c = Conversation()
    assert passes(fw, *c.handshake())
    first = c.nxt[OUT]
    assert passes(fw, c.seg("PA", payload=b"a" * 1400))
    for _ in range(4):
        assert passes(fw, c.seg("PA", payload=b"a" * 1400, seq=first))
    assert entry(pool)[1] <= 300_000
    assert passes(fw, c.seg("A", IN))
    assert entry(pool)[1] > 300_000
    for _ in range(50):  # 70 kB later: the first segment is older than the server's window
        assert passes(fw, c.seg("PA", payload=b"b" * 1400), c.seg("A", IN))
    stored = pool.peek(WEB)[0]
    assert passes(fw, c.seg("PA", payload=b"a" * 1400, seq=first))
    assert pool.peek(WEB)[0] == stored


def test_window_scaling_from_the_syn_options(pool: Pool) -> None:
    """RFC 7323: with both SYNs carrying a scale, the window is the field shifted by it;
    without, data past the unscaled window is dropped."""
    fw = pool.nf()
    for sport, scaled in ((40010, True), (40011, False)):
        c = Conversation(sport=sport, win=(64240, 1000))
        opts = [("WScale", 7)]
        assert passes(fw, c.seg("S", options=opts),
                      c.seg("SA", IN, options=opts if scaled else []), c.seg("A"), c.seg("A", IN))
        far = c.seg("PA", payload=b"x", seq=c.nxt[OUT] + 50_000)  # in 1000 << 7, past 1000
        assert (reason(fw, far) is None) is scaled, sport


def test_new_syn_on_an_established_connection_reaches_the_endpoint(pool: Pool) -> None:
    """RFC 5961 §4: the SYN passes and changes nothing; the server's challenge ACK passes;
    the client's RST to it closes the connection, and its next SYN opens a new one."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    assert passes(a, *c.handshake(), c.seg("PA", payload=b"x"), c.seg("A", IN))
    restarted = Conversation(isn=(900_000, 0))
    assert passes(b, restarted.seg("S"))                       # the client lost its state
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")
    challenge = c.seg("A", IN)                                 # the server still has it
    assert passes(a, challenge)
    assert passes(b, c.seg("R", seq=c.nxt[OUT]))               # the client resets it
    assert state_of(pool)[0] == "CLOSE"
    again = Conversation(isn=(900_000, 7000))
    assert passes(a, *again.handshake())
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")


def test_new_syn_acknowledged_by_the_server_takes_the_connection_over(pool: Pool) -> None:
    """Both endpoints lost the old connection: the SYN-ACK that answers the new SYN resyncs."""
    fw = pool.nf()
    c = Conversation()
    assert passes(fw, *c.handshake())
    new = Conversation(isn=(777_000, 333_000))
    assert passes(fw, *new.handshake(), new.seg("PA", payload=b"new"), new.seg("A", IN))
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")
    assert entry(pool)[0].tcp.seen[0].end == new.nxt[OUT]  # the record follows the new numbers


def test_simultaneous_open(pool: Pool) -> None:
    """RFC 9293 §3.5 figure 7: both SYNs, both SYN-ACKs, then data."""
    fw = pool.nf()
    c = Conversation()
    syn, syn_in = c.seg("S"), c.seg("S", IN)
    assert passes(fw, syn, syn_in)
    assert state_of(pool)[0] == "SYN_SENT2"
    assert passes(fw, c.seg("SA", seq=c.isn[OUT]), c.seg("SA", IN, seq=c.isn[IN]))
    assert passes(fw, c.seg("A", IN), c.seg("PA", payload=b"hi"), c.seg("A", IN))
    assert state_of(pool) == ("ESTABLISHED", "10.0.0.1:40000")


def test_syn_after_close_opens_a_new_connection(pool: Pool) -> None:
    fw = pool.nf()
    c = Conversation()
    assert passes(fw, *c.handshake(), c.seg("FA", IN), c.seg("FA"), c.seg("A", IN))
    assert state_of(pool) == ("TIME_WAIT", "10.0.0.1:40000")
    reopen_in = Conversation(isn=(0, 90_000))
    assert reason(fw, reopen_in.seg("S", IN)) == "denied_by_rule"  # a new connection for the rules,
    assert pool.peek(WEB) == (None, -2)                             # and the old one is over
    assert passes(fw, Conversation(isn=(50_000, 0)).seg("S"))
    assert state_of(pool) == ("SYN_SENT", "10.0.0.1:40000")


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
    assert state_of(pool) == ("SYN_SENT", "10.0.0.1:40000")  # an error does not change the entry


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
    c = Conversation()
    assert passes(fw, *c.handshake(), udp())
    time.sleep(0.5)
    assert pool.peek(WEB) == (None, -2)
    assert reason(fw, c.seg("PA", IN, payload=b"late")) == "no_connection"
    assert reason(fw, udp(IN)) == "denied_by_rule"  # an expired flow's reply is a new inbound flow


def test_entry_is_rewritten_only_below_half_its_timeout(pool: Pool) -> None:
    fw = pool.nf({**CONFIG, "timeouts": {"udp_stream": 1.0}})
    key = conn_key(17, CLIENT, 5353, SERVER, 53)
    assert passes(fw, udp(), udp(IN))
    trips = fw.state.round_trips
    cached = pool.backend == "cached"  # then the entry is read from the cache, its TTL counting down
    assert passes(fw, udp(), udp(IN))
    assert fw.state.round_trips == trips + (0 if cached else 1)  # read only: no write while the TTL is fresh
    time.sleep(0.6)
    assert pool.peek(key)[1] < 500
    assert passes(fw, udp())
    assert fw.state.round_trips == trips + (1 if cached else 3)  # read, then one refreshing write
    assert 800 < pool.peek(key)[1] <= 1000


def test_a_batch_costs_two_round_trips(pool: Pool) -> None:
    fw = pool.nf()
    c = Conversation()
    syns = [tcp("S", sport=port) for port in range(41000, 41032)]
    assert passes(fw, *syns, *c.handshake(), c.seg("PA", payload=b"x"), c.seg("A", IN))  # in order
    assert fw.state.round_trips == 2
    assert state_of(pool)[0] == "ESTABLISHED"
    assert passes(fw, *syns)                # retransmitted SYNs change nothing:
    assert fw.state.round_trips == (2 if pool.backend == "cached" else 3)  # one read-only round trip, or none


def _racing(monkeypatch: pytest.MonkeyPatch, fw: Firewall, between: Any) -> list:
    """Make ``between()`` run after ``fw``'s read and before its write (once)."""
    execute = fw.state._execute
    ran: list = []

    def racing(ops):
        if any(op == "script" for op, _, _ in ops) and not ran:
            ran.append(between())
        return execute(ops)

    monkeypatch.setattr(fw.state, "_execute", racing)
    return ran


def test_lost_race_is_read_again(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A and B each see one FIN of the same connection at once: the result is LAST_ACK, as in series."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    assert passes(a, *c.handshake())
    before = c.nxt[OUT]
    fin_out = c.seg("FA")
    fin_in = c.seg("FA", IN, ack=before)  # simultaneous close: neither FIN has seen the other
    ran = _racing(monkeypatch, a, lambda: passes(b, fin_in))  # B writes between A's read and write
    assert passes(a, fin_out)
    assert ran == [True] and state_of(pool) == ("LAST_ACK", "10.0.0.1:40000")


def test_reset_deletes_only_what_it_read(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runs the server's RST to the SYN (delete) while B stores the SYN-ACK: the delete is
    compare-and-delete, so A reads again and the RST, now after an answer, leaves CLOSE."""
    a, b = pool.nf(name="fw-a"), pool.nf(name="fw-b")
    c = Conversation()
    assert passes(a, c.seg("S"))
    syn_ack = c.seg("SA", IN)
    ran = _racing(monkeypatch, a, lambda: passes(b, syn_ack))
    assert passes(a, c.seg("R", IN, seq=c.nxt[IN]))
    assert ran == [True] and state_of(pool)[0] == "CLOSE"


def test_compare_and_delete_script(pool: Pool) -> None:
    state = pool.state()
    b = state.batch()
    b.set("k", b"v1", 10)
    wrong = b.script("cad", ["k"], [b"v0"])
    b.execute()
    assert wrong.value == 0 and pool.peek("k")[0] == b"v1"
    b = state.batch()
    right, again = b.script("cad", ["k"], [b"v1"]), b.script("cad", ["k"], [b"v1"])
    b.execute()
    assert (right.value, again.value) == (1, 0) and pool.peek("k") == (None, -2)


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
    c = Conversation()
    assert passes(fw, *c.handshake())
    state.available = False
    for pkt in (c.seg("PA", payload=b"x"), c.seg("A", IN), tcp("S", sport=1234)):
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

def _exchange(nf: Any, pkt: tuple[bytes, int]) -> Optional[bytes]:
    reply = nf.exchange(pkt[0], spi=2 | pkt[1])
    return None if reply is None else reply.inner


@pytest.mark.root
def test_processes_share_connections(nf_process, redis_clean) -> None:
    a = nf_process("firewall", CONFIG, redis_clean.url("red"))
    b = nf_process("firewall", CONFIG, redis_clean.url("red"))
    c = Conversation()
    for nf, pkt in zip((a, b, a, b, a), (*c.handshake(), c.seg("PA", IN, payload=b"hi"), c.seg("FA"))):
        reply = nf.exchange(pkt[0], spi=2 | pkt[1])
        assert reply is not None and reply.inner == pkt[0] and reply.si == 254
    assert _exchange(b, tcp("S", IN, sport=22)) is None
    assert _exchange(a, tcp("A", IN, sport=23)) is None
    assert _exchange(b, c.seg("PA", IN, payload=b"x", seq=c.nxt[IN] + 2**30)) is None
    assert b.counters()["drops"] == {"denied_by_rule": 1, "out_of_window": 1}
    assert a.counters()["drops"] == {"no_connection": 1}


@pytest.mark.root
def test_established_connection_survives_the_kill_of_its_instance(nf_process, redis_clean) -> None:
    a = nf_process("firewall", CONFIG, redis_clean.url("red"))
    c = Conversation()
    for pkt in c.handshake():
        assert _exchange(a, pkt) == pkt[0]
    a.kill()
    b = nf_process("firewall", CONFIG, redis_clean.url("red"))
    for pkt in (c.seg("PA", IN, payload=b"after"), c.seg("PA", payload=b"crash"), c.seg("FA", IN),
                c.seg("FA"), c.seg("A", IN)):
        assert _exchange(b, pkt) == pkt[0]  # no new SYN needed
    assert _exchange(b, tcp("S", IN, sport=22)) is None


@pytest.mark.root
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
    nf.send_bursts(frames)
    replies = [nsh.parse(r) for r in nf.receive()]
    assert nf.alive()
    assert _exchange(nf, tcp("S", sport=45000)) == tcp("S", sport=45000)[0]  # still works
    c = nf.counters()
    assert c["rx"] == len(frames) + 1 and c["tx"] == len(replies) + 1
    assert c["dropped"] + c["tx"] == c["rx"] and "nf_error" not in c["drops"]
    assert {r.inner for r in replies} <= {f[:1500] for f in inner}  # what passes is unchanged
    assert c["dropped"] > len(frames) * 3 // 4
    assert {"bad_ip_checksum", "bad_l4_checksum", "truncated_tcp", "bad_tcp_offset", "bad_tcp_flags",
            "denied_by_rule", "no_connection"} <= set(c["drops"])


@pytest.mark.root
def test_process_fails_closed_when_state_is_unreachable(nf_process) -> None:
    nf = nf_process("firewall", CONFIG, "redis://tenant-red:x@127.0.0.1:1/0")
    assert _exchange(nf, tcp("S")) is None
    assert nf.alive()
    assert nf.counters()["drops"] == {"state_unavailable": 1}
