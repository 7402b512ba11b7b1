"""A kept-open OpenFlow 1.5 connection to an Open vSwitch bridge, for the changes failover needs.

``ovs-ofctl`` costs a process per change (tens of milliseconds: fork, exec, connect, negotiate),
which is most of a failover. The bridge listens on its management socket
(``/var/run/openvswitch/<bridge>.mgmt``); this module keeps one connection to it open and
sends the one message a failover needs, a group modification removing a bucket (OpenFlow
1.5.1 §7.3.4.2, ``OFPGC_REMOVE_BUCKET``), followed by a barrier, so the call returns only when
the switch has applied it, or raises with the switch's error. Everything else (programming
flows) stays with ``ovs-ofctl``, whose text syntax it is written in.

``tests/test_openflow.py`` checks the encoding byte for byte by having ``ovs-ofctl ofp-print``
decode it.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
from pathlib import Path
from typing import Optional

OFP_VERSION = 0x06  # OpenFlow 1.5
OFPT_HELLO, OFPT_ERROR, OFPT_ECHO_REQUEST, OFPT_ECHO_REPLY = 0, 1, 2, 3
OFPT_GROUP_MOD, OFPT_BARRIER_REQUEST, OFPT_BARRIER_REPLY = 15, 20, 21
OFPHET_VERSIONBITMAP = 1
OFPGC_INSERT_BUCKET, OFPGC_REMOVE_BUCKET = 3, 5
OFPGT_SELECT = 1
OFPG_BUCKET_LAST = 0xFFFFFFFE
OFPGBPT_WEIGHT = 0
OFPAT_SET_FIELD, OFPAT_EXPERIMENTER = 25, 0xFFFF
NX_VENDOR_ID, NXAST_RESUBMIT_TABLE = 0x00002320, 14
OFPP_IN_PORT = 0xFFF8
NXM_NX_REG = 0x0001  # OXM class of Nicira's registers reg0..reg15 (4 bytes each)
_HEADER = struct.Struct("!BBHI")
RUN_DIR = Path("/var/run/openvswitch")


class OpenFlowError(RuntimeError):
    pass


def message(msg_type: int, xid: int, body: bytes = b"") -> bytes:
    return _HEADER.pack(OFP_VERSION, msg_type, _HEADER.size + len(body), xid) + body


def hello(xid: int) -> bytes:
    """HELLO offering OpenFlow 1.5 only (a version bitmap element, §7.5.1)."""
    return message(OFPT_HELLO, xid, struct.pack("!HHI", OFPHET_VERSIONBITMAP, 8, 1 << OFP_VERSION))


def remove_bucket(xid: int, group_id: int, bucket_id: int, group_type: int = OFPGT_SELECT) -> bytes:
    """GROUP_MOD removing bucket ``bucket_id`` of group ``group_id`` (no buckets, no properties)."""
    return message(OFPT_GROUP_MOD, xid, struct.pack("!HBxIHxxI", OFPGC_REMOVE_BUCKET, group_type, group_id,
                                                    0, bucket_id))


def set_reg(reg: int, value: int) -> bytes:
    """Action ``set_field:VALUE->regN`` (an OXM set-field, padded to 8 bytes)."""
    oxm = struct.pack("!IBBBB", (NXM_NX_REG << 16) | (reg << 9) | 4, *value.to_bytes(4, "big"))
    return struct.pack("!HH", OFPAT_SET_FIELD, 16) + oxm + bytes(4)


def resubmit(table: int) -> bytes:
    """Action ``resubmit(,TABLE)`` (Nicira's NXAST_RESUBMIT_TABLE, in_port unchanged)."""
    return struct.pack("!HHIHHB3x", OFPAT_EXPERIMENTER, 16, NX_VENDOR_ID, NXAST_RESUBMIT_TABLE, OFPP_IN_PORT,
                       table)


def insert_bucket(xid: int, group_id: int, bucket_id: int, weight: int, actions: bytes,
                  group_type: int = OFPGT_SELECT) -> bytes:
    """GROUP_MOD inserting one bucket (with a weight property) after the group's last."""
    props = struct.pack("!HHH2x", OFPGBPT_WEIGHT, 8, weight)
    bucket = struct.pack("!HHI", 8 + len(actions) + len(props), len(actions), bucket_id) + actions + props
    return message(OFPT_GROUP_MOD, xid, struct.pack("!HBxIHxxI", OFPGC_INSERT_BUCKET, group_type, group_id,
                                                    len(bucket), OFPG_BUCKET_LAST) + bucket)


class Connection:
    """One OpenFlow connection to ``bridge``'s management socket, opened on first use and again
    after it broke (one retry per call). Thread-safe: one call at a time."""

    def __init__(self, bridge: str, run_dir: Path = RUN_DIR, timeout: float = 2.0) -> None:
        self.path = run_dir / f"{bridge}.mgmt"
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._xid = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buf = b""

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as err:
            sock.close()
            raise OpenFlowError(f"cannot connect to {self.path}: {err.strerror or err}") from None
        self._sock, self._buf = sock, b""
        sock.sendall(hello(next(self._xid)))
        msg_type, _, body = self._read()
        if msg_type != OFPT_HELLO:
            self.close()
            raise OpenFlowError(f"{self.path}: expected HELLO, got message type {msg_type}")

    def _read(self) -> tuple[int, int, bytes]:
        """The next message (type, xid, body); answers echo requests on the way."""
        assert self._sock is not None
        while True:
            while len(self._buf) < _HEADER.size or len(self._buf) < _HEADER.unpack_from(self._buf)[2]:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("the switch closed the connection")
                self._buf += data
            _, msg_type, length, xid = _HEADER.unpack_from(self._buf)
            body, self._buf = self._buf[_HEADER.size:length], self._buf[length:]
            if msg_type == OFPT_ECHO_REQUEST:
                self._sock.sendall(message(OFPT_ECHO_REPLY, xid, body))
                continue
            return msg_type, xid, body

    def send(self, build: "callable[[int], bytes]", what: str) -> None:
        """Send the message ``build(xid)`` makes, then a barrier; return once both are answered.

        Raises:
            OpenFlowError: the switch refused the message, or could not be reached.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._open()
                    assert self._sock is not None
                    xid, barrier = next(self._xid), next(self._xid)
                    self._sock.sendall(build(xid) + message(OFPT_BARRIER_REQUEST, barrier))
                    while True:
                        msg_type, got_xid, body = self._read()
                        if msg_type == OFPT_ERROR and got_xid == xid:
                            err_type, code = struct.unpack_from("!HH", body)
                            self._drain_to(barrier)
                            raise OpenFlowError(f"{what}: the switch refused it (OpenFlow error type "
                                                f"{err_type}, code {code})")
                        if msg_type == OFPT_BARRIER_REPLY and got_xid == barrier:
                            return
                except (OSError, ConnectionError) as err:
                    self.close()
                    if attempt == 2:
                        raise OpenFlowError(f"{what}: {self.path}: {err}") from None

    def _drain_to(self, barrier: int) -> None:
        while True:
            msg_type, got_xid, _ = self._read()
            if msg_type == OFPT_BARRIER_REPLY and got_xid == barrier:
                return
