"""Tenant isolation at the state server: ISO-4.

With each tenant's own credentials, the check pulls every lever a Redis user has to read,
change, enumerate, watch or stall another tenant's state, or to take over the server, and
records each lever's outcome:

- ``refused``: the server said no (NOPERM, WRONGPASS, NOAUTH, a disabled or unknown command);
- ``contained``: the server did it, and the check saw that nothing reached another tenant.
  Only levers whose reach a lab may bound rather than forbid end so: client tracking in
  broadcast mode (no other tenant's key name arrives), a long-running script (the other
  tenants' GETs keep answering within an NF's timeout), filling memory (the tenant hits its own
  limit; the others still write);
- ``allowed``: anything else. One allowed lever is a FAIL naming it;
- ``n/a``: a lever that needs another tenant, in a lab of one.

The positive half: each tenant's user does on its own keys what its NFs do, through the NFs'
own state client (every operation of ``nfs.state``, the scripts by SHA), and client tracking in
default mode delivers it an invalidation. A server that refuses everything FAILs too.

With replicas (``state: {replicas: N}``) the levers reach them and the Sentinels too: a
tenant may not write to its replica, promote it (``REPLICAOF NO ONE``, ``FAILOVER``), log in
to another tenant's replica, or ask a Sentinel anything but where a primary is (no
``SENTINEL FAILOVER``, ``SET``, ``REMOVE``, ``MONITOR``, ``RESET``, ``CONFIG``, listing).

In a cluster (``state: {cluster: N}``) every probe on a key goes to the node that holds its
slot, and the levers reach every node: no ``CLUSTER`` subcommand but ``SLOTS`` (the client's
slot map), no login at another tenant's node, and no connection to any node's cluster bus (it
has no authentication; the lab's nftables refuses every source but the nodes' own address),
beside the positive half that every node still says the cluster is ok.

With one tenant the levers against the server itself still run (there is no other tenant's
key, channel or server to try): a tenant that may flush, reconfigure, watch or stall its state
server is a hole whoever shares that server. SHUTDOWN, SWAPDB and ACL SETUSER are not tried (if
allowed they would wreck the lab under test); the ACL that allows none of them is what ISO-4
exercises.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from conformance.core import Result, check, verdict
from conformance.load import Context

SECRET = "t:{t}:iso4:secret"      # written by the admin on each tenant's server, must survive
NF_TIMEOUT = 1.0                  # nfs.state.RedisState's socket timeout: past it, NFs fail closed
FILL_VALUE = 512 << 10            # bytes per SET when filling memory
HEAVY_WINDOW = 10_000_000         # replay window of the heaviest script a tenant may run
REFUSAL_CODES = ("NOPERM", "WRONGPASS", "NOAUTH", "READONLY")
LUA_LOOP = "while true do end"
LIBRARY = "#!lua name=iso4\nredis.register_function('iso4', function() return 1 end)"


class RespError(Exception):
    """An error reply."""


def refusal(reply: Any) -> Optional[str]:
    """The refusal in ``reply`` (a denied, disabled or unknown command), else None."""
    if not isinstance(reply, RespError):
        return None
    text = str(reply)
    if text.split(" ", 1)[0] in REFUSAL_CODES or "not allowed" in text or "unknown command" in text \
            or "unknown subcommand" in text:
        return text
    return None


class Resp:
    """A bare RESP2/RESP3 connection: each reply exactly as the server gave it, pushes
    (RESP3 invalidations) kept apart in :attr:`pushes`.

    Args:
        host: server address.
        port: server port.
        timeout: socket timeout in seconds.
    """

    def __init__(self, host: str, port: int, timeout: float = 2.0) -> None:
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.pushes: list[Any] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, *args: Any) -> None:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))

    def call(self, *args: Any, timeout: Optional[float] = None) -> Any:
        """Send one command and return its reply (a :class:`RespError` for an error reply)."""
        self.send(*args)
        return self.reply(timeout)

    def reply(self, timeout: Optional[float] = None) -> Any:
        """The next reply that is not a push; raises ``socket.timeout`` if none comes in time."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            kind, value = self._read()
            if kind != ">":
                return value
            self.pushes.append(value)

    def wait_pushes(self, seconds: float, enough: Callable[[list[Any]], bool] = lambda _: False) -> list[Any]:
        """Collect pushes for ``seconds`` or until ``enough(pushes)``; return all so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not enough(self.pushes):
            self.sock.settimeout(left)
            try:
                kind, value = self._read()
            except (socket.timeout, TimeoutError):
                break
            if kind == ">":
                self.pushes.append(value)
        return self.pushes

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _read(self) -> tuple[str, Any]:
        line = self._line()
        kind, rest = chr(line[0]), line[1:]
        if kind in "+(,":
            return kind, rest.decode()
        if kind == "-":
            return kind, RespError(rest.decode())
        if kind == ":":
            return kind, int(rest)
        if kind == "#":
            return kind, rest == b"t"
        if kind == "_":
            return kind, None
        if kind in "$=!":
            n = int(rest)
            data = None if n < 0 else self._exact(n)
            return kind, RespError(data.decode()) if kind == "!" else data
        if kind in "*>~%|":
            n = int(rest) * (2 if kind in "%|" else 1)
            items = None if n < 0 else [self._read()[1] for _ in range(n)]
            if kind == "|":  # an attribute precedes the real reply
                return self._read()
            return kind, items
        raise ConnectionError(f"unexpected RESP type {kind!r} in {line[:40]!r}")


def _mentions(value: Any, needle: bytes) -> bool:
    if isinstance(value, bytes):
        return needle in value
    if isinstance(value, (list, tuple)):
        return any(_mentions(v, needle) for v in value)
    return False


def _short(reply: Any) -> str:
    text = repr(reply)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Probe:
    """What ISO-4 needs of a running lab: addresses, credentials, the admin."""

    lab: Any

    def tenants(self) -> list[str]:
        return [t.name for t in self.lab.topo.tenants]

    def conn(self, tenant: Optional[str], server: str, resp3: bool = False,
             key: Optional[str] = None) -> tuple[Resp, Any]:
        """A connection to ``server``'s state server (in a cluster: the node holding ``key``),
        authenticated as ``tenant`` (None: not at all); returns it with the reply to AUTH/HELLO."""
        c = Resp(self.lab.state_ip, self.lab.state_port(server, key=key))
        if tenant is None:
            return c, None
        user, pw = f"tenant-{tenant}", self.lab.passwords[tenant]
        reply = c.call("HELLO", "3", "AUTH", user, pw) if resp3 else c.call("AUTH", user, pw)
        return c, reply

    def get_latencies(self, tenant: str, seconds: float,
                      busy: Optional[threading.Thread] = None) -> tuple[list[float], list[str]]:
        """``tenant``'s own GETs for ``seconds`` (and as long as ``busy`` runs), as its NFs
        would: latencies in ms, failures."""
        import redis
        port = self.lab.state_port(tenant, key=SECRET.format(t=tenant))
        r = redis.Redis(host=self.lab.state_ip, port=port, username=f"tenant-{tenant}",
                        password=self.lab.passwords[tenant], socket_timeout=NF_TIMEOUT)
        ms, failed = [], []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or (busy is not None and busy.is_alive()):
            t0 = time.monotonic()
            try:
                r.get(SECRET.format(t=tenant))
                ms.append((time.monotonic() - t0) * 1000)
            except redis.exceptions.RedisError as err:
                failed.append(f"{type(err).__name__}: {err}")
            time.sleep(0.01)
        r.close()
        return ms, failed


class Levers:
    """Tries levers and keeps their outcomes."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.allowed: list[str] = []

    def record(self, name: str, outcome: str, detail: str) -> None:
        self.outcomes[name] = f"{outcome}: {detail}"
        if outcome == "allowed":
            self.allowed.append(f"{name}: {detail}")

    def command(self, name: str, c: Resp, *args: Any) -> Any:
        """One command that must be refused."""
        try:
            reply = c.call(*args)
        except (socket.timeout, TimeoutError):
            self.record(name, "allowed", "no refusal within 2 s")
            return None
        why = refusal(reply)
        self.record(name, "refused" if why else "allowed", why or f"reply {_short(reply)}")
        return reply

    def count(self, outcome: str) -> int:
        return sum(1 for v in self.outcomes.values() if v.startswith(outcome + ":"))


