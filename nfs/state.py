"""The tenant-scoped state client every NF keeps its per-flow facts in (the state contract).

Keys are ``t:{tenant}:{nf}:{key}``; the Redis user of a tenant may touch only ``t:{tenant}:*``
(the server enforces it with an ACL). An NF never talks to Redis directly: it fills a
:class:`Batch` with the operations of a whole batch of packets, :meth:`Batch.execute` sends them
in one pipelined round trip (StatelessNF's main optimisation), then the NF reads the results
from the :class:`Ref` each operation returned.

Two backends with one interface: :class:`RedisState` (the real thing) and :class:`LocalState`
(in-process dict with TTLs: the unit-test double and the local-state baseline of the
benchmarks). Server-side scripts (atomic read-modify-write) exist in both: Lua for Redis, a
Python function of the same meaning for the local backend, and ``tests/test_state.py`` runs the
same assertions on both.

When Redis is unreachable, :meth:`Batch.execute` raises :class:`StateUnavailable`; the NF then
drops the batch (fail closed) and the next batch reconnects.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse


class StateUnavailable(Exception):
    """The state server could not be reached, or refused the batch; no packet of the batch
    may be forwarded (fail closed).

    Args:
        message: what happened, for the one log line.
        reason: the drop reason the packets are counted under.
    """

    def __init__(self, message: str, reason: str = "state_unavailable") -> None:
        super().__init__(message)
        self.reason = reason


_UNSET = object()


class Ref:
    """The result of one operation of a batch, available after :meth:`Batch.execute`."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value: Any = _UNSET

    @property
    def value(self) -> Any:
        if self._value is _UNSET:
            raise RuntimeError("the batch has not been executed yet")
        return self._value


# -- server-side scripts: Lua for Redis, the same meaning in Python for LocalState ----------

@dataclass(frozen=True)
class Script:
    """An atomic read-modify-write run by the state server.

    Attributes:
        lua: the Redis script (KEYS and ARGV as documented on each script).
        local: ``f(store, keys, args) -> result`` with the same meaning, for LocalState.
    """

    lua: str
    local: Callable[["LocalState", Sequence[str], Sequence[Any]], Any]


def _cas_local(store: "LocalState", keys: Sequence[str], args: Sequence[Any]) -> int:
    key, = keys
    expected, new, ttl_ms = args[0], args[1], int(args[2])
    current = store._get(key)
    if (expected == b"" and current is not None) or (expected != b"" and current != _b(expected)):
        return 0
    store._set(key, _b(new), ttl_ms)
    return 1


CAS = Script(
    # KEYS[1]; ARGV: expected ('' = must be absent), new value, TTL in ms (0 = none).
    # Sets the key to the new value only if it still holds the expected one. Returns 1 or 0.
    lua="""
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
""",
    local=_cas_local,
)


def _cad_local(store: "LocalState", keys: Sequence[str], args: Sequence[Any]) -> int:
    key, = keys
    if store._get(key) != _b(args[0]):
        return 0
    del store.store[key]
    return 1


CAD = Script(
    # KEYS[1]; ARGV[1]: the value read. Deletes the key only if it still holds that value
    # (compare-and-delete: the firewall's RST must not delete what another instance wrote
    # since it read). Returns 1 or 0.
    lua="""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
    local=_cad_local,
)


def _replay_local(store: "LocalState", keys: Sequence[str], args: Sequence[Any]) -> int:
    key, = keys
    seq, window = int(args[0]), int(args[1])
    if seq == 0:
        return 0
    raw = store._get(key)
    top, bits = (0, "0" * window) if raw is None else (int(raw.split(b":")[0]), raw.split(b":")[1].decode())
    if seq > top:
        shift = seq - top
        bits = "1" + "0" * (window - 1) if shift >= window else "1" + "0" * (shift - 1) + bits[:window - shift]
        top = seq
    else:
        off = top - seq
        if off >= window or bits[off] == "1":
            return 0
        bits = bits[:off] + "1" + bits[off + 1:]
    store._set(key, f"{top}:{bits}".encode(), 0)
    return 1


REPLAY = Script(
    # KEYS[1] holds "top:bits" (RFC 4303 §3.4.3 sliding window; character i of bits is '1' if
    # sequence number top - i was accepted). ARGV: sequence number, window size. Marks the
    # number and returns 1 if it is new and inside the window; returns 0 and changes nothing
    # for a replay or a number too old for the window. Called only after the integrity check.
    lua="""
local seq = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
if seq == 0 then return 0 end
local top, topstr, bits = 0, '0', string.rep('0', w)
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ':')
  topstr = string.sub(cur, 1, sep - 1)
  top = tonumber(topstr)
  bits = string.sub(cur, sep + 1)
end
if seq > top then
  local shift = seq - top
  if shift >= w then
    bits = '1' .. string.rep('0', w - 1)
  else
    bits = '1' .. string.rep('0', shift - 1) .. string.sub(bits, 1, w - shift)
  end
  topstr = ARGV[1]
