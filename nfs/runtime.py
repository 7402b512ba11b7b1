"""The packet loop every statelab NF runs (the NF process contract of docs/architecture.md).

``python -m nfs.<kind> --iface IF --state URL [--state-password-file FILE] --instance ID
--config FILE [--counters FILE]``

The loop reads frames from the NF's one-arm data interface with an AF_PACKET socket, drops and
counts anything that is not a well-formed NSH frame, hands the rest to the NF in batches (so an
NF can do all of a batch's state operations in one round trip), and writes each processed frame
back with its service index decremented. Counters (rx, tx, drops by reason, per-tenant rx,
state operations) are written atomically to a JSON file several times a second, so they are
readable while the NF runs. SIGTERM drains what is already queued and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union
from urllib.parse import quote, urlsplit, urlunsplit

import yaml

from nfs import mmsg, nsh
from nfs.state import StateClient, StateUnavailable, open_state

BATCH = 64
RCVBUF = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux value; Python lacks the name
SOL_PACKET, PACKET_IGNORE_OUTGOING = 263, 23              # Linux >= 4.20; Python lacks the names
COUNTER_INTERVAL = 0.2
DRAIN_QUIET = 0.05
PASSWORD_ENV = "STATELAB_STATE_PASSWORD"

log = logging.getLogger("nfs")


@dataclass(frozen=True)
class Drop:
    """Verdict: drop the packet and count it under ``reason``."""

    reason: str


@dataclass(frozen=True)
class Reply:
    """Verdict: send ``frame`` (which the NF generated, e.g. an ICMP error) back toward the
    packet's sender: onto the reverse chain, as if this NF had just processed it there."""

    frame: bytes


Verdict = Union[bytes, Drop, Reply]


class NetworkFunction:
    """Base class of an NF: turns a batch of NSH frames into verdicts.

    Subclasses set ``kind`` and override :meth:`process`. They keep no per-flow state of
    their own: what must outlive a packet goes to :attr:`state`, whose keys are scoped to
    ``t:{tenant}:{pool}:``. A subclass may raise :class:`~nfs.state.StateUnavailable` from
    :meth:`process`: the runtime then drops the whole batch (fail closed).

    Args:
        config: the pool's ``config`` mapping from the topology; the lab adds a ``statelab``
            section with ``tenant``, ``tenant_id`` and ``pool``.
        state_url: Redis URL with this tenant's credentials; None or ``local:`` for
            in-process state.
        instance: this instance's id, for logs.
    """

    kind = "base"

    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str):
        self.config = dict(config)
        lab = dict(self.config.pop("statelab", None) or {})
        self.tenant: str = str(lab.get("tenant", "default"))
        self.tenant_id: int = int(lab.get("tenant_id", 0))
        self.pool: str = str(lab.get("pool", self.kind))
        self.chains: dict[str, list[str]] = {d: list(c) for d, c in (lab.get("chains") or {}).items()}
        self.state_url = state_url
        self.instance = instance
        self._state: Optional[StateClient] = None

    def reverse_path(self, frame: nsh.NshFrame) -> Optional[tuple[int, int]]:
        """(spi, si) that continue a reply to ``frame`` on the reverse chain after this NF's
        hop there, or None if this NF's pool is not on the reverse chain."""
        direction = frame.spi & 1
        reverse = self.chains.get("inbound" if direction == 0 else "outbound", [])
        if self.pool not in reverse:
            return None
        return (frame.spi & ~1) | (1 - direction), 255 - reverse.index(self.pool) - 1

    @property
    def state(self) -> StateClient:
        """The tenant-scoped state client (opened on first use)."""
        if self._state is None:
            self._state = open_state(self.state_url, self.tenant, self.pool)
        return self._state

    @property
    def state_ops(self) -> int:
        return self._state.ops if self._state is not None else 0

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        """Decide what happens to each packet of a batch.

        Args:
            packets: the batch, in arrival order.

        Returns:
            One verdict per packet: the inner frame to send on, or a :class:`Drop`.
        """
        raise NotImplementedError