def _own_keys_work(p: Probe, tenant: str) -> Optional[str]:
    """Everything the NFs do, through their own state client, on the tenant's own keys; the
    first thing that did not work, or None."""
    from nfs.state import StateUnavailable, open_state
    st = open_state(p.lab.state_url(tenant), tenant, "iso4", password=p.lab.passwords[tenant])
    b = st.batch()
    expect: list[tuple[str, Any, Callable[[Any], bool]]] = [
        ("SET PX", b.set("p", "1", ttl=30), lambda v: v is True),
        ("SET NX", b.set("nx", "1", ttl=30, nx=True), lambda v: v is True),
        ("GET", b.get("p"), lambda v: v == b"1"),
        ("PTTL", b.pttl("p"), lambda v: isinstance(v, int) and v > 0),
        ("INCRBY", b.incrby("n", 5), lambda v: v == 5),
        ("PEXPIRE", b.expire("n", 30), lambda v: v is True),
        ("EVALSHA cas", b.script("cas", ["c"], ["", "v", 30000]), lambda v: v == 1),
        ("EVALSHA replay", b.script("replay", ["r"], [5, 64]), lambda v: v == 1),
        ("DEL", b.delete("p"), lambda v: v == 1),
    ]
    try:
        b.execute()
    except StateUnavailable as err:
        return f"its NFs' state client fails: {err}"
    except Exception as err:  # a NOPERM surfaces here as redis-py's error
        return f"its NFs' state client fails: {type(err).__name__}: {err}"
    finally:
        clean = st.batch()
        for k in ("p", "nx", "n", "c", "r"):
            clean.delete(k)
        try:
            clean.execute()
        except Exception:
            pass
    for what, ref, ok in expect:
        if not ok(ref.value):
            return f"{what} on its own key gave {ref.value!r}"
    return None


