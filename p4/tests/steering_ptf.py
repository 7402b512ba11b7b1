"""PTF tests of p4/steering.p4 on simple_switch_grpc, programmed by statelab's bmv2 driver.

Run by ``p4/tests/run_ptf.py`` (``make -C p4 ptf``), which makes the veths, starts the switch
and passes its addresses as test parameters. Each test programs the same steering plan afresh
(pipeline pushed again: empty tables, zero counters) through :class:`Bmv2Steering` over
statelab's P4Runtime client, then sends frames from PTF ports and checks where they come out,
pairing every positive check (``verify_packet``) with the negative one
(``verify_no_other_packets``), and the drop counters by reason.

Ports: 1 a1, 2 a2, 3 b1, 4 trunk (a3 on VLAN 10, b2 on VLAN 20), 5 unknown, 6 c1 (a tenant
without paths), 11 fw-1, 12 fw-2, 13 nat-1, 14 fw-3 (a member added during a test), and 15,
a port added to the running switch by one test.
"""

from __future__ import annotations

import itertools
import struct
import subprocess
import zlib
from dataclasses import dataclass
from typing import Optional

import ptf
from ptf import testutils as tu
from ptf.base_tests import BaseTest
from scapy.layers.inet import IP, TCP, UDP, ICMP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from statelab.fabric import HostPort, Member, ServicePath, SteeringPlan, spi_of
from statelab.fabric.bmv2 import FABRIC_MAC, Bmv2Steering, runtime_cli
from statelab.fabric.buckets import N_BUCKETS
from statelab.fabric.p4rt import P4RuntimeClient

if "vlan" in HostPort.__dataclass_fields__:
    TrunkPort = HostPort
else:  # until the plan carries HostPort.vlan
    @dataclass(frozen=True)
    class TrunkPort(HostPort):
        vlan: Optional[int] = None

A, B, C = 1, 2, 3
GW_MAC = "02:00:00:00:ff:fe"
PAYLOAD = b"statelab-ptf-" + bytes(range(40))
ELECTION_IDS = itertools.count(10)


def host(tenant: int, port: int, n: int, ip: str, direction: int, vlan: Optional[int] = None) -> HostPort:
    return TrunkPort(tenant, port, f"02:00:00:{tenant:02x}:00:{n:02x}", spi_of(tenant, direction), ip,
                     vlan=vlan)


A1 = host(A, 1, 1, "10.0.0.1", 0)
A2 = host(A, 2, 2, "10.0.0.2", 1)
A3 = host(A, 4, 3, "10.0.0.3", 0, vlan=10)
B1 = host(B, 3, 1, "10.0.0.1", 0)            # same address as a1, other tenant
B2 = host(B, 4, 2, "10.0.0.2", 1, vlan=20)   # same address as a2, on the trunk
C1 = host(C, 6, 1, "10.0.9.1", 0)


def nf(name: str, port: int) -> Member:
    return Member(name, port, f"02:4e:46:00:00:{port:02x}")


FW1, FW2, NAT1, FW3, NAT2 = nf("a-fw-1", 11), nf("a-fw-2", 12), nf("a-nat-1", 13), nf("a-fw-3", 14), nf("a-nat-2", 15)
FW, NAT = (A, "fw"), (A, "nat")
SPI_A_OUT, SPI_A_IN, SPI_B_OUT = spi_of(A, 0), spi_of(A, 1), spi_of(B, 0)


def plan() -> SteeringPlan:
    paths = (ServicePath(A, SPI_A_OUT, ("fw", "nat")), ServicePath(A, SPI_A_IN, ("nat", "fw")),
             ServicePath(B, SPI_B_OUT, ()), ServicePath(B, spi_of(B, 1), ()))
    fields = SteeringPlan.__dataclass_fields__
    kwargs = {"host_ports": (A1, A2, A3, B1, B2, C1), "paths": paths,
              "members": {FW: (FW1, FW2), NAT: (NAT1,)}}
    if "groups" in fields:
        kwargs["groups"] = {}   # OVS only
    return SteeringPlan(**kwargs)


# -- frames ------------------------------------------------------------------------------