else
  local off = top - seq
  if off >= w or string.sub(bits, off + 1, off + 1) == '1' then return 0 end
  bits = string.sub(bits, 1, off) .. '1' .. string.sub(bits, off + 2)
end
redis.call('SET', KEYS[1], topstr .. ':' .. bits)
return 1
""",
    local=_replay_local,
)

SCRIPTS = {"cas": CAS, "cad": CAD, "replay": REPLAY}


def _b(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    return str(v).encode()


# -- batches ---------------------------------------------------------------------------------

class Batch:
    """The state operations of one batch of packets, run together by :meth:`execute`.

    Keys are relative (``"ct:10.0.0.1:..."``); the client adds the tenant/NF prefix.
    """

    def __init__(self, client: "StateClient") -> None:
        self.client = client
        self.ops: list[tuple[str, tuple[Any, ...], Ref]] = []

    def _add(self, op: str, *args: Any) -> Ref:
        ref = Ref()
        self.ops.append((op, args, ref))
        return ref

    def get(self, key: str) -> Ref:
        """Value of ``key`` (bytes) or None."""
        return self._add("get", key)

    def pttl(self, key: str) -> Ref:
        """Remaining lifetime in ms; -1 without TTL, -2 if absent (Redis semantics)."""
        return self._add("pttl", key)

    def set(self, key: str, value: Any, ttl: Optional[float] = None, nx: bool = False) -> Ref:
        """Set ``key``; with ``nx`` only if absent (result True if it was set)."""
        return self._add("set", key, value, ttl, nx)

    def incrby(self, key: str, amount: int) -> Ref:
        """Atomically add ``amount``; result is the new value."""
        return self._add("incrby", key, amount)

    def expire(self, key: str, ttl: float) -> Ref:
        """Set a key's lifetime in seconds; result True if the key exists."""
        return self._add("expire", key, ttl)

    def delete(self, key: str) -> Ref:
        """Delete ``key``; result is 1 if it existed."""
        return self._add("delete", key)

    def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Ref:
        """Run one of :data:`SCRIPTS` atomically on the server."""
        if name not in SCRIPTS:
            raise KeyError(f"unknown state script {name!r}; known: {', '.join(SCRIPTS)}")
        return self._add("script", name, tuple(keys), tuple(args))

    def __len__(self) -> int:
        return len(self.ops)

    def execute(self) -> None:
        """Run every operation in one round trip and fill their refs.

        Raises:
            StateUnavailable: the server could not be reached; no ref is filled.
        """
        if self.ops:
            results = self.client._execute(self.ops)
            for (_, _, ref), value in zip(self.ops, results):
                ref._value = value
            self.client.ops += len(self.ops)
            self.client.round_trips += 1
        self.ops = []


