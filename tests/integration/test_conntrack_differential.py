"""Differential test: our firewall NF against Linux's own conntrack, packet by packet.

One trace of TCP segments (scapy; handshakes, data, closes, blind and in-window resets, data
and acknowledgements outside the window, SYN-ACKs acknowledging the wrong number, SYNs on
established connections, simultaneous open, window scaling, retransmissions, ICMP errors...)
goes through two firewalls with the same policy (inside hosts may open connections, nothing
else starts one):

1. Linux: a router namespace this test creates, between two veths whose other ends the test
   holds, with ``nf_conntrack_tcp_loose=0``, ``nf_conntrack_tcp_be_liberal=0`` and the nftables
   ruleset ``ct state invalid drop; ct state established,related accept; iifname <inside> ct
   state new accept; drop`` (each rule with a counter). After each segment the test waits for
   one of the counters to count it: that is Linux's verdict; the capture on the far side then
   shows that exactly the accepted ones were forwarded.
2. Ours: a real ``python -m nfs.firewall`` process (tests/nfharness.py) on a real Redis,
   given the trace in NSH frames; what comes back is what it forwarded.

The verdicts must be equal, segment by segment, except where :data:`INTENDED` lists a segment
with the reason and the RFC; each listed difference must occur (the list stays honest).
"""

from __future__ import annotations

import json
import secrets
import select
import shutil
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.layers.l2 import Ether

from nfs import nsh, packet
from nfs.firewall import Firewall
from nfs.mmsg import packet_socket
from nfs.runtime import Drop
from nfs.state import LocalState
from tests.nfharness import nsh_frame
from tests.tcpconv import CLIENT, IN, OUT, SERVER, Conversation, ip_id

pytestmark = pytest.mark.root

CONFIG = {"default": "deny", "rules": [{"action": "allow", "direction": "outbound"}]}
RULES = ("invalid drop", "established,related accept", "new from inside accept", "other drop")
DEADLINE = 10.0
SENDER_MAC = bytes.fromhex("02cc00000001")


@dataclass(frozen=True)
class Packet:
    scenario: str
    index: int
    frame: bytes
    direction: int

    def __str__(self) -> str:
        pkt = Ether(self.frame)
        if TCP in pkt and ICMP not in pkt:
            t = pkt[TCP]
            what = f"{t.sprintf('%TCP.flags%') or '-'} seq={t.seq} ack={t.ack} win={t.window} len={len(t.payload)}"
        else:
            what = pkt[IP].summary()
        return f"{self.scenario}[{self.index}] {'out' if self.direction == OUT else 'in '} {what}"


# -- the trace -------------------------------------------------------------------------------