def udp(src: HostPort, dst_ip: str, sport: int = 4000, dport: int = 5000, dst_mac: str = GW_MAC):
    return Ether(src=src.mac, dst=dst_mac) / IP(src=src.ip, dst=dst_ip, ttl=64) / UDP(sport=sport, dport=dport) / Raw(PAYLOAD)


def tagged(frame, vlan: int):
    """The same frame with an 802.1Q tag."""
    eth = frame[Ether]
    return Ether(src=eth.src, dst=eth.dst) / Dot1Q(vlan=vlan, type=eth.type) / eth.payload.copy()


def with_dst_mac(frame, mac: str):
    f = frame.copy()
    f[Ether].dst = mac
    return f


def nsh(inner, spi: int, si: int, c1: int, dst: str, src: str = FABRIC_MAC, md_type: int = 1,
        length: int = 6, next_proto: int = 3, ttl: int = 63):
    """An NSH MD-type-1 frame as RFC 8300 lays it out (built by hand, not by the code under test)."""
    base = struct.pack("!BBBB", (ttl >> 2) & 0x0F, ((ttl & 3) << 6) | length, md_type, next_proto)
    header = base + struct.pack("!I", spi << 8 | si) + struct.pack("!IIII", c1, 0, 0, 0)
    return Ether(dst=dst, src=src, type=0x894F) / Raw(header + bytes(inner))


def returned(inner, member: Member, spi: int, si: int, c1: int = A):
    """What an NF sends back: outer MACs swapped, index decremented by the NF."""
    return nsh(inner, spi, si, c1, dst=FABRIC_MAC, src=member.mac)


def bucket_of(frame) -> int:
    """The bucket bmv2 hashes a frame to: CRC-32 of src, dst, proto, sport, dport, mod 256."""
    ip = frame[IP]
    sport = dport = 0
    if TCP in frame or UDP in frame:
        l4 = frame[TCP] if TCP in frame else frame[UDP]
        sport, dport = l4.sport, l4.dport
    data = struct.pack("!4s4sBHH", bytes(map(int, ip.src.split("."))), bytes(map(int, ip.dst.split("."))),
                       ip.proto, sport, dport)
    return zlib.crc32(data) % N_BUCKETS


# -- the base test -----------------------------------------------------------------------


class SteeringTest(BaseTest):
    """Programs the plan on a fresh pipeline before each test."""

    def setUp(self) -> None:
        BaseTest.setUp(self)
        self.dataplane = ptf.dataplane_instance
        self.params = tu.test_params_get()
        # above the driver's own connection (election id 1) that started the switch
        self.client = P4RuntimeClient(self.params["grpc"], int(self.params["device_id"]),
                                      election_id=next(ELECTION_IDS))
        self.client.connect()
        self.steering = Bmv2Steering.over(self.client, name="PTF switch")
        self.steering.program(plan())
        self.dataplane.flush()

    def tearDown(self) -> None:
        self.client.close()
        BaseTest.tearDown(self)

    def owner(self, key, frame) -> Member:
        member = self.steering.buckets(key)[bucket_of(frame)]
        assert member is not None, f"bucket {bucket_of(frame)} of {key} has no member"
        return member

    def send_expect(self, port: int, frame, expected, out_port: int) -> None:
        tu.send_packet(self, port, frame)
        tu.verify_packet(self, expected, out_port)
        tu.verify_no_other_packets(self)

    def send_dropped(self, port: int, frame) -> None:
        tu.send_packet(self, port, frame)
        tu.verify_no_other_packets(self)

    def assert_drops(self, before: dict[str, int], **expected: int) -> None:
        after = self.steering.drops()
        delta = {r: after[r] - before[r] for r in after if after[r] != before[r]}
        self.assertEqual(delta, expected)


# -- classification and the chain -------------------------------------------------------


class HostIpv4StartsItsPath(SteeringTest):
    """IPv4 from an access port enters its tenant's chain at SI 255, NSH toward a member."""

    def runTest(self) -> None:
        frame = udp(A1, A2.ip)
        member = self.owner(FW, frame)
        self.send_expect(A1.port, frame, nsh(frame, SPI_A_OUT, 255, A, member.mac), member.port)
        self.assertEqual(self.steering.classified(A), 1)
        self.assertEqual(self.steering.sent_to(member), 1)
        self.assertEqual(self.steering.dropped(), 0)


