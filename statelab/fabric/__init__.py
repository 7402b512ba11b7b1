"""Fabric drivers: one per switch kind, all behind the steering contract.

A driver is a Mininet switch class that also implements :class:`Fabric`: it is programmed
once with a :class:`SteeringPlan` (which port belongs to which tenant, each tenant's service
paths, each pool's members) and then changes pool membership atomically while traffic flows.

Numbering shared by every driver (docs/architecture.md):

- service path id ``spi = tenant_id << 1 | direction`` (0 outbound, 1 inbound);
- service index of hop ``i`` of a path: ``255 - i``; an NF returns it decremented by one,
  and a packet whose index is ``255 - len(hops)`` has passed the whole chain;
- the NSH context header C1 carries the tenant id.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from statelab.errors import LabError, MissingDependency

OUTBOUND, INBOUND = 0, 1
DIRECTIONS = {"outbound": OUTBOUND, "inbound": INBOUND}
FIRST_SI = 255

PoolKey = tuple[int, str]  # (tenant id, pool name)


def spi_of(tenant_id: int, direction: int) -> int:
    """Return the NSH service path id of a tenant's chain in one direction."""
    return tenant_id << 1 | direction


@dataclass(frozen=True)
class HostPort:
    """A tenant host's port on the fabric; what it sends takes path ``spi``.

    IPv4 leaving the chain is delivered to the host whose ``ip`` it is addressed to (within
    the tenant), with the destination MAC set to ``mac``; ARP by MAC; broadcast floods.
    """

    tenant: int
    port: int
    mac: str
    spi: int
    ip: str


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


@dataclass
class SteeringPlan:
    """Everything a fabric needs to steer a lab's traffic."""

    host_ports: tuple[HostPort, ...]
    paths: tuple[ServicePath, ...]
    groups: Mapping[PoolKey, int]
    members: dict[PoolKey, list[Member]] = field(default_factory=dict)

    def positions(self, key: PoolKey) -> list[tuple[ServicePath, int]]:
        """Return every (path, hop index) at which pool ``key`` is visited."""
        tenant, pool = key
        return [(p, i) for p in self.paths if p.tenant == tenant
                for i, hop in enumerate(p.hops) if hop == pool]


class Fabric:
    """The steering interface every fabric driver implements (mixed into a Mininet switch)."""

    kind: ClassVar[str] = ""
    package: ClassVar[str] = ""
    binaries: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def setup(cls) -> None:
        """Check that the switch's programs are installed; raise with what to install."""
        for binary in cls.binaries:
            if shutil.which(binary) is None:
                raise MissingDependency(binary, cls.package)

    def port_name(self, member: Member) -> str:
        """The switch-side interface name of a pool member's link (root namespace)."""
        return f"{self.name}-p{member.port}"

    def program(self, plan: SteeringPlan) -> None:
        """Install the whole plan, replacing whatever the switch held."""
        raise NotImplementedError

    def add_member(self, key: PoolKey, member: Member) -> None:
        """Atomically make ``member`` a member of pool ``key``; it then takes its share."""
        raise NotImplementedError

    def remove_member(self, key: PoolKey, member: Member) -> None:
        """Atomically stop sending new packets of pool ``key`` to ``member``.

        Packets the member already holds may still come back and are still accepted,
        until :meth:`forget_member`.
        """
        raise NotImplementedError

    def forget_member(self, key: PoolKey, member: Member) -> None:
        """Remove every trace of a member that has stopped."""
        raise NotImplementedError

    def dropped(self) -> int:
        """Packets dropped as unclassified, forged or out of path."""
        raise NotImplementedError


FABRIC_DRIVERS = {
    "ovs": "statelab.fabric.ovs:OvsFabric",
}


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
    if kind not in FABRIC_DRIVERS:
        raise LabError(f"fabric kind {kind!r} has no driver in this version of statelab; "
                       f"kinds with a driver: {', '.join(FABRIC_DRIVERS)}")
    module, name = FABRIC_DRIVERS[kind].split(":")
    return getattr(importlib.import_module(module), name)