class StateClient:
    """Common part of the two backends.

    Args:
        tenant: tenant name (first part of every key).
        nf: the NF's name within the tenant (its pool), second part of every key.
    """

    def __init__(self, tenant: str, nf: str) -> None:
        self.prefix = f"t:{tenant}:{nf}:"
        self.ops = 0
        self.round_trips = 0

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def connect(self) -> None:
        """Open the connection now rather than on the first batch (nothing to open in-process).

        Raises:
            StateUnavailable: the server does not answer.
        """

    def batch(self) -> Batch:
        """A new, empty batch."""
        return Batch(self)

    def _execute(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        raise NotImplementedError


class RedisState(StateClient):
    """State in Redis (or any server speaking its protocol), over the tenant's ACL user.

    Args:
        url: ``redis://user@host:port/db`` (or ``redis://user:password@...``).
        tenant: tenant name.
        nf: NF name within the tenant.
        timeout: socket timeout in seconds; past it the batch fails closed.
        password: the user's password, when the URL has none.
    """

    def __init__(self, url: str, tenant: str, nf: str, timeout: float = 1.0,
                 password: Optional[str] = None) -> None:
        import redis

        super().__init__(tenant, nf)
        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self.url = url
        extra = {} if password is None or urlparse(url).password else {"password": password}
        self.r = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **extra)
        self._scripts = {name: self.r.register_script(s.lua) for name, s in SCRIPTS.items()}
        self._noscript = redis.exceptions.NoScriptError

    def connect(self) -> None:
        try:
            self.r.ping()
        except self._redis_errors as err:
            raise StateUnavailable(f"state server unreachable: {err}") from None

    def __repr__(self) -> str:
        u = urlparse(self.url)
        return f"RedisState({u.username}@{u.hostname}:{u.port}, prefix={self.prefix!r})"

    def _execute(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        pipe = self.r.pipeline(transaction=False)
        for op, args, _ in ops:
            if op == "get":
                pipe.get(self.key(args[0]))
            elif op == "pttl":
                pipe.pttl(self.key(args[0]))
            elif op == "set":
                key, value, ttl, nx = args
                pipe.set(self.key(key), value, px=int(ttl * 1000) if ttl else None, nx=nx)
            elif op == "incrby":
                pipe.incrby(self.key(args[0]), args[1])
            elif op == "expire":
                pipe.pexpire(self.key(args[0]), int(args[1] * 1000))
            elif op == "delete":
                pipe.delete(self.key(args[0]))
            elif op == "script":
                # EVALSHA straight into the pipeline: redis-py's own script call would add a
                # SCRIPT EXISTS round trip before every pipeline that holds a script
                name, keys, sargs = args
                pipe.evalsha(self._scripts[name].sha, len(keys), *[self.key(k) for k in keys], *sargs)
        try:
            results = pipe.execute(raise_on_error=False)
            missing = [i for i, r in enumerate(results) if isinstance(r, self._noscript)]
            if missing:
                results = self._load_and_rerun(ops, results, missing)
        except self._redis_errors as err:
            raise StateUnavailable(f"state server unreachable: {err}") from None
        for r in results:
            if isinstance(r, Exception):  # NOPERM, BUSY, OOM, ...: the server refused the batch
                raise StateUnavailable(f"state server refused an operation: {r}", "state_refused")
        return [bool(r) if op in ("set", "expire") else r for (op, _, _), r in zip(ops, results)]

    def _load_and_rerun(self, ops: list[tuple[str, tuple[Any, ...], Ref]], results: list[Any],
                        missing: list[int]) -> list[Any]:
        """The server lacks our scripts (a fresh server the lab did not load them into): load
        them if this user may, then run just the script operations that failed (they had no
        effect). A user who may not load scripts fails closed."""
        import redis
        try:
            for script in self._scripts.values():
                self.r.script_load(script.script)
        except redis.exceptions.ResponseError as err:
            raise StateUnavailable(f"the state server lacks the NF scripts and this user cannot load "
                                   f"them: {err}") from None
        pipe = self.r.pipeline(transaction=False)
        for i in missing:
            name, keys, sargs = ops[i][1]
            pipe.evalsha(self._scripts[name].sha, len(keys), *[self.key(k) for k in keys], *sargs)
        for i, r in zip(missing, pipe.execute(raise_on_error=False)):
            results[i] = r
        return results


class LocalState(StateClient):
    """In-process state with the same interface and TTL semantics (one process only).

    Several LocalState objects may share one ``store`` dict to stand for several instances of
    one process; they are not shared across processes: that is what Redis is for.
    """

    def __init__(self, tenant: str, nf: str, store: Optional[dict[str, tuple[bytes, float]]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(tenant, nf)
        self.store = {} if store is None else store
        self.clock = clock
        self.lock = threading.Lock()
        self.available = True  # tests switch it off to see an NF fail closed

    def _get(self, key: str) -> Optional[bytes]:
        item = self.store.get(key)
        if item is None:
            return None
        if item[1] and item[1] <= self.clock():
            del self.store[key]
            return None
        return item[0]

    def _set(self, key: str, value: bytes, ttl_ms: float) -> None:
        self.store[key] = (value, self.clock() + ttl_ms / 1000 if ttl_ms else 0.0)

    def _one(self, op: str, args: tuple[Any, ...]) -> Any:
        if op == "get":
            return self._get(self.key(args[0]))
        if op == "pttl":
            key = self.key(args[0])
            if self._get(key) is None:
                return -2
            exp = self.store[key][1]
            return -1 if not exp else int((exp - self.clock()) * 1000)
        if op == "set":
            key, value, ttl, nx = args
            if nx and self._get(self.key(key)) is not None:
                return False
            self._set(self.key(key), _b(value), ttl * 1000 if ttl else 0)
            return True
        if op == "incrby":
            key = self.key(args[0])
            cur = self._get(key)
            new = int(cur or 0) + int(args[1])
            exp = self.store[key][1] if cur is not None else 0.0
            self.store[key] = (str(new).encode(), exp)
            return new
        if op == "expire":
            key = self.key(args[0])
            if self._get(key) is None:
                return False
            self.store[key] = (self.store[key][0], self.clock() + args[1])
            return True
        if op == "delete":
            key = self.key(args[0])
            existed = self._get(key) is not None
            self.store.pop(key, None)
            return int(existed)
        if op == "script":
            name, keys, sargs = args
            return SCRIPTS[name].local(self, [self.key(k) for k in keys], [_b(a) for a in sargs])
        raise ValueError(op)

    def _execute(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        if not self.available:
            raise StateUnavailable("local state switched off")
        with self.lock:
            return [self._one(op, args) for op, args, _ in ops]


def open_state(url: Optional[str], tenant: str, nf: str, password: Optional[str] = None) -> StateClient:
    """The state client an NF process uses: Redis for ``redis://`` URLs, LocalState for ``local:``.

    Args:
        url: the ``--state`` argument; None or ``local:`` gives in-process state (no sharing:
            the baseline of the benchmarks, and what a broken stateful NF looks like).
        tenant: tenant name.
        nf: NF name within the tenant.
        password: the state server password, when the URL has none (``nfs.runtime`` reads it
            from ``--state-password-file`` or ``$STATELAB_STATE_PASSWORD``).
    """
    if url is None or url.startswith("local:"):
        return LocalState(tenant, nf)
    return RedisState(url, tenant, nf, password=password)
