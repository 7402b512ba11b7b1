"""Fabric drivers: one per switch kind, all behind the steering contract.

A driver is one module of this package that owns its target: a Mininet switch class that
also implements :class:`Fabric` and registers itself with :func:`register`. It is programmed
once with a frozen :class:`SteeringPlan` (which port belongs to which tenant, each tenant's
service paths, each pool's first members) and then changes pool membership while traffic
flows, keeping its own membership state. Membership changes are *ordered*, not atomic
(P4Runtime on bmv2 accepts no atomic batch): a member's return path is accepted before it gets
traffic, and its traffic stops before its return path is removed (docs/contracts.md).

Numbering shared by every driver (docs/architecture.md):

- service path id ``spi = tenant_id << 1 | direction`` (0 outbound, 1 inbound);
- service index of hop ``i`` of a path: ``255 - i``; an NF returns it decremented by one,
  and a packet whose index is ``255 - len(hops)`` has passed the whole chain;
- the NSH context header C1 carries the tenant id.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Optional

from statelab.errors import LabError, MissingDependency

if TYPE_CHECKING:
    from statelab.record import Record

OUTBOUND, INBOUND = 0, 1
DIRECTIONS = {"outbound": OUTBOUND, "inbound": INBOUND}
FIRST_SI = 255

PoolKey = tuple[int, str]  # (tenant id, pool name)


def spi_of(tenant_id: int, direction: int) -> int:
    """Return the NSH service path id of a tenant's chain in one direction."""
    return tenant_id << 1 | direction


@dataclass(frozen=True)
class HostPort:
    """A tenant host's attachment to the fabric; what it sends takes path ``spi``.

    On an access port (``vlan`` None) only untagged frames belong to the tenant; on a trunk
    port the tenant is (port, ``vlan``), other tags and untagged frames are dropped, and what
    is delivered to the host leaves tagged with ``vlan``. IPv4 leaving the chain is delivered
    to the host whose ``ip`` it is addressed to (within the tenant), with the destination MAC
    set to ``mac``; ARP by MAC; broadcast floods the tenant's attachments.
    """

    tenant: int
    port: int
    mac: str
    spi: int
    ip: str
    vlan: Optional[int] = None


@dataclass(frozen=True)
class ServicePath:
    """One tenant's chain in one direction: the pools a packet visits, in order."""

    tenant: int
    spi: int
    hops: tuple[str, ...]


@dataclass(frozen=True)
class Member:
    """One NF instance in a pool: its fabric port and the MAC of its data interface."""

    name: str
    port: int
    mac: str


@dataclass(frozen=True)
class SteeringPlan:
    """Everything a fabric needs to steer a lab's traffic (frozen: drivers keep their own state).

    Attributes:
        host_ports: every tenant host's attachment.
        paths: every tenant's chains.
        members: each pool's members when the lab starts.
    """

    host_ports: tuple[HostPort, ...]
    paths: tuple[ServicePath, ...]
    members: Mapping[PoolKey, tuple[Member, ...]] = field(default_factory=dict)

    def pools(self) -> tuple[PoolKey, ...]:
        """Every pool a path visits, in a stable order (drivers number them from this)."""
        keys = {(p.tenant, hop) for p in self.paths for hop in p.hops} | set(self.members)
        return tuple(sorted(keys))

    def positions(self, key: PoolKey) -> list[tuple[ServicePath, int]]:
        """Return every (path, hop index) at which pool ``key`` is visited."""
        tenant, pool = key
        return [(p, i) for p in self.paths if p.tenant == tenant
                for i, hop in enumerate(p.hops) if hop == pool]


