"""A topology spec becomes a running Mininet lab, and is always torn down again.

``with Lab(spec) as lab:`` builds, in order: the fabric switch, the tenant hosts, the
management network (a Linux bridge joining the root namespace, the state server host and every
NF host; NFs reach only the state server on it), the state servers (a real ``redis-server`` per
tenant, its tenant's ACL user allowed only what NFs do), the NF pools (each NF as its tenant's
own unprivileged uid), and finally the steering plan on the fabric. Leaving the block, by return, exception or Ctrl-C,
tears all of it down. Everything created is written to a :class:`~statelab.record.Record` as it
is created, so teardown ends exactly that by PID and name, even from another process
(``statelab clean``) when the lab's owner died.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.util
import ipaddress
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import yaml

from statelab import spec as specmod
from statelab.control import Controller
from statelab.errors import LabError, MissingDependency, ProcessFailed
from statelab.fabric import (DIRECTIONS, HostPort, Member, PoolKey, ServicePath, SteeringPlan,
                             fabric_class, spi_of)
from statelab.record import RUN_ROOT, Record, proc_start_time

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_NODE = "state-server"
DATA_IF = "eth0"
MGMT_IF = "mgmt0"
NF_PORT_BASE = 100
NF_MTU = 1600  # 1500-byte inner packets + inner Ethernet (14) + NSH MD type 1 (24) + outer Ethernet
READY_TIMEOUT = 15.0

# The state servers: one redis-server per tenant (docs/contracts.md, "State"). A tenant's user
# may run exactly what the state client of nfs/state.py sends (GET, PTTL, SET [PX] [NX], INCRBY,
# PEXPIRE, DEL; EVALSHA of the scripts the lab loads), EXPIRE, EXISTS and SCRIPT EXISTS (which
# redis-py's Script objects send) for vendor NFs, the connection commands of a client that
# caches (HELLO 3, CLIENT TRACKING and CACHING), and with replicas WAIT and ROLE (is this the
# primary?): no EVAL, no SCRIPT LOAD, no channels.
TENANT_COMMANDS = ("get", "set", "pttl", "incrby", "pexpire", "expire", "del", "exists",
                   "evalsha", "script|exists", "ping", "hello", "client|tracking", "client|caching",
                   "wait", "role")
# on a cluster node also where the slots are (the client's slot map): nothing that changes it
CLUSTER_TENANT_COMMANDS = ("cluster|slots",)
CLUSTER_SLOTS = 16384
CLUSTER_NODE_TIMEOUT_MS = 5000
STATE_MAXMEMORY = 64 << 20        # bytes of data per tenant; full: writes fail (noeviction)
STATE_DATA_LIMIT = 256 << 20      # RLIMIT_DATA of each redis-server: bounds script memory too
SENTINELS, SENTINEL_QUORUM = 3, 2  # with replicas: Sentinels, and how many must agree a primary is down
# a primary silent this long is down for one Sentinel. A Sentinel PINGs every min(this, 1 s)
# and counts silence from when its link to a just-promoted primary opened: at 500 or 1000 ms it
# sometimes took the primary it had just promoted for down and failed back; 2000 leaves margin
SENTINEL_DOWN_AFTER_MS = 2000
SENTINEL_FAILOVER_TIMEOUT_MS = 5000
FAILOVER_TIMEOUT = 15.0           # seconds kill_state_primary waits for a promotion
# NF processes run as one unprivileged uid per tenant (no passwd entry needed, like systemd's
# DynamicUser), above systemd's container range and below 2^31: base + lab tag << 8 + index.
NF_UID_BASE = 0x70000000
NF_CAPS = "net_raw"               # an AF_PACKET socket; nothing else
PERSIST_ROOT = Path("/var/lib/statelab")  # state kept across labs (pinned ESP keys only)
STANDBY_ENV = "STATELAB_STANDBY"  # =0: no warm standby instance per pool
NF_ROOT_ENV = "STATELAB_NF_ROOT"  # =1: run NFs as root, as before (for a vendor NF that needs it)

# binary -> Debian/Ubuntu package that provides it
REQUIRED = {"mnexec": "mininet", "ip": "iproute2", "bridge": "iproute2", "ethtool": "ethtool",
            "ifconfig": "net-tools", "redis-server": "redis-server", "setpriv": "util-linux",
            "prlimit": "util-linux"}

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def check_dependencies(fabric_kind: str = "ovs") -> None:
    """Fail with the package to install if a program the lab needs is missing.

    Args:
        fabric_kind: the fabric whose driver's programs are checked too.

    Raises:
        MissingDependency: naming the missing program and its package.
    """
    for binary, package in REQUIRED.items():
        if shutil.which(binary) is None:
            raise MissingDependency(binary, package)
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        raise MissingDependency("python3-mininet (Python package 'mininet')", "mininet") from None
    fabric_class(fabric_kind).setup()


def lab_tag(name: str) -> str:
    """Four hex digits naming a lab's interfaces (Linux allows 15 characters per name)."""
    return hashlib.sha1(name.encode()).hexdigest()[:4]


@dataclass
class Instance:
    """One running NF instance of a pool."""

    id: str
    tenant: "specmod.Tenant"
    pool: "specmod.Pool"
    node: Any  # mininet Host
    member: Member
    proc: subprocess.Popen
    counters_path: Path
    log_path: Path
    mgmt_ip: str
    in_pool: bool = True
    standby: bool = False  # started, ready and connected, not yet in its pool (see Lab.standby)

    @property
    def key(self) -> PoolKey:
        return (self.tenant.id, self.pool.name)

    def counters(self) -> dict[str, Any]:
        """The instance's counters as last written by its runtime (empty before it is ready)."""
        try:
            return json.loads(self.counters_path.read_text())
        except (OSError, ValueError):
            return {}

    def alive(self) -> bool:
        return self.proc.poll() is None