class Counters:
    """Packet counters of one NF instance, written atomically to a JSON file."""

    def __init__(self, path: Optional[Path], instance: str, kind: str) -> None:
        self.path = path
        self.instance = instance
        self.kind = kind
        self.rx = 0
        self.tx = 0
        self.drops: Counter[str] = Counter()
        self.rx_by_tenant: Counter[int] = Counter()
        self.state_ops = 0
        self.batches = 0
        self.first_rx: Optional[float] = None  # wall-clock time of the first frame (scale-out: P4)
        self.started = time.time()
        self._written = 0.0

    def drop(self, reason: str) -> None:
        """Count one dropped packet under ``reason``."""
        self.drops[reason] += 1

    def snapshot(self, state: str) -> dict[str, Any]:
        """Return the counters as a JSON-ready dict; ``state`` is running/draining/stopped."""
        return {
            "instance": self.instance, "kind": self.kind, "pid": os.getpid(),
            "state": state, "rx": self.rx, "tx": self.tx,
            "drops": dict(self.drops), "dropped": sum(self.drops.values()),
            "rx_by_tenant": {str(k): v for k, v in self.rx_by_tenant.items()},
            "state_ops": self.state_ops, "batches": self.batches, "first_rx": self.first_rx,
            "started": self.started, "updated": time.time(),
        }

    def write(self, state: str = "running", force: bool = False) -> None:
        """Write the counters file when the interval has passed (a heartbeat too: ``updated``)."""
        now = time.monotonic()
        if self.path is None or not (force or now - self._written >= COUNTER_INTERVAL):
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(state)))
        os.replace(tmp, self.path)
        self._written = now


class Runtime:
    """The packet loop: AF_PACKET in, batch through the NF, AF_PACKET out.

    Args:
        nf: the network function.
        iface: the data interface (one-arm link to the fabric).
        counters: where the counters go.
        batch: most frames handed to the NF at once.
    """

    def __init__(self, nf: NetworkFunction, iface: str, counters: Counters, batch: int = BATCH):
        self.nf = nf
        self.iface = iface
        self.counters = counters
        self.batch = batch
        self.draining = False
        self.state_down = False
        self.sock = mmsg.packet_socket(iface)
        self.sock.setblocking(False)
        try:  # room for bursts while a batch waits on the state server (FORCE: past rmem_max, root)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        try:  # the kernel keeps our own sent frames off the socket: half the reads, no filtering
            self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self._sees_outgoing = False
        except OSError:
            self._sees_outgoing = True
        # a batch in one recvmmsg and one sendmmsg call where libc has them
        self.ring = mmsg.Ring(self.sock, max(batch, 1)) if mmsg.available() else None

    def _on_term(self, signum: int, _frame: Any) -> None:
        log.info("%s: signal %d, draining", self.nf.instance, signum)
        self.draining = True

    def _read_batch(self) -> list[bytes]:
        frames: list[bytes] = []
        if self.ring is not None and not self._sees_outgoing:
            return self.ring.recv(self.batch)
        if not self._sees_outgoing:
            recv, append = self.sock.recv, frames.append
            try:
                for _ in range(self.batch):
                    append(recv(65535))
            except BlockingIOError:
                pass
            return frames
        while len(frames) < self.batch:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            frames.append(data)
        return frames

    def handle(self, frames: Sequence[bytes]) -> None:
        """Parse, process and send one batch of raw frames."""
        c = self.counters
        parsed = []
        if c.first_rx is None:
            c.first_rx = time.time()
            c.write(force=True)  # seen at once, not at the next interval
        c.rx += len(frames)
        c.batches += 1
        parse, by_tenant = nsh.parse, c.rx_by_tenant
        for frame in frames:
            try:
                p = parse(frame)
            except nsh.Malformed as err:
                c.drop(err.reason)
                continue
            by_tenant[p.tenant] += 1
            parsed.append(p)
        if not parsed:
            return
        try:
            verdicts = self.nf.process(parsed)
            if self.state_down:
                log.warning("%s: state server reachable again", self.nf.instance)
                self.state_down = False
        except StateUnavailable as err:
            if not self.state_down:
                log.error("%s: %s; dropping packets until it is back (fail closed)", self.nf.instance, err)
                self.state_down = True
            for _ in parsed:
                c.drop(err.reason)
            return
        except Exception:  # an NF bug must cost the batch, never the process
            log.exception("%s: NF raised on a batch of %d", self.nf.instance, len(parsed))
            for _ in parsed:
                c.drop("nf_error")
            return
        c.state_ops = self.nf.state_ops
        outs = []
        for p, verdict in zip(parsed, verdicts):
            if isinstance(verdict, Drop):
                c.drop(verdict.reason)
                continue
            if isinstance(verdict, Reply):
                path = self.nf.reverse_path(p)
                if path is None:
                    c.drop("no_reverse_path")
                    continue
                outs.append(nsh.reply(p, verdict.frame, *path))
            else:
                outs.append(nsh.reply(p, verdict))
        self._send(outs)

    def _send(self, outs: list[bytes]) -> None:
        c = self.counters
        if self.ring is not None and all(len(o) <= self.ring.slot for o in outs):
            sent, failed = self.ring.send(outs)
            c.tx += sent
            for _, err in failed:
                c.drop("tx_error")
            if failed:
                log.warning("%s: %d sends failed: %s", self.nf.instance, len(failed), os.strerror(failed[0][1]))
            return
        for out in outs:
            try:
                self.sock.send(out)
                c.tx += 1
            except OSError as err:
                c.drop("tx_error")
                log.warning("%s: send failed: %s", self.nf.instance, err)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, then drain the queue and return the exit status (0)."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.counters.write(force=True)
        log.info("%s: %s ready on %s", self.nf.instance, self.nf.kind, self.iface)
        quiet_since = None
        full = False
        while True:
            if full:  # more is queued: read on without asking select
                ready = True
            else:
                try:
                    ready = bool(select.select([self.sock], [], [], DRAIN_QUIET if self.draining
                                               else COUNTER_INTERVAL)[0])
                except InterruptedError:
                    ready = False
            frames = self._read_batch() if ready else []
            full = len(frames) >= self.batch
            if frames:
                self.handle(frames)
                quiet_since = None
            elif self.draining:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= DRAIN_QUIET:
                    break
            self.counters.write("draining" if self.draining else "running")
        self.counters.write("stopped", force=True)
        log.info("%s: drained, exiting", self.nf.instance)
        return 0


