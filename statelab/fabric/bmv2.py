"""bmv2 fabric: the steering contract on p4lang's ``simple_switch_grpc``, over P4Runtime.

The switch runs ``p4/steering.p4`` (compiled into ``p4/build/``); its tables are described in
that file's header and in docs/architecture.md. In short: ``classify`` (port, VLAN) ->
tenant or NF port; ``nf_return`` accepts only the (port, spi, si, C1) combinations of the plan;
``next_hop`` (spi, si) -> pool or delivery; ``bucket`` (pool, hash of the inner 5-tuple mod
256) -> member, NSH pushed; ``deliver`` within the tenant (IPv4 by address, ARP by MAC,
broadcast to the tenant's multicast group). Misses are counted drops by reason.

Pool membership lives in this driver, not in the plan. Each pool's 256 buckets are assigned
to its members by highest random weight (:mod:`statelab.fabric.buckets`), so a new member
takes only the buckets it wins and a removed member's buckets spread over the rest. P4Runtime
on bmv2 has no atomic batches, so every change is a sequence of single-entry writes in the
order the steering contract needs: a member's return path is inserted before any bucket
points to it; on removal its buckets are moved to the others first and its return path stays
until :meth:`Bmv2Fabric.forget_member`.

Ports attached after the switch started (a pool grows) are added with bmv2's runtime
``port_add`` through ``simple_switch_CLI`` on the switch's Thrift port.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence, Union

from mininet.node import Switch

from statelab.errors import LabError, MissingDependency, ProcessFailed
from statelab.fabric import FIRST_SI, Fabric, Member, PoolKey, ServicePath, SteeringPlan, register
from statelab.fabric.buckets import N_BUCKETS, assign_buckets, changed_buckets
from statelab.fabric.p4rt import (DELETE, INSERT, P4RuntimeClient, P4RuntimeError, TableEntry,
                                  Ternary)

P4_BUILD = Path(__file__).resolve().parents[2] / "p4" / "build"
P4_JSON = "steering.json"
P4_INFO = "steering.p4info.txtpb"
FABRIC_MAC = "02:5e:00:00:00:01"
PACKAGE_HINT = ("p4lang's Ubuntu packages p4lang-bmv2 and p4lang-p4c come from the p4lang "
                "repository on the openSUSE Build Service (home:p4lang); elsewhere build bmv2 "
                "with its gRPC server (PI) from source")

ING = "SteeringIngress."
T_CLASSIFY, T_NF_RETURN, T_NEXT_HOP, T_BUCKET, T_DELIVER = (
    ING + t for t in ("classify", "nf_return", "next_hop", "bucket", "deliver"))
A_DROP = ING + "drop"

# The drop reasons of p4/steering.p4 (index into the `drops` counter) ...
DROP_REASONS = ("unclassified", "nsh_from_host", "forged", "out_of_path", "no_member", "undeliverable")
# ... those that :meth:`Bmv2Fabric.dropped` reports (as OVS's drop flows do) ...
FABRIC_DROPS = ("unclassified", "nsh_from_host", "forged", "out_of_path")
# ... and each table's miss.
TABLE_MISS = {T_CLASSIFY: "unclassified", T_NF_RETURN: "forged", T_NEXT_HOP: "out_of_path",
              T_BUCKET: "no_member", T_DELIVER: "undeliverable"}

ETHERTYPE_IPV4, ETHERTYPE_ARP = 0x0800, 0x0806
PRIO_IPV4, PRIO_ARP, PRIO_FLOOD = 100, 50, 40  # the priorities of OVS's table 40


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} cannot be read)"


NO_THRIFT = "compiled without Thrift support"   # what simple_switch_grpc logs when it has no runtime server


def runtime_cli(thrift_port: int, command: str, what: str) -> str:
    """Run one command of bmv2's runtime CLI (``simple_switch_CLI``) against a switch.

    Args:
        thrift_port: the switch's ``--thrift-port``.
        command: e.g. ``port_add veth1 7``.
        what: how an error names the attempt.

    Returns:
        What the CLI printed.

    Raises:
        LabError: the CLI is not installed, or the command failed.
    """
    cli = shutil.which("simple_switch_CLI")
    if cli is None:
        raise LabError(f"{what}: simple_switch_CLI not found; bmv2 adds ports at run time only "
                       f"through its Thrift runtime (install bmv2's tools: {PACKAGE_HINT})")
    # bmv2's CLI is a Python script needing Thrift's Python library: the system's Python has it
    # (python3-thrift), while `env python3` may find another one first (pyenv, a venv)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    proc = subprocess.run([python, cli, "--thrift-port", str(thrift_port)], input=command + "\n",
                          capture_output=True, text=True, timeout=30)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "Error" in out or "Invalid" in out:
        raise LabError(f"{what}: `{command}` on Thrift port {thrift_port} failed "
                       f"(exit code {proc.returncode}):\n{out}")
    return out


class Bmv2Steering:
    """The steering plan as entries of ``p4/steering.p4``'s tables, and pool membership.

    It keeps what it installed (pool ids, each pool's members and bucket owners, each
    member's return path), never the plan's own lists, so the plan may be frozen.

    Args:
        rt: returns a context manager that yields the P4Runtime client (a driver's guard
            that turns the failure of a dead switch into an error naming it).
        p4_build: the directory with the compiled program.
        name: how errors name the switch.
    """

    def __init__(self, rt: Callable[[], ContextManager[P4RuntimeClient]], p4_build: Path = P4_BUILD,
                 name: str = "bmv2") -> None:
        self._rt = rt
        self.p4_build = Path(p4_build)
        self.name = name
        self.plan: Optional[SteeringPlan] = None
        self._lock = threading.RLock()
        self._reset_state()

    @classmethod
    def over(cls, client: P4RuntimeClient, p4_build: Path = P4_BUILD, name: str = "bmv2") -> "Bmv2Steering":
        """Program through a client directly (tests: PTF, no Mininet switch)."""
        return cls(lambda: contextlib.nullcontext(client), p4_build, name)

    def _reset_state(self) -> None:
        self._pools: dict[PoolKey, int] = {}
        self._members: dict[PoolKey, list[Member]] = {}
        self._owners: dict[PoolKey, list[Optional[Member]]] = {}
        self._returns: dict[tuple[PoolKey, str], list[TableEntry]] = {}
        self._nf_ports: dict[int, set[tuple[PoolKey, str]]] = {}

    @staticmethod
    def _positions(plan: SteeringPlan, key: PoolKey) -> list[tuple[ServicePath, int]]:
        tenant, pool = key
        return [(p, i) for p in plan.paths if p.tenant == tenant
                for i, hop in enumerate(p.hops) if hop == pool]

    def program(self, plan: SteeringPlan) -> None:
        """Install the whole plan on an empty pipeline (the program is pushed again)."""
        with self._lock, self._rt() as rt:
            # PI forgets its multicast groups when the pipeline changes but bmv2 keeps them
            # (a group created again would hold both replica sets): delete them first
            for group in rt.read_multicast_groups():
                rt.write_multicast_group(DELETE, group)
            rt.set_pipeline(self.p4_build / P4_INFO, self.p4_build / P4_JSON)
            self.plan = plan
            self._reset_state()
            for table, reason in TABLE_MISS.items():
                rt.set_default(table, A_DROP, {"reason": DROP_REASONS.index(reason)})
            self._program_hosts(rt, plan)
            for key in plan.pools():
                self._pools[key] = len(self._pools) + 1
            for path in plan.paths:
                for i, hop in enumerate(path.hops):
                    rt.insert(TableEntry(T_NEXT_HOP, {"spi": path.spi, "si": FIRST_SI - i},
                                         ING + "to_pool", {"pool": self._pools[(path.tenant, hop)]}))
                rt.insert(TableEntry(T_NEXT_HOP, {"spi": path.spi, "si": FIRST_SI - len(path.hops)},
                                     ING + "end_of_chain"))
            for key in self._pools:
                self._owners[key] = [None] * N_BUCKETS
                self._members[key] = []
                for member in plan.members.get(key, ()):
                    self._install_return(rt, key, member)
                    self._members[key].append(member)
                self._apply_assignment(rt, key)

    def _program_hosts(self, rt: P4RuntimeClient, plan: SteeringPlan) -> None:
        classified: dict[tuple[int, int], int] = {}
        floods: dict[int, set[tuple[int, int]]] = {}
        for hp in plan.host_ports:
            vid = getattr(hp, "vlan", None) or 0
            where = (hp.port, vid)
            if where in classified:
                if classified[where] != hp.tenant:
                    raise LabError(f"fabric port {hp.port}{f' VLAN {vid}' if vid else ''} is given to "
                                   f"tenants {classified[where]} and {hp.tenant}")
            else:
                classified[where] = hp.tenant
                rt.insert(TableEntry(T_CLASSIFY, {"port": hp.port, "tagged": int(vid != 0), "vid": vid},
                                     ING + "host_frame", {"tenant": hp.tenant, "spi": hp.spi}))
            rt.insert(TableEntry(T_DELIVER, {"tenant": hp.tenant,
                                             "ether_type": Ternary(ETHERTYPE_IPV4, 0xFFFF),
                                             "ip_dst": Ternary(hp.ip, 0xFFFFFFFF)},
                                 ING + "to_host", {"port": hp.port, "mac": hp.mac, "vid": vid},
                                 priority=PRIO_IPV4))
            rt.insert(TableEntry(T_DELIVER, {"tenant": hp.tenant,
                                             "ether_type": Ternary(ETHERTYPE_ARP, 0xFFFF),
                                             "eth_dst": Ternary(hp.mac, (1 << 48) - 1)},
                                 ING + "to_port", {"port": hp.port, "vid": vid}, priority=PRIO_ARP))
            floods.setdefault(hp.tenant, set()).add(where)
        for tenant, replicas in sorted(floods.items()):
            # group id = tenant id (1..4095); each replica's instance is its VLAN (0: untagged)
            rt.write_multicast_group(INSERT, tenant, sorted(replicas))
            rt.insert(TableEntry(T_DELIVER, {"tenant": tenant,
                                             "eth_dst": Ternary("01:00:00:00:00:00", "01:00:00:00:00:00")},
                                 ING + "flood", {"group": tenant}, priority=PRIO_FLOOD))

    def _install_return(self, rt: P4RuntimeClient, key: PoolKey, member: Member) -> None:
        """Accept what ``member`` sends back at each position of its pool; NSH on its port."""
        assert self.plan is not None
        tenant = key[0]
        ident = (key, member.name)
        if ident in self._returns:
            return
        entries = self._returns.setdefault(ident, [])
        users = self._nf_ports.setdefault(member.port, set())
        if not users:
            entry = TableEntry(T_CLASSIFY, {"port": member.port, "tagged": 0, "vid": 0}, ING + "nf_frame")
            rt.insert(entry)
        users.add(ident)
        for path, hop in self._positions(self.plan, key):
            entry = TableEntry(T_NF_RETURN, {"port": member.port, "spi": path.spi,
                                             "si": FIRST_SI - hop - 1, "c1": tenant},
                               ING + "accept_return", {"tenant": tenant})
            rt.insert(entry)
            entries.append(entry)

    def _remove_return(self, rt: P4RuntimeClient, key: PoolKey, member: Member) -> None:
        ident = (key, member.name)
        entries = self._returns.get(ident, [])
        while entries:
            rt.delete(entries[-1])
            entries.pop()
        self._returns.pop(ident, None)
        users = self._nf_ports.get(member.port, set())
        if ident in users:
            if users == {ident}:
                rt.delete(TableEntry(T_CLASSIFY, {"port": member.port, "tagged": 0, "vid": 0}))
            users.discard(ident)
            if not users:
                self._nf_ports.pop(member.port, None)

    def _apply_assignment(self, rt: P4RuntimeClient, key: PoolKey) -> int:
        """Write, one entry at a time, the buckets whose member changes; return how many."""
        pool = self._pools[key]
        owners = self._owners[key]
        new = assign_buckets(self._members[key], key=lambda m: m.name)
        moved = changed_buckets(owners, new)
        for b in moved:
            entry = TableEntry(T_BUCKET, {"pool": pool, "bucket": b}, ING + "to_member",
                               {"port": new[b].port, "mac": new[b].mac} if new[b] is not None else {})
            if new[b] is None:
                rt.delete(entry)
            else:
                (rt.insert if owners[b] is None else rt.modify)(entry)
            owners[b] = new[b]
        return len(moved)

    def _pool_of(self, key: PoolKey) -> int:
        if self.plan is None:
            raise LabError(f"{self.name}: program() the steering plan first")
        if key not in self._pools:
            raise LabError(f"{self.name}: no path visits pool {key[1]!r} of tenant {key[0]}")
        return self._pools[key]

    def add_member(self, key: PoolKey, member: Member) -> None:
        """Accept ``member``'s returns, then move to it the buckets it wins (one MODIFY each)."""
        with self._lock, self._rt() as rt:
            self._pool_of(key)
            self._install_return(rt, key, member)
            members = self._members[key]
            if all(m.name != member.name for m in members):
                members.append(member)
            self._apply_assignment(rt, key)

    def remove_member(self, key: PoolKey, member: Member) -> None:
        """Move ``member``'s buckets to the remaining members; its returns are still accepted."""
        with self._lock, self._rt() as rt:
            self._pool_of(key)
            members = self._members[key]
            if any(m.name == member.name for m in members):
                members[:] = [m for m in members if m.name != member.name]
                self._apply_assignment(rt, key)

    def forget_member(self, key: PoolKey, member: Member) -> None:
        """Remove the member's buckets (if still there) and its return path."""
        with self._lock:
            self.remove_member(key, member)
            with self._rt() as rt:
                self._remove_return(rt, key, member)

    def members(self, key: PoolKey) -> tuple[Member, ...]:
        """The members pool ``key`` sends to now."""
        return tuple(self._members.get(key, ()))

    def buckets(self, key: PoolKey) -> tuple[Optional[Member], ...]:
        """Each bucket's member as installed on the switch."""
        return tuple(self._owners.get(key, (None,) * N_BUCKETS))

    def drops(self) -> dict[str, int]:
        """Packets dropped, by reason (the names of :data:`DROP_REASONS`)."""
        with self._rt() as rt:
            cells = rt.read_counter(ING + "drops")
        return {reason: cells[i].packets if i in cells else 0 for i, reason in enumerate(DROP_REASONS)}

    def dropped(self) -> int:
        """Packets dropped as unclassified, NSH from a host, forged or out of path."""
        drops = self.drops()
        return sum(drops[r] for r in FABRIC_DROPS)

    def sent_to(self, member: Member) -> int:
        """Packets sent to a pool member (its port) since the plan was programmed."""
        with self._rt() as rt:
            cell = rt.read_counter(ING + "member_sent", member.port).get(member.port)
        return cell.packets if cell else 0

    def classified(self, tenant: int) -> int:
        """Packets from the tenant's host ports since the plan was programmed."""
        with self._rt() as rt:
            cell = rt.read_counter(ING + "tenant_classified", tenant).get(tenant)
        return cell.packets if cell else 0

    def dump(self) -> str:
        """Drops and bucket owners, for a person reading a failure."""
        lines = [f"drops: {self.drops()}"]
        for key, owners in self._owners.items():
            counts: dict[str, int] = {}
            for m in owners:
                counts[m.name if m else "-"] = counts.get(m.name if m else "-", 0) + 1
            lines.append(f"pool {key} (id {self._pools[key]}): buckets {counts}")
        return "\n".join(lines)


@register
class Bmv2Fabric(Fabric, Switch):
    """The bmv2 driver: ``simple_switch_grpc`` programmed over P4Runtime.

    Args:
        name: the switch name (also the prefix of its interfaces).
        log_dir: where the switch's log goes (``<name>.log``); default the lab's run directory
            (:meth:`bind`), else a directory in /tmp.
        log_level: bmv2's log level (``trace``, ``debug``, ``info``, ``warn``, ``error``,
            ``off``); ``debug`` and ``trace`` log every packet and slow the switch down.
        grpc_port: the P4Runtime port on 127.0.0.1 (default: a free one).
        thrift_port: bmv2's runtime (Thrift) port on 127.0.0.1 (default: a free one).
        device_id: the P4Runtime device id (default: the dpid).
        p4_build: the directory with ``steering.json`` and ``steering.p4info.txtpb``.
        start_timeout: how long ``start`` waits for the switch to answer, in seconds.
        rpc_timeout: the deadline of every P4Runtime call, in seconds.
        **params: passed to :class:`mininet.node.Switch` (e.g. ``dpid``).
    """

    kind = "bmv2"
    package = "p4lang-bmv2"
    binaries = ("simple_switch_grpc",)
    # measured 2026-12-01 (bmv2 1.15.5 built -O2 with its debug log macros, log level warn/off,
    # 2 busy cores): 1000 pps loss-free, 0.1-0.4% loss at 2000-3000, ~8000 pps saturated
    capacity_pps = 1500.0  # the checks drive half of it: below the loss-free 1000 with room to spare

    def __init__(self, name: str, log_dir: Union[str, Path, None] = None, log_level: str = "warn",
                 grpc_port: Optional[int] = None, thrift_port: Optional[int] = None,
                 device_id: Optional[int] = None, p4_build: Union[str, Path, None] = None,
                 start_timeout: float = 30.0, rpc_timeout: float = 10.0, **params: Any) -> None:
        params["inNamespace"] = False   # the switch process and its interfaces live in the root namespace
        Switch.__init__(self, name, **params)
        self._log_dir = Path(log_dir) if log_dir else None
        self.log_level = log_level
        self.grpc_port = grpc_port
        self.thrift_port = thrift_port
        self.device_id = int(self.dpid, 16) if device_id is None else device_id
        self.p4_build = Path(p4_build) if p4_build else P4_BUILD
        self.start_timeout = start_timeout
        self.rpc_timeout = rpc_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.command: list[str] = []
        self.client: Optional[P4RuntimeClient] = None
        self.plan: Optional[SteeringPlan] = None
        self.steering = Bmv2Steering(self._switch, self.p4_build, f"fabric {name}")

    @classmethod
    def setup(cls) -> None:
        """Check that simple_switch_grpc and the compiled program are there."""
        try:
            Fabric.setup.__func__(cls)
        except MissingDependency as err:
            err.args = (f"{err.args[0]}; {PACKAGE_HINT}",)
            raise
        for name in (P4_JSON, P4_INFO):
            if not (P4_BUILD / name).exists():
                raise LabError(f"{P4_BUILD / name} is missing: rebuild it with `make -C p4` (needs p4c)")

    # -- the switch process --------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        """Where the switch's log goes."""
        if self._log_dir is not None:
            return self._log_dir
        if self.run_dir is not None:
            return Path(self.run_dir)
        return Path(tempfile.gettempdir()) / f"statelab-{self.name}"

    @property
    def log_path(self) -> Path:
        """The switch's log (its console output)."""
        return self.log_dir / f"{self.name}.log"

    def _data_intfs(self) -> list[tuple[int, str]]:
        return sorted((port, intf.name) for port, intf in self.intfs.items()
                      if port > 0 and intf.name != "lo")

    def start(self, controllers: Sequence[Any] = ()) -> None:
        """Start simple_switch_grpc on every interface attached so far, wait until its
        P4Runtime server answers and install the program.

        Raises:
            ProcessFailed: the switch exited, or did not answer within ``start_timeout``.
        """
        if self.proc is not None and self.proc.poll() is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.grpc_port = self.grpc_port or free_port()
        self.thrift_port = self.thrift_port or free_port()
        for _port, intf in self._data_intfs():
            subprocess.run(["ip", "link", "set", intf, "up"], capture_output=True)
        self.command = ["simple_switch_grpc", "--no-p4", "--device-id", str(self.device_id),
                        "--thrift-port", str(self.thrift_port), "--log-console",
                        "--log-level", self.log_level,
                        "--notifications-addr", f"ipc://{self.log_dir}/{self.name}-notifications.ipc"]
        for port, intf in self._data_intfs():
            self.command += ["-i", f"{port}@{intf}"]
        self.command += ["--", "--grpc-server-addr", f"127.0.0.1:{self.grpc_port}"]
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            # its own session: a Ctrl-C meant for the lab does not kill the switch mid-teardown
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        if self.record is not None:
            self.record.add_process(self.proc.pid, self._what())
        try:
            self._connect()
        except BaseException:
            self._stop_process()
            raise

    def _what(self) -> str:
        pid = self.proc.pid if self.proc is not None else "-"
        return f"simple_switch_grpc of fabric {self.name} (pid {pid}: {' '.join(self.command)})"

    def _failed(self, why: str = "") -> ProcessFailed:
        code = self.proc.poll() if self.proc is not None else None
        what = self._what() + (f" {why}" if why else "")
        return ProcessFailed(what, code, _tail(self.log_path))

    def _connect(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise self._failed()
            client = P4RuntimeClient(f"127.0.0.1:{self.grpc_port}", self.device_id, timeout=self.rpc_timeout)
            try:
                client.connect(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
                client.set_pipeline(self.p4_build / P4_INFO, self.p4_build / P4_JSON)
            except P4RuntimeError as err:
                client.close()
                if self.proc.poll() is not None:
                    raise self._failed() from None
                if not err.unavailable or time.monotonic() > deadline:
                    raise self._failed(f"did not accept the program within {self.start_timeout:g}s "
                                       f"({err})") from None
                time.sleep(0.1)
                continue
            self.client = client
            return

    def _stop_process(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self, deleteIntfs: bool = True) -> None:  # noqa: N803 (Mininet's signature)
        """Stop the switch process, then let Mininet delete the interfaces."""
        self._stop_process()
        Switch.stop(self, deleteIntfs)

    @contextlib.contextmanager
    def _switch(self) -> Iterator[P4RuntimeClient]:
        """The P4Runtime client, checking first that the switch still runs; a failed call to a
        switch that has died raises :class:`ProcessFailed` with its exit code and log."""
        if self.proc is None or self.client is None:
            raise LabError(f"fabric {self.name} is not started")
        if self.proc.poll() is not None:
            raise self._failed("has died")
        try:
            yield self.client
        except P4RuntimeError:
            try:
                self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                raise  # the switch runs: the call itself was refused
            raise self._failed("has died") from None

    # -- ports ---------------------------------------------------------------------------

    @property
    def runtime_ports(self) -> bool:
        """True if this switch can add and remove ports while it runs (it has bmv2's Thrift
        runtime server, and simple_switch_CLI is installed)."""
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return NO_THRIFT not in log and shutil.which("simple_switch_CLI") is not None

    def _runtime_cli(self, command: str, what: str) -> None:
        if self.proc is None:
            raise LabError(f"fabric {self.name} is not started")
        if self.proc.poll() is not None:
            raise self._failed("has died")
        if NO_THRIFT in self.log_path.read_text(errors="replace"):
            raise LabError(f"{what} on {self.name}: this simple_switch_grpc was built without its Thrift "
                           f"runtime server (bmv2's configure --with-thrift), the only way bmv2 adds a port "
                           f"while it runs; p4lang's packages have it ({PACKAGE_HINT})")
        runtime_cli(self.thrift_port, command, f"{what} on {self.name}")

    def attach(self, intf: Any) -> None:
        """Add an interface that was linked to the running switch as a bmv2 port."""
        port, name = self._port_of(intf)
        if self.proc is None:
            return  # start() takes every interface linked by then
        subprocess.run(["ip", "link", "set", name, "up"], capture_output=True)
        self._runtime_cli(f"port_add {name} {port}", f"adding {name} as port {port}")

    def detach(self, intf: Any) -> None:
        """Let an interface go: nothing to do on the switch.

        bmv2's runtime ``port_remove`` blocks until a frame arrives on the port (it joins the
        port's pcap receive thread; seen here: 20 s and more on an idle port), so the driver
        leaves the port in place; it goes DOWN when the lab deletes the link, no entry points
        to it any more (``forget_member`` ran first), and the lab never reuses a port number.
        """
        self._port_of(intf)  # still an error to detach what was never attached

    # -- the Fabric interface (the steering tables do the work) ---------------------------

    def program(self, plan: SteeringPlan) -> None:
        """Install the whole plan on an empty pipeline (the program is pushed again)."""
        self.steering.program(plan)
        self.plan = plan

    def add_member(self, key: PoolKey, member: Member) -> None:
        """Accept ``member``'s returns, then move to it the buckets it wins (one MODIFY each)."""
        self.steering.add_member(key, member)

    def remove_member(self, key: PoolKey, member: Member) -> None:
        """Move ``member``'s buckets to the remaining members; its returns are still accepted."""
        self.steering.remove_member(key, member)

    def forget_member(self, key: PoolKey, member: Member) -> None:
        """Remove the member's buckets (if still there) and its return path."""
        self.steering.forget_member(key, member)

    def dropped(self) -> int:
        """Packets dropped as unclassified, NSH from a host, forged or out of path."""
        return self.steering.dropped()

    def dump(self) -> str:
        """Drops and bucket owners, for a person reading a failure."""
        return self.steering.dump() + f"\nlog: {self.log_path}"