class Lab:
    """A running lab built from a topology; use as a context manager.

    Args:
        topology: the loaded spec.
        progress: called with a short line for each long step (e.g. ``print``).
        run_root: where labs keep their records, configs, logs and counters.
    """

    def __init__(self, topology: "specmod.Topology", progress: Progress = _quiet,
                 run_root: Path = RUN_ROOT, standby: Optional[bool] = None) -> None:
        self.topo = topology
        # one warm instance per pool: scale-out adds it to the fabric (tens of ms) instead of
        # building a host and starting a process (hundreds); STATELAB_STANDBY=0 turns it off
        self.standby = os.environ.get(STANDBY_ENV, "1") != "0" if standby is None else standby
        self._standby_of: dict[PoolKey, Instance] = {}
        self.run_salt = secrets.token_bytes(32)  # this run's: per-run ESP keys (esp_keys_for_run)
        self.progress = progress
        self.tag = lab_tag(topology.name)
        self.run_dir = run_root / topology.name
        self.record: Optional[Record] = None
        self.net: Any = None
        self.fabric: Any = None
        self.hosts: dict[str, Any] = {}
        self.trunks: dict[str, Any] = {}  # trunk name -> its site switch (Mininet OVSSwitch)
        self._access_vlans: dict[str, int] = {}
        self.instances: dict[str, Instance] = {}
        self.plan: Optional[SteeringPlan] = None
        self.state_node: Any = None
        self.state_ip = ""
        self.state_ports: dict[str, int] = {}                              # tenant -> its primary's port
        self.state_procs: dict[tuple[str, int], subprocess.Popen] = {}    # (tenant, port) -> redis-server
        self.cluster_buses: dict[tuple[str, int], int] = {}   # (tenant, port) -> its cluster bus port
        self.cluster_slots: dict[str, list[tuple[int, int, int]]] = {}  # tenant -> [(first, last slot, port)]
        self.sentinel_ports: list[int] = []
        self.mgmt = topology.management
        self.passwords: dict[str, str] = {}
        self.nf_uids: dict[str, int] = {}
        self._next_port = NF_PORT_BASE
        self._next_mgmt = 10
        self._free_mgmt: list[int] = []  # management addresses of removed NFs, given out again
        self._next_index: dict[PoolKey, int] = {}
        self._mgmt_links = 0
        self._stopped = False
        self.control = Controller(self)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Build and start everything; on failure, what was built is still torn down by stop()."""
        check_dependencies(self.topo.fabric_kind)
        for tenant in self.topo.tenants:
            for pool in tenant.pools:
                if pool.command is None and importlib.util.find_spec(f"nfs.{pool.kind}") is None:
                    raise LabError(f"NF kind {pool.kind!r} (pool {tenant.name}/{pool.name}, "
                                   f"{self.topo.source}:{pool.line}) has no implementation in "
                                   f"this version of statelab; give the pool a `command`")
        if os.geteuid() != 0:
            raise LabError("a lab creates namespaces, veths and bridges: run it as root (sudo)")
        self._claim_run_dir()
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        setLogLevel("warning")
        fabric_cls = fabric_class(self.topo.fabric_kind)
        fabric_cls.prepare(self.record, self.progress)
        self._check_management_subnet()
        self.progress(f"building lab {self.topo.name!r} ({len(self.topo.tenants)} tenants)")
        self.net = Mininet(topo=None, controller=None, build=False, autoSetMacs=False)
        self.fabric = self.net.addSwitch(f"s{self.tag}", cls=fabric_cls, dpid=f"{int(self.tag, 16):016x}")
        self.fabric.bind(self.record, self.run_dir)
        self.record.add_process(self.fabric.pid, f"mininet shell of switch {self.fabric.name}")
        host_ports = self._add_hosts()
        self._add_management_bridge()
        self._start_state_server()
        for tenant in self.topo.tenants:
            for pool in tenant.pools:
                for _ in range(pool.instances):
                    self.add_instance(tenant, pool, attach=False)
                if self.standby:
                    self._standby_of[(tenant.id, pool.name)] = self._make_standby(tenant, pool, attach=False)
        self.progress("starting the fabric")
        for tenant in self.topo.tenants:
            for h in tenant.hosts:
                node = self.hosts[h.name]
                node.configDefault()
                self._default_route(node, tenant, h)
        self.net.built = True  # nodes and links are built above; Mininet only starts the switch
        self.net.start()
        self._tag_trunk_ports()
        self.plan = self._plan(host_ports)
        self.fabric.program(self.plan)
        for inst in self._standby_of.values():
            self.fabric.prepare_member(inst.key, inst.member)
        self.progress("waiting for NF instances")
        for inst in self.instances.values():
            self.wait_ready(inst)
        self.control.start_watch()
        self.progress(f"lab {self.topo.name!r} is up")

    def stop(self) -> None:
        """Tear everything down; idempotent, and safe after a failed or partial start."""
        if self._stopped:
            return
        self._stopped = True
        old = signal.getsignal(signal.SIGINT)
        in_main = _is_main_thread()
        if in_main:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut teardown short
        try:
            self.control.stop_watch()
            if self.record is None:
                return  # nothing was created
            self.progress(f"tearing down lab {self.topo.name!r}")
            for inst in self.instances.values():
                if inst.alive():
                    inst.proc.terminate()
            deadline = time.monotonic() + 2
            for inst in self.instances.values():
                try:
                    inst.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    inst.proc.kill()
                    inst.proc.wait()
            if self.net is not None:
                try:
                    self.net.stop()
                except Exception as err:  # the record below still removes what is left
                    print(f"statelab: mininet teardown: {err}", file=sys.stderr)
                for node in self.net.hosts:
                    if node.shell is not None:
                        node.shell.wait()
            if self.record is not None:
                self.record.clean()
                left = self.record.leftovers()
                if left:
                    raise LabError("teardown left behind: " + ", ".join(left))
                fabric_class(self.topo.fabric_kind).release(self.record)
                shutil.rmtree(self.run_dir, ignore_errors=True)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, old)

    # -- building ----------------------------------------------------------------------

    def _claim_run_dir(self) -> None:
        path = self.run_dir / "record.json"
        if path.exists():
            try:
                old = Record.load(path)
            except (OSError, ValueError, TypeError):
                old = None
            if old is not None and old.owner_alive():
                raise LabError(f"lab {self.topo.name!r} is already running (owner pid {old.owner}); "
                               f"stop it with `sudo statelab down {self.topo.name}`")
            if old is not None:
                self.progress(f"removing what a dead lab {self.topo.name!r} left behind")
                old.clean()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True, mode=0o700)
        me = os.getpid()
        self.record = Record(lab=self.topo.name, owner=me, owner_start=proc_start_time(me),
                             run_dir=str(self.run_dir))
        self.record.save()

    def _check_management_subnet(self) -> None:
        """Use the topology's management subnet; if it is the default and another lab (or
        anything else) already uses it, take the next free /24 of 198.18.0.0/15."""
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        used = [(ipaddress.IPv4Interface(line.split()[3]), line.split()[1]) for line in out.splitlines()]

        def clash(net: ipaddress.IPv4Network) -> Optional[str]:
            return next((f"{addr} on interface {ifname}" for addr, ifname in used if addr.network.overlaps(net)), None)

        subnet = self.topo.management
        taken = clash(subnet)
        if taken is None:
            self.mgmt = subnet
            return
        if subnet == specmod.DEFAULT_MANAGEMENT:
            for net in ipaddress.IPv4Network("198.18.0.0/15").subnets(new_prefix=24):
                if clash(net) is None:
                    self.progress(f"management subnet {subnet} is in use ({taken}); using {net}")
                    self.mgmt = net
                    return
        raise LabError(f"management subnet {subnet} overlaps {taken}; "
                       f"set `management: {{subnet: ...}}` in the topology to an unused range")

    def _add_node(self, name: str, **params: Any) -> Any:
        node = self.net.addHost(name, **params)
        self.record.add_process(node.pid, f"mininet shell of {name}")
        node.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        return node

    def _link(self, node: Any, port: int, mac: str, mtu: int = 1500) -> str:
        """Connect ``node``'s data interface to fabric port ``port``; return the fabric-side name.

        NF links get ``mtu`` = :data:`NF_MTU`, room for a full inner frame plus NSH.
        """
        sw_intf = self.fabric.port_name(Member("", port, mac))
        self.record.add_interface(sw_intf)
        self.net.addLink(node, self.fabric, port2=port, intfName1=DATA_IF, intfName2=sw_intf,
                         addr1=mac)
        self._tune_root_intf(sw_intf)
        node.cmd(f"ethtool -K {DATA_IF} tx off >/dev/null 2>&1")
        if mtu != 1500:
            subprocess.run(["ip", "link", "set", sw_intf, "mtu", str(mtu)], capture_output=True)
            node.cmd(f"ip link set {DATA_IF} mtu {mtu}")
        return sw_intf

    def _tune_root_intf(self, name: str) -> None:
        subprocess.run(["ethtool", "-K", name, "tx", "off"], capture_output=True)
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], capture_output=True)

    def _add_hosts(self) -> list[HostPort]:
        """Tenant hosts, each on an access port of its own or behind its trunk (one fabric port
        per trunk, one VLAN per host on it)."""
        ports = []
        port = 1
        trunk_ports: dict[str, int] = {}
        for tenant in self.topo.tenants:
            for i, h in enumerate(tenant.hosts, 1):
                mac = h.mac or f"02:00:{tenant.id >> 8:02x}:{tenant.id & 0xff:02x}:00:{i:02x}"
                node = self._add_node(h.name, ip=str(h.ip), mac=mac)
                if h.trunk is None:
                    self._link(node, port, mac)
                    at, port = port, port + 1
                else:
                    if h.trunk not in trunk_ports:
                        trunk_ports[h.trunk], port = port, port + 1
                        self._add_trunk(h.trunk, trunk_ports[h.trunk])
                    at = trunk_ports[h.trunk]
                    self._behind_trunk(node, mac, h)
                self.hosts[h.name] = node
                ports.append(HostPort(tenant.id, at, mac, spi_of(tenant.id, DIRECTIONS[
                    "outbound" if h.zone == "inside" else "inbound"]), str(h.ip.ip), h.vlan))
        return ports

    def _add_trunk(self, name: str, port: int) -> None:
        """A site switch for trunk ``name``: a standalone Open vSwitch bridge (this kernel has no
        802.1Q or VLAN-filtering bridge) whose uplink, carrying every VLAN tagged, is fabric
        port ``port``; each host behind it gets an access port in its VLAN."""
        from mininet.node import OVSSwitch

        from statelab.fabric.ovs import OvsFabric
        OvsFabric.prepare(self.record, self.progress)
        bridge = f"t{self.tag}{len(self.trunks)}"
        self.record.ovs_bridges.append(bridge)
        self.record.save()
        sw = self.net.addSwitch(bridge, cls=OVSSwitch, datapath="user", failMode="standalone",
                                inband=False, dpid=f"{int(self.tag, 16) << 8 | len(self.trunks) + 1:016x}")
        self.record.add_process(sw.pid, f"mininet shell of trunk switch {bridge} ({name})")
        uplink = f"{bridge}-up"
        self.record.add_interface(uplink)
        sw_intf = self.fabric.port_name(Member("", port, ""))
        self.record.add_interface(sw_intf)
        self.net.addLink(sw, self.fabric, port2=port, intfName1=uplink, intfName2=sw_intf)
        for intf in (uplink, sw_intf):
            self._tune_root_intf(intf)
        self.trunks[name] = sw

    def _behind_trunk(self, node: Any, mac: str, host: "specmod.Host") -> None:
        """Link a host to an access port of its trunk's switch, in the host's VLAN."""
        sw = self.trunks[host.trunk]
        access = f"{sw.name}h{len(sw.intfs)}"
        self.record.add_interface(access)
        self.net.addLink(node, sw, intfName1=DATA_IF, intfName2=access, addr1=mac)
        self._tune_root_intf(access)
        node.cmd(f"ethtool -K {DATA_IF} tx off >/dev/null 2>&1")
        self._access_vlans[access] = host.vlan

    def _tag_trunk_ports(self) -> None:
        """Once the trunk switches run: each host's access port in its VLAN."""
        for access, vlan in self._access_vlans.items():
            proc = subprocess.run(["ovs-vsctl", "set", "Port", access, f"tag={vlan}"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"trunk access port {access}: VLAN {vlan}: {proc.stderr.strip()}")

    def _default_route(self, node: Any, tenant: "specmod.Tenant", host: "specmod.Host") -> None:
        """Route everything off the host's subnet (NAT public addresses, VIPs, remote sites) into
        the fabric: default via a virtual gateway (the subnet's last address) whose MAC is fixed,
        so no ARP is needed; the fabric delivers IPv4 by destination address anyway."""
        gateway = gateway_of(host.ip.network)
        if any(h.ip.ip == gateway for h in tenant.hosts):
            return
        node.cmd(f"ip neigh replace {gateway} lladdr {gateway_mac(tenant.id)} nud permanent dev {DATA_IF} && "
                 f"ip route replace default via {gateway} dev {DATA_IF}")

    def _plan(self, host_ports: list[HostPort]) -> SteeringPlan:
        paths = [ServicePath(tenant.id, spi_of(tenant.id, d), tuple(getattr(tenant, direction)))
                 for tenant in self.topo.tenants for direction, d in DIRECTIONS.items()]
        members: dict[PoolKey, list[Member]] = {}
        for inst in self.instances.values():
            if inst.in_pool:
                members.setdefault(inst.key, []).append(inst.member)
        return SteeringPlan(tuple(host_ports), tuple(paths), {k: tuple(v) for k, v in members.items()})

    # -- management network and state server --------------------------------------------

    def _mgmt_ip(self, index: int) -> str:
        return str(self.mgmt.network_address + index)

    def _mgmt_mac(self, ip: str) -> str:
        """The fixed MAC address of a management address: 02:4d, the lab tag, the host index."""
        index = int(ipaddress.IPv4Address(ip)) - int(self.mgmt.network_address)
        return f"02:4d:{self.tag[:2]}:{self.tag[2:]}:{index >> 8 & 0xff:02x}:{index & 0xff:02x}"

    @property
    def mgmt_bridge(self) -> str:
        """The management bridge's name (in the root namespace, address .1)."""
        return f"m{self.tag}"

    def _add_management_bridge(self) -> None:
        """The management bridge, its address .1 with a fixed MAC (a bridge otherwise takes the
        lowest MAC of its ports, which changes as NFs come and go)."""
        br = self.mgmt_bridge
        self.record.linux_bridges.append(br)
        self.record.save()
        ip = self._mgmt_ip(1)
        for cmd in (["ip", "link", "add", br, "address", self._mgmt_mac(ip), "type", "bridge"],
                    ["ip", "addr", "add", f"{ip}/{self.mgmt.prefixlen}", "dev", br],
                    ["ip", "link", "set", br, "up"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"management bridge {br}: `{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{br}.disable_ipv6=1"], capture_output=True)

    def _join_management(self, node: Any, ip: str, nf: bool = True) -> None:
        """Put ``node`` on the management network at ``ip``.

        Every address has a fixed MAC, known to the bridge (static entry on the node's port,
        learning off: a forged source address is never learnt) and to everyone it talks to
        (permanent neighbour entries: an ARP reply or gratuitous ARP changes nobody's view).
        An NF's port is moreover ``isolated`` (it reaches only the state server and the root
        namespace, never another NF), ``locked`` (frames whose source MAC is not the port's own
        are dropped) and gets no flooded unknown unicast or multicast.

        Args:
            node: the Mininet host.
            ip: its management address.
            nf: the host is an NF instance (else: the state server).
        """
        self._mgmt_links += 1
        br = self.mgmt_bridge
        root_if = f"{br}-{self._mgmt_links}"
        mac = self._mgmt_mac(ip)
        self.record.add_interface(root_if)
        guard = ["isolated", "on", "locked", "on", "flood", "off", "mcast_flood", "off"] if nf else []
        cmds = [["ip", "link", "add", root_if, "type", "veth", "peer", "name", MGMT_IF, "address", mac,
                 "netns", str(node.pid)],
                ["ip", "link", "set", root_if, "master", br],
                ["bridge", "link", "set", "dev", root_if, "learning", "off", *guard],
                ["bridge", "fdb", "replace", mac, "dev", root_if, "master", "static"],
                ["ip", "neigh", "replace", ip, "lladdr", mac, "nud", "permanent", "dev", br]]
        for cmd in cmds:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"management link of {node.name}: `{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        self._tune_root_intf(root_if)
        subprocess.run(["ip", "link", "set", root_if, "up"], capture_output=True)
        peers = [(self._mgmt_ip(1), self._mgmt_mac(self._mgmt_ip(1)))]
        if nf:
            peers.append((self.state_ip, self._mgmt_mac(self.state_ip)))
        node.cmd(f"ip addr add {ip}/{self.mgmt.prefixlen} dev {MGMT_IF} && "
                 f"ip link set {MGMT_IF} up && ip link set lo up && " +
                 " && ".join(f"ip neigh replace {p} lladdr {m} nud permanent dev {MGMT_IF}" for p, m in peers))
        if nf:
            self.state_node.cmd(f"ip neigh replace {ip} lladdr {mac} nud permanent dev {MGMT_IF}")

    def _leave_management(self, ip: str) -> None:
        """Forget a removed NF's management address (its port went with its veth); the address
        is given to a later NF (a lab that scales for hours must not run out of its subnet)."""
        self.state_node.cmd(f"ip neigh del {ip} dev {MGMT_IF}")
        subprocess.run(["ip", "neigh", "del", ip, "dev", self.mgmt_bridge], capture_output=True)
        heapq.heappush(self._free_mgmt, int(ipaddress.ip_address(ip)) - int(self.mgmt.network_address))

    def _take_mgmt_index(self) -> int:
        """The lowest free host number of the management subnet for a new NF.

        Raises:
            LabError: every address of the subnet is taken (too many NFs at once).
        """
        if self._free_mgmt:
            return heapq.heappop(self._free_mgmt)
        index = self._next_mgmt
        if index >= self.mgmt.num_addresses - 1:
            raise LabError(f"the management subnet {self.mgmt} has no address left for another NF "
                           f"({index - 10} NFs at once); give the topology a larger one (management: {{subnet: ...}})")
        self._next_mgmt += 1
        return index

    def _start_state_server(self) -> None:
        """One redis-server per tenant in host ``state-server``, tenant i (topology order) on
        port ``state.port + i``: a tenant can see, fill or stall only its own server. Each has
        the default user off, the lab's ``admin`` and the tenant's user (:func:`tenant_acl`), a
        memory limit (noeviction: state is never silently dropped), and is started under an
        RLIMIT_DATA that bounds what a script may allocate. Passwords live in files of mode
        0600 only; the NFs' scripts are loaded by the admin (tenants cannot load any).

        With ``state: {replicas: R}`` each tenant's server has R replicas (replica j on port
        ``state.port + j * tenants + i``) and three Sentinels (after the last replica's port)
        watch every primary: see :meth:`kill_state_primary` and docs/contracts.md, "Replicas and failover"."""
        replicas, cluster = self.topo.state_replicas, self.topo.state_cluster
        what = f"a Redis Cluster of {cluster} nodes per tenant" if cluster else "one redis-server per tenant"
        self.progress(f"starting the state servers ({what}, {len(self.topo.tenants)} tenants"
                      + (f", each with {replicas} replica(s) and 3 Sentinels)" if replicas else ")"))
        self.state_node = self._add_node(STATE_NODE, ip=None)
        self.state_ip = self._mgmt_ip(2)
        self._join_management(self.state_node, self.state_ip, nf=False)
        self._prepare_nf_users()
        tenants = len(self.topo.tenants)
        last = (self.topo.state_port + tenants * (replicas + 1) - 1 + (SENTINELS if replicas else 0)
                + (tenants * cluster * 2 - tenants if cluster else 0))
        if last > 65535:
            raise LabError(f"state.port {self.topo.state_port} ({self.topo.source}): the lab needs "
                           f"{last - self.topo.state_port + 1} ports from it (one per tenant and replica, and "
                           f"the Sentinels; or two per cluster node); choose a lower port")
        self.passwords = {"admin": secrets.token_hex(16)}
        started = []
        for i, tenant in enumerate(self.topo.tenants):
            name = tenant.name
            port = self.state_ports[name] = self.topo.state_port + i
            pw = self.passwords[name] = secrets.token_hex(16)
            _write_private(self._tenant_dir(name) / "state-password", pw + "\n", self.nf_uids.get(name))
            if cluster:
                for j in range(cluster):
                    started.append(self._start_state_process(name, port + j * tenants,
                                                             bus=port + (cluster + j) * tenants))
                continue
            started.append(self._start_state_process(name, port))
            for j in range(1, replicas + 1):
                started.append(self._start_state_process(name, self.topo.state_port + j * tenants + i, replica_of=port))
        for name, port, proc, log in started:
            self._wait_state_process(name, port, proc, log)
        if cluster:
            self._guard_cluster_bus()
            for name in self.state_ports:
                self._form_cluster(name)
        for name in self.state_ports if replicas else ():
            self._wait_replicas_online(name, self.state_ports[name], replicas)
        if replicas:
            base = self.topo.state_port + tenants * (replicas + 1)
            self.sentinel_ports = [base + k for k in range(SENTINELS)]
            sentinels = [self._start_sentinel(p) for p in self.sentinel_ports]
            self._wait_sentinels(sentinels)
        self.load_state_scripts()

    def _start_state_process(self, tenant: str, port: int, replica_of: Optional[int] = None,
                             bus: Optional[int] = None) -> tuple[str, int, subprocess.Popen, Path]:
        """Start one redis-server of ``tenant`` on ``port`` (a replica of the one on
        ``replica_of``, if given; a cluster node with its bus on ``bus``, if given); returns
        (tenant, port, process, log)."""
        t = self.topo.tenant(tenant)
        conf = self.run_dir / f"redis-{tenant}-{port}.conf"
        replication = ["repl-diskless-sync yes", "repl-diskless-sync-delay 0", "masteruser admin",
                       f"masterauth {self.passwords['admin']}"]
        if replica_of is not None:
            replication.append(f"replicaof {self.state_ip} {replica_of}")
        if bus is not None:  # slots are assigned by _form_cluster; a node without them answers nothing
            replication = ["cluster-enabled yes", f"cluster-config-file nodes-{tenant}-{port}.conf",
                           f"cluster-port {bus}", f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}",
                           "cluster-require-full-coverage yes", "cluster-allow-reads-when-down no"]
            self.cluster_buses[(tenant, port)] = bus
        _write_private(conf, "\n".join([
            f"bind {self.state_ip}", f"port {port}", "protected-mode yes",
            'save ""', *self._persistence(t, port), "daemonize no",
            f"maxmemory {STATE_MAXMEMORY}", "maxmemory-policy noeviction", "maxclients 1024",
            "proto-max-bulk-len 1mb", "client-query-buffer-limit 1mb",
            "client-output-buffer-limit normal 64mb 16mb 10",
            "enable-debug-command no", "enable-module-command no", "enable-protected-configs no",
            *(replication if self.topo.state_replicas or bus is not None else []),
            "user default off", f"user admin on >{self.passwords['admin']} ~* &* +@all",
            tenant_acl(tenant, self.passwords[tenant], cluster=bus is not None), ""]))
        log = self.run_dir / f"redis-{tenant}-{port}.log"
        argv = ["prlimit", f"--data={STATE_DATA_LIMIT}", "--", "redis-server", str(conf)]
        role = "replica" if replica_of is not None else "redis-server"
        proc = self._popen(self.state_node, argv, log, f"{role} of tenant {tenant} (port {port})")
        self.state_procs[(tenant, port)] = proc
        return tenant, port, proc, log

    def _wait_state_process(self, tenant: str, port: int, proc: subprocess.Popen, log: Path) -> None:
        """Until the server on ``port`` answers (and, for a replica, has its primary's data)."""
        what = f"redis-server of tenant {tenant} on host {STATE_NODE} (port {port})"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise ProcessFailed(what, proc.returncode, _tail(log))
            try:
                info = self._admin(port).info("replication")
                if info.get("role") == "master" or info.get("master_link_status") == "up":
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{what} (not ready after {READY_TIMEOUT:.0f}s)", None, _tail(log))
            time.sleep(0.05)

    def _wait_replicas_online(self, tenant: str, primary: Optional[int], count: int) -> None:
        """Until a write on the primary on ``primary`` is acknowledged by ``count`` replicas
        (WAIT), as an NF's will be: a replica just synced acknowledges only from its first
        periodic ACK, up to a second later. The probe key (outside every tenant's keys)
        expires at once. ``primary`` None: whichever the Sentinels name now (it may change
        while we wait)."""
        deadline = time.monotonic() + READY_TIMEOUT
        fixed = primary
        while True:
            try:
                primary = fixed if fixed is not None else self.state_port(tenant)
                admin = self._admin(primary)
                admin.set("statelab:replicated", "1", px=1000)
                if admin.execute_command("WAIT", count, 100) >= count:
                    return
                if fixed is None:
                    self._follow_primary(tenant, primary)
            except Exception:
                pass
            if time.monotonic() > deadline:
                try:
                    info = self._admin(primary).info("replication")
                except Exception as err:
                    info = {"error": str(err)}
                logs = "".join(f"\n--- {log.name}:\n{_tail(log)}" for log in sorted(self.run_dir.glob(f"redis-{tenant}-*.log")))
                raise LabError(f"tenant {tenant}'s state primary (port {primary}) does not see {count} replica(s) "
                               f"acknowledge a write after {READY_TIMEOUT:.0f}s; its replication: {info}{logs}")
            time.sleep(0.05)

    def _guard_cluster_bus(self) -> None:
        """The cluster bus has no authentication (Redis 7.0): whoever reaches it can join a
        node to a cluster and claim its slots. nftables in the state server's namespace
        refuses (TCP reset) every bus connection that does not come from the nodes' own
        address; the table goes with the namespace."""
        if shutil.which("nft") is None:
            raise LabError("a state cluster needs nft to guard its bus ports: sudo apt-get install nftables "
                           "(or run sudo scripts/install.sh)")
        ports = ", ".join(str(b) for b in self.cluster_buses.values())
        rules = self.run_dir / "cluster-bus.nft"
        _write_private(rules, "table inet statelab_bus {\n  chain input {\n"
                              "    type filter hook input priority 0; policy accept;\n"
                              f"    tcp dport {{ {ports} }} ip saddr != {self.state_ip} reject with tcp reset\n"
                              "  }\n}\n")
        out = self.state_node.cmd(f"nft -f {shlex.quote(str(rules))} 2>&1; echo rc=$?")
        if not out.rstrip().endswith("rc=0"):
            raise LabError(f"cannot guard the state cluster's bus ports with nftables in host {STATE_NODE}: "
                           f"{out.strip()}")

    def _form_cluster(self, tenant: str) -> None:
        """Give each of ``tenant``'s cluster nodes an equal range of the 16384 hash slots,
        introduce them to the first (CLUSTER MEET), and wait until every node says the
        cluster is ok and knows all slots' owners."""
        ports = self.state_servers(tenant)
        n = len(ports)
        self.cluster_slots[tenant] = []
        for (lo, hi), port in zip(slot_ranges(n), ports):
            self.cluster_slots[tenant].append((lo, hi, port))
            self._admin(port).execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        first = self._admin(ports[0])
        for port in ports[1:]:
            first.execute_command("CLUSTER", "MEET", self.state_ip, port, self.cluster_buses[(tenant, port)])
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(ports)
        while pending:
            try:
                info = self._admin(pending[0]).cluster("info")
                if info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == n \
                        and int(info.get("cluster_slots_ok", 0)) == CLUSTER_SLOTS:
                    pending.pop(0)
                    continue
            except Exception as err:
                info = {"error": str(err)}
            if time.monotonic() > deadline:
                raise LabError(f"tenant {tenant}'s state cluster (ports {ports}) is not ok after {READY_TIMEOUT:.0f}s: "
                               f"node {pending[0]} says {info}; log: {_tail(self.run_dir / f'redis-{tenant}-{pending[0]}.log')}")
            time.sleep(0.05)

    def _follow_primary(self, tenant: str, primary: int) -> None:
        """Point every other server of ``tenant`` that is not a replica of ``primary`` at it,
        as the Sentinels would some seconds later (e.g. one left over from a failover that
        followed another)."""
        for port in self.state_servers(tenant):
            if port == primary or self.state_procs[(tenant, port)].poll() is not None:
                continue
            other = self._admin(port)
            info = other.info("replication")
            if info.get("role") != "slave" or int(info.get("master_port", 0)) != primary:
                other.execute_command("REPLICAOF", self.state_ip, primary)

    def _start_sentinel(self, port: int) -> tuple[int, subprocess.Popen, Path]:
        """One Redis Sentinel watching every tenant's primary. Anyone may ask it where a
        primary is (nothing else: the default user); the lab and the other Sentinels use admin."""
        pw = self.passwords["admin"]
        lines = [f"bind {self.state_ip}", f"port {port}", "daemonize no", f"dir {self.run_dir}",
                 "sentinel resolve-hostnames no", "sentinel sentinel-user admin", f"sentinel sentinel-pass {pw}",
                 "user default on nopass -@all +ping +hello +sentinel|get-master-addr-by-name",
                 f"user admin on >{pw} ~* &* +@all"]
        for t in self.topo.tenants:
            service = sentinel_service(t.name)
            lines += [f"sentinel monitor {service} {self.state_ip} {self.state_ports[t.name]} {SENTINEL_QUORUM}",
                      f"sentinel auth-user {service} admin", f"sentinel auth-pass {service} {pw}",
                      f"sentinel down-after-milliseconds {service} {SENTINEL_DOWN_AFTER_MS}",
                      f"sentinel failover-timeout {service} {SENTINEL_FAILOVER_TIMEOUT_MS}"]
        conf = self.run_dir / f"sentinel-{port}.conf"
        _write_private(conf, "\n".join(lines) + "\n")
        log = self.run_dir / f"sentinel-{port}.log"
        proc = self._popen(self.state_node, ["redis-server", str(conf), "--sentinel"], log,
                           f"redis-sentinel (port {port})")
        return port, proc, log

    def _wait_sentinels(self, sentinels: list[tuple[int, subprocess.Popen, Path]]) -> None:
        """Until every Sentinel knows every primary's replicas and the other Sentinels: only
        then can they agree on a failover."""
        replicas, others = self.topo.state_replicas, len(sentinels) - 1
        deadline = time.monotonic() + READY_TIMEOUT
        for port, proc, log in sentinels:
            what = f"redis-sentinel on host {STATE_NODE} (port {port})"
            pending = [sentinel_service(t.name) for t in self.topo.tenants]
            while pending:
                if proc.poll() is not None:
                    raise ProcessFailed(what, proc.returncode, _tail(log))
                try:
                    s = self._admin(port)
                    service = pending[0]
                    if (len(s.sentinel_slaves(service)) >= replicas
                            and len(s.sentinel_sentinels(service)) >= others):
                        pending.pop(0)
                        continue
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise ProcessFailed(f"{what} (does not know {pending[0]}'s replicas and the other "
                                        f"Sentinels after {READY_TIMEOUT:.0f}s)", None, _tail(log))
                time.sleep(0.05)

    def state_admin(self, port: int):
        """A redis-py client of the state server (or cluster node) on ``port``, as the admin."""
        return self._admin(port)

    def _admin(self, port: int):
        import redis
        return redis.Redis(host=self.state_ip, port=port, username="admin", password=self.passwords["admin"],
                           socket_timeout=2, decode_responses=True)

    def _persistence(self, tenant: "specmod.Tenant", port: int) -> list[str]:
        """redis.conf lines: in memory only, or, for a tenant whose ESP keys are pinned, an
        append-only file fsynced on every write in /var/lib/statelab/LAB/TENANT, so its
        sequence counters outlive the lab (a new lab with the same keys goes on counting)."""
        if not pins_esp_keys(tenant):
            # a directory of its own: a replica writes the RDB it syncs to dump.rdb there, and a
            # server started in a shared one would load another server's (another tenant's) data
            d = self.run_dir / f"redis-{tenant.name}-{port}"
            d.mkdir(mode=0o700, exist_ok=True)
            return ["appendonly no", f"dir {d}"]
        if self.topo.state_replicas or self.topo.state_cluster:
            raise LabError(f"tenant {tenant.name} ({self.topo.source}, line {tenant.line}) pins its ESP keys, and "
                           f"its state server has replicas or is a cluster: a pinned SA's sequence counter "
                           f"persists on one server only in this version; use keys: per-run, or leave out "
                           f"state: replicas/cluster")
        d = PERSIST_ROOT / self.topo.name / tenant.name
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.progress(f"tenant {tenant.name} pins its ESP keys: its state is kept in {d}")
        return ["appendonly yes", "appendfsync always", f"dir {d}"]

    def load_state_scripts(self, ports: Optional[list[int]] = None) -> None:
        """Load the NFs' scripts (``nfs.state.SCRIPTS``) into every state server (replicas
        too: scripts are not replicated, and a replica may become the primary), as admin: a
        tenant may run them by SHA (EVALSHA) but load none of its own."""
        from nfs.state import SCRIPTS
        for port in ports if ports is not None else [p for _, p in self.state_procs]:
            admin = self._admin(port)
            for script in SCRIPTS.values():
                admin.script_load(script.lua)

    def _prepare_nf_users(self) -> None:
        """Pick each tenant's NF uid (unless ``STATELAB_NF_ROOT=1``) and let those uids pass
        through the run directory (0711: no listing) to their own tenant directory."""
        self.nf_uids = {}
        if os.environ.get(NF_ROOT_ENV) == "1":
            return
        if len(self.topo.tenants) > 256:
            raise LabError(f"{len(self.topo.tenants)} tenants: NFs run as one uid per tenant, at most "
                           f"256 per lab; set {NF_ROOT_ENV}=1 to run them as root")
        for i, tenant in enumerate(self.topo.tenants):
            uid = NF_UID_BASE + (int(self.tag, 16) << 8) + i
            try:
                taken = pwd.getpwuid(uid).pw_name
            except KeyError:
                taken = None
            if taken is not None:
                raise LabError(f"uid {uid}, meant for the NFs of tenant {tenant.name}, belongs to user "
                               f"{taken!r}; set {NF_ROOT_ENV}=1 to run NFs as root")
            self.nf_uids[tenant.name] = uid
        for d in [self.run_dir, *self.run_dir.parents]:
            if d == self.run_dir:
                d.chmod(0o711)
            elif not d.stat().st_mode & 0o001:
                raise LabError(f"{d} is not searchable by other users, so unprivileged NFs cannot reach "
                               f"{self.run_dir}: `chmod o+x {d}`, another STATELAB_RUN, or {NF_ROOT_ENV}=1")

    def _tenant_dir(self, tenant: str) -> Path:
        """The directory of a tenant's NF configs, counters and state password: mode 0700,
        owned by the tenant's NF uid (other tenants' NFs cannot read it)."""
        d = self.run_dir / f"tenant-{tenant}"
        if not d.is_dir():
            d.mkdir(mode=0o700)
            uid = self.nf_uids.get(tenant)
            if uid is not None:
                os.chown(d, uid, uid)
        return d

    def _nf_user_argv(self, tenant: str) -> list[str]:
        """The prefix that starts a command as ``tenant``'s NF uid with only CAP_NET_RAW (none
        when NFs run as root)."""
        uid = self.nf_uids.get(tenant)
        if uid is None:
            return []
        caps = f"-all,+{NF_CAPS}"
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={caps}",
                f"--ambient-caps={caps}", f"--bounding-set={caps}", "--no-new-privs", "--"]

    def state_port(self, tenant: str, key: Optional[str] = None) -> int:
        """The port of ``tenant``'s state server (on :attr:`state_ip`): with replicas, of its
        primary as the Sentinels name it now; in a cluster, of the node that holds ``key``
        (without one, the first node)."""
        if tenant not in self.state_ports:
            raise LabError(f"no state server for tenant {tenant!r}; tenants: {', '.join(self.state_ports)}")
        if key is not None and tenant in self.cluster_slots:
            from redis.crc import key_slot
            slot = key_slot(key.encode())
            return next(port for lo, hi, port in self.cluster_slots[tenant] if lo <= slot <= hi)
        for port in self.sentinel_ports:
            try:
                _, primary = self._admin(port).sentinel_get_master_addr_by_name(sentinel_service(tenant))
            except Exception:
                continue
            self.state_ports[tenant] = int(primary)
            break
        return self.state_ports[tenant]

    def state_servers(self, tenant: str) -> list[int]:
        """The ports of all of ``tenant``'s state servers (primary and replicas)."""
        return [p for t, p in self.state_procs if t == tenant]

    def state_url(self, tenant: str) -> str:
        """Redis URL of ``tenant``'s state server with its user but no password (an NF gets the
        password from a file: a command line is readable by every local user); with replicas,
        the Sentinels' addresses and the service to ask them for."""
        if self.sentinel_ports:
            sentinels = ",".join(f"{self.state_ip}:{p}" for p in self.sentinel_ports)
            return f"redis+sentinel://tenant-{tenant}@{sentinels}/{sentinel_service(tenant)}?wait=1"
        if tenant in self.cluster_slots:
            nodes = ",".join(f"{self.state_ip}:{p}" for p in self.state_servers(tenant))
            return f"redis+cluster://tenant-{tenant}@{nodes}/"
        return f"redis://tenant-{tenant}@{self.state_ip}:{self.state_port(tenant)}/0"

    def kill_state_primary(self, tenant: str) -> dict[str, Any]:
        """SIGKILL ``tenant``'s state primary; wait until the Sentinels have promoted a replica,
        then start the killed server again as a replica of the new primary (the lab's
        replica count is back). Returns what happened, times in ms from the kill."""
        if not self.sentinel_ports:
            raise LabError(f"tenant {tenant}'s state server has no replica (topology: state: {{replicas: 1}})")
        old = self.state_port(tenant)
        proc = self.state_procs[(tenant, old)]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = t0 + FAILOVER_TIMEOUT
        while (new := self.state_port(tenant)) == old:
            if time.monotonic() > deadline:
                raise LabError(f"the Sentinels promoted no replica of tenant {tenant} within "
                               f"{FAILOVER_TIMEOUT:.0f}s of its primary's death (logs: {self.run_dir}/sentinel-*.log)")
            time.sleep(0.01)
        promoted_ms = (time.monotonic() - t0) * 1000
        _, port, again, log = self._start_state_process(tenant, old, replica_of=new)
        self._wait_state_process(tenant, port, again, log)
        self.load_state_scripts([old])
        self._wait_replicas_online(tenant, None, self.topo.state_replicas)
        return {"tenant": tenant, "killed_port": old, "new_primary_port": new,
                "promoted_ms": round(promoted_ms, 1), "healed_ms": round((time.monotonic() - t0) * 1000, 1)}

    def state_password_file(self, tenant: str) -> Path:
        """The file (mode 0600, owned by the tenant's NF uid) holding ``tenant``'s password."""
        return self._tenant_dir(tenant) / "state-password"

    def redis(self, tenant: Optional[str] = None, server: Optional[str] = None):
        """A redis-py client of a state server.

        Args:
            tenant: connect as this tenant's restricted user; None: as the lab's admin.
            server: whose state server (a tenant name); default: ``tenant``'s own. The admin
                without ``server`` gets a client that sends each command to the server of the
                tenant its key names (``t:{tenant}:...``).
        """
        import redis
        if tenant is None and server is None:
            return _AdminByKey(self)
        if (server or tenant) in self.cluster_slots:
            from redis.cluster import ClusterNode, RedisCluster
            return RedisCluster(startup_nodes=[ClusterNode(self.state_ip, p) for p in self.state_servers(server or tenant)],
                                username="admin" if tenant is None else f"tenant-{tenant}",
                                password=self.passwords["admin" if tenant is None else tenant], socket_timeout=2)
        return redis.Redis(host=self.state_ip, port=self.state_port(server or tenant),
                           username="admin" if tenant is None else f"tenant-{tenant}",
                           password=self.passwords["admin" if tenant is None else tenant], socket_timeout=2)

    # -- processes ---------------------------------------------------------------------

    def _popen(self, node: Any, argv: list[str], log: Path, what: str,
               env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.Popen:
        """Start a lab process in ``node``, its output in ``log`` (mode 0600), tracked by PID."""
        with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            proc = node.popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env or _process_env(), cwd=str(cwd or self.run_dir))
        self.record.add_process(proc.pid, f"{what} on {node.name}")
        return proc

    def spawn(self, host: str, argv: list[str], stdin: bool = False) -> subprocess.Popen:
        """Start a program in a tenant host (or an NF instance's host), tracked by PID like
        every lab process.

        Args:
            host: tenant host name, or NF instance id.
            argv: the command; its stdout is a pipe, stderr goes to the host's log.
            stdin: give the program a pipe to write to (else /dev/null).

        Returns:
            The process (``.stdout`` readable as text).
        """
        node = self.instances[host].node if host in self.instances else self.host(host)
        with open(self.run_dir / f"{host}.log", "ab") as err:
            proc = node.popen(argv, stdout=subprocess.PIPE, stderr=err,
                              stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                              env=_process_env(), cwd=str(self.run_dir), text=True)
        self.record.add_process(proc.pid, f"{argv[0]} on {host}")
        return proc

    # -- NF instances ------------------------------------------------------------------

    def add_instance(self, tenant: "specmod.Tenant", pool: "specmod.Pool", attach: bool) -> Instance:
        """Create an NF host, link it to the fabric and start its process.

        Args:
            tenant: the tenant whose pool grows.
            pool: the pool.
            attach: the fabric is already running, so add the port to it now.
        """
        key = (tenant.id, pool.name)
        index = self._next_index.get(key, 0) + 1
        self._next_index[key] = index
        iid = f"{tenant.name}-{pool.name}-{index}"
        port = self._next_port
        self._next_port += 1
        mac = f"02:4e:46:00:{port >> 8:02x}:{port & 0xff:02x}"
        node = self._add_node(iid, ip=None)
        self._link(node, port, mac, NF_MTU)
        node.cmd(f"ip link set {DATA_IF} up")
        if attach:
            self.fabric.attach(self.fabric.intfs[port])
        mgmt_ip = self._mgmt_ip(self._take_mgmt_index())
        self._join_management(node, mgmt_ip)
        # the config (IPsec keys too), counters and password sit in the tenant's own directory,
        # which only the tenant's NF uid can open; `statelab status` finds counters by a symlink
        tdir = self._tenant_dir(tenant.name)
        uid = self.nf_uids.get(tenant.name)
        config = tdir / f"{iid}.config.yaml"
        _write_private(config, yaml.safe_dump({
            **esp_keys_for_run(pool.kind, _plain(pool.config), self.run_salt),
            "statelab": {"tenant": tenant.name, "tenant_id": tenant.id, "pool": pool.name,
                         "chains": {"outbound": list(tenant.outbound), "inbound": list(tenant.inbound)}}}), uid)
        counters = tdir / f"{iid}.counters.json"
        counters.unlink(missing_ok=True)
        link = self.run_dir / counters.name
        link.unlink(missing_ok=True)
        link.symlink_to(counters)
        log = self.run_dir / f"{iid}.log"
        command = list(pool.command) if pool.command else [sys.executable, "-m", f"nfs.{pool.kind}"]
        argv = self._nf_user_argv(tenant.name) + command + [
            "--iface", DATA_IF, "--state", self.state_url(tenant.name),
            "--state-password-file", str(self.state_password_file(tenant.name)), "--instance", iid,
            "--config", str(config), "--counters", str(counters)]
        proc = self._popen(node, argv, log, f"NF {iid}", env=_nf_env() if uid is not None else None, cwd=tdir)
        inst = Instance(iid, tenant, pool, node, Member(iid, port, mac), proc, counters, log, mgmt_ip)
        self.instances[iid] = inst
        return inst

    def _make_standby(self, tenant: "specmod.Tenant", pool: "specmod.Pool", attach: bool) -> Instance:
        inst = self.add_instance(tenant, pool, attach)
        inst.in_pool, inst.standby = False, True
        if attach:  # the fabric runs: its flows now (at the start, after the plan is programmed)
            self.fabric.prepare_member(inst.key, inst.member)
        return inst

    def take_standby(self, tenant: "specmod.Tenant", pool: "specmod.Pool") -> Optional[Instance]:
        """The pool's warm instance, ready (None without one, or if it died: then it is removed)."""
        inst = self._standby_of.pop((tenant.id, pool.name), None)
        if inst is None:
            return None
        if not inst.alive():
            self.remove_instance(inst)
            return None
        self.wait_ready(inst)
        inst.standby = False
        return inst

    def replenish_standby(self, tenant: "specmod.Tenant", pool: "specmod.Pool") -> None:
        """Start the pool's next warm instance (after the last one joined the pool)."""
        key = (tenant.id, pool.name)
        if self.standby and key not in self._standby_of:
            self._standby_of[key] = self._make_standby(tenant, pool, attach=True)

    def wait_ready(self, inst: Instance) -> None:
        """Wait until an instance's runtime has opened its interface (its counters file exists).

        Raises:
            ProcessFailed: the process exited first, or did not get ready in time.
        """
        deadline = time.monotonic() + READY_TIMEOUT
        while not inst.counters():
            if inst.proc.poll() is not None:
                command = " ".join(inst.pool.command) if inst.pool.command else f"python -m nfs.{inst.pool.kind}"
                raise ProcessFailed(f"NF {inst.id} ({command} ...; pool {inst.tenant.name}/{inst.pool.name} at "
                                    f"{self.topo.source}:{inst.pool.line})", inst.proc.returncode,
                                    _tail(inst.log_path))
            if time.monotonic() > deadline:
                raise ProcessFailed(f"NF {inst.id} (not ready after {READY_TIMEOUT:.0f}s; pool "
                                    f"{inst.tenant.name}/{inst.pool.name} at {self.topo.source}:{inst.pool.line})",
                                    None, _tail(inst.log_path))
            time.sleep(0.05)

    def remove_instance(self, inst: Instance) -> None:
        """Delete a stopped instance's host, links and fabric port."""
        if inst.alive():
            inst.proc.kill()
        inst.proc.wait()
        sw_intf = self.fabric.port_name(inst.member)
        if inst.member.port in self.fabric.intfs:
            self.fabric.detach(self.fabric.intfs[inst.member.port])
        for intf in list(inst.node.intfList()):
            link = getattr(intf, "link", None)
            if link is not None:
                if link in self.net.links:
                    self.net.links.remove(link)
                link.delete()
        inst.node.terminate()
        if inst.node.shell is not None:
            inst.node.shell.wait()
        self.net.hosts.remove(inst.node)
        del self.net.nameToNode[inst.node.name]
        if Path(f"/sys/class/net/{sw_intf}").exists():
            subprocess.run(["ip", "link", "del", sw_intf], capture_output=True)
        self._leave_management(inst.mgmt_ip)
        del self.instances[inst.id]
        if self._standby_of.get(inst.key) is inst:
            del self._standby_of[inst.key]

    # -- looking at it -----------------------------------------------------------------

    def host(self, name: str) -> Any:
        """The Mininet node of a tenant host."""
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r}; hosts: {', '.join(self.hosts)}") from None

    def trunk_uplink(self, trunk: str) -> str:
        """The root-namespace interface of a trunk switch's uplink (the trunk's fabric port peer)."""
        return f"{self.trunks[trunk].name}-up"

    def pool_instances(self, tenant: str, pool: str) -> list[Instance]:
        """The instances of one pool (alive or not), oldest first."""
        return [i for i in self.instances.values() if i.tenant.name == tenant and i.pool.name == pool]

    def settled_counters(self, timeout: float = 3.0) -> dict[str, dict[str, Any]]:
        """Counters of every live instance, each written after this call (so nothing older).

        Returns:
            ``{instance id: counters}``; a dead instance's last counters are included as they are.
        """
        since = time.time()
        deadline = time.monotonic() + timeout
        while True:
            snap = {i.id: i.counters() for i in self.iter_instances()}
            stale = [iid for iid, c in snap.items()
                     if self.instances[iid].alive() and c.get("updated", 0) <= since]
            if not stale or time.monotonic() > deadline:
                return snap
            time.sleep(0.05)

    def iter_instances(self) -> Iterator[Instance]:
        return iter(list(self.instances.values()))


