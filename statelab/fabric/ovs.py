"""Open vSwitch fabric: the steering contract in OpenFlow 1.5 on the userspace datapath.

Tables (registers: reg0 tenant id, reg1 service path id, reg2 service index, reg3 NF port):

- 0  classify: a tenant host port sets tenant and path; an NF port with NSH goes to 20;
     anything else (unknown port, VLAN tag on an access port, NSH from a host) is dropped
     and counted.
- 10 chain entry: IPv4 starts the path at index 255; other frames (ARP, broadcast) are
     delivered within the tenant without a chain.
- 20 return from an NF: only the (port, spi, si, tenant) combinations the plan allows pass;
     forged or misplaced NSH is dropped. The outer Ethernet header is removed.
- 21 copy the returned service index to reg2 and remove NSH.
- 30 next hop: (path, index) picks the pool's select group, or delivery after the last hop.
- 40 delivery within the tenant: IPv4 by destination address (the destination MAC is set to
     that host's), ARP by destination MAC, broadcast and multicast flood the tenant's ports;
     anything else is dropped.
- 50 encapsulation toward the chosen instance (a group bucket sets reg3 and resubmits here,
     because OVS does not apply encap(nsh) written inside a bucket).

Each pool is a ``select`` group with ``selection_method=hash`` on the inner 5-tuple: OVS
scores buckets by highest random weight, so adding a member moves only its share of flows and
removing one moves only its flows. Each membership change is one OpenFlow bundle, so the
ordering contract holds trivially: a new member's return flows and its bucket appear together,
and its bucket goes (remove_member) before its return flows (forget_member).

An access port matches untagged frames only; a trunk port matches (port, VLAN id), pops the
tag on the way in and pushes it on delivery; untagged or foreign-tagged frames on it miss
table 0 and are dropped and counted.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from mininet.node import OVSSwitch

from statelab.errors import LabError
from statelab.fabric import FIRST_SI, Fabric, Member, PoolKey, SteeringPlan, openflow, register

OVS_CTL = Path("/usr/share/openvswitch/scripts/ovs-ctl")
OFCTL = ("ovs-ofctl", "-O", "OpenFlow15")
FABRIC_MAC = "02:5e:00:00:00:01"
MEMBER_COOKIE = 1 << 32
BUCKET_WEIGHT = 100  # every member the same (insert_bucket's default weight is 0: give it one)
HASH_FIELDS = "fields(nw_src,nw_dst,nw_proto,tcp_src,tcp_dst,udp_src,udp_dst)"
log = logging.getLogger("statelab.fabric.ovs")


def _run(args: Iterable[str], what: str, stdin: Optional[str] = None) -> str:
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{what} failed (exit code {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ovs_running() -> bool:
    """True if ovsdb-server and ovs-vswitchd answer."""
    return (subprocess.run(["ovs-vsctl", "-t", "2", "show"], capture_output=True).returncode == 0
            and subprocess.run(["ovs-appctl", "-t", "ovs-vswitchd", "version"],
                               capture_output=True).returncode == 0)


def start_ovs() -> None:
    """Start Open vSwitch's daemons (this kernel has no OVS module: userspace datapath only)."""
    if not OVS_CTL.exists():
        raise LabError(f"{OVS_CTL} not found: install openvswitch-switch")
    proc = subprocess.run([str(OVS_CTL), "start", "--system-id=random"], capture_output=True, text=True)
    if proc.returncode != 0 or not ovs_running():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise LabError(f"could not start Open vSwitch (ovs-ctl exit code {proc.returncode}):\n{tail}\n"
                       f"see /var/log/openvswitch/ovs-vswitchd.log")


def stop_ovs() -> None:
    """Stop the daemons that :func:`start_ovs` started (ovs-ctl ends them by their pidfiles)."""
    subprocess.run([str(OVS_CTL), "stop"], capture_output=True)