class Fabric:
    """The steering interface every fabric driver implements (mixed into a Mininet switch).

    The lab calls, in order: :meth:`setup` (binaries there?), :meth:`prepare` (shared daemons),
    the constructor (through Mininet's ``addSwitch``), :meth:`bind` (the lab's record and run
    directory), Mininet's ``start`` (returns only once the switch is ready, or raises with the
    exit code and log tail), :meth:`program`, then membership changes and Mininet's
    ``attach``/``detach`` for links added or removed while running; at the end Mininet's
    ``stop`` and :meth:`release`.
    """

    kind: ClassVar[str] = ""
    package: ClassVar[str] = ""
    binaries: ClassVar[tuple[str, ...]] = ()
    capacity_pps: ClassVar[Optional[float]] = None  # packets/s forwarded loss-free; None: fast enough
    name: str
    intfs: dict  # Mininet's: port number -> interface
    record: Optional["Record"] = None
    run_dir: Optional[Path] = None

    @classmethod
    def setup(cls) -> None:
        """Check that the switch's programs are installed; raise with what to install.

        Raises:
            MissingDependency: naming the program and the package that provides it.
        """
        for binary in cls.binaries:
            if shutil.which(binary) is None:
                raise MissingDependency(binary, cls.package)

    @classmethod
    def prepare(cls, record: "Record", progress: Callable[[str], None]) -> None:
        """Start what every switch of this kind needs (e.g. Open vSwitch's daemons), noting in
        ``record`` what :meth:`release` must stop. Default: nothing."""

    @classmethod
    def release(cls, record: "Record") -> None:
        """Stop what :meth:`prepare` started for this lab. Default: nothing."""

    def bind(self, record: "Record", run_dir: Path) -> None:
        """Give the driver the lab's record (it adds every process and bridge it creates) and
        the lab's run directory (logs)."""
        self.record = record
        self.run_dir = run_dir

    def _port_of(self, intf: object) -> tuple[int, str]:
        """(port number, name) of an interface linked to this switch (Mininet's ``intfs``)."""
        name = str(intf)
        for port, i in self.intfs.items():
            if i.name == name:
                return port, name
        raise LabError(f"{name} is not an interface of {self.name}: link it to the switch first")

    def port_name(self, member: Member) -> str:
        """The switch-side interface name of a pool member's link (root namespace)."""
        return f"{self.name}-p{member.port}"

    def program(self, plan: SteeringPlan) -> None:
        """Install the whole plan, replacing whatever the switch held."""
        raise NotImplementedError

    def add_member(self, key: PoolKey, member: Member) -> None:
        """Make ``member`` a member of pool ``key``: first accept its returns, then give it its
        share of flows (no flow moves between the old members)."""
        raise NotImplementedError

    def prepare_member(self, key: PoolKey, member: Member) -> None:
        """Install ahead what :meth:`add_member` needs but what sends it nothing yet (a warm
        standby instance), so that adding it later is quick. Optional: by default nothing."""

    def remove_member(self, key: PoolKey, member: Member) -> None:
        """Stop sending new packets of pool ``key`` to ``member``; its flows move to the others.

        Packets the member already holds may still come back and are still accepted,
        until :meth:`forget_member`.
        """
        raise NotImplementedError

    def forget_member(self, key: PoolKey, member: Member) -> None:
        """Remove every trace of a member that has stopped (after :meth:`remove_member`)."""
        raise NotImplementedError

    def dropped(self) -> int:
        """Packets dropped as unclassified, forged or out of path."""
        raise NotImplementedError


FABRIC_DRIVERS: dict[str, type] = {}
UNAVAILABLE: dict[str, str] = {}  # driver module -> why it could not be imported


def register(cls: type) -> type:
    """Class decorator: make a driver known under its ``kind``."""
    FABRIC_DRIVERS[cls.kind] = cls
    return cls


def drivers() -> dict[str, type]:
    """Every driver of this package, by kind (importing each module registers its drivers)."""
    for mod in pkgutil.iter_modules(__path__):
        try:
            importlib.import_module(f"{__name__}.{mod.name}")
        except ImportError as err:  # e.g. a Python package the driver needs is not installed
            UNAVAILABLE[mod.name] = str(err)
    return FABRIC_DRIVERS


def fabric_class(kind: str) -> type:
    """Return the driver class of a fabric kind.

    Args:
        kind: a fabric kind from the topology (``fabric.kind``).

    Raises:
        LabError: the kind is unknown or has no driver in this version; lists the known ones.
    """
    from statelab.spec import FABRIC_KINDS

    if kind not in FABRIC_KINDS:
        raise LabError(f"unknown fabric kind {kind!r}; known kinds: {', '.join(FABRIC_KINDS)}")
    known = drivers()
    if kind not in known:
        broken = "".join(f"; module {m} could not be imported: {why}" for m, why in UNAVAILABLE.items())
        raise LabError(f"fabric kind {kind!r} has no driver in this version of statelab; "
                       f"kinds with a driver: {', '.join(sorted(known))}{broken}")
    return known[kind]
