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

import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qs, quote, unquote, urlparse


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

    def forget(self, keys: Sequence[str]) -> bool:
        """Read ``keys`` from the server next time, whatever is cached; True if any was
        (nothing is here: only a caching client keeps anything). An NF about to drop a packet
        on a value no write of its own has just confirmed calls it and, if True, decides again
        on a fresh read: another instance's write may be on its way as an invalidation."""
        return False

    def _execute(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        raise NotImplementedError


def pack_command(*args: Any) -> bytes:
    """One command in the Redis protocol (RESP): ``*N`` then each argument as a bulk string.

    The hot path's own encoder (redis-py's costs several microseconds a command);
    ``tests/test_state.py`` checks it byte-exact against redis-py's ``pack_command``.
    """
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, bool):
            raise TypeError("a bool is not a Redis argument; pass 0 or 1")
        elif isinstance(a, int):
            b = b"%d" % a
        elif isinstance(a, float):
            b = repr(a).encode()
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


_WRITES = frozenset(("set", "incrby", "expire", "delete", "script"))
WAIT_TIMEOUT_MS = 250   # how long a batch waits for its replicas before it fails closed
SENTINEL_TIMEOUT = 0.2  # seconds per Sentinel asked where the primary is


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"state URL {url!r}: {text!r} is not host:port")
    return host, int(port)
CACHE_MAX = 1 << 16  # entries kept per client; past it the older half goes


@dataclass
class _InFlight:
    """A pipeline sent and not yet read: its ops, the results the cache gave, and which
    replies to expect (the ops' own, the cache's extra reads, a WAIT)."""

    ops: list[tuple[str, tuple[Any, ...], Ref]]
    results: list[Any]
    remote: list[int]
    extra: list[tuple[str, str]]
    wait: int
    written: set[str]
    sent_at: float