class ChainWalksToDelivery(SteeringTest):
    """fw returns SI 254 -> NSH to nat at 254 -> nat returns 253 -> NSH removed, delivered by
    destination address with the host's MAC; the inbound chain (nat, fw) back to a1 too."""

    def runTest(self) -> None:
        frame = udp(A1, A2.ip)
        fw = self.owner(FW, frame)
        self.send_expect(fw.port, returned(frame, fw, SPI_A_OUT, 254),
                         nsh(frame, SPI_A_OUT, 254, A, NAT1.mac), NAT1.port)
        self.send_expect(NAT1.port, returned(frame, NAT1, SPI_A_OUT, 253),
                         with_dst_mac(frame, A2.mac), A2.port)

        back = udp(A2, A1.ip, sport=5000, dport=4000)
        self.send_expect(A2.port, back, nsh(back, SPI_A_IN, 255, A, NAT1.mac), NAT1.port)
        fw = self.owner(FW, back)
        self.send_expect(NAT1.port, returned(back, NAT1, SPI_A_IN, 254),
                         nsh(back, SPI_A_IN, 254, A, fw.mac), fw.port)
        # a1 and b1 share 10.0.0.1: delivery stays in tenant A (port 1, never port 3)
        self.send_expect(fw.port, returned(back, fw, SPI_A_IN, 253), with_dst_mac(back, A1.mac), A1.port)
        self.assertEqual(self.steering.dropped(), 0)


class OverlappingTenantsStayApart(SteeringTest):
    """Tenant B uses tenant A's addresses; its frames reach only B's hosts (B has no chain)."""

    def runTest(self) -> None:
        to_b2 = udp(B1, B2.ip)
        expected = tagged(with_dst_mac(to_b2, B2.mac), 20)   # b2 sits on the trunk, VLAN 20
        self.send_expect(B1.port, to_b2, expected, 4)
        to_b1 = udp(B2, B1.ip)
        self.send_expect(4, tagged(to_b1, 20), with_dst_mac(to_b1, B1.mac), B1.port)
        self.assertEqual(self.steering.classified(B), 2)
        self.assertEqual(self.steering.classified(A), 0)


# -- VLAN trunks -------------------------------------------------------------------------


class TrunkClassifiesByVlan(SteeringTest):
    """On a trunk the VLAN picks the tenant (tag removed before the chain); untagged and
    foreign-tagged frames are dropped and counted; so is a tagged frame on an access port."""

    def runTest(self) -> None:
        frame = udp(A3, A1.ip)
        member = self.owner(FW, frame)
        self.send_expect(4, tagged(frame, 10), nsh(frame, SPI_A_OUT, 255, A, member.mac), member.port)
        before = self.steering.drops()
        self.send_dropped(4, frame)                  # untagged on the trunk
        self.send_dropped(4, tagged(frame, 99))      # nobody's VLAN
        self.send_dropped(A1.port, tagged(udp(A1, A2.ip), 10))  # tag on an access port
        self.assert_drops(before, unclassified=3)
        self.assertEqual(self.steering.classified(A), 1)


class UnknownPortDropped(SteeringTest):
    """A port that is in no plan: dropped and counted, whatever it sends."""

    def runTest(self) -> None:
        before = self.steering.drops()
        self.send_dropped(5, udp(A1, A2.ip))
        self.send_dropped(5, nsh(udp(A1, A2.ip), SPI_A_OUT, 254, A, FABRIC_MAC))
        self.assert_drops(before, unclassified=2)
        self.assertEqual(self.steering.dropped(), 2)


# -- forged NSH --------------------------------------------------------------------------


