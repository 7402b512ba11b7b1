"""Batched datagram I/O (nfs.mmsg) against plain send/recv, over a Unix datagram socket pair."""

from __future__ import annotations

import socket

import pytest

from nfs import mmsg

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="libc has no recvmmsg/sendmmsg")


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_a_batch_goes_out_and_comes_in_as_plain_datagrams(pair) -> None:
    a, b = pair
    frames = [bytes([i]) * (i * 7 % 300) for i in range(40)]
    assert mmsg.Ring(a, 64, 512).send(frames) == (40, [])
    assert [b.recv(1024) for _ in frames] == frames  # what plain recv sees
    for f in frames:
        b.send(f)
    assert mmsg.Ring(a, 64, 512).recv() == frames  # what plain send sent
    assert mmsg.Ring(a, 64, 512).recv() == []       # nothing queued: no wait, no error


def test_a_short_send_leaves_whole_slots_for_the_next_receive(pair) -> None:
    a, b = pair
    ring = mmsg.Ring(a, 8, 256)
    ring.send([b"x", b"yy"])
    big = [bytes(200), bytes(250)]
    for f in big:
        b.send(f)
    assert ring.recv() == big


def test_limits_oversize_and_cut_frames(pair) -> None:
    a, b = pair
    ring = mmsg.Ring(a, 4, 64)
    with pytest.raises(ValueError, match="5 frames for 4 slots"):
        ring.send([b""] * 5)
    with pytest.raises(ValueError, match="65 bytes"):
        ring.send([bytes(65)])
    b.send(bytes(100))
    assert ring.recv() == [bytes(64)]  # cut to a slot: the NF's parser drops what does not add up
    for f in (b"1", b"2", b"3"):
        b.send(f)
    assert ring.recv(2) == [b"1", b"2"] and ring.recv() == [b"3"]


def test_refused_frames_are_reported_and_the_rest_still_go(pair) -> None:
    a, b = pair
    b.close()
    sent, failed = mmsg.Ring(a, 4, 64).send([b"a", b"b"])
    assert sent == 0 and [i for i, _ in failed] == [0, 1]