class RedisState(StateClient):
    """State in Redis (or any server speaking its protocol), over the tenant's ACL user.

    One connection speaking RESP3, its commands packed here and its replies parsed by hiredis;
    a batch is one write of the whole pipeline and one read of its replies.

    With ``cache`` (the default), what a batch read is kept, and the server tells the client
    when another client changes it: Redis client-side caching in default tracking mode (``CLIENT
    TRACKING on``), where the server remembers the keys this connection read, and only those, so
    a tenant hears of nothing but its own keys. Invalidations arrive on the same connection,
    in order with the replies; they are read at the start of every batch (one non-blocking
    read) and while a round trip's replies are read. So:

    - a ``get``/``pttl`` of a key read before and not invalidated since is answered locally
      (the TTL counts down from the one read; the entry ends at that deadline); a batch whose
      every operation is answered so costs no round trip;
    - a key this batch writes is forgotten first, and read again at the end of the same
      pipeline (no extra round trip), so the next batch finds it cached;
    - another instance's write is seen from the first batch after its invalidation arrived
      (microseconds after the write). Writes stay compare-and-set (the NF scripts), so an
      answer that was stale by that much costs a retry, never a lost update;
    - a lost connection forgets everything: the next batch goes to the server (and fails
      closed if it does not answer).

    With replicas (``redis+sentinel://user@host:port[,host:port...]/service?wait=N``) the
    client asks the Sentinels, in turn, where the primary of ``service`` is, connects there and
    checks with ``ROLE`` that it is one (a Sentinel's answer can be a moment old). A batch that
    writes ends its pipeline with ``WAIT N``: its packets go on only once N replicas hold the
    writes, so a primary that dies loses nothing a packet already depended on (above all no ESP
    sequence number: docs/contracts.md, "Replicas and failover"); fewer acknowledgements fail the batch closed
    (``state_unreplicated``). A lost primary fails batches closed until the Sentinels name
    another.

    Args:
        url: ``redis://user@host:port/db`` (or ``redis://user:password@...``; ``?wait=N``
            makes batches that write wait for N replicas of that server), or the Sentinel
            form above.
        tenant: tenant name.
        nf: NF name within the tenant.
        timeout: socket timeout in seconds; past it the batch fails closed.
        password: the user's password, when the URL has none.
        cache: keep what was read, as above; False sends every operation to the server.
    """

    def __init__(self, url: str, tenant: str, nf: str, timeout: float = 1.0,
                 password: Optional[str] = None, cache: bool = True) -> None:
        import hashlib

        super().__init__(tenant, nf)
        self.url = url
        self._sentinels: list[tuple[str, int]] = []
        self._service = ""
        self.wait_replicas = 0
        u = urlparse(url)
        query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        if u.scheme == "redis+sentinel":
            creds, _, hosts = u.netloc.rpartition("@")
            self._sentinels = [_host_port(h, url) for h in hosts.split(",") if h]
            self._service = u.path.strip("/")
            if not self._sentinels or not self._service:
                raise ValueError(f"state URL {url!r}: write redis+sentinel://user@host:port[,host:port]/service")
            user, _, pw = creds.partition(":")
            self._addr = self._sentinels[0]
            self._user = unquote(user) or "default"
            self._password = unquote(pw) if pw else password
            self._db = int(query.get("db", 0))
            self.wait_replicas = int(query.get("wait", 1))
        elif u.scheme in ("redis", ""):
            self._addr = (u.hostname or "127.0.0.1", u.port or 6379)
            self._user = unquote(u.username) if u.username else "default"
            self._password = unquote(u.password) if u.password else password
            self._db = int(u.path.strip("/") or 0)
            self.wait_replicas = int(query.get("wait", 0))  # a primary with replicas, no Sentinel
        else:
            raise ValueError(f"state URL {url!r}: only redis://user@host:port/db or "
                             f"redis+sentinel://user@host:port[,host:port]/service is supported")
        self.wait_timeout_ms = WAIT_TIMEOUT_MS
        self.unreplicated = 0  # batches failed closed because too few replicas acknowledged
        self.timeout = timeout
        self.caching = cache
        self._sock: Optional[socket.socket] = None
        self._reader: Any = None
        self._sha = {name: hashlib.sha1(s.lua.encode()).hexdigest() for name, s in SCRIPTS.items()}
        # key -> (value, deadline on the monotonic clock or 0.0 for none); value None: absent
        self.cache: dict[str, tuple[Optional[bytes], float]] = {}
        self._hits: set[str] = set()  # keys the last batch that read answered from the cache
        self._invalidated: dict[str, int] = {}  # key invalidated in this round trip -> replies before it
        self._position = 0
        self._invalidated_all = False
        self.cache_hits = 0
        self.invalidations = 0

    def __repr__(self) -> str:
        return f"RedisState({self._user}@{self._addr[0]}:{self._addr[1]}, prefix={self.prefix!r})"

    # -- the connection ----------------------------------------------------------------------

    def connect(self) -> None:
        if self._sock is not None:
            return
        import hiredis

        if self._sentinels:
            self._addr = self._ask_sentinels()
        try:
            sock = socket.create_connection(self._addr, timeout=self.timeout)
        except OSError as err:
            raise StateUnavailable(f"state server unreachable: {self._addr[0]}:{self._addr[1]}: {err}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._reader = sock, hiredis.Reader()
        self._push_type = hiredis.PushNotification
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.cache.clear()
        hello = ["HELLO", 3] + (["AUTH", self._user, self._password] if self._password is not None else [])
        setup = [hello] + ([["SELECT", self._db]] if self._db else [])
        if self.caching:
            setup.append(["CLIENT", "TRACKING", "on"])
        if self._sentinels:
            setup.append(["ROLE"])
        try:
            replies = self._round_trip(b"".join(pack_command(*c) for c in setup), len(setup))
        except StateUnavailable:
            self._drop()
            raise
        for cmd, r in zip(setup, replies):
            if isinstance(r, Exception):
                self._drop()
                raise StateUnavailable(f"state server refused {cmd[0]} {cmd[1:2]}: {r}", "state_refused")
        if self._sentinels and (not replies[-1] or replies[-1][0] != b"master"):
            self._drop()
            raise StateUnavailable(f"{self._addr[0]}:{self._addr[1]}, named by the Sentinels as the primary of "
                                   f"{self._service}, is a {replies[-1][0].decode() if replies[-1] else '?'}")

    def _ask_sentinels(self) -> tuple[str, int]:
        """The primary's address by the first Sentinel that answers (each gets a short timeout)."""
        import hiredis

        errors = []
        for host, port in self._sentinels:
            try:
                with socket.create_connection((host, port), timeout=min(self.timeout, SENTINEL_TIMEOUT)) as s:
                    s.sendall(pack_command("SENTINEL", "get-master-addr-by-name", self._service))
                    reader = hiredis.Reader()
                    reply: Any = False
                    while reply is False:
                        data = s.recv(4096)
                        if not data:
                            raise ConnectionError("closed")
                        reader.feed(data)
                        reply = reader.gets()
            except (OSError, ConnectionError) as err:
                errors.append(f"{host}:{port}: {err}")
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return reply[0].decode(), int(reply[1])
            errors.append(f"{host}:{port}: {reply!r}")
        raise StateUnavailable(f"no Sentinel named a primary for {self._service}: {'; '.join(errors)}")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self.cache.clear()

    def _round_trip(self, payload: bytes, count: int) -> list[Any]:
        """Send ``payload`` and read ``count`` replies (invalidations between them applied)."""
        self._send(payload)
        return self._receive(count)

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(payload)
        except OSError as err:
            self._drop()
            raise StateUnavailable(f"state server unreachable: {err}") from None

    def _receive(self, count: int) -> list[Any]:
        """Read ``count`` replies (invalidations between them applied)."""
        if self._sock is None:
            raise StateUnavailable("state server unreachable: the connection was lost")
        try:
            replies: list[Any] = []
            while len(replies) < count:
                got = self._reader.gets()
                if got is False:
                    data = self._sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("the state server closed the connection")
                    self._reader.feed(data)
                    continue
                self._position = len(replies)
                if not self._push(got):
                    replies.append(got)
            return replies
        except (OSError, ConnectionError) as err:
            self._drop()
            raise StateUnavailable(f"state server unreachable: {err}") from None

    def _push(self, msg: Any) -> bool:
        """Apply ``msg`` if it is a push (hiredis gives pushes their own type): invalidations."""
        if not isinstance(msg, self._push_type):
            return False
        if msg and msg[0] == b"invalidate":
            keys = msg[1] if len(msg) > 1 else None
            if keys is None:  # the server forgot what we read (FLUSHALL, full table): forget it all
                self.cache.clear()
                self._invalidated_all = True
            else:
                for k in keys:
                    name = k.decode()
                    self.cache.pop(name, None)
                    self._invalidated[name] = self._position
                self.invalidations += len(keys)
        return True

    def forget(self, keys: Sequence[str]) -> bool:
        """True if the last batch that read answered any of ``keys`` from the cache."""
        stale = False
        for k in keys:
            self.cache.pop(self.prefix + k, None)
            stale |= k in self._hits
        return stale

    def _poll_invalidations(self) -> None:
        """Apply the invalidations already on the socket, without waiting."""
        sock = self._sock
        if sock is None:
            return
        try:
            while self._poller.poll(0):  # one poll(2) when nothing came: the common case
                data = sock.recv(1 << 16)
                if not data:
                    self._drop()
                    return
                self._reader.feed(data)
        except OSError:
            self._drop()
            return
        while True:
            msg = self._reader.gets()
            if msg is False:
                return
            self._push(msg)

    # -- a batch -------------------------------------------------------------------------------

    def _command(self, op: str, args: tuple[Any, ...]) -> bytes:
        key = self.prefix + args[0] if op != "script" else ""
        if op == "get":
            return pack_command("GET", key)
        if op == "pttl":
            return pack_command("PTTL", key)
        if op == "set":
            _, value, ttl, nx = args
            return pack_command("SET", key, value, *(("PX", int(ttl * 1000)) if ttl else ()), *(("NX",) if nx else ()))
        if op == "incrby":
            return pack_command("INCRBY", key, args[1])
        if op == "expire":
            return pack_command("PEXPIRE", key, int(args[1] * 1000))
        if op == "delete":
            return pack_command("DEL", key)
        name, keys, sargs = args
        return pack_command("EVALSHA", self._sha[name], len(keys), *[self.prefix + k for k in keys], *sargs)

    def _execute(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        sent = self._begin(ops)
        return sent if isinstance(sent, list) else self._finish(sent)

    def _begin(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> Any:
        """Answer what the cache can and send the rest of ``ops`` in one pipeline; returns the
        results if nothing had to be sent, else what :meth:`_finish` needs to read the replies
        (a cluster client sends to every node before it reads from any)."""
        if self._sock is None:
            self.connect()
        elif self.caching:
            self._poll_invalidations()
            if self._sock is None:
                self.connect()
        cache, now, prefix = self.cache, time.monotonic(), self.prefix
        if any(op in ("get", "pttl") for op, _, _ in ops):
            self._hits.clear()
        results: list[Any] = [None] * len(ops)
        remote: list[int] = []
        written: set[str] = set()
        missed: dict[str, list[bool]] = {}  # key read from the server -> [get sent, pttl sent]
        for i, (op, args, _) in enumerate(ops):
            if op in _WRITES:
                for k in (args[1] if op == "script" else (args[0],)):
                    written.add(k)
                    if cache.pop(prefix + k, None) is not None:
                        missed.setdefault(k, [False, False])
                remote.append(i)
                continue
            k = args[0]
            if self.caching and k not in written:
                hit = cache.get(prefix + k)
                if hit is not None and (not hit[1] or hit[1] > now):
                    self.cache_hits += 1
                    self._hits.add(k)
                    if op == "get":
                        results[i] = hit[0]
                    else:
                        results[i] = -2 if hit[0] is None else -1 if not hit[1] else max(1, int((hit[1] - now) * 1000))
                    continue
                missed.setdefault(k, [False, False])[op == "pttl"] = True
            remote.append(i)
        if not remote:
            return results
        self.round_trips += 1
        # what the cache needs beyond the batch's own reads: GET and PTTL of every key read or
        # written here, after the writes (so the next batch finds it)
        extra = []
        if self.caching:
            for k, (got_value, got_ttl) in missed.items():
                if k in written:
                    extra += [(k, "get"), (k, "pttl")]
                else:
                    extra += ([] if got_value else [(k, "get")]) + ([] if got_ttl else [(k, "pttl")])
        payload = b"".join(self._command(ops[i][0], ops[i][1]) for i in remote)
        payload += b"".join(pack_command("GET" if what == "get" else "PTTL", prefix + k) for k, what in extra)
        wait = self.wait_replicas if written else 0
        if wait:
            payload += pack_command("WAIT", wait, self.wait_timeout_ms)
        sent_at = time.monotonic()
        # an invalidation that arrives among this batch's replies after the reply to our read
        # of that key is of a write made after the read: that value must not be kept (and the
        # server, having told us, no longer tracks the key for us); one before it is older
        self._invalidated.clear()
        self._invalidated_all = False
        self._send(payload)
        return _InFlight(ops, results, remote, extra, wait, written, sent_at)

    def _finish(self, f: "_InFlight") -> list[Any]:
        """Read the replies of what :meth:`_begin` sent; return the results of all its ops."""
        ops, results, remote, extra, wait, written = f.ops, f.results, f.remote, f.extra, f.wait, f.written
        replies = self._receive(len(remote) + len(extra) + (1 if wait else 0))
        acked = replies.pop() if wait else None
        missing = [j for j, r in enumerate(replies[:len(remote)])
                   if isinstance(r, Exception) and str(r).startswith("NOSCRIPT")]
        if missing:
            for j, r in zip(missing, self._load_and_rerun([ops[remote[j]] for j in missing])):
                replies[j] = r
            if wait:  # the scripts wrote after the WAIT: wait for them too
                acked = self._round_trip(pack_command("WAIT", wait, self.wait_timeout_ms), 1)[0]
        if wait:
            if isinstance(acked, Exception):
                raise StateUnavailable(f"state server refused WAIT: {acked}", "state_refused")
            if acked < wait:
                self.unreplicated += 1
                raise StateUnavailable(f"{acked} of {wait} replicas acknowledged the batch's writes within "
                                       f"{self.wait_timeout_ms} ms", "state_unreplicated")
        for r in replies:
            if isinstance(r, Exception):  # NOPERM, BUSY, OOM, ...: the server refused the batch
                if str(r).startswith(("MOVED ", "ASK ")):  # a cluster node no longer holds the slot
                    raise StateUnavailable(f"state server redirected an operation: {r}", "state_moved")
                raise StateUnavailable(f"state server refused an operation: {r}", "state_refused")
        values: dict[str, list[Any]] = {}  # key -> [value, pttl, index of its first reply]
        for j, (i, r) in enumerate(zip(remote, replies)):
            op, args, _ = ops[i]
            if op in ("set", "expire"):
                r = bool(r) if op == "expire" else r is not None
            results[i] = r
            if op in ("get", "pttl") and args[0] not in written:
                values.setdefault(args[0], [_UNSET, _UNSET, j])[op == "pttl"] = r
        for j, ((k, what), r) in enumerate(zip(extra, replies[len(remote):]), len(remote)):
            values.setdefault(k, [_UNSET, _UNSET, j])[what == "pttl"] = r
        if self.caching:
            self._remember(values, f.sent_at)
        return results

    def _remember(self, values: dict[str, list[Any]], sent_at: float) -> None:
        """Cache what was read with both its value and TTL (a GET alone says nothing of when the
        key ends). The deadline counts from when the batch was sent: never later than the server's."""
        cache = self.cache
        if len(cache) + len(values) > CACHE_MAX:
            for k in list(cache)[:len(cache) // 2]:
                del cache[k]
        if self._invalidated_all:
            return
        gone = self._invalidated
        for k, (value, pttl, first) in values.items():
            if value is _UNSET or pttl is _UNSET or (gone and gone.get(self.prefix + k, -1) > first):
                continue
            if pttl == -2 or value is None:
                cache[self.prefix + k] = (None, 0.0)
            elif pttl == -1:
                cache[self.prefix + k] = (value, 0.0)
            elif pttl > 0:
                cache[self.prefix + k] = (value, sent_at + pttl / 1000)

    def _load_and_rerun(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        """The server lacks our scripts (a fresh server the lab did not load them into): load
        them if this user may, then run just the script operations that failed (they had no
        effect). A user who may not load scripts fails closed."""
        loads = [pack_command("SCRIPT", "LOAD", s.lua) for s in SCRIPTS.values()]
        for r in self._round_trip(b"".join(loads), len(loads)):
            if isinstance(r, Exception):
                raise StateUnavailable(f"the state server lacks the NF scripts and this user cannot load "
                                       f"them: {r}")
        return self._round_trip(b"".join(self._command(op, args) for op, args, _ in ops), len(ops))


SLOTS = 16384  # Redis Cluster's hash slots


class ClusterState(StateClient):
    """State in a Redis Cluster: one :class:`RedisState` per node (each with its own
    connection, cache and invalidations), the slot map learnt from the cluster itself.

    A batch is split by the hash slot of each operation's key (redis-py's ``key_slot``:
    CRC16 of the key, or of its ``{hash tag}``), sent to every node it touches before any
    reply is read, so it costs one round trip of the slowest node, not one per node. Every
    script of :data:`SCRIPTS` touches one key; a vendor NF's script that touches several must
    give them one hash tag. A node that answers ``MOVED``/``ASK`` (the slots moved) or cannot be
    reached fails the batch closed (``state_moved``/``state_unavailable``); the next batch
    reads the slot map again (``CLUSTER SLOTS``) from whichever node answers.

    Args:
        url: ``redis+cluster://user@host:port[,host:port...]/`` (any of the nodes).
        tenant, nf, timeout, password, cache: as for :class:`RedisState`.
    """

    def __init__(self, url: str, tenant: str, nf: str, timeout: float = 1.0,
                 password: Optional[str] = None, cache: bool = True) -> None:
        super().__init__(tenant, nf)
        u = urlparse(url)
        creds, _, hosts = u.netloc.rpartition("@")
        seeds = [_host_port(h, url) for h in hosts.split(",") if h]
        if u.scheme != "redis+cluster" or not seeds:
            raise ValueError(f"state URL {url!r}: write redis+cluster://user@host:port[,host:port]/")
        user, _, pw = creds.partition(":")
        self.url, self.tenant, self.nf = url, tenant, nf
        self._user = unquote(user) or "default"
        self._password = unquote(pw) if pw else password
        self._options = dict(timeout=timeout, cache=cache)
        self._known = list(seeds)  # every node address seen, seeds first
        self._nodes: dict[tuple[str, int], RedisState] = {}
        self._owner: list[Optional[tuple[str, int]]] = []  # slot -> node address ([] until read)

    def __repr__(self) -> str:
        return f"ClusterState({self._user}@{len(self._known)} nodes, prefix={self.prefix!r})"

    def _node(self, addr: tuple[str, int]) -> RedisState:
        node = self._nodes.get(addr)
        if node is None:
            auth = f"{quote(self._user, safe='')}@" if self._password is None else \
                f"{quote(self._user, safe='')}:{quote(self._password, safe='')}@"
            node = self._nodes[addr] = RedisState(f"redis://{auth}{addr[0]}:{addr[1]}/0", self.tenant, self.nf,
                                                  **self._options)
        return node

    def connect(self) -> None:
        if not self._owner:
            self._read_slots()
        for addr in {a for a in self._owner if a is not None}:
            self._node(addr).connect()

    def _read_slots(self) -> None:
        """The slot map from the first node that gives one (every slot must have an owner)."""
        errors = []
        for addr in list(self._known):
            node = self._node(addr)
            try:
                node.connect()
                reply, = node._round_trip(pack_command("CLUSTER", "SLOTS"), 1)
            except StateUnavailable as err:
                errors.append(f"{addr[0]}:{addr[1]}: {err}")
                continue
            if isinstance(reply, Exception) or not reply:
                errors.append(f"{addr[0]}:{addr[1]}: CLUSTER SLOTS: {reply or 'no slots'}")
                continue
            owner: list[Optional[tuple[str, int]]] = [None] * SLOTS
            for start, end, primary, *_ in reply:
                where = (primary[0].decode() or addr[0], int(primary[1]))
                owner[start:end + 1] = [where] * (end - start + 1)
                if where not in self._known:
                    self._known.append(where)
            if None in owner:
                errors.append(f"{addr[0]}:{addr[1]}: slot {owner.index(None)} has no node")
                continue
            self._owner = owner
            return
        raise StateUnavailable(f"no cluster node gave a slot map: {'; '.join(errors)}")

    def _slot_node(self, op: str, args: tuple[Any, ...]) -> tuple[str, int]:
        from redis.crc import key_slot

        keys = args[1] if op == "script" else (args[0],)
        slots = {key_slot((self.prefix + k).encode()) for k in keys}
        if len(slots) != 1:
            raise ValueError(f"script {args[0]!r} touches keys in {len(slots)} hash slots: {list(keys)}; "
                             f"in a cluster the keys of one script must share a hash tag {{...}}")
        owner = self._owner[slots.pop()]
        assert owner is not None
        return owner

    def forget(self, keys: Sequence[str]) -> bool:
        if not self._owner:
            return False
        stale = False
        for k in keys:
            stale |= self._node(self._slot_node("get", (k,))).forget([k])
        return stale

    @property
    def cache_hits(self) -> int:
        return sum(n.cache_hits for n in self._nodes.values())

    @property
    def invalidations(self) -> int:
        return sum(n.invalidations for n in self._nodes.values())

    def _execute(self, ops: list[tuple[str, tuple[Any, ...], Ref]]) -> list[Any]:
        if not self._owner:
            self._read_slots()
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (op, args, _) in enumerate(ops):
            groups.setdefault(self._slot_node(op, args), []).append(i)
        error: Optional[StateUnavailable] = None
        sent = []
        for addr, idx in groups.items():  # every node's pipeline out before any reply is read
            node = self._node(addr)
            try:
                sent.append((node, idx, node._begin([ops[i] for i in idx])))
            except StateUnavailable as err:
                error = error or err
        results: list[Any] = [None] * len(ops)
        remote = 0
        for node, idx, begun in sent:
            try:
                if isinstance(begun, list):
                    sub = begun
                else:
                    remote += 1
                    sub = node._finish(begun)
            except StateUnavailable as err:
                error = error or err
                continue
            for i, r in zip(idx, sub):
                results[i] = r
        self.round_trips += remote
        if error is not None:
            if error.reason in ("state_moved", "state_unavailable"):
                self._owner = []  # the slots may have moved: read the map again next batch
            raise error
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
        self.round_trips += 1
        with self.lock:
            return [self._one(op, args) for op, args, _ in ops]


def open_state(url: Optional[str], tenant: str, nf: str, password: Optional[str] = None) -> StateClient:
    """The state client an NF process uses: Redis for ``redis://`` and ``redis+sentinel://`` URLs,
    a Redis Cluster for ``redis+cluster://``, LocalState for ``local:``.

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
    if url.startswith("redis+cluster:"):
        return ClusterState(url, tenant, nf, password=password)
    return RedisState(url, tenant, nf, password=password)