def state_url_with_password(url: Optional[str], password_file: Optional[Path]) -> Optional[str]:
    """The ``--state`` URL with the password put in (in this process's memory only).

    The password comes from ``password_file`` (which must not be readable by group or others),
    else from ``$STATELAB_STATE_PASSWORD``, else it is the URL's own (the old form, still
    accepted: vendor NFs and tests pass ``redis://user:password@host:port/db``).

    Raises:
        ValueError: the file cannot be read or is open to other users.
    """
    password = None
    if password_file is not None:
        try:
            st = password_file.stat()
            password = password_file.read_text().strip()
        except OSError as err:
            raise ValueError(f"cannot read --state-password-file {password_file}: {err.strerror}") from None
        if st.st_mode & 0o077:
            raise ValueError(f"--state-password-file {password_file} has mode {st.st_mode & 0o777:o}: "
                             f"other users may read it; chmod 600 {password_file}")
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    if url is None or password is None or url.startswith("local:"):
        return url
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostport}"))


def main(nf_class: type[NetworkFunction], argv: Optional[Sequence[str]] = None) -> int:
    """Entry point shared by every ``python -m nfs.<kind>``.

    Args:
        nf_class: the NF to run.
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    ap = argparse.ArgumentParser(prog=f"python -m nfs.{nf_class.kind}",
                                 description=f"statelab {nf_class.kind} network function")
    ap.add_argument("--iface", required=True, help="data interface (one-arm link to the fabric)")
    ap.add_argument("--state", default=None,
                    help="state server URL, redis://user@host:port/db (or local:); a password in the "
                         "URL works too, but every local user can read a command line")
    ap.add_argument("--state-password-file", type=Path, default=None,
                    help=f"file (mode 0600) holding the state server password; without it "
                         f"${PASSWORD_ENV}, else the URL's")
    ap.add_argument("--instance", required=True, help="instance id, e.g. red-fw-1")
    ap.add_argument("--config", type=Path, default=None, help="YAML/JSON file with the pool's config")
    ap.add_argument("--counters", type=Path, default=None, help="JSON file the counters are written to")
    ap.add_argument("--batch", type=int, default=BATCH, help="most frames per batch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        state_url = state_url_with_password(args.state, args.state_password_file)
    except ValueError as err:
        print(f"{args.instance}: {err}", file=sys.stderr)
        return 2
    config: Mapping[str, Any] = {}
    if args.config is not None:
        config = yaml.safe_load(args.config.read_text()) or {}
    try:
        nf = nf_class(config, state_url, args.instance)
    except ValueError as err:
        print(f"{args.instance}: bad config {args.config}: {err}", file=sys.stderr)
        return 2
    try:
        rt = Runtime(nf, args.iface, Counters(args.counters, args.instance, nf_class.kind), args.batch)
    except OSError as err:
        print(f"{args.instance}: cannot open data interface {args.iface!r}: {err}", file=sys.stderr)
        return 2
    if state_url is not None:  # connected before it says it is ready: its first batch pays no setup
        try:
            nf.state.connect()
        except StateUnavailable as err:
            log.warning("%s: %s; starting anyway (batches fail closed until it answers)", args.instance, err)
    return rt.run()
