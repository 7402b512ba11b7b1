"""Bucket assignment for P4 fabrics: highest random weight, minimal moves."""

from __future__ import annotations

from collections import Counter

import pytest

from statelab.fabric import Member
from statelab.fabric.buckets import N_BUCKETS, assign_buckets, changed_buckets


def test_every_bucket_has_a_member_and_the_split_is_even():
    owners = Counter(assign_buckets(["fw-1", "fw-2", "fw-3", "fw-4"]))
    assert sum(owners.values()) == N_BUCKETS
    assert set(owners) == {"fw-1", "fw-2", "fw-3", "fw-4"}
    assert all(40 <= n <= 90 for n in owners.values()), owners  # 64 each on average


def test_assignment_depends_on_the_set_not_the_order():
    assert assign_buckets(["a", "b", "c"]) == assign_buckets(["c", "a", "b"])


def test_adding_a_third_member_moves_about_a_third_and_only_to_it():
    old = assign_buckets(["fw-1", "fw-2"])
    new = assign_buckets(["fw-1", "fw-2", "fw-3"])
    moved = changed_buckets(old, new)
    assert all(new[b] == "fw-3" for b in moved), "a bucket moved between old members"
    assert set(moved) == {b for b in range(N_BUCKETS) if new[b] == "fw-3"}
    assert 0.22 <= len(moved) / N_BUCKETS <= 0.45, len(moved)


def test_removing_a_member_moves_only_its_buckets():
    old = assign_buckets(["fw-1", "fw-2", "fw-3", "fw-4"])
    new = assign_buckets(["fw-1", "fw-2", "fw-4"])
    moved = changed_buckets(old, new)
    assert moved == [b for b in range(N_BUCKETS) if old[b] == "fw-3"]
    assert "fw-3" not in new
    # its buckets spread over all the others, not onto one of them
    assert set(new[b] for b in moved) == {"fw-1", "fw-2", "fw-4"}


def test_remove_then_add_back_restores_the_assignment():
    before = assign_buckets(["a", "b", "c"])
    assign_buckets(["a", "c"])
    assert assign_buckets(["a", "b", "c"]) == before


def test_members_by_key_and_empty_pool():
    m1, m2 = Member("red-fw-1", 100, "02:00:00:00:00:64"), Member("red-fw-2", 101, "02:00:00:00:00:65")
    owners = assign_buckets((m1, m2), key=lambda m: m.name)
    assert set(owners) == {m1, m2}
    assert assign_buckets((), key=lambda m: m.name) == (None,) * N_BUCKETS
    assert len(assign_buckets(["x"], n_buckets=16)) == 16


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        assign_buckets(["a", "a"])