def _tracking_works(p: Probe, tenant: str) -> Optional[str]:
    """Client tracking in default mode on its own key delivers an invalidation (RESP3)."""
    key = f"t:{tenant}:iso4:tracked"
    c, hello = p.conn(tenant, tenant, resp3=True, key=key)
    w, _ = p.conn(tenant, tenant, key=key)
    try:
        if isinstance(hello, RespError):
            return f"HELLO 3: {hello}"
        for args in (("CLIENT", "TRACKING", "ON"), ("GET", key)):
            reply = c.call(*args)
            if isinstance(reply, RespError):
                return f"{' '.join(args)}: {reply}"
        w.call("SET", key, "changed")
        def seen(pushes: list[Any]) -> bool:
            return any(_mentions(m, key.encode()) for m in pushes)
        if not seen(c.wait_pushes(1.0, seen)):
            return "CLIENT TRACKING ON (default mode): no invalidation of its own key within 1 s"
        w.call("DEL", key)
        return None
    finally:
        c.close()
        w.close()


def _cross_tenant(p: Probe, lv: Levers, a: str, b: str) -> None:
    """``a``'s user against ``b``'s keys and channels on its own server, and at ``b``'s server."""
    key = SECRET.format(t=b)
    from nfs.state import SCRIPTS
    import hashlib
    cas = hashlib.sha1(SCRIPTS["cas"].lua.encode()).hexdigest()
    tries = {f"GET {key}": ("GET", key), f"SET {key}": ("SET", key, "stolen"), f"DEL {key}": ("DEL", key),
             f"EXISTS {key}": ("EXISTS", key), f"PTTL {key}": ("PTTL", key),
             f"INCRBY {key}": ("INCRBY", key, "1"), f"PEXPIRE {key}": ("PEXPIRE", key, "1"),
             f"EVALSHA cas on {key}": ("EVALSHA", cas, "1", key, "", "stolen", "0"),
             f"EVAL GET {key}": ("EVAL", "return redis.call('GET', KEYS[1])", "1", key),
             f"PUBLISH t:{b}:iso4": ("PUBLISH", f"t:{b}:iso4", "x"),
             f"SUBSCRIBE t:{b}:iso4": ("SUBSCRIBE", f"t:{b}:iso4"),
             f"PSUBSCRIBE t:{b}:*": ("PSUBSCRIBE", f"t:{b}:*")}
    for name, args in tries.items():
        c, _ = p.conn(a, a)
        try:
            lv.command(f"{a} {name}", c, *args)
        finally:
            c.close()
    c, reply = p.conn(a, b)
    try:
        why = refusal(reply)
        if why:
            lv.record(f"{a} AUTH at {b}'s server", "refused", why)
        else:
            got = c.call("GET", key)
            lv.record(f"{a} AUTH at {b}'s server", "allowed", f"AUTH {_short(reply)}, then GET {key}: {_short(got)}")
    finally:
        c.close()