def _process_env() -> dict[str, str]:
    """Environment of the programs a lab starts: statelab importable, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _nf_env() -> dict[str, str]:
    """Environment of an unprivileged NF: :func:`_process_env` without whatever else root's
    environment holds (an NF can read its own)."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    return {k: v for k, v in _process_env().items() if k in keep or k.startswith("PYTHON")}


def derive_esp_key(key_hex: str, spi: int, salt: bytes) -> str:
    """This run's key of one SA: HKDF-SHA256 (RFC 5869) of the topology's key material (AES key
    and RFC 4106 salt), with the run's random ``salt``, bound to the SPI; as long as the input."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = bytes.fromhex(key_hex)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=len(material), salt=salt,
                info=b"statelab ESP SA key " + spi.to_bytes(4, "big"))
    return hkdf.derive(material).hex()


def esp_keys_for_run(kind: str, config: dict[str, Any], salt: bytes) -> dict[str, Any]:
    """An ipsec pool's config with this run's SA keys (unless ``keys: pinned``; see
    nfs/ipsec.py). Both gateways of a lab derive the same key for the same SA; a new lab run
    derives new ones, so sequence numbers restarting at 1 never repeat a nonce."""
    if kind != "ipsec" or config.get("keys", "per-run") == "pinned":
        return config
    out = dict(config)
    for sa in ("sa_out", "sa_in"):
        if isinstance(out.get(sa), dict) and "key" in out[sa] and "spi" in out[sa]:
            out[sa] = {**out[sa], "key": derive_esp_key(str(out[sa]["key"]), int(out[sa]["spi"]), salt)}
    return out


def pins_esp_keys(tenant: "specmod.Tenant") -> bool:
    """Whether a tenant has an ipsec pool with ``keys: pinned`` (its state must persist)."""
    return any(p.kind == "ipsec" and p.config.get("keys") == "pinned" for p in tenant.pools)


def slot_ranges(nodes: int) -> list[tuple[int, int]]:
    """The hash slots each of ``nodes`` cluster nodes holds: equal ranges, in order."""
    return [(j * CLUSTER_SLOTS // nodes, (j + 1) * CLUSTER_SLOTS // nodes - 1) for j in range(nodes)]


def sentinel_service(tenant: str) -> str:
    """The name the Sentinels know ``tenant``'s state primary by."""
    return f"tenant-{tenant}"