Scenario = Callable[[Callable[..., Conversation]], list[tuple[bytes, int]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def handshake_data_fin(conv):
    c = conv()
    return [*c.handshake(), c.seg("PA", payload=b"q" * 100), c.seg("A", IN),
            c.seg("PA", IN, payload=b"r" * 200), c.seg("A"), c.seg("FA"), c.seg("A", IN),
            c.seg("FA", IN), c.seg("A")]


@scenario
def blind_rst(conv):
    c = conv()
    out = [*c.handshake(), c.seg("PA", payload=b"x" * 50), c.seg("A", IN)]
    out += [c.seg("R", seq=c.nxt[OUT] - 100_000), c.seg("R", seq=c.nxt[OUT] + 5_000_000),
            c.seg("R", IN, seq=c.nxt[IN] - 70_000), c.seg("RA", IN, seq=c.nxt[IN] + 2**30)]
    return out + [c.seg("PA", IN, payload=b"still open"), c.seg("A")]


@scenario
def rst_in_window(conv):
    c = conv()
    out = [*c.handshake(), c.seg("PA", payload=b"x" * 50), c.seg("A", IN)]
    out += [c.seg("R", seq=c.nxt[OUT] + 1000),          # in the window, not exact: no close
            c.seg("PA", IN, payload=b"y" * 20), c.seg("A"),
            c.seg("RA")]                                # exact: closes
    return out + [c.seg("PA", IN, payload=b"late"), c.seg("R", seq=c.nxt[OUT])]


@scenario
def rst_answering_syn(conv):
    c = conv()
    return [c.seg("S"), c.seg("RA", IN, seq=0), c.seg("A", IN), c.seg("S", seq=c.isn[OUT])]


@scenario
def data_outside_window(conv):
    c = conv()
    return [*c.handshake(),
            c.seg("PA", payload=b"x", seq=c.nxt[OUT] + 1_000_000),
            c.seg("PA", IN, payload=b"x", seq=c.nxt[IN] + 2**30),
            c.seg("A", ack=c.nxt[IN] + 5000),          # acknowledges data never sent
            c.seg("PA", IN, payload=b"x", seq=c.nxt[IN], ack=c.nxt[OUT] + 1),
            c.seg("PA", payload=b"in the window"), c.seg("A", IN)]


@scenario
def data_a_little_past_window(conv):
    c = conv(win=(64240, 1000))  # the server offers 1000 bytes: Linux tolerates some more, not all
    return [*c.handshake(), *(c.seg("PA", payload=b"x" * 400) for _ in range(7)), c.seg("A", IN)]


@scenario
def syn_ack_wrong_ack(conv):
    c = conv()
    s = c.isn[IN]
    return [c.seg("S"), c.seg("SA", IN, seq=s, ack=c.nxt[OUT] + 1), c.seg("SA", IN, seq=s, ack=c.nxt[OUT] + 100_000),
            c.seg("SA", IN, seq=s, ack=c.nxt[OUT] - 1000),  # less than the SYN: lets the client reset it
            c.seg("SA", IN), c.seg("A"), c.seg("PA", payload=b"ok")]


@scenario
def syn_ack_ack_far_behind(conv):
    c = conv()
    return [c.seg("S"), c.seg("SA", IN, seq=c.isn[IN], ack=c.nxt[OUT] - 100_000), c.seg("R", seq=c.nxt[OUT] - 100_000),
            c.seg("SA", IN), c.seg("A")]


@scenario
def new_syn_on_established(conv):
    c = conv()
    out = [*c.handshake(), c.seg("PA", payload=b"x"), c.seg("A", IN)]
    lost = conv(isn=(3_000_000, 0))  # the client lost the connection, same ports
    out += [lost.seg("S"), c.seg("A", IN),         # the server's challenge ACK (RFC 5961 §4)
            c.seg("R", seq=c.nxt[OUT])]            # the client's RST to it
    again = conv(isn=(3_000_000, 8_000_000))
    return out + [*again.handshake(), again.seg("PA", payload=b"new")]


@scenario
def new_syn_resynced_by_syn_ack(conv):
    c = conv()
    new = conv(isn=(7_000_000, 9_000_000))
    return [*c.handshake(), *new.handshake(), new.seg("PA", payload=b"new"), new.seg("A", IN)]


@scenario
def simultaneous_open(conv):
    c = conv()
    return [c.seg("S"), c.seg("S", IN), c.seg("SA", seq=c.isn[OUT]), c.seg("SA", IN, seq=c.isn[IN]),
            c.seg("A", IN), c.seg("PA", payload=b"hi"), c.seg("A", IN)]


@scenario
def window_scaling(conv):
    c = conv(win=(64240, 1000))
    ws = [("MSS", 1460), ("WScale", 7), ("SAckOK", b"")]
    return [c.seg("S", options=ws), c.seg("SA", IN, options=ws), c.seg("A"), c.seg("A", IN),
            c.seg("PA", payload=b"x", seq=c.nxt[OUT] + 50_000),     # in 1000 << 7
            c.seg("PA", payload=b"x", seq=c.nxt[OUT] + 300_000)]    # past it and its tolerance


@scenario
def window_scaling_one_side(conv):
    c = conv(win=(64240, 1000))
    return [c.seg("S", options=[("WScale", 7)]), c.seg("SA", IN), c.seg("A"), c.seg("A", IN),
            c.seg("PA", payload=b"x", seq=c.nxt[OUT] + 50_000)]     # not scaled: past 1000


@scenario
def retransmissions(conv):
    c = conv()
    out = [c.seg("S"), c.seg("S", seq=c.isn[OUT])]
    syn_ack = c.seg("SA", IN)
    out += [syn_ack, syn_ack, c.seg("A")]
    first = c.nxt[OUT]
    data = c.seg("PA", payload=b"d" * 1000)
    out += [data, data, data, data, c.seg("A", IN), data]
    return out + [c.seg("PA", payload=b"d" * 500, seq=first + 500), c.seg("A", IN)]


@scenario
def ack_far_behind(conv):
    c = conv(win=(65535, 65160))
    out = [*c.handshake()]
    start = c.nxt[IN]
    for n in range(46):  # 67 kB from the server, acknowledged as it comes
        out.append(c.seg("PA", IN, payload=b"z" * 1460))
        if n % 10 == 9:
            out.append(c.seg("A"))
    return out + [c.seg("A", ack=start), c.seg("A")]  # an ACK more than 66000 bytes behind


@scenario
def rst_in_close_wait(conv):
    c = conv()
    out = [*c.handshake(), c.seg("FA"), c.seg("A", IN), c.seg("PA", IN, payload=b"half closed"), c.seg("A")]
    return out + [c.seg("R", IN, seq=c.nxt[IN] + 3_000_000)]


@scenario
def challenge_ack_in_last_ack(conv):
    c = conv()
    out = [*c.handshake(), c.seg("FA", IN), c.seg("FA")]   # LAST_ACK: the client's FIN unacked
    lost = conv(isn=(4_000_000, 0))
    return out + [lost.seg("S"), c.seg("A", IN, seq=c.nxt[IN]), c.seg("A", IN), c.seg("A")]


@scenario
def time_wait_reopen(conv):
    c = conv()
    out = [*c.handshake(), c.seg("FA"), c.seg("FA", IN), c.seg("A")]
    reopen_in = conv(isn=(0, 6_000_000))
    reopen = conv(isn=(6_500_000, 7_500_000))
    return out + [reopen_in.seg("S", IN), *reopen.handshake()]


@scenario
def no_connection(conv):
    c = conv()
    return [c.seg("A"), c.seg("PA", payload=b"mid-stream"), c.seg("S", IN), c.seg("SA", IN), c.seg("FA")]


@scenario
def bad_flags_and_checksum(conv):
    c = conv()
    out = [*c.handshake()]
    for flags in ("SF", "FR", "", "F"):
        out.append(c.seg(flags, seq=c.nxt[OUT]))
    bad = bytearray(c.seg("PA", payload=b"bad sum", seq=c.nxt[OUT])[0])
    bad[14 + 20 + 16] ^= 0x5A  # TCP checksum
    return out + [(bytes(bad), OUT), c.seg("PA", payload=b"good")]


@scenario
def icmp_errors(conv):
    c = conv()
    out = [c.seg("S")]

    def unreachable(sport: int) -> tuple[bytes, int]:
        return raw(Ether() / IP(src="203.0.113.1", dst=CLIENT) / ICMP(type=3, code=1)
                   / IPerror(src=CLIENT, dst=SERVER) / TCPerror(sport=sport, dport=c.dport, flags="S",
                                                                seq=c.isn[OUT])), IN
    return out + [unreachable(c.sport),       # about the tracked connection: related
                  unreachable(c.sport + 1)]   # about nothing tracked


# Where we differ on purpose: (scenario, index) -> (ours forwards?, Linux forwards?, why and RFC).
INTENDED: dict[tuple[str, int], tuple[bool, bool, str]] = {
    ("rst_in_close_wait", 7): (False, True, (
        "a RST far outside the window in CLOSE_WAIT: Linux accepts any RST in FIN_WAIT, CLOSE_WAIT "
        "and LAST_ACK (tcp_can_early_drop); ours checks it as in ESTABLISHED, since a half-closed "
        "connection still carries data: RFC 5961 §3 (blind reset)")),
}


def _stamped(frame: bytes, ident: int) -> bytes:
    """``frame`` with IPv4 identification ``ident`` (header checksum made right again): the
    name of this one segment in a capture, even if it repeats another one."""
    b = bytearray(frame)
    b[18:20] = ident.to_bytes(2, "big")
    b[24:26] = bytes(2)
    b[24:26] = packet.checksum(bytes(b[14:14 + (b[14] & 0xF) * 4])).to_bytes(2, "big")
    return bytes(b)


def build_trace() -> list[Packet]:
    trace = []
    for n, (name, fn) in enumerate(SCENARIOS.items()):
        def conv(n: int = n, **kw) -> Conversation:
            return Conversation(sport=41000 + 10 * n, **kw)
        for i, (frame, direction) in enumerate(fn(conv)):
            trace.append(Packet(name, i, _stamped(frame, len(trace) + 1), direction))
    return trace


# -- Linux: a router namespace with nftables and conntrack ------------------------------------

def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class LinuxFirewall:
    """A namespace ``slct-<tag>`` routing between veth ``fc`` (inside: 10.0.0.254/24) and
    ``fs`` (outside: 203.0.113.254/24), filtering with conntrack; the test holds the veths'
    other ends in the root namespace (no addresses there; the router's neighbour entries name
    MACs nobody has, so what it forwards is captured and goes no further)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = f"slct-{tag}"
        self.inside, self.outside = f"ctc{tag}", f"cts{tag}"
        self.socks: dict[int, socket.socket] = {}
        self.last: Optional[list[int]] = None
        _run("ip", "netns", "add", self.ns)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _ns(self, *argv: str) -> str:
        return _run("ip", "netns", "exec", self.ns, *argv)

    def _build(self) -> None:
        self._ns("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        for ours, theirs in ((self.inside, "fc"), (self.outside, "fs")):
            _run("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", self.ns)
            _run("sysctl", "-qw", f"net.ipv6.conf.{ours}.disable_ipv6=1", f"net.ipv4.conf.{ours}.forwarding=0")
            _run("ip", "link", "set", ours, "up")
        self._ns("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                 "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.all.send_redirects=0",
                 "net.netfilter.nf_conntrack_tcp_loose=0", "net.netfilter.nf_conntrack_tcp_be_liberal=0",
                 "net.netfilter.nf_conntrack_tcp_ignore_invalid_rst=0", "net.netfilter.nf_conntrack_checksum=1")
        for dev, addr, peer in (("fc", "10.0.0.254/24", CLIENT), ("fs", "203.0.113.254/24", SERVER)):
            self._ns("ip", "addr", "add", addr, "dev", dev)
            self._ns("ip", "link", "set", dev, "up")
            self._ns("ip", "neigh", "replace", peer, "lladdr", "02:ee:00:00:00:01", "dev", dev, "nud", "permanent")
        ruleset = """table inet ctdiff {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state invalid counter drop
    ct state established,related counter accept
    iifname "fc" ct state new counter accept
    counter drop
  }
}
"""
        done = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=ruleset,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nft in namespace {self.ns}: {done.stderr.strip()}")
        self.macs = {d: bytes.fromhex(json.loads(self._ns("ip", "-j", "link", "show", dev))[0]["address"]
                                      .replace(":", "")) for d, dev in ((OUT, "fc"), (IN, "fs"))}
        for d, dev in ((OUT, self.inside), (IN, self.outside)):
            s = packet_socket(dev)
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            self.socks[d] = s

    def counters(self) -> list[int]:
        out = json.loads(self._ns("nft", "-j", "list", "chain", "inet", "ctdiff", "forward"))
        rules = [item["rule"] for item in out["nftables"] if "rule" in item]
        return [next(e["counter"]["packets"] for e in r["expr"] if "counter" in e) for r in rules]

    def verdict(self, pkt: Packet) -> tuple[bool, str]:
        """Send one segment into the router; (forwarded?, the rule that counted it)."""
        before = self.last or self.counters()
        frame = self.macs[pkt.direction] + SENDER_MAC + pkt.frame[12:]
        self.socks[pkt.direction].send(frame)
        end = time.monotonic() + DEADLINE
        while True:
            now = self.counters()
            grown = [i for i, (a, b) in enumerate(zip(before, now)) if b != a]
            if sum(now) > sum(before):
                self.last = now
                assert sum(now) == sum(before) + 1 and len(grown) == 1, (
                    f"{pkt}: counters went {before} -> {now}: something else crossed the router")
                return grown[0] in (1, 2), RULES[grown[0]]
            assert time.monotonic() < end, f"{pkt}: no rule of the router counted it within {DEADLINE:g} s"
            time.sleep(0.01)

    def captured(self, want: set[int]) -> set[int]:
        """IP ids of the trace's frames forwarded out of the router, once ``want`` arrived."""
        got: set[int] = set()
        end = time.monotonic() + DEADLINE
        while not want <= got and time.monotonic() < end:
            ready, _, _ = select.select(list(self.socks.values()), [], [], 0.1)
            for s in ready:
                data, addr = s.recvfrom(65535)
                if addr[2] != socket.PACKET_OUTGOING and data[12:14] == b"\x08\x00":
                    got.add(ip_id(data))
        return got

    def conntrack_table(self) -> str:
        if shutil.which("conntrack") is None:
            return "(conntrack not installed)"
        done = subprocess.run(["ip", "netns", "exec", self.ns, "conntrack", "-L"], capture_output=True, text=True)
        return done.stdout + done.stderr

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)  # takes the veths along
        for dev in (self.inside, self.outside):
            subprocess.run(["ip", "link", "del", dev], capture_output=True)