def _server_levers(p: Probe, lv: Levers, a: str) -> None:
    """``a``'s user against its own server: enumerate, watch, reconfigure, flush."""
    own = f"t:{a}:iso4:own"
    tries = [("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",), ("DBSIZE",), ("INFO", "keyspace"),
             ("OBJECT", "ENCODING", own), ("MEMORY", "USAGE", own), ("MEMORY", "STATS"),
             ("DEBUG", "OBJECT", own), ("DEBUG", "SLEEP", "0"), ("CONFIG", "GET", "maxmemory"),
             ("CONFIG", "SET", "maxmemory-policy", "noeviction"), ("ACL", "LIST"), ("ACL", "LOG"),
             ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", "999999999"), ("CLIENT", "PAUSE", "1"),
             ("MONITOR",), ("SLOWLOG", "GET"), ("PUBSUB", "CHANNELS"), ("PSUBSCRIBE", "*"),
             ("EVAL", "return 1", "0"), ("SCRIPT", "LOAD", "return 1"), ("SCRIPT", "KILL"),
             ("SCRIPT", "FLUSH"), ("FUNCTION", "LOAD", LIBRARY), ("FUNCTION", "LIST"), ("FCALL", "iso4", "0"),
             ("FUNCTION", "FLUSH"), ("REPLICAOF", "NO", "ONE"), ("BGSAVE",), ("MODULE", "LIST"),
             ("FLUSHDB",), ("FLUSHALL",)]
    for args in tries:
        c, _ = p.conn(a, a)
        try:
            name = " ".join(str(x) for x in args[:2]) if args[0] != "FUNCTION" else f"FUNCTION {args[1]}"
            lv.command(f"{a} {name}", c, *args)
        finally:
            c.close()
    c, _ = p.conn(None, a)
    try:
        lv.command(f"anyone GET {SECRET.format(t=a)} at {a}'s server without credentials", c,
                   "GET", SECRET.format(t=a))
    finally:
        c.close()


