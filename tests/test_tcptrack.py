"""The TCP tracker on its own: sequence arithmetic, options, the record's text form, a
connection across the 2**32 wrap (the firewall tests cover the rest through the firewall)."""

from __future__ import annotations

from nfs import packet, tcptrack
from nfs.firewall import DEFAULT_TIMEOUTS
from nfs.tcptrack import ORIGINAL, REPLY, Segment, TcpConn, after, before
from tests.tcpconv import IN, OUT, Conversation

TIMEOUTS = {name: int(sec * 1000) for name, sec in DEFAULT_TIMEOUTS.items()}


def segment(pkt: tuple[bytes, int]) -> Segment:
    return Segment.from_packet(packet.parse(pkt[0]))


def run(conn: TcpConn, *pkts: tuple[bytes, int]) -> list:
    return [tcptrack.track(conn, ORIGINAL if d == OUT else REPLY, segment((f, d)), TIMEOUTS).reason
            for f, d in pkts]


def opened(c: Conversation, *options) -> TcpConn:
    """The record of ``c`` after the client's SYN (as the firewall makes it)."""
    syn = c.seg("S", options=options)
    conn = tcptrack.new(segment(syn))
    assert run(conn, syn) == [None] and conn.state == tcptrack.SYN_SENT
    return conn


def test_sequence_numbers_compare_modulo_2_32() -> None:
    assert before(1, 2) and after(2, 1) and not before(2, 2)
    assert before(0xFFFFFFF0, 5) and after(5, 0xFFFFFFF0)  # across the wrap
    assert before(0, 0x7FFFFFFF) and not before(0, 0x80000001)


def test_segment_reads_the_header_and_options() -> None:
    c = Conversation()
    seg = segment(c.seg("S", options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 9)]))
    assert (seg.seq, seg.win, seg.length, seg.index, seg.end) == (1000, 64240, 0, tcptrack.I_SYN, 1001)
    conn = tcptrack.new(seg)
    side = conn.seen[ORIGINAL]
    assert side.scale == 9 and side.flags & tcptrack.SACK_PERM and side.flags & tcptrack.WINDOW_SCALE
    big = segment(c.seg("S", seq=1000, options=[("WScale", 20)]))
    assert tcptrack.new(big).seen[ORIGINAL].scale == 14  # RFC 7323 §2.3: at most 14
    assert segment(c.seg("FA", payload=b"abc")).end == 1001 + 4


def test_record_text_round_trips_and_refuses_garbage() -> None:
    c = Conversation()
    conn = opened(c)
    assert run(conn, c.seg("SA", IN), c.seg("A")) == [None, None]
    text = conn.encode()
    assert len(text.split()) == TcpConn.FIELDS and TcpConn.decode(text) == conn
    for bad in ("", "3 0", text + " 1", text.replace("3 ", "x ", 1), "99" + text[1:], f"{2**32} " + text[2:]):
        assert TcpConn.decode(bad) is None, bad


def test_a_connection_across_the_sequence_wrap() -> None:
    c = Conversation(isn=(0xFFFFFF00, 0xFFFFFFF0))
    conn = opened(c)
    assert run(conn, c.seg("SA", IN), c.seg("A")) == [None, None]
    for _ in range(4):  # both sides' numbers wrap past 0
        assert run(conn, c.seg("PA", payload=b"x" * 100), c.seg("PA", IN, payload=b"y" * 100),
                   c.seg("A")) == [None, None, None]
    assert c.nxt[OUT] < 0x1000 and c.nxt[IN] < 0x1000
    assert conn.state == tcptrack.ESTABLISHED and conn.seen[ORIGINAL].end == c.nxt[OUT]
    assert run(conn, c.seg("PA", payload=b"z", seq=c.nxt[OUT] + 2**31 - 1)) == ["out_of_window"]
