"""Which pool member owns each hash bucket: the one assignment every P4 driver uses.

A P4 fabric hashes a packet's inner 5-tuple to one of :data:`N_BUCKETS` buckets and looks the
bucket up in a table the controller fills (a P4 action selector would pick ``hash % members``
and remap about two thirds of all flows when a pool grows from 2 to 3). The controller assigns
buckets by highest random weight (rendezvous hashing): each bucket goes to the member with the
highest score ``H(member, bucket)``. The assignment depends only on the set of member keys, not
on their order or history, and it is minimal:

- adding a member moves only the buckets it wins (about ``1/(n+1)`` of them), each from its
  old owner to the new member; no bucket moves between old members;
- removing a member moves only the buckets it owned, spread over the remaining members.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence, TypeVar

N_BUCKETS = 256

M = TypeVar("M")


def score(key: str, bucket: int) -> int:
    """Return the highest-random-weight score of member ``key`` for ``bucket`` (64 bits).

    Args:
        key: the member's stable identity (e.g. its instance name).
        bucket: the bucket number.
    """
    digest = hashlib.blake2b(f"{key}\0{bucket}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_buckets(members: Sequence[M], key: Callable[[M], str] = str,
                   n_buckets: int = N_BUCKETS) -> tuple[Optional[M], ...]:
    """Assign each of ``n_buckets`` buckets to one member by highest random weight.

    Args:
        members: the pool's members, in any order (their keys must be distinct).
        key: a member's stable identity; the assignment depends on these keys only.
        n_buckets: how many buckets the data plane has.

    Returns:
        For each bucket ``0 .. n_buckets-1``, its member, or ``None`` for every bucket when
        ``members`` is empty.

    Raises:
        ValueError: two members have the same key.
    """
    keyed = [(key(m), m) for m in members]
    if len({k for k, _ in keyed}) != len(keyed):
        raise ValueError(f"members have duplicate keys: {sorted(k for k, _ in keyed)}")
    if not keyed:
        return (None,) * n_buckets
    # Ties (a 2^-64 event) go to the greater key, so the result never depends on order.
    return tuple(max(keyed, key=lambda km: (score(km[0], b), km[0]))[1] for b in range(n_buckets))


def changed_buckets(old: Sequence[Optional[M]], new: Sequence[Optional[M]]) -> list[int]:
    """Return the buckets whose member differs between two assignments of equal length.

    Args:
        old: the assignment before a change.
        new: the assignment after it.
    """
    if len(old) != len(new):
        raise ValueError(f"assignments of different lengths: {len(old)} and {len(new)}")
    return [b for b, (o, n) in enumerate(zip(old, new)) if o != n]