@pytest.fixture
def linux_firewall() -> Iterator[LinuxFirewall]:
    if shutil.which("nft") is None:
        pytest.skip("nft not installed: apt-get install nftables conntrack (scripts/install.sh)")
    try:
        fw = LinuxFirewall()
    except RuntimeError as err:
        pytest.skip(f"this kernel cannot run an nftables/conntrack firewall in a namespace: {err}")
    try:
        yield fw
    finally:
        fw.close()


# -- the test --------------------------------------------------------------------------------

def _in_process_reasons(trace: list[Packet]) -> list[Optional[str]]:
    """Our drop reason of each segment, from the same code run in this process (for the
    failure message, and to check the process agrees with it)."""
    fw = Firewall(CONFIG, None, "reference")
    fw._state = LocalState("red", "fw")
    out = []
    for p in trace:
        (v,) = fw.process([nsh.parse(nsh_frame(p.frame, spi=2 | p.direction))])
        out.append(v.reason if isinstance(v, Drop) else None)
    return out


def test_verdicts_equal_linux_conntrack_packet_by_packet(linux_firewall, nf_process, redis_clean) -> None:
    trace = build_trace()
    linux = [linux_firewall.verdict(p) for p in trace]
    forwarded_ids = {ip_id(p.frame) for p, (fwd, _) in zip(trace, linux) if fwd}
    assert linux_firewall.captured(forwarded_ids) == forwarded_ids  # what the counters call forwarded was

    nf = nf_process("firewall", CONFIG, redis_clean.url("red"))
    nf.send_bursts([nsh_frame(p.frame, spi=2 | p.direction) for p in trace], burst=50)
    back = {ip_id(nsh.parse(f).inner) for f in nf.receive()}
    ours = [ip_id(p.frame) in back for p in trace]
    reasons = _in_process_reasons(trace)
    assert ours == [r is None for r in reasons], "the process and the in-process firewall disagree"
    assert nf.counters()["drops"] == Counter(r for r in reasons if r)

    unexplained, seen = [], set()
    for p, (lx, rule), mine, why in zip(trace, linux, ours, reasons):
        key = (p.scenario, p.index)
        if key in INTENDED:
            seen.add(key)
            want_ours, want_linux, text = INTENDED[key]
            assert (mine, lx) == (want_ours, want_linux), f"{p}: intended difference did not show: {text}"
        elif mine != lx:
            unexplained.append(f"{p}: Linux {'forwards' if lx else 'drops'} ({rule}), "
                               f"ours {'forwards' if mine else 'drops (' + str(why) + ')'}")
    assert not unexplained, ("verdicts differ from Linux conntrack:\n" + "\n".join(unexplained)
                             + "\n\nLinux's table now:\n" + linux_firewall.conntrack_table())
    assert seen == set(INTENDED), f"listed differences not in the trace: {set(INTENDED) - seen}"
    # How much the trace exercised (printed with -s / -rA).
    drops = Counter(r for r in reasons if r)
    print(f"\n{len(trace)} segments in {len(SCENARIOS)} scenarios; Linux forwarded {len(forwarded_ids)}, "
          f"dropped {len(trace) - len(forwarded_ids)}; equal verdicts on {len(trace) - len(INTENDED)}, "
          f"intended differences {len(INTENDED)}; our drops: {dict(drops)}")