@register
class OvsFabric(Fabric, OVSSwitch):
    """The OVS driver: a Mininet OVSSwitch on the userspace datapath, programmed over OpenFlow 1.5.

    Args:
        name: the bridge name.
        **params: passed to :class:`mininet.node.OVSSwitch`.
    """

    kind = "ovs"
    package = "openvswitch-switch"
    binaries = ("ovs-vsctl", "ovs-ofctl", "ovs-vswitchd", "ovsdb-server")

    def __init__(self, name: str, **params) -> None:
        params.update(datapath="user", failMode="secure", protocols="OpenFlow15", inband=False)
        OVSSwitch.__init__(self, name, **params)
        self.plan: Optional[SteeringPlan] = None
        self._groups: dict[PoolKey, int] = {}          # pool -> OpenFlow group id
        self._members: dict[PoolKey, list[Member]] = {}  # pool -> its members now
        self._of: Optional[openflow.Connection] = None   # opened on the first removal
        self._prepared: set[int] = set()  # ports of standby members whose flows are in already

    def stop(self, *args: Any, **kwargs: Any) -> None:
        if self._of is not None:
            self._of.close()
        OVSSwitch.stop(self, *args, **kwargs)

    @classmethod
    def setup(cls) -> None:
        """Check the OVS programs (the lab starts the daemons in :meth:`prepare` if needed).

        Raises:
            MissingDependency: an OVS program is not installed.
        """
        Fabric.setup.__func__(cls)

    @classmethod
    def prepare(cls, record: Any, progress: Callable[[str], None]) -> None:
        """Start Open vSwitch's daemons if they are not running (and note it in the record)."""
        if not ovs_running():
            progress("starting Open vSwitch")
            start_ovs()
            record.ovs_started = True
            record.save()
        version = subprocess.run(["ovs-vsctl", "--version"], capture_output=True, text=True).stdout
        cls.OVSVersion = re.findall(r"\d+\.\d+", version)[0] if version else "3.1"

    @classmethod
    def release(cls, record: Any) -> None:
        """Stop the daemons if :meth:`prepare` started them for this lab."""
        if record.ovs_started:
            stop_ovs()

    def bind(self, record: Any, run_dir: Path) -> None:
        Fabric.bind(self, record, run_dir)
        record.ovs_bridges.append(self.name)
        record.save()

    # -- OpenFlow plumbing -------------------------------------------------------------

    def _bundle(self, lines: list[str], what: str) -> None:
        """Apply flow and group mods as one atomic OpenFlow bundle."""
        with tempfile.NamedTemporaryFile("w", suffix=".ofbundle", delete=False) as f:
            f.write("\n".join(lines) + "\n")
        try:
            _run([*OFCTL, "bundle", self.name, f.name], f"{what} on bridge {self.name}")
        finally:
            Path(f.name).unlink(missing_ok=True)

    def attach(self, intf: Any) -> None:
        """Add an interface linked while the switch runs, as the OpenFlow port Mininet gave it."""
        port = self.ports[intf]
        _run(["ovs-vsctl", "add-port", self.name, str(intf), "--", "set", "Interface", str(intf),
              f"ofport_request={port}"], f"adding {intf} to {self.name}")
        deadline = time.monotonic() + 5
        out = ""
        while time.monotonic() < deadline:
            out = _run(["ovs-vsctl", "get", "Interface", str(intf), "ofport"], "reading ofport").strip()
            if out == str(port):
                return
            time.sleep(0.05)
        raise LabError(f"{intf} did not become port {port} of {self.name} (ofport {out})")

    def detach(self, intf: Any) -> None:
        """Remove an interface's port (no error if it is already gone)."""
        subprocess.run(["ovs-vsctl", "--if-exists", "del-port", self.name, str(intf)], capture_output=True)

    # -- flows of the plan -------------------------------------------------------------

    @staticmethod
    def _bucket(member: Member) -> str:
        return (f"bucket=bucket_id:{member.port},weight:{BUCKET_WEIGHT},actions=set_field:{member.port}->reg3,"
                f"resubmit(,50)")

    def _member_flows(self, key: PoolKey, member: Member) -> list[str]:
        """Flows that exist for one member: its encapsulation and its allowed returns."""
        assert self.plan is not None
        cookie = f"cookie={MEMBER_COOKIE | member.port:#x}"
        tenant = key[0]
        flows = [f"flow add table=50,{cookie},priority=100,reg3={member.port},actions="
                 f"encap(nsh(md_type=1)),move:NXM_NX_REG1[0..23]->NXOXM_NSH_SPI[],"
                 f"move:NXM_NX_REG2[0..7]->NXOXM_NSH_SI[],move:NXM_NX_REG0[]->NXOXM_NSH_C1[],"
                 f"encap(ethernet),set_field:{member.mac}->eth_dst,"
                 f"set_field:{FABRIC_MAC}->eth_src,output:{member.port}",
                 f"flow add table=0,{cookie},priority=100,in_port={member.port},dl_type=0x894f,"
                 f"actions=goto_table:20"]
        for path, hop in self.plan.positions(key):
            flows.append(f"flow add table=20,{cookie},priority=100,in_port={member.port},"
                         f"dl_type=0x894f,nsh_mdtype=1,nsh_spi={path.spi},nsh_si={FIRST_SI - hop - 1},"
                         f"nsh_c1={tenant},actions=decap(),set_field:{tenant}->reg0,"
                         f"set_field:{path.spi}->reg1,goto_table:21")
        return flows

    @staticmethod
    def _out_port(port: int, vlan: Optional[int]) -> str:
        """Output to an access port, or to a trunk port tagged with ``vlan`` (tag removed after)."""
        if vlan is None:
            return f"output:{port}"
        return f"push_vlan:0x8100,set_field:{4096 | vlan}->vlan_vid,output:{port},pop_vlan"

    def _out(self, hp: Any) -> str:
        return self._out_port(hp.port, hp.vlan)

    def _base_flows(self, plan: SteeringPlan) -> list[str]:
        flows = ["flow add table=0,priority=0,actions=drop",
                 "flow add table=20,priority=0,actions=drop",
                 "flow add table=21,priority=100,packet_type=(1,0x894f),"
                 "actions=move:NXOXM_NSH_SI[]->NXM_NX_REG2[0..7],decap(),goto_table:30",
                 "flow add table=10,priority=100,ip,actions=set_field:255->reg2,goto_table:30",
                 "flow add table=10,priority=10,actions=goto_table:40"]
        for hp in plan.host_ports:
            flows.append(f"flow add table=0,priority=110,in_port={hp.port},dl_type=0x894f,actions=drop")
            if hp.vlan is None:
                match, pop = "vlan_tci=0x0000/0x1000", ""
            else:
                match, pop = f"dl_vlan={hp.vlan}", "pop_vlan,"
            flows.append(f"flow add table=0,priority=100,in_port={hp.port},{match},actions={pop}"
                         f"set_field:{hp.tenant}->reg0,set_field:{hp.spi}->reg1,goto_table:10")
            flows.append(f"flow add table=40,priority=100,reg0={hp.tenant},ip,nw_dst={hp.ip},"
                         f"actions=set_field:{hp.mac}->eth_dst,{self._out(hp)}")
            flows.append(f"flow add table=40,priority=50,reg0={hp.tenant},arp,dl_dst={hp.mac},"
                         f"actions={self._out(hp)}")
        for tenant in sorted({hp.tenant for hp in plan.host_ports}):
            ports = sorted({(hp.port, hp.vlan) for hp in plan.host_ports if hp.tenant == tenant},
                           key=lambda pv: (pv[1] is not None, pv))
            outs = ",".join(self._out_port(port, vlan) for port, vlan in ports)
            flows.append(f"flow add table=40,priority=40,reg0={tenant},"
                         f"dl_dst=01:00:00:00:00:00/01:00:00:00:00:00,actions={outs}")
        for path in plan.paths:
            for i, hop in enumerate(path.hops):
                group = self._groups[(path.tenant, hop)]
                flows.append(f"flow add table=30,priority=100,reg1={path.spi},reg2={FIRST_SI - i},"
                             f"actions=group:{group}")
            flows.append(f"flow add table=30,priority=100,reg1={path.spi},"
                         f"reg2={FIRST_SI - len(path.hops)},actions=goto_table:40")
        return flows

    # -- the Fabric interface ----------------------------------------------------------

    def group_of(self, key: PoolKey) -> int:
        """The OpenFlow group id of a pool."""
        return self._groups[key]

    def program(self, plan: SteeringPlan) -> None:
        self.plan = plan
        self._groups = {key: i + 1 for i, key in enumerate(plan.pools())}
        self._members = {key: list(plan.members.get(key, ())) for key in self._groups}
        lines = ["flow delete", "group delete group_id=all"]
        for key, group in self._groups.items():
            buckets = ",".join(self._bucket(m) for m in self._members[key])
            lines.append(f"group add group_id={group},type=select,selection_method=hash,"
                         f"{HASH_FIELDS}" + (f",{buckets}" if buckets else ""))
        lines += self._base_flows(plan)
        for key, members in self._members.items():
            for m in members:
                lines += self._member_flows(key, m)
        self._bundle(lines, "programming the steering plan")

    def prepare_member(self, key: PoolKey, member: Member) -> None:
        """Install a standby member's flows (its encapsulation, its returns): nothing reaches it
        until :meth:`add_member` gives it a bucket."""
        assert self.plan is not None, "program() first"
        self._bundle(self._member_flows(key, member), f"preparing {member.name}")
        self._prepared.add(member.port)

    def add_member(self, key: PoolKey, member: Member) -> None:
        """Flows first, then the bucket; for a prepared member only the bucket, over the kept-open
        OpenFlow connection (``ovs-ofctl`` as the fallback)."""
        assert self.plan is not None, "program() first"
        self._members[key].append(member)
        group, what = self._groups[key], f"adding {member.name} to its pool"
        if member.port in self._prepared:
            actions = openflow.set_reg(3, member.port) + openflow.resubmit(50)
            try:
                self._openflow().send(lambda xid: openflow.insert_bucket(xid, group, member.port, BUCKET_WEIGHT,
                                                                         actions), what)
                return
            except openflow.OpenFlowError as err:
                log.warning("%s over OpenFlow: %s; using ovs-ofctl", what, err)
            lines = []
        else:
            lines = self._member_flows(key, member)
        lines.append(f"group insert_bucket group_id={group},command_bucket_id=last,{self._bucket(member)}")
        self._bundle(lines, what)

    def remove_member(self, key: PoolKey, member: Member) -> None:
        """Take a member out of its pool's group: over the kept-open OpenFlow connection (a
        failover's whole cost is this call), with ``ovs-ofctl`` as the fallback."""
        assert self.plan is not None, "program() first"
        members = self._members.get(key, [])
        if member in members:
            members.remove(member)
            group, what = self._groups[key], f"removing {member.name} from its pool"
            try:
                self._openflow().send(lambda xid: openflow.remove_bucket(xid, group, member.port), what)
            except openflow.OpenFlowError as err:
                log.warning("%s over OpenFlow: %s; using ovs-ofctl", what, err)
                self._bundle([f"group remove_bucket group_id={group},command_bucket_id={member.port}"], what)

    def _openflow(self) -> "openflow.Connection":
        if self._of is None:
            self._of = openflow.Connection(self.name, Path(os.environ.get("OVS_RUNDIR", openflow.RUN_DIR)))
        return self._of

    def forget_member(self, key: PoolKey, member: Member) -> None:
        self._prepared.discard(member.port)
        self.remove_member(key, member)
        self._bundle([f"flow delete cookie={MEMBER_COOKIE | member.port:#x}/-1"],
                     f"removing the flows of {member.name}")

    def dropped(self) -> int:
        out = _run([*OFCTL, "dump-flows", self.name], "reading drop counters")
        return sum(int(tok.split("=")[1].rstrip(","))
                   for line in out.splitlines() if line.rstrip().endswith("actions=drop")
                   for tok in line.split() if tok.startswith("n_packets="))

    def dump(self) -> str:
        """Flows and groups with their counters, for a person reading a failure."""
        return (_run([*OFCTL, "dump-flows", self.name], "dump-flows")
                + _run([*OFCTL, "dump-groups", self.name], "dump-groups"))