class ForgedNshDropped(SteeringTest):
    """From an NF port only the exact (port, spi, si, C1) of its pool's positions pass."""

    def runTest(self) -> None:
        frame = udp(A1, A2.ip)
        before = self.steering.drops()
        forged = [
            returned(frame, FW1, SPI_B_OUT, 254),          # another tenant's path
            returned(frame, FW1, SPI_A_OUT, 255),          # index not decremented
            returned(frame, FW1, SPI_A_OUT, 253),          # skips nat
            returned(frame, FW1, SPI_A_OUT, 254, c1=B),    # C1 of another tenant
        ]
        for f in forged:
            self.send_dropped(FW1.port, f)
        self.send_dropped(NAT1.port, returned(frame, NAT1, SPI_A_OUT, 254))   # fw's combination, nat's port
        self.send_dropped(FW1.port, nsh(frame, SPI_A_OUT, 254, A, FABRIC_MAC, md_type=2, length=2))
        self.send_dropped(FW1.port, frame)                                      # no NSH on an NF port
        self.send_dropped(A1.port, returned(frame, FW1, SPI_A_OUT, 254))      # NSH from a host
        self.send_dropped(4, tagged(returned(frame, FW1, SPI_A_OUT, 254), 10))  # ... on the trunk
        self.assert_drops(before, forged=6, unclassified=1, nsh_from_host=2)
        self.assertEqual(self.steering.dropped(), 9)
        # the genuine one still passes
        self.send_expect(FW1.port, returned(frame, FW1, SPI_A_OUT, 254),
                         nsh(frame, SPI_A_OUT, 254, A, NAT1.mac), NAT1.port)


# -- delivery within the tenant ----------------------------------------------------------


class NonIpDeliveredWithinTenant(SteeringTest):
    """ARP and broadcast skip the chain: broadcast to the tenant's other ports (a trunk copy
    tagged with the tenant's VLAN), ARP unicast by MAC; other unicast is dropped."""

    def runTest(self) -> None:
        who_has = Ether(src=A1.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A1.mac, psrc=A1.ip, pdst=A2.ip)
        tu.send_packet(self, A1.port, who_has)
        tu.verify_packet(self, who_has, A2.port)
        tu.verify_packet(self, tagged(who_has, 10), 4)
        tu.verify_no_other_packets(self)

        is_at = Ether(src=A2.mac, dst=A1.mac) / ARP(op=2, hwsrc=A2.mac, psrc=A2.ip, hwdst=A1.mac, pdst=A1.ip)
        self.send_expect(A2.port, is_at, is_at, A1.port)

        b_bcast = Ether(src=B2.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=B2.mac, psrc=B2.ip, pdst=B1.ip)
        # from the trunk on VLAN 20: only b1; not back to the trunk, not to tenant A
        self.send_expect(4, tagged(b_bcast, 20), b_bcast, B1.port)

        before = self.steering.drops()
        self.send_dropped(A1.port, Ether(src=A1.mac, dst=A2.mac, type=0x88B5) / Raw(PAYLOAD))
        self.send_dropped(B1.port, udp(B1, "10.0.0.9"))   # no host of B has that address
        self.assert_drops(before, undeliverable=2)
        self.assertEqual(self.steering.dropped(), 0)      # not a steering violation


class OutOfPathDropped(SteeringTest):
    """IPv4 of a tenant that has no service path is dropped as out of path."""

    def runTest(self) -> None:
        before = self.steering.drops()
        self.send_dropped(C1.port, udp(C1, "10.0.9.2"))
        self.assert_drops(before, out_of_path=1)
        self.assertEqual(self.steering.classified(C), 1)


# -- instance selection ------------------------------------------------------------------


def flows(n: int = 240):
    out = []
    for i in range(n):
        if i % 8 == 7:
            out.append(Ether(src=A1.mac, dst=GW_MAC) / IP(src=A1.ip, dst=f"192.0.2.{i % 250 + 1}")
                       / ICMP(id=i) / Raw(PAYLOAD))
        elif i % 2:
            out.append(Ether(src=A1.mac, dst=GW_MAC) / IP(src=A1.ip, dst=A2.ip)
                       / TCP(sport=10000 + i, dport=443, flags="S") / Raw(PAYLOAD))
        else:
            out.append(udp(A1, A2.ip, sport=20000 + i, dport=53))
    return out


