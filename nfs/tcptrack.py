"""TCP connection tracking the way Linux conntrack does it, for the firewall's shared entries.

A middlebox's view of one TCP connection: the state machine and the window check of Linux's
``net/netfilter/nf_conntrack_proto_tcp.c`` (``nf_conntrack_tcp_loose=0``,
``nf_conntrack_tcp_be_liberal=0``, ``nf_conntrack_tcp_ignore_invalid_rst=0``), written again
in Python over a record that the firewall keeps in the state server. Nothing here talks to the
state server or keeps anything between calls: :func:`track` changes the :class:`TcpConn` it is
given and says what happens to the packet.

Per direction the record keeps what Linux keeps (``struct ip_ct_tcp_state``):

- ``end``: highest sequence number sent plus one (``td_end``);
- ``maxend``: highest right edge of the window the other side offered (``td_maxend``);
- ``maxwin``: largest window the other side offered, scaled (``td_maxwin``);
- ``maxack``: highest acknowledgement this side sent (``td_maxack``);
- ``scale``: this side's window scale from its SYN (RFC 7323 §2; both SYNs must carry the
  option, else neither side scales);
- flags: window scale and SACK permitted seen, FIN sent, data not yet acknowledged, ...

A segment is accepted when it lies in the receiver's window: ``seq <= sender.maxend`` and
``end >= sender.end - receiver.maxwin``; its acknowledgement must not cover data never sent
(``ack <= receiver.end``) and not lie far behind (``ack >= receiver.end - max(66000,
sender.maxwin)``). What is older than the window (a retransmission of acknowledged data) or
acknowledges too far behind passes without changing anything ("ignored"), as in Linux.

Decisions that follow RFC 5961 and RFC 9293 through Linux's table:

- a RST must carry exactly the sequence number the receiver expects next (its highest ACK)
  to close the connection; one that is in the window but not exact passes and changes nothing
  (the endpoint answers with a challenge ACK, RFC 5961 §3.2); one below is ``bad_rst``;
- a SYN on a synchronised connection passes and changes nothing but a note of it (RFC 5961
  §4: the endpoint answers with a challenge ACK); if the other side answers it with a SYN-ACK
  that acknowledges it, the record takes the new connection over (the endpoints lost their
  state, the middlebox did not);
- a SYN-ACK must acknowledge no more than the SYN (RFC 9293 §3.10.7.3: ``SEG.ACK > SND.NXT``
  is unacceptable, dropped as ``bad_ack``); one that acknowledges less passes, so that the
  client can answer it with a RST (RFC 9293 §3.5, old duplicate SYN): within the usual
  66000-byte allowance below ``td_end`` it is taken as the answer, further below it changes
  nothing;
- simultaneous open (RFC 9293 §3.5, figure 7) goes SYN_SENT -> SYN_SENT2 -> SYN_RECV;
- a SYN after both FINs (TIME_WAIT, or CLOSE after a RST) starts a new connection.

One deliberate difference from Linux: Linux accepts any RST in FIN_WAIT, CLOSE_WAIT and
LAST_ACK without looking at its sequence number (``tcp_can_early_drop``); here it is checked as
in ESTABLISHED, because a half-closed connection can carry data for a long time and RFC 5961
§3 protects every synchronised state from blind resets. (TIME_WAIT and CLOSE, where no data
flows any more, accept any RST, as Linux.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping, Optional

from nfs.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Packet

MASK = 0xFFFFFFFF

# -- states (Linux's enum tcp_conntrack, same order) and the two pseudo-states of the table ---
(NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE,
 SYN_SENT2) = range(10)
INVALID, IGNORE = 10, 11
STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
               "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
STATE_BY_NAME = {name: n for n, name in enumerate(STATE_NAMES) if n != NONE}
# The timeout (firewall config name) of each state; SYN_SENT2 has SYN_SENT's, as in Linux.
TIMEOUT_OF = {n: ("syn_sent" if n == SYN_SENT2 else name.lower())
              for n, name in enumerate(STATE_NAMES) if n != NONE}

# -- what a segment is, for the table (Linux's "index"), and the two directions -------------
I_SYN, I_SYNACK, I_FIN, I_ACK, I_RST, I_NONE = range(6)
ORIGINAL, REPLY = 0, 1

# -- flags per direction (Linux's IP_CT_TCP_FLAG_*, same values) ------------------------------
WINDOW_SCALE, SACK_PERM, CLOSE_INIT, BE_LIBERAL, DATA_UNACKNOWLEDGED, MAXACK_SET = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)
EXP_CHALLENGE_ACK, SIMULTANEOUS_OPEN = 0x40, 0x80  # in TcpConn.last_flags
# -- connection status bits (Linux's IPS_SEEN_REPLY, IPS_ASSURED) -----------------------------
SEEN_REPLY, ASSURED = 0x1, 0x2

MAX_WSCALE = 14
MAXACKWINCONST = 66000
MAX_RETRANS = 3           # nf_conntrack_tcp_max_retrans
INVALID_SHORTEN_MIN_MS = 120_000  # an invalid FIN/RST answer shortens only timers above 2 min

_SS, _SR, _ES, _FW, _CW, _LA, _TW, _CL, _S2, _IV, _IG = (
    SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2,
    INVALID, IGNORE)
# TABLE[direction][index][state] -> next state; columns NONE, SS, SR, ES, FW, CW, LA, TW, CL, S2.
TABLE = (
    (  # ORIGINAL
        (_SS, _SS, _IG, _IG, _IG, _IG, _IG, _SS, _SS, _S2),  # SYN
        (_IV, _IV, _SR, _IV, _IV, _IV, _IV, _IV, _IV, _SR),  # SYN-ACK
        (_IV, _IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, _IV),  # FIN
        (_ES, _IV, _ES, _ES, _CW, _CW, _TW, _TW, _CL, _IV),  # ACK
        (_IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL),  # RST
        (_IV,) * 10,                                         # none of them
    ),
    (  # REPLY
        (_IV, _S2, _IV, _IV, _IV, _IV, _IV, _SS, _IV, _S2),
        (_IV, _SR, _IG, _IG, _IG, _IG, _IG, _IG, _IG, _SR),
        (_IV, _IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, _IV),
        (_IV, _IG, _SR, _ES, _CW, _CW, _TW, _TW, _CL, _IG),
        (_IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL),
        (_IV,) * 10,
    ),
)
# States in which any RST is accepted (Linux accepts one in every closing state; see above).
_RST_UNCHECKED = (TIME_WAIT, CLOSE)
# States in which a RST must carry exactly the expected sequence number to close (RFC 5961 §3.2).
_RST_EXACT = (ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK)


def before(a: int, b: int) -> bool:
    """Sequence number ``a`` comes before ``b`` (modulo 2**32, RFC 9293 §3.4)."""
    return (a - b) & MASK >= 0x80000000


def after(a: int, b: int) -> bool:
    """Sequence number ``a`` comes after ``b``."""
    return before(b, a)


@dataclass(frozen=True)
class Segment:
    """The fields of a TCP segment the tracker reads.

    Attributes:
        seq: sequence number; ack: acknowledgement number (read even without the ACK flag).
        win: window field (unscaled); flags: the flags byte.
        length: bytes of data; options: the option bytes of the header.
    """

    seq: int
    ack: int
    win: int
    flags: int
    length: int = 0
    options: bytes = b""

    @classmethod
    def from_packet(cls, pkt: Packet) -> "Segment":
        """The segment of a parsed TCP packet (``pkt.l4`` set, data offset checked)."""
        buf, l4 = pkt.buf, pkt.l4
        seq, ack = struct.unpack_from("!II", buf, l4 + 4)
        doff = (buf[l4 + 12] >> 4) * 4
        (win,) = struct.unpack_from("!H", buf, l4 + 14)
        return cls(seq, ack, win, buf[l4 + 13], pkt.end - l4 - doff, bytes(buf[l4 + 20:l4 + doff]))

    @property
    def end(self) -> int:
        """Sequence number after the segment (SYN and FIN count one each)."""
        return (self.seq + self.length + bool(self.flags & TCP_SYN) + bool(self.flags & TCP_FIN)) & MASK

    @property
    def index(self) -> int:
        f = self.flags
        if f & TCP_RST:
            return I_RST
        if f & TCP_SYN:
            return I_SYNACK if f & TCP_ACK else I_SYN
        if f & TCP_FIN:
            return I_FIN
        return I_ACK if f & TCP_ACK else I_NONE


@dataclass
class Side:
    """What the tracker knows about one direction (Linux's ``struct ip_ct_tcp_state``)."""

    end: int = 0
    maxend: int = 0
    maxwin: int = 0
    maxack: int = 0
    scale: int = 0
    flags: int = 0

    def reset(self) -> None:
        self.end = self.maxend = self.maxwin = self.maxack = self.scale = 0
        self.flags &= BE_LIBERAL


def _sides() -> list[Side]:
    return [Side(), Side()]


@dataclass
class TcpConn:
    """One tracked TCP connection; ``seen[ORIGINAL]`` is the side that sent the first SYN.

    The ``last_*`` fields note the last packet that changed the state or was ignored (Linux's
    ``last_index``, ``last_dir``, ...): they let a RST answering an ignored SYN close the
    connection, and a SYN-ACK answering one take the connection over.
    """

    state: int = NONE
    status: int = 0
    seen: list[Side] = field(default_factory=_sides)
    last_index: int = I_NONE
    last_dir: int = ORIGINAL
    last_seq: int = 0
    last_ack: int = 0
    last_end: int = 0
    last_win: int = 0
    last_wscale: int = 0
    last_flags: int = 0
    retrans: int = 0

    FIELDS = 23

    @property
    def name(self) -> str:
        return STATE_NAMES[self.state]

    @property
    def established(self) -> bool:
        """Linux's nf_conntrack_tcp_established: ESTABLISHED after a complete handshake."""
        return self.state == ESTABLISHED and bool(self.status & ASSURED)

    def encode(self) -> str:
        """The record as text: 23 integers separated by spaces (the state first)."""
        nums = [self.state, self.status]
        for s in self.seen:
            nums += [s.end, s.maxend, s.maxwin, s.maxack, s.scale, s.flags]
        nums += [self.last_index, self.last_dir, self.last_seq, self.last_ack, self.last_end,
                 self.last_win, self.last_wscale, self.last_flags, self.retrans]
        return " ".join(map(str, nums))

    @classmethod
    def decode(cls, text: str) -> Optional["TcpConn"]:
        """The record written by :meth:`encode`, or None if ``text`` is not one."""
        try:
            n = [int(x) for x in text.split()]
        except ValueError:
            return None
        if len(n) != cls.FIELDS or n[0] not in TIMEOUT_OF or not all(0 <= x <= MASK for x in n):
            return None
        return cls(n[0], n[1], [Side(*n[2:8]), Side(*n[8:14])], *n[14:])


@dataclass(frozen=True)
class Outcome:
    """What happens to a packet and to its connection's timer.

    Attributes:
        reason: None if the packet passes, else its drop reason.
        timeout: the timer (ms) the packet starts, or None if it leaves the timer alone.
        kill: the connection ends now (its record is deleted), the packet passes.
        reopen: the connection ended; the packet starts a new one (the rules decide on it).
        shorten: an answer to an invalid FIN/RST: the timer is cut to this many ms if it is
            longer (and longer than two minutes).
    """

    reason: Optional[str] = None
    timeout: Optional[int] = None
    kill: bool = False
    reopen: bool = False
    shorten: Optional[int] = None


_PASS = Outcome()
_REOPEN = Outcome(reopen=True)


def _options_into(side: Side, options: bytes) -> None:
    """Window scale and SACK-permitted from a SYN's options (Linux's tcp_options)."""
    if not options:
        return
    side.scale = 0
    side.flags &= BE_LIBERAL
    i, n = 0, len(options)
    while i < n:
        kind = options[i]
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if n - i < 2:
            return
        size = options[i + 1]
        if size < 2 or size > n - i:
            return
        if kind == 4 and size == 2:
            side.flags |= SACK_PERM
        elif kind == 3 and size == 3:
            side.scale = min(options[i + 2], MAX_WSCALE)
            side.flags |= WINDOW_SCALE
        i += size


def _sack(options: bytes, sack: int) -> int:
    """The highest right edge of the SACK blocks in ``options``, if after ``sack``."""
    if len(options) == 12 and options[:4] == b"\x01\x01\x08\x0a":  # timestamps only
        return sack
    i, n = 0, len(options)
    while i < n:
        kind = options[i]
        if kind == 0:
            return sack
        if kind == 1:
            i += 1
            continue
        if n - i < 2:
            return sack
        size = options[i + 1]
        if size < 2 or size > n - i:
            return sack
        if kind == 5 and size >= 10 and (size - 2) % 8 == 0:
            for j in range(i + 2, i + size, 8):
                (right,) = struct.unpack_from("!I", options, j + 4)
                if after(right, sack):
                    sack = right
            return sack
        i += size
    return sack


def new(seg: Segment, loose: bool = False) -> Optional[TcpConn]:
    """The record a segment without a connection starts, or None if it cannot start one.

    Only a SYN starts a connection; with ``loose`` an ACK picks one up in the middle (its
    window is then not checked: Linux's "be liberal" for picked-up connections).

    Args:
        seg: the segment, sent by the side that becomes the originator.
        loose: pick up connections mid-stream (``nf_conntrack_tcp_loose=1``).
    """
    first = TABLE[ORIGINAL][seg.index][NONE]
    if first == SYN_SENT:
        conn = TcpConn()
        s = conn.seen[ORIGINAL]
        s.end = s.maxend = seg.end
        s.maxwin = seg.win or 1
        _options_into(s, seg.options)
        return conn
    if first != ESTABLISHED or not loose:
        return None
    conn = TcpConn()
    s = conn.seen[ORIGINAL]
    s.end = seg.end
    s.maxwin = seg.win or 1
    s.maxend = (s.end + s.maxwin) & MASK
    conn.seen[ORIGINAL].flags = conn.seen[REPLY].flags = SACK_PERM | BE_LIBERAL
    return conn


def track(conn: TcpConn, direction: int, seg: Segment, timeouts: Mapping[str, int]) -> Outcome:
    """Run one segment over its connection's record (changed in place, even for a dropped one,
    as Linux does).

    Args:
        conn: the record.
        direction: ORIGINAL (sent by the originator) or REPLY.
        seg: the segment.
        timeouts: timer lengths in ms by name: each state's (lower case), ``close``,
            ``max_retrans`` and ``unacknowledged``.

    Returns:
        The outcome; the packet passes unless ``reason`` is set.
    """
    outcome = _track(conn, direction, seg, timeouts)
    if direction == REPLY and outcome.reason is None and not outcome.reopen:
        conn.status |= SEEN_REPLY
    return outcome


def _track(conn: TcpConn, d: int, seg: Segment, timeouts: Mapping[str, int]) -> Outcome:
    index = seg.index
    old = conn.state
    new_state = TABLE[d][index][old]
    checked = True  # False: the packet skips the window check (Linux's "goto in_window")

    if new_state == SYN_SENT and old in (TIME_WAIT, CLOSE):
        if ((conn.seen[0].flags | conn.seen[1].flags) & CLOSE_INIT
                or (conn.last_dir == d and conn.last_index == I_RST)):
            return _REOPEN  # a closed or aborted connection is opened again (RFC 9293 §3.6.1)
        new_state = IGNORE
    if new_state == IGNORE:
        if (index == I_SYNACK and conn.last_index == I_SYN and conn.last_dir != d
                and seg.ack == conn.last_end):
            # The SYN-ACK answers a SYN we let pass as possibly stale: the endpoints agree on a
            # new connection, so the record takes the noted SYN over.
            old, new_state = SYN_SENT, SYN_RECV
            other = conn.seen[conn.last_dir]
            other.end = other.maxend = conn.last_end
            other.maxwin = conn.last_win or 1
            other.scale = conn.last_wscale
            conn.last_flags &= ~EXP_CHALLENGE_ACK
            other.flags = conn.last_flags
            conn.seen[d].reset()
        else:
            conn.last_index, conn.last_dir = index, d
            conn.last_seq, conn.last_end, conn.last_win = seg.seq, seg.end, seg.win
            if index == I_SYN and d == ORIGINAL:
                noted = Side()
                _options_into(noted, seg.options)
                conn.last_flags = noted.flags & (WINDOW_SCALE | SACK_PERM)
                conn.last_wscale = noted.scale if noted.flags & WINDOW_SCALE else 0
                if old == LAST_ACK:
                    conn.last_flags |= EXP_CHALLENGE_ACK
            if old == SYN_SENT and index == I_ACK and d == REPLY:
                conn.last_ack = seg.ack
            return _PASS
    elif new_state == INVALID:
        return Outcome("invalid_state")
    elif new_state == TIME_WAIT:
        if (old == LAST_ACK and index == I_ACK and conn.last_dir != d and conn.last_index == I_SYN
                and conn.last_flags & EXP_CHALLENGE_ACK):
            conn.last_flags &= ~EXP_CHALLENGE_ACK  # a challenge ACK, not the ACK of the last FIN
            return _PASS
    elif new_state == SYN_SENT2:
        conn.last_flags |= SIMULTANEOUS_OPEN
    elif new_state == SYN_RECV:
        if d == REPLY and index == I_ACK and conn.last_flags & SIMULTANEOUS_OPEN:
            new_state = ESTABLISHED
    elif new_state == CLOSE and index == I_RST:
        verdict = _rst(conn, d, seg, old)
        if isinstance(verdict, Outcome):
            return verdict
        new_state, checked = verdict

    if checked:
        result = _in_window(conn, d, index, seg)
        if result == IGNORE:
            return _PASS
        if result != "ok":
            return _invalid(conn, d, index, result, timeouts)

    conn.last_index, conn.last_dir = index, d
    conn.state = new_state
    if old != new_state and new_state == FIN_WAIT:
        conn.seen[d].flags |= CLOSE_INIT
    timeout = _timeout(conn, index, new_state, timeouts)
    if not conn.status & SEEN_REPLY:
        if seg.flags & TCP_RST:
            return Outcome(kill=True)  # the only answer was a RST: no connection to keep
        if index == I_SYN and old == SYN_SENT:
            return _PASS  # a retransmitted SYN does not extend the timer
        if new_state == ESTABLISHED:
            timeout = min(timeout, timeouts["unacknowledged"])
    elif not conn.status & ASSURED and old in (SYN_RECV, ESTABLISHED) and new_state == ESTABLISHED:
        conn.status |= ASSURED
    return Outcome(timeout=timeout)


def _rst(conn: TcpConn, d: int, seg: Segment, old: int):
    """A RST that would close the connection: (next state, window check?) or a final Outcome."""
    if old in _RST_UNCHECKED:
        return CLOSE, False
    synchronized = bool(conn.status & ASSURED) and old in _RST_EXACT
    other = conn.seen[1 - d]
    if other.flags & MAXACK_SET and conn.last_index != I_SYN:
        seq = seg.seq
        if seq == 0 and not synchronized:
            return CLOSE, True
        if before(seq, other.maxack):
            return Outcome("bad_rst")  # behind what the receiver has acknowledged: blind
        if not synchronized or seq == other.maxack:
            return CLOSE, True
        if conn.last_index == I_ACK and conn.last_dir == d and seq == conn.last_end:
            return CLOSE, True  # the RST right after this side's last segment
        new_state = old  # in the window, not exact: passes, the endpoint challenges it
    else:
        new_state = CLOSE
    if (((conn.status & SEEN_REPLY and conn.last_index == I_SYN)
         or (not conn.status & ASSURED and conn.last_index == I_ACK))
            and seg.ack == conn.last_end):
        return new_state, False  # the answer to a SYN or ACK we let pass unchecked
    if (old == SYN_SENT and conn.last_index == I_ACK and conn.last_dir == REPLY
            and seg.seq == conn.last_ack):
        return new_state, False  # the answer to a challenge ACK we let pass
    return new_state, True


def _init_sender(sender: Side, receiver: Side, seg: Segment, d: int) -> None:
    """A SYN-ACK (or a SYN of simultaneous open) starts the sender's side of the record."""
    sender.end = sender.maxend = seg.end
    sender.maxwin = seg.win or 1
    _options_into(sender, seg.options)
    if d == REPLY and not (sender.flags & WINDOW_SCALE and receiver.flags & WINDOW_SCALE):
        sender.scale = receiver.scale = 0  # RFC 7323 §2.2: scaling needs the option both ways


def _maxackwindow(side: Side) -> int:
    return max(side.maxwin, MAXACKWINCONST)


def _in_window(conn: TcpConn, d: int, index: int, seg: Segment):
    """Linux's tcp_in_window: "ok", IGNORE, or a drop reason; updates both sides."""
    sender, receiver = conn.seen[d], conn.seen[1 - d]
    syn, has_ack = seg.flags & TCP_SYN, seg.flags & TCP_ACK
    seq, ack, win, end = seg.seq, seg.ack, seg.win, seg.end
    sack = _sack(seg.options, ack) if receiver.flags & SACK_PERM else ack

    if sender.maxwin == 0:
        if syn:
            _init_sender(sender, receiver, seg, d)
            if not has_ack:
                return "ok"  # simultaneous open: the reply direction's SYN
        else:
            sender.end = end
            swin = (win << sender.scale) & MASK
            sender.maxwin = swin or 1
            sender.maxend = (end + sender.maxwin) & MASK
            if receiver.maxwin == 0:
                receiver.end = receiver.maxend = sack
            elif sack == (receiver.end + 1) & MASK:
                receiver.end = (receiver.end + 1) & MASK  # the answer to a keepalive
    elif syn and after(end, sender.end) and conn.state in (SYN_SENT, SYN_RECV):
        _init_sender(sender, receiver, seg, d)  # a new SYN(-ACK) with a higher sequence number
        if d == REPLY and not has_ack:
            return "ok"

    if not has_ack:
        ack = sack = receiver.end
    elif seg.flags & TCP_RST and ack == 0:
        ack = sack = receiver.end  # stacks that send RST-ACK with a zero ACK
    if seg.flags & TCP_RST and seq == 0 and conn.state == SYN_SENT:
        seq = end = sender.end  # a RST answering the SYN

    if not before(seq, (sender.maxend + 1) & MASK):
        overshot = (end - sender.maxend + 1) & MASK
        if (receiver.maxwin and after(end, (sender.end - receiver.maxwin - 1) & MASK)
                and after(sack, (receiver.end - _maxackwindow(sender) - 1) & MASK)
                and overshot <= receiver.maxwin and before(sack, (receiver.end + 1) & MASK)):
            sender.end = end  # a few bytes past the window: tolerated, as Linux does
            sender.flags |= DATA_UNACKNOWLEDGED
            return _liberal(sender, IGNORE)
        return _liberal(sender, "out_of_window")
    if not before(sack, (receiver.end + 1) & MASK):
        return _liberal(sender, "bad_ack")  # acknowledges data the other side never sent
    if receiver.maxwin and not after(end, (sender.end - receiver.maxwin - 1) & MASK):
        return _liberal(sender, IGNORE)  # all of it acknowledged long ago: a late retransmission
    if not after(sack, (receiver.end - _maxackwindow(sender) - 1) & MASK):
        return _liberal(sender, IGNORE)  # an acknowledgement far behind: overly delayed

    if not syn:
        win = (win << sender.scale) & MASK
    swin = (win + sack - ack) & MASK
    sender.maxwin = max(sender.maxwin, swin)
    if after(end, sender.end):
        sender.end = end
        sender.flags |= DATA_UNACKNOWLEDGED
    if has_ack:
        if not sender.flags & MAXACK_SET:
            sender.maxack = ack
            sender.flags |= MAXACK_SET
        elif after(ack, sender.maxack):
            sender.maxack = ack
    if receiver.maxwin != 0 and after(end, sender.maxend):
        receiver.maxwin = (receiver.maxwin + end - sender.maxend) & MASK
    if after((sack + win) & MASK, (receiver.maxend - 1) & MASK):
        receiver.maxend = (sack + win + (win == 0)) & MASK
    if ack == receiver.end:
        receiver.flags &= ~DATA_UNACKNOWLEDGED
    if index == I_ACK:
        if (conn.last_dir == d and conn.last_seq == seq and conn.last_ack == ack
                and conn.last_end == end and conn.last_win == seg.win):
            conn.retrans += 1
        else:
            conn.last_dir, conn.last_seq, conn.last_ack, conn.last_end = d, seq, ack, end
            conn.last_win, conn.retrans = seg.win, 0
    return "ok"


def _liberal(sender: Side, result):
    """A picked-up connection (loose) accepts what the window check would refuse."""
    return "ok" if sender.flags & BE_LIBERAL else result


def _invalid(conn: TcpConn, d: int, index: int, reason: str, timeouts: Mapping[str, int]) -> Outcome:
    """A segment outside the window. A FIN or RST answering the other side's invalid FIN or
    RST shortens the timer of an established connection (Linux's nf_tcp_handle_invalid)."""
    if not conn.status & ASSURED or index not in (I_RST, I_FIN):
        return Outcome(reason)
    if conn.last_dir != d and conn.last_index in (I_FIN, I_RST):
        return Outcome(reason, shorten=timeouts["unacknowledged"])
    conn.last_index, conn.last_dir = index, d
    return Outcome(reason)


def _timeout(conn: TcpConn, index: int, state: int, timeouts: Mapping[str, int]) -> int:
    """The timer an accepted segment starts (Linux's choice in nf_conntrack_tcp_packet)."""
    normal = timeouts[TIMEOUT_OF[state]]
    if conn.retrans >= MAX_RETRANS and normal > timeouts["max_retrans"]:
        return timeouts["max_retrans"]
    if index == I_RST:
        return timeouts["close"]
    if ((conn.seen[0].flags | conn.seen[1].flags) & DATA_UNACKNOWLEDGED
            and normal > timeouts["unacknowledged"]):
        return timeouts["unacknowledged"]
    if conn.last_win == 0 and normal > timeouts["max_retrans"]:
        return timeouts["max_retrans"]
    return normal