def _tracking_broadcast(p: Probe, lv: Levers, a: str, others: list[str]) -> None:
    """CLIENT TRACKING in broadcast mode, for each other tenant's prefix and for none: the
    tenant may turn it on (default mode is what caching NFs use), but no other tenant's key
    name may reach it. Its own key's name must (the detector works)."""
    modes = [(f"t:{b}:",) for b in others] + [()]
    conns = []
    tracked = "t:{t}:iso4:tracked"
    try:
        for prefix in modes:  # at the node holding the tenant's own probe key (the detector)
            c, hello = p.conn(a, a, resp3=True, key=tracked.format(t=a))
            args = ("CLIENT", "TRACKING", "ON", "BCAST") + (("PREFIX",) + prefix if prefix else ())
            name = f"{a} {' '.join(args)}"
            reply = c.call(*args)
            conns.append((name, c, reply, hello))
        for b in [*others, a]:   # each other tenant writes its own key, as its NFs do; then a
            key = tracked.format(t=b)
            w, _ = p.conn(b, b, key=key)
            w.call("SET", key, "x")
            w.call("DEL", key)
            w.close()
        for name, c, reply, hello in conns:
            why = refusal(reply) or refusal(hello)
            if why:
                lv.record(name, "refused", why)
                continue
            pushes = c.wait_pushes(0.3)
            leaked = [b for b in others if any(_mentions(m, f"t:{b}:".encode()) for m in pushes)]
            own = sum(1 for m in pushes if _mentions(m, f"t:{a}:".encode()))
            if leaked:
                lv.record(name, "allowed", f"invalidations named keys of {', '.join(leaked)}")
            else:
                lv.record(name, "contained", f"no other tenant's key name arrived in 0.3 s "
                                             f"({own} invalidation(s) of {a}'s own keys did)")
    finally:
        for _, c, _, _ in conns:
            c.close()


