"""A packet socket opened by ``nfs.mmsg.packet_socket`` holds only its own interface's
frames from the start. The premise, shown on loopback: a socket opened with ETH_P_ALL and not
yet bound already queues every interface's frames (so a tap or NF opened that way mid-run
records frames of other ports as its own); one opened with protocol 0 queues none."""

from __future__ import annotations

import os
import select
import socket

import pytest

from nfs.mmsg import ETH_P_ALL, packet_socket

pytestmark = pytest.mark.root


def _loopback_datagram() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"statelab packet_socket probe", ("127.0.0.1", 9))  # discard port, loopback only


def _queued(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0.2)[0])


def test_only_its_own_interface_from_the_first_frame() -> None:
    if os.geteuid() != 0:
        pytest.skip("AF_PACKET needs root (CAP_NET_RAW)")
    unbound_all = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    unbound_none = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    bound = packet_socket("lo")
    try:
        _loopback_datagram()
        assert _queued(unbound_all)       # the old way: frames before any bind
        assert not _queued(unbound_none)  # protocol 0: nothing until bound
        assert _queued(bound)             # bound to lo with ETH_P_ALL: lo's frames arrive
        assert bound.getsockname()[:2] == ("lo", ETH_P_ALL)
    finally:
        for s in (unbound_all, unbound_none, bound):
            s.close()
    with pytest.raises(OSError):
        packet_socket("statelab-none0")
