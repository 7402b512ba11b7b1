"""The state client: the same behaviour on Redis and in process; ACLs; failing closed."""

from __future__ import annotations

import time

import pytest
import redis

from nfs.state import LocalState, RedisState, StateUnavailable


@pytest.fixture(params=["redis", "local"])
def state(request, redis_clean):
    if request.param == "redis":
        return RedisState(redis_clean.url("red"), "red", "fw")
    return LocalState("red", "fw")


def run(state, fill):
    b = state.batch()
    refs = fill(b)
    b.execute()
    return [r.value for r in refs]


def test_get_set_ttl_nx_incrby_delete(state) -> None:
    got = run(state, lambda b: [b.get("a"), b.set("a", "1", ttl=5), b.get("a"), b.set("a", "2", nx=True),
                                b.pttl("a"), b.incrby("n", 64), b.incrby("n", 64), b.delete("a"), b.get("a"),
                                b.pttl("a")])
    assert got[:4] == [None, True, b"1", False]
    assert 4000 < got[4] <= 5000
    assert got[5:] == [64, 128, 1, None, -2]
    assert state.round_trips == 1 and state.ops == 10


def test_keys_are_scoped_to_tenant_and_nf(state) -> None:
    assert state.key("ct:x") == "t:red:fw:ct:x"


def test_ttl_expires(state) -> None:
    run(state, lambda b: [b.set("short", "v", ttl=0.05)])
    time.sleep(0.1)
    assert run(state, lambda b: [b.get("short")]) == [None]


def test_compare_and_set(state) -> None:
    assert run(state, lambda b: [b.script("cas", ["k"], ["", "v1", 0])]) == [1]
    assert run(state, lambda b: [b.script("cas", ["k"], ["", "v2", 0])]) == [0]
    assert run(state, lambda b: [b.script("cas", ["k"], ["v1", "v2", 10000])]) == [1]
    assert run(state, lambda b: [b.script("cas", ["k"], ["v1", "v3", 0]), b.get("k")]) == [0, b"v2"]


def test_replay_window_rfc4303(state) -> None:
    def check(seq: int) -> int:
        return run(state, lambda b: [b.script("replay", ["w"], [seq, 64])])[0]
    assert [check(s) for s in (1, 2, 5, 3)] == [1, 1, 1, 1]
    assert check(2) == 0                 # replay
    assert check(100) == 1               # window moves: top 100
    assert check(37) == 1                # 100 - 63: oldest still inside
    assert check(36) == 0                # too old
    assert check(37) == 0                # replay at the edge
    assert check(99) == 1 and check(99) == 0
    assert check(2**32 - 1) == 1         # large sequence numbers stay exact
    assert check(2**32 - 64) == 1 and check(2**32 - 65) == 0
    assert check(0) == 0


def test_tenant_user_cannot_touch_other_tenants_keys(redis_clean) -> None:
    red = redis.Redis.from_url(redis_clean.url("red"))
    for op in (lambda: red.get("t:blue:fw:x"), lambda: red.set("t:blue:fw:x", 1), lambda: red.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            op()
    blue = RedisState(redis_clean.url("red"), "blue", "fw")  # red's credentials, blue's prefix
    with pytest.raises(StateUnavailable, match="NOPERM|no permissions") as refused:
        run(blue, lambda b: [b.get("x")])
    assert refused.value.reason == "state_refused"  # fail closed, counted under its own reason


def test_unreachable_server_raises_state_unavailable() -> None:
    dead = RedisState("redis://u:p@127.0.0.1:1/0", "red", "fw", timeout=0.2)
    with pytest.raises(StateUnavailable):
        run(dead, lambda b: [b.get("x")])
    local = LocalState("red", "fw")
    local.available = False
    with pytest.raises(StateUnavailable):
        run(local, lambda b: [b.get("x")])