def _while_running(p: Probe, others: list[str], seconds: float,
                   busy: Optional[threading.Thread] = None) -> tuple[dict[str, list[float]], list[str]]:
    """The other tenants' GET latencies (ms) and failures, each measured in its own thread."""
    results: dict[str, tuple[list[float], list[str]]] = {}

    def measure(b: str) -> None:
        results[b] = p.get_latencies(b, seconds, busy)
    threads = [threading.Thread(target=measure, args=(b,)) for b in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {b: ms for b, (ms, _) in results.items()}, [f"{b}: {f}" for b, (_, fs) in results.items() for f in fs]


def _judge_stall(lv: Levers, name: str, others: list[str], ms: dict[str, list[float]], failed: list[str],
                 what: str, figures: dict[str, Any]) -> None:
    slow = [f"{b} GET {max(v):.0f} ms" for b, v in ms.items() if v and max(v) >= NF_TIMEOUT * 1000]
    if not others:
        lv.record(name, "allowed", f"{what}, and no other tenant to show it stays on this tenant's server")
    elif failed or slow or not any(ms.values()):
        lv.record(name, "allowed", f"{what}; other tenants' NFs blocked: {(failed + slow)[:3]}")
    else:
        worst = max(max(v) for v in ms.values())
        figures.setdefault("other_get_max_ms", {})[name] = round(worst, 1)
        lv.record(name, "contained", f"{what}; other tenants' GETs answered meanwhile, max {worst:.1f} ms")


def _long_script(p: Probe, lv: Levers, a: str, others: list[str], figures: dict[str, Any]) -> None:
    """EVAL of an endless loop: refused, or (if accepted) the others must not notice."""
    name = f"{a} EVAL {LUA_LOOP!r}"
    c, _ = p.conn(a, a)
    try:
        c.send("EVAL", LUA_LOOP, "0")
        try:
            reply = c.reply(timeout=0.5)
        except (socket.timeout, TimeoutError):
            reply = None
        if reply is not None:
            why = refusal(reply)
            lv.record(name, "refused" if why else "allowed", why or f"reply {_short(reply)}")
            return
        ms, failed = _while_running(p, others, 1.0)
        try:
            p.lab.redis(server=a).script_kill()
        except Exception:
            pass
        _judge_stall(lv, name, others, ms, failed, "the loop ran (killed by the admin after 1.5 s)", figures)
    finally:
        c.close()


def _heavy_script(p: Probe, lv: Levers, a: str, others: list[str], figures: dict[str, Any]) -> None:
    """The heaviest thing a tenant may run: the NFs' replay script with a huge window on its
    own key (seconds of CPU, tens of MB). The other tenants' GETs must keep answering."""
    from nfs.state import SCRIPTS
    import hashlib
    name = f"{a} EVALSHA replay window={HEAVY_WINDOW} (long-running allowed script)"
    if not others:
        lv.record(name, "n/a", "no other tenant whose GETs it could stall")
        return
    sha = hashlib.sha1(SCRIPTS["replay"].lua.encode()).hexdigest()
    base, _ = _while_running(p, others, 0.3)
    box: dict[str, Any] = {}

    def run() -> None:
        c, _ = p.conn(a, a, key=f"t:{a}:iso4:heavy")
        t0 = time.monotonic()
        try:
            box["reply"] = c.call("EVALSHA", sha, "1", f"t:{a}:iso4:heavy", "5", str(HEAVY_WINDOW), timeout=30)
        except Exception as err:
            box["reply"] = err
        box["seconds"] = time.monotonic() - t0
        c.close()
    t = threading.Thread(target=run)
    t.start()
    ms, failed = _while_running(p, others, 0.3, busy=t)
    t.join()
    p.lab.redis(server=a).delete(f"t:{a}:iso4:heavy")
    flat = [v for vs in base.values() for v in vs]
    figures["other_get_median_ms_idle"] = round(statistics.median(flat), 2) if flat else None
    figures["heavy_script_s"] = round(box.get("seconds", 0.0), 2)
    during = [v for vs in ms.values() for v in vs]
    figures["other_get_max_ms_during_heavy_script"] = round(max(during), 1) if during else None
    _judge_stall(lv, name, others, ms, failed,
                 f"ran {box.get('seconds', 0):.2f} s, reply {_short(box.get('reply'))}", figures)


def _fill_memory(p: Probe, lv: Levers, a: str, others: list[str], figures: dict[str, Any]) -> None:
    """Write until the server says no: it must, at the tenant's own limit, and the other
    tenants must still be able to write."""
    name = f"{a} fills memory (SET {FILL_VALUE >> 10} KB values until refused)"
    fill = "t:{a}:iso4:{{fill}}:{n}"  # one hash tag: in a cluster every value goes to one node
    port = p.lab.state_port(a, key=fill.format(a=a, n=0))
    limit = int(p.lab.state_admin(port).config_get("maxmemory").get("maxmemory", 0))
    figures["maxmemory_mb"] = limit >> 20
    if limit == 0:
        lv.record(name, "allowed", "the tenant's state server has no memory limit")
        return
    c, _ = p.conn(a, a, key=fill.format(a=a, n=0))
    value = b"x" * FILL_VALUE
    written, refused = 0, None
    try:
        while written < limit * 3 // 2 + (16 << 20):
            reply = c.call("SET", fill.format(a=a, n=written // FILL_VALUE), value, timeout=10)
            if isinstance(reply, RespError):
                refused = str(reply)
                break
            written += FILL_VALUE
        blocked = []
        for b in others:
            w, _ = p.conn(b, b, key=f"t:{b}:iso4:write")
            if w.call("SET", f"t:{b}:iso4:write", "x") != "OK":
                blocked.append(b)
            w.call("DEL", f"t:{b}:iso4:write")
            w.close()
    finally:
        for i in range(written // FILL_VALUE + 1):
            c.call("DEL", fill.format(a=a, n=i))
        c.close()
    figures["fill_refused_after_mb"] = round(written / (1 << 20), 1) if refused else None
    if refused is None:
        lv.record(name, "allowed", f"wrote {written >> 20} MB with no refusal (limit {limit >> 20} MB)")
    elif blocked:
        lv.record(name, "allowed", f"refused after {written >> 20} MB ({refused}); then {', '.join(blocked)} "
                                   f"could not write either")
    else:
        lv.record(name, "contained", f"refused after {written >> 20} MB at its own limit ({refused.split()[0]})"
                                     + (f"; {', '.join(others)} still wrote" if others else ""))


def _as_tenant(p: Probe, lv: Levers, name: str, port: int, tenant: str, *args: Any) -> None:
    """One lever that must be refused, at the server on ``port``, logged in as ``tenant``."""
    c = Resp(p.lab.state_ip, port)
    try:
        c.call("AUTH", f"tenant-{tenant}", p.lab.passwords[tenant])
        lv.command(name, c, *args)
    finally:
        c.close()


def _replication_levers(p: Probe, lv: Levers, a: str, others: list[str]) -> None:
    """Levers against ``a``'s replicas, other tenants' replicas and the Sentinels."""
    lab = p.lab
    primary = lab.state_port(a)
    own = SECRET.format(t=a)
    user, pw = f"tenant-{a}", lab.passwords[a]
    for port in [x for x in lab.state_servers(a) if x != primary]:
        for args in (("SET", own, "x"), ("REPLICAOF", "NO", "ONE"), ("FAILOVER",), ("CONFIG", "SET", "replica-read-only", "no")):
            _as_tenant(p, lv, f"{a} {' '.join(args[:2])} at its replica (port {port})", port, a, *args)
        for b in others:
            c = Resp(lab.state_ip, [x for x in lab.state_servers(b) if x != lab.state_port(b)][0])
            try:
                lv.command(f"{a} logs in to {b}'s replica", c, "AUTH", user, pw)
            finally:
                c.close()
    _as_tenant(p, lv, f"{a} FAILOVER at its primary", primary, a, "FAILOVER")
    service = f"tenant-{a}"
    for port in lab.sentinel_ports:
        for args in (("SENTINEL", "FAILOVER", service), ("SENTINEL", "SET", service, "down-after-milliseconds", "1"),
                     ("SENTINEL", "REMOVE", service), ("SENTINEL", "MONITOR", "iso4", lab.state_ip, str(primary), "1"),
                     ("SENTINEL", "RESET", "*"), ("SENTINEL", "MASTERS"), ("SENTINEL", "REPLICAS", service),
                     ("SENTINEL", "CONFIG", "SET", "resolve-hostnames", "yes"), ("ACL", "LIST"), ("CLIENT", "LIST"),
                     ("AUTH", user, pw)):
            c = Resp(lab.state_ip, port)
            try:
                lv.command(f"{a} {' '.join(args[:2])} at Sentinel {port}", c, *args)
            finally:
                c.close()


CLUSTER_LEVERS = (("CLUSTER", "ADDSLOTS", "0"), ("CLUSTER", "DELSLOTS", "0"), ("CLUSTER", "FLUSHSLOTS"),
                  ("CLUSTER", "SETSLOT", "0", "STABLE"), ("CLUSTER", "MEET", "127.0.0.1", "1"),
                  ("CLUSTER", "FORGET", "0" * 40), ("CLUSTER", "RESET"), ("CLUSTER", "FAILOVER"),
                  ("CLUSTER", "REPLICATE", "0" * 40), ("CLUSTER", "SET-CONFIG-EPOCH", "1"),
                  ("CLUSTER", "BUMPEPOCH"), ("CLUSTER", "SAVECONFIG"), ("CLUSTER", "NODES"), ("CLUSTER", "SHARDS"),
                  ("CLUSTER", "INFO"), ("CLUSTER", "MYID"), ("CLUSTER", "COUNTKEYSINSLOT", "0"),
                  ("CLUSTER", "GETKEYSINSLOT", "0", "10"), ("CLUSTER", "LINKS"),
                  ("MIGRATE", "127.0.0.1", "1", "", "0", "100", "KEYS", "t:x"))


def _cluster_levers(p: Probe, lv: Levers, a: str, others: list[str], broken: list[str]) -> None:
    """Levers against ``a``'s cluster nodes, the other tenants' nodes and every cluster bus."""
    lab = p.lab
    user, pw = f"tenant-{a}", lab.passwords[a]
    for port in lab.state_servers(a):
        for args in CLUSTER_LEVERS:
            _as_tenant(p, lv, f"{a} {' '.join(args[:2])} at its node {port}", port, a, *args)
        info = lab.state_admin(port).cluster("info")
        if info.get("cluster_state") != "ok":  # the positive half: the nodes themselves reach the bus
            broken.append(f"{a}'s node {port} says cluster_state {info.get('cluster_state')}")
    for b in others:
        for port in lab.state_servers(b):
            c = Resp(lab.state_ip, port)
            try:
                lv.command(f"{a} logs in to {b}'s node {port}", c, "AUTH", user, pw)
            finally:
                c.close()



def _cluster_bus(p: Probe, lv: Levers) -> None:
    """A connection to every node's cluster bus from outside the nodes (the bus has no
    authentication: whoever reaches it may join a cluster and claim its slots)."""
    lab = p.lab
    for (owner, port), bus in lab.cluster_buses.items():
        name = f"a connection from outside the state server to the cluster bus of {owner}'s node {port} (port {bus})"
        try:
            socket.create_connection((lab.state_ip, bus), timeout=2.0).close()
            lv.record(name, "allowed", "the connection opened")
        except ConnectionRefusedError:
            lv.record(name, "refused", "connection refused (TCP reset)")
        except OSError as err:
            lv.record(name, "refused", f"no connection: {err}")


@check("ISO-4")
def iso_4(ctx: Context) -> Result:
    """One tenant's state credentials MUST NOT read, write, enumerate, watch or stall another
    tenant's state, nor reconfigure the state server; they MUST allow what the tenant's NFs do
    on its own keys.

    Every lever and its outcome (refused, contained, allowed) is in the ``levers`` figure;
    the module docstring of ``conformance/isolation/state.py`` lists them.
    """
    p = Probe(ctx.lab)
    tenants = p.tenants()
    lv = Levers()
    figures: dict[str, Any] = {"tenants": len(tenants)}
    broken: list[str] = []
    for t in tenants:
        p.lab.redis(server=t).set(SECRET.format(t=t), "x")
    try:
        for a in tenants:
            others = [b for b in tenants if b != a]
            c, reply = p.conn(a, a)
            c.close()
            if isinstance(reply, RespError):
                broken.append(f"{a} cannot log in to its own state server: {reply}")
                continue
            for what in (_own_keys_work(p, a), _tracking_works(p, a)):
                if what:
                    broken.append(f"{a}: {what}")
            for b in others:
                _cross_tenant(p, lv, a, b)
            _tracking_broadcast(p, lv, a, others)
            _long_script(p, lv, a, others, figures)
            _server_levers(p, lv, a)
            if p.lab.sentinel_ports:
                _replication_levers(p, lv, a, others)
            if p.lab.cluster_buses:
                _cluster_levers(p, lv, a, others, broken)
        if p.lab.cluster_buses:
            _cluster_bus(p, lv)
        first, rest = tenants[0], tenants[1:]
        _heavy_script(p, lv, first, rest, figures)
        _fill_memory(p, lv, first, rest, figures)
        for t in tenants:
            value = p.lab.redis(server=t).get(SECRET.format(t=t))
            if value != b"x":
                lv.record(f"{t}'s key {SECRET.format(t=t)} at the end", "allowed", f"it is now {value!r}, not b'x'")
    finally:
        for t in tenants:
            admin = p.lab.redis(server=t)
            admin.delete(SECRET.format(t=t))
            try:
                admin.function_delete("iso4")
            except Exception:
                pass
        p.lab.load_state_scripts()  # in case a lever flushed them
    figures.update({"levers_tried": len(lv.outcomes) - lv.count("n/a"), "refused": lv.count("refused"),
                    "contained": lv.count("contained"), "allowed": len(lv.allowed),
                    "allowed_operations": lv.allowed, "own_operations_broken": broken,
                    "levers": lv.outcomes})
    problems = [f"allowed: {x}" for x in lv.allowed] + [f"own state unusable: {x}" for x in broken]
    return verdict(not problems, figures, "; ".join(problems))