class BucketSelection(SteeringTest):
    """Flows follow the bucket table (hash of the inner 5-tuple); 2 -> 3 members moves about a
    third of them, all to the new member; removing it moves exactly those back; its returns are
    accepted until it is forgotten."""

    def where(self, frames) -> list[int]:
        ports = []
        for frame in frames:
            member = self.owner(FW, frame)
            tu.send_packet(self, A1.port, frame)
            tu.verify_packet(self, nsh(frame, SPI_A_OUT, 255, A, member.mac), member.port)
            ports.append(member.port)
        tu.verify_no_other_packets(self)
        return ports

    def runTest(self) -> None:
        frames = flows()
        two = self.where(frames)
        share = two.count(FW1.port) / len(two)
        self.assertTrue(0.3 < share < 0.7, f"fw-1 took {share:.0%} of flows")

        self.steering.add_member(FW, FW3)
        three = self.where(frames)
        moved = [i for i, (a, b) in enumerate(zip(two, three)) if a != b]
        self.assertTrue(all(three[i] == FW3.port for i in moved), "a flow moved between old members")
        self.assertTrue(0.2 <= len(moved) / len(frames) <= 0.47, f"{len(moved)} of {len(frames)} flows moved")
        # what fw-3 sends back goes on to nat
        f = frames[moved[0]]
        self.send_expect(FW3.port, returned(f, FW3, SPI_A_OUT, 254), nsh(f, SPI_A_OUT, 254, A, NAT1.mac), NAT1.port)

        self.steering.remove_member(FW, FW3)
        self.assertEqual(self.where(frames), two)
        self.send_expect(FW3.port, returned(f, FW3, SPI_A_OUT, 254), nsh(f, SPI_A_OUT, 254, A, NAT1.mac), NAT1.port)
        self.steering.forget_member(FW, FW3)
        before = self.steering.drops()
        self.send_dropped(FW3.port, returned(f, FW3, SPI_A_OUT, 254))
        self.assert_drops(before, unclassified=1)   # its port is nobody's now
        self.assertEqual(self.steering.sent_to(FW3), len(moved))


class EmptyPoolDrops(SteeringTest):
    """A pool without members drops (counted as no_member) until a member comes back."""

    def runTest(self) -> None:
        frame = udp(A1, A2.ip)
        self.steering.remove_member(FW, FW1)
        self.steering.remove_member(FW, FW2)
        before = self.steering.drops()
        self.send_dropped(A1.port, frame)
        self.assert_drops(before, no_member=1)
        self.steering.add_member(FW, FW2)
        self.send_expect(A1.port, frame, nsh(frame, SPI_A_OUT, 255, A, FW2.mac), FW2.port)


# -- a port added to the running switch ---------------------------------------------------


class PortAddedAtRunTime(SteeringTest):
    """A veth added with bmv2's runtime port_add carries a new member's traffic at once."""

    def runTest(self) -> None:
        if self.params["thrift"] is None:
            self.skipTest("this simple_switch_grpc has no Thrift runtime (built without --with-thrift) "
                          "or simple_switch_CLI is missing: bmv2 cannot add ports while it runs")
        tag = self.params["tag"]
        sw_if, ptf_if = f"p4s{tag}-15", f"p4t{tag}-15"
        subprocess.run(["ip", "link", "add", sw_if, "type", "veth", "peer", "name", ptf_if], check=True)
        listening = False
        try:
            for name in (sw_if, ptf_if):
                subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True)
                subprocess.run(["ip", "link", "set", name, "up"], check=True)
            runtime_cli(int(self.params["thrift"]), f"port_add {sw_if} 15", "adding port 15")
            self.dataplane.port_add(ptf_if, 0, 15)
            listening = True
            self.steering.add_member(NAT, NAT2)
            frame = next(f for f in flows() if self.owner(NAT, f) == NAT2)   # a flow nat-2 wins
            fw = self.owner(FW, frame)
            self.send_expect(fw.port, returned(frame, fw, SPI_A_OUT, 254),
                             nsh(frame, SPI_A_OUT, 254, A, NAT2.mac), 15)
            self.send_expect(15, returned(frame, NAT2, SPI_A_OUT, 253), with_dst_mac(frame, A2.mac), A2.port)
            self.steering.forget_member(NAT, NAT2)  # the port stays, as the driver leaves it (detach)
        finally:
            if listening:
                self.dataplane.port_remove(0, 15)
            subprocess.run(["ip", "link", "del", sw_if], capture_output=True)
