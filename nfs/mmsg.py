"""Batched datagram I/O: a whole batch of frames in one ``recvmmsg(2)`` / ``sendmmsg(2)`` call.

A Python packet loop spends most of its time in two system calls per frame. Linux reads and
writes many datagrams per call; Python's ``socket`` module has no binding for it, so this calls
libc through ctypes, into buffers set up once: ``slots`` frame buffers of ``slot`` bytes, one
iovec and one ``struct mmsghdr`` each. The lengths the kernel writes back are read through a
memoryview on the header array, so the per-frame cost in Python is one slice.

Works on any datagram socket (AF_PACKET in the NFs and the benches; ``tests/test_mmsg.py``
checks it over a Unix socket pair against plain ``send``/``recv``). :func:`available` is False
where libc lacks the calls; callers then keep the one-call-per-frame loop.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import Optional, Sequence

MSG_DONTWAIT = 0x40
ETH_P_ALL = 0x0003


def packet_socket(iface: str, proto: int = ETH_P_ALL) -> socket.socket:
    """A raw AF_PACKET socket that holds only frames of ``iface`` (of ethertype ``proto``).

    Opened with protocol 0, which receives nothing, and then bound to the interface with
    ``proto``: a socket opened with ETH_P_ALL receives every interface's frames until its
    bind, so a tap that joined a running lab recorded, now and then, frames of other ports as
    its own (the soak's duplicate ESP numbers), and an NF could read frames of its
    management link.
    """
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind((iface, proto))
    except OSError:
        s.close()
        raise
    return s


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_HDR = ctypes.sizeof(_Mmsghdr)
_LEN_AT = _Mmsghdr.msg_len.offset
_IOV = ctypes.sizeof(_Iovec)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _recvmmsg = _libc.recvmmsg
    _sendmmsg = _libc.sendmmsg
    _recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _recvmmsg.restype = _sendmmsg.restype = ctypes.c_int
except (OSError, AttributeError):
    _recvmmsg = _sendmmsg = None


def available() -> bool:
    """Whether this libc has recvmmsg/sendmmsg."""
    return _recvmmsg is not None


class Ring:
    """``slots`` buffers of ``slot`` bytes for batched reads and writes on one socket.

    Args:
        sock: a datagram socket (its file descriptor is used directly).
        slots: most frames per call.
        slot: bytes per frame; a longer frame is read cut short (see :meth:`recv`).
    """

    def __init__(self, sock: socket.socket, slots: int = 64, slot: int = 16384) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "libc has no recvmmsg/sendmmsg")
        self.fd = sock.fileno()
        self.slots, self.slot = slots, slot
        self._buf = bytearray(slots * slot)
        self._view = memoryview(self._buf)
        self._iov_raw = bytearray(slots * _IOV)
        self._hdr_raw = bytearray(slots * _HDR)
        self._iov = (_Iovec * slots).from_buffer(self._iov_raw)
        self._hdr = (_Mmsghdr * slots).from_buffer(self._hdr_raw)
        base = ctypes.addressof((ctypes.c_char * len(self._buf)).from_buffer(self._buf))
        for i in range(slots):
            self._iov[i].iov_base = base + i * slot
            self._iov[i].iov_len = slot
            self._hdr[i].msg_hdr.msg_iov = ctypes.addressof(self._iov[i])
            self._hdr[i].msg_hdr.msg_iovlen = 1
        self._lens = memoryview(self._hdr_raw).cast("I")      # msg_len of header i: [i * step + at]
        self._len_step, self._len_at = _HDR // 4, _LEN_AT // 4
        self._iov_lens = memoryview(self._iov_raw).cast("Q")  # iov_len of iovec i: [2 * i + 1]
        self._hdr_addr = ctypes.addressof(self._hdr)

    def recv(self, limit: Optional[int] = None) -> list[bytes]:
        """Up to ``limit`` (default ``slots``) frames already queued; [] if none (never blocks).

        A frame of ``slot`` bytes or more comes back cut to ``slot`` bytes: the caller's
        length check sees it (the NFs' parsers drop what does not add up).

        Raises:
            OSError: any error but "nothing queued".
        """
        n = _recvmmsg(self.fd, self._hdr_addr, limit or self.slots, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        view, lens, slot, step, at = self._view, self._lens, self.slot, self._len_step, self._len_at
        return [view[i * slot:i * slot + lens[i * step + at]].tobytes() for i in range(n)]

    def send(self, frames: Sequence[bytes]) -> tuple[int, list[tuple[int, int]]]:
        """Send ``frames`` (at most ``slots``), in order, in as few calls as the kernel allows.

        Returns:
            (frames sent, [(index, errno)] of the frames the kernel refused; each refused frame
            is skipped and the rest still go).

        Raises:
            ValueError: more frames than slots, or a frame longer than a slot.
        """
        count = len(frames)
        if count > self.slots:
            raise ValueError(f"{count} frames for {self.slots} slots")
        buf, slot, lens = self._buf, self.slot, self._iov_lens
        for i, frame in enumerate(frames):
            size = len(frame)
            if size > slot:
                raise ValueError(f"frame {i} has {size} bytes, a slot {slot}")
            start = i * slot
            buf[start:start + size] = frame
            lens[2 * i + 1] = size
        sent, failed, off = 0, [], 0
        while off < count:
            n = _sendmmsg(self.fd, self._hdr_addr + off * _HDR, count - off, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                failed.append((off, err))
                off += 1
                continue
            sent += n
            off += n
        for i in range(count):  # recv reads into the same slots: whole slots again
            lens[2 * i + 1] = slot
        return sent, failed
