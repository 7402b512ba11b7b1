"""A topology spec becomes a running Mininet lab, and is always torn down again.

``with Lab(spec) as lab:`` builds, in order: the fabric switch, the tenant hosts, the
management network (a Linux bridge joining the root namespace, the state server host and every
NF host), the state server (a real ``redis-server`` with one ACL user per tenant), the NF pools,
and finally the steering plan on the fabric. Leaving the block, by return, exception or Ctrl-C,
tears all of it down. Everything created is written to a :class:`~statelab.record.Record` as it
is created, so teardown ends exactly that by PID and name, even from another process
(``statelab clean``) when the lab's owner died.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import os
import secrets
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

# binary -> Debian/Ubuntu package that provides it
REQUIRED = {"mnexec": "mininet", "ip": "iproute2", "ethtool": "ethtool", "ifconfig": "net-tools",
            "redis-server": "redis-server"}

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
                 run_root: Path = RUN_ROOT) -> None:
        self.topo = topology
        self.progress = progress
        self.tag = lab_tag(topology.name)
        self.run_dir = run_root / topology.name
        self.record: Optional[Record] = None
        self.net: Any = None
        self.fabric: Any = None
        self.hosts: dict[str, Any] = {}
        self.instances: dict[str, Instance] = {}
        self.plan: Optional[SteeringPlan] = None
        self.state_node: Any = None
        self.state_ip = ""
        self.mgmt = topology.management
        self.passwords: dict[str, str] = {}
        self._next_port = NF_PORT_BASE
        self._next_mgmt = 10
        self._next_index: dict[PoolKey, int] = {}
        self._mgmt_links = 0
        self._stopped = False
        from statelab.control import Controller
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
        self._ensure_ovs()
        self._check_management_subnet()
        self.progress(f"building lab {self.topo.name!r} ({len(self.topo.tenants)} tenants)")
        self.net = Mininet(topo=None, controller=None, build=False, autoSetMacs=False)
        fabric_cls = fabric_class(self.topo.fabric_kind)
        self.fabric = self.net.addSwitch(f"s{self.tag}", cls=fabric_cls, dpid=f"{int(self.tag, 16):016x}")
        self.record.ovs_bridges.append(self.fabric.name)
        self.record.add_process(self.fabric.pid, f"mininet shell of switch {self.fabric.name}")
        host_ports = self._add_hosts()
        self._add_management_bridge()
        self._start_state_server()
        for tenant in self.topo.tenants:
            for pool in tenant.pools:
                for _ in range(pool.instances):
                    self._add_instance(tenant, pool, attach=False)
        self.progress("starting the fabric")
        for tenant in self.topo.tenants:
            for h in tenant.hosts:
                node = self.hosts[h.name]
                node.configDefault()
                self._default_route(node, tenant, h)
        self.net.built = True  # nodes and links are built above; Mininet only starts the switch
        self.net.start()
        self.plan = self._plan(host_ports)
        self.fabric.program(self.plan)
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
                if self.record.ovs_started:
                    from statelab.fabric.ovs import stop_ovs
                    stop_ovs()
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

    def _ensure_ovs(self) -> None:
        if self.topo.fabric_kind != "ovs":
            return
        from statelab.fabric.ovs import ovs_running, start_ovs
        if not ovs_running():
            self.progress("starting Open vSwitch")
            start_ovs()
            self.record.ovs_started = True
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
        sw_intf = f"s{self.tag}-p{port}"
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
        ports = []
        port = 1
        for tenant in self.topo.tenants:
            for i, h in enumerate(tenant.hosts, 1):
                mac = h.mac or f"02:00:{tenant.id >> 8:02x}:{tenant.id & 0xff:02x}:00:{i:02x}"
                node = self._add_node(h.name, ip=str(h.ip), mac=mac)
                self._link(node, port, mac)
                self.hosts[h.name] = node
                ports.append(HostPort(tenant.id, port, mac, spi_of(tenant.id, DIRECTIONS[
                    "outbound" if h.zone == "inside" else "inbound"]), str(h.ip.ip)))
                port += 1
        return ports

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
        paths, groups = [], {}
        for tenant in self.topo.tenants:
            for pool in tenant.pools:
                groups[(tenant.id, pool.name)] = len(groups) + 1
            for direction, d in DIRECTIONS.items():
                paths.append(ServicePath(tenant.id, spi_of(tenant.id, d), tuple(getattr(tenant, direction))))
        members: dict[PoolKey, list[Member]] = {}
        for inst in self.instances.values():
            members.setdefault(inst.key, []).append(inst.member)
        return SteeringPlan(tuple(host_ports), tuple(paths), groups, members)

    # -- management network and state server --------------------------------------------

    def _mgmt_ip(self, index: int) -> str:
        return str(self.mgmt.network_address + index)

    def _add_management_bridge(self) -> None:
        br = f"m{self.tag}"
        self.record.linux_bridges.append(br)
        self.record.save()
        for cmd in (["ip", "link", "add", br, "type", "bridge"],
                    ["ip", "addr", "add", f"{self._mgmt_ip(1)}/{self.mgmt.prefixlen}", "dev", br],
                    ["ip", "link", "set", br, "up"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"management bridge {br}: `{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{br}.disable_ipv6=1"], capture_output=True)

    def _join_management(self, node: Any, ip: str) -> None:
        self._mgmt_links += 1
        root_if = f"m{self.tag}-{self._mgmt_links}"
        self.record.add_interface(root_if)
        cmds = [["ip", "link", "add", root_if, "type", "veth", "peer", "name", MGMT_IF, "netns", str(node.pid)],
                ["ip", "link", "set", root_if, "master", f"m{self.tag}", "up"]]
        for cmd in cmds:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"management link of {node.name}: {proc.stderr.strip()}")
        self._tune_root_intf(root_if)
        node.cmd(f"ip addr add {ip}/{self.mgmt.prefixlen} dev {MGMT_IF} && "
                 f"ip link set {MGMT_IF} up && ip link set lo up")

    def _start_state_server(self) -> None:
        self.progress("starting the state server (redis-server)")
        self.state_node = self._add_node(STATE_NODE, ip=None)
        self.state_ip = self._mgmt_ip(2)
        self._join_management(self.state_node, self.state_ip)
        self.passwords = {"admin": secrets.token_hex(16)}
        users = [f"user admin on >{self.passwords['admin']} ~* &* +@all"]
        for tenant in self.topo.tenants:
            pw = self.passwords[tenant.name] = secrets.token_hex(16)
            users.append(f"user tenant-{tenant.name} on >{pw} resetkeys ~t:{tenant.name}:* "
                         f"resetchannels +@all -@admin -@dangerous -scan -randomkey")
        conf = self.run_dir / "redis.conf"
        conf.write_text("\n".join([
            f"bind {self.state_ip}", f"port {self.topo.state_port}", "protected-mode yes",
            'save ""', "appendonly no", "daemonize no", f"dir {self.run_dir}",
            "user default off", *users, ""]))
        conf.chmod(0o600)
        log = self.run_dir / "redis.log"
        proc = self._popen(self.state_node, ["redis-server", str(conf)], log, "redis-server")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise ProcessFailed(f"redis-server on host {STATE_NODE}", proc.returncode, _tail(log))
            try:
                if self.redis().ping():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ProcessFailed(f"redis-server on host {STATE_NODE} (not answering after "
                                    f"{READY_TIMEOUT:.0f}s)", None, _tail(log))
            time.sleep(0.05)

    def state_url(self, tenant: str) -> str:
        """Redis URL with ``tenant``'s own ACL credentials (its key prefix only)."""
        return f"redis://tenant-{tenant}:{self.passwords[tenant]}@{self.state_ip}:{self.topo.state_port}/0"

    def redis(self, tenant: Optional[str] = None):
        """A redis-py client: the admin user, or ``tenant``'s restricted user."""
        import redis
        if tenant is None:
            return redis.Redis(host=self.state_ip, port=self.topo.state_port, username="admin",
                               password=self.passwords["admin"], socket_timeout=2)
        return redis.Redis.from_url(self.state_url(tenant), socket_timeout=2)

    # -- processes ---------------------------------------------------------------------

    def _popen(self, node: Any, argv: list[str], log: Path, what: str) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = node.popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=_process_env(), cwd=str(self.run_dir))
        self.record.add_process(proc.pid, f"{what} on {node.name}")
        return proc

    def spawn(self, host: str, argv: list[str]) -> subprocess.Popen:
        """Start a program in a tenant host, tracked by PID like every lab process.

        Args:
            host: tenant host name.
            argv: the command; its stdout is a pipe, stderr goes to the host's log.

        Returns:
            The process (``.stdout`` readable as text).
        """
        node = self.host(host)
        with open(self.run_dir / f"{host}.log", "ab") as err:
            proc = node.popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                              env=_process_env(), cwd=str(self.run_dir), text=True)
        self.record.add_process(proc.pid, f"{argv[0]} on {host}")
        return proc

    # -- NF instances ------------------------------------------------------------------

    def _add_instance(self, tenant: "specmod.Tenant", pool: "specmod.Pool", attach: bool) -> Instance:
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
        sw_intf = self._link(node, port, mac, NF_MTU)
        node.cmd(f"ip link set {DATA_IF} up")
        if attach:
            self.fabric.add_port(sw_intf, port)
        mgmt_ip = self._mgmt_ip(self._next_mgmt)
        self._next_mgmt += 1
        self._join_management(node, mgmt_ip)
        config = self.run_dir / f"{iid}.config.yaml"
        config.write_text(yaml.safe_dump({
            **_plain(pool.config),
            "statelab": {"tenant": tenant.name, "tenant_id": tenant.id, "pool": pool.name,
                         "chains": {"outbound": list(tenant.outbound), "inbound": list(tenant.inbound)}}}))
        counters = self.run_dir / f"{iid}.counters.json"
        log = self.run_dir / f"{iid}.log"
        command = list(pool.command) if pool.command else [sys.executable, "-m", f"nfs.{pool.kind}"]
        argv = command + ["--iface", DATA_IF, "--state", self.state_url(tenant.name), "--instance", iid,
                          "--config", str(config), "--counters", str(counters)]
        proc = self._popen(node, argv, log, f"NF {iid}")
        inst = Instance(iid, tenant, pool, node, Member(iid, port, mac), proc, counters, log, mgmt_ip)
        self.instances[iid] = inst
        return inst

    def wait_ready(self, inst: Instance) -> None:
        """Wait until an instance's runtime has opened its interface (its counters file exists).

        Raises:
            ProcessFailed: the process exited first, or did not get ready in time.
        """
        deadline = time.monotonic() + READY_TIMEOUT
        while not inst.counters():
            if inst.proc.poll() is not None:
                raise ProcessFailed(f"NF {inst.id} ({' '.join(inst.proc.args[3:6])} ...)",
                                    inst.proc.returncode, _tail(inst.log_path))
            if time.monotonic() > deadline:
                raise ProcessFailed(f"NF {inst.id} (not ready after {READY_TIMEOUT:.0f}s)", None,
                                    _tail(inst.log_path))
            time.sleep(0.05)

    def remove_instance(self, inst: Instance) -> None:
        """Delete a stopped instance's host, links and fabric port."""
        if inst.alive():
            inst.proc.kill()
        inst.proc.wait()
        sw_intf = f"s{self.tag}-p{inst.member.port}"
        self.fabric.del_port(sw_intf)
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
        del self.instances[inst.id]

    # -- looking at it -----------------------------------------------------------------

    def host(self, name: str) -> Any:
        """The Mininet node of a tenant host."""
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r}; hosts: {', '.join(self.hosts)}") from None

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