def tenant_acl(tenant: str, password: str, cluster: bool = False) -> str:
    """The ACL line of a tenant's user: its own keys, no channels, only :data:`TENANT_COMMANDS`
    (and on a cluster node :data:`CLUSTER_TENANT_COMMANDS`)."""
    return (f"user tenant-{tenant} on >{password} resetkeys ~t:{tenant}:* resetchannels -@all "
            + " ".join(f"+{c}" for c in TENANT_COMMANDS + (CLUSTER_TENANT_COMMANDS if cluster else ())))


def _write_private(path: Path, text: str, uid: Optional[int] = None) -> None:
    """Write ``path`` with mode 0600 from its first byte, owned by ``uid`` (default root)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if uid is not None:
        os.fchown(fd, uid, uid)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class _AdminByKey:
    """The lab's admin on every state server: a command whose first argument is a key
    ``t:{tenant}:...`` goes to that tenant's server (``lab.redis().get("t:blue:fw:x")``)."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab
        self._clients: dict[str, Any] = {}

    def __getattr__(self, command: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            key = args[0].decode() if args and isinstance(args[0], bytes) else args[0] if args else ""
            parts = key.split(":") if isinstance(key, str) else []
            if len(parts) < 3 or parts[0] != "t" or parts[1] not in self._lab.state_ports:
                raise LabError(f"lab.redis().{command}{args!r}: one state server per tenant, and this "
                               f"names no tenant's key; use lab.redis(server=TENANT)")
            if parts[1] not in self._clients or self._lab.sentinel_ports:  # the primary may have moved
                self._clients[parts[1]] = self._lab.redis(server=parts[1])
            return getattr(self._clients[parts[1]], command)(*args, **kwargs)
        return call


def gateway_of(network: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The virtual gateway address of a tenant subnet: its last usable address."""
    return network.broadcast_address - 1


def gateway_mac(tenant_id: int) -> str:
    """The MAC address tenant hosts use for their virtual gateway."""
    return f"02:00:{tenant_id >> 8:02x}:{tenant_id & 0xff:02x}:ff:fe"


def _plain(value: Any) -> Any:
    """A spec value (read-only mappings, tuples) as plain dicts and lists for YAML."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(log is empty)"
    except OSError:
        return f"(no log at {path})"


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
