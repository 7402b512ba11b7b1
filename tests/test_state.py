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


# -- the Redis client's own protocol code and its cache ---------------------------------------

@pytest.mark.parametrize("args", [("GET", "t:red:fw:k"), ("SET", "k", b"\x00\xff\r\n", "PX", 1500, "NX"),
                                  ("EVALSHA", "ab" * 20, 1, "k", "", 3.5, -7), ("PING",)])
def test_pack_command_is_byte_exact_with_redis_py(args) -> None:
    from redis.connection import Connection
    from nfs.state import pack_command
    assert pack_command(*args) == b"".join(Connection().pack_command(*args))


def _until(check, deadline: float = 5.0):
    """Run ``check`` (one batch each time) until it returns something truthy, up to a deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = check()
        if got:
            return got
    raise AssertionError(f"not seen within {deadline} s")


def test_cache_answers_reads_and_learns_of_other_clients_writes(redis_clean) -> None:
    a, b = (RedisState(redis_clean.url("red"), "red", "fw") for _ in range(2))
    run(b, lambda x: [x.set("k", "v1", ttl=60)])
    assert run(a, lambda x: [x.get("k"), x.pttl("k"), x.get("absent")])[0] == b"v1"
    trips = a.round_trips
    for _ in range(3):  # read again: from the cache, the TTL counting down, absence cached too
        value, pttl, absent = run(a, lambda x: [x.get("k"), x.pttl("k"), x.get("absent")])
        assert (value, absent) == (b"v1", None) and 50_000 < pttl <= 60_000
    assert a.round_trips == trips and a.cache_hits == 9
    run(b, lambda x: [x.set("k", "v2"), x.set("absent", "now")])  # another instance writes both
    assert _until(lambda: run(a, lambda x: [x.get("k"), x.get("absent")]) == [b"v2", b"now"])
    assert a.invalidations >= 2
    assert run(a, lambda x: [x.pttl("k")]) == [-1]  # SET without PX cleared the TTL: read again, not kept


def test_an_invalidation_among_the_replies_keeps_the_value_read_out_of_the_cache(redis_clean) -> None:
    """The server can send an invalidation of a key after the reply to our GET of it (another
    client wrote it in between) and before our last reply: the value read is already stale
    and the server tracks the key for us no more, so it must not be cached."""
    a, b = (RedisState(redis_clean.url("red"), "red", "fw") for _ in range(2))
    run(b, lambda x: [x.set("k", "v1")])
    a.connect()
    real = a._receive

    def write_in_between(count: int) -> list:
        replies = real(count)  # our GET's reply was v1 ...
        run(b, lambda x: [x.set("k", "v2")])  # ... then b writes, and its invalidation comes
        a._position = 1                       # after that first reply, before the others
        before = a.invalidations
        deadline = time.monotonic() + 5
        while a.invalidations == before:      # the server's own push, read as if among the replies
            a._poll_invalidations()
            assert time.monotonic() < deadline
        return replies

    a._receive = write_in_between  # type: ignore[method-assign]
    assert run(a, lambda x: [x.get("k"), x.pttl("k"), x.get("other")]) == [b"v1", -1, None]
    a._receive = real  # type: ignore[method-assign]
    assert run(a, lambda x: [x.get("k")]) == [b"v2"]  # read from the server, not the stale v1


def test_own_writes_are_read_back_in_the_same_round_trip(redis_clean) -> None:
    a = RedisState(redis_clean.url("red"), "red", "fw")
    assert run(a, lambda x: [x.get("n"), x.pttl("n"), x.incrby("n", 5), x.get("n")]) == [None, -2, 5, b"5"]
    assert a.round_trips == 1
    assert run(a, lambda x: [x.get("n"), x.pttl("n")]) == [b"5", -1]  # re-read after the write: cached
    assert a.round_trips == 1
    assert run(a, lambda x: [x.script("cas", ["n"], ["5", "6", 0]), x.get("n")]) == [1, b"6"]
    assert run(a, lambda x: [x.get("n")]) == [b"6"] and a.round_trips == 2


def test_cached_entry_ends_with_its_ttl(redis_clean) -> None:
    a = RedisState(redis_clean.url("red"), "red", "fw")
    run(a, lambda x: [x.set("short", "v", ttl=0.2)])
    assert run(a, lambda x: [x.get("short"), x.pttl("short")])[0] == b"v"
    trips = a.round_trips
    _until(lambda: run(a, lambda x: [x.get("short")]) == [None])
    assert a.round_trips > trips  # past its deadline it was asked for again, never served stale


def test_a_lost_connection_forgets_the_cache(redis_clean) -> None:
    a = RedisState(redis_clean.url("red"), "red", "fw")
    run(a, lambda x: [x.set("k", "v1")])
    assert run(a, lambda x: [x.get("k")]) == [b"v1"]
    admin = redis_clean.admin()
    admin.client_kill_filter(user="tenant-red")
    admin.set("t:red:fw:k", "v2")  # written while nobody tracks it for a
    assert run(a, lambda x: [x.get("k")]) == [b"v2"]


def test_tracking_tells_a_tenant_only_of_its_own_keys(redis_clean) -> None:
    red = RedisState(redis_clean.url("red"), "red", "fw")
    blue = RedisState(redis_clean.url("blue"), "blue", "fw")
    run(red, lambda x: [x.get("k")])
    run(blue, lambda x: [x.get("k")])
    run(blue, lambda x: [x.set("k", "blue")])  # blue's t:blue:fw:k: nothing for red to hear
    run(red, lambda x: [x.set("k", "red")])
    assert _until(lambda: run(red, lambda x: [x.get("k")]) == [b"red"])
    assert _until(lambda: run(blue, lambda x: [x.get("k")]) == [b"blue"])
    assert red.invalidations <= 1 and "t:blue:fw:k" not in red.cache
