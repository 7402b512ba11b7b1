/*
 * statelab steering fabric for bmv2 (P4_16, v1model): the steering contract of
 * statelab/fabric/__init__.py, table for table the behaviour of the OVS driver
 * (statelab/fabric/ovs.py).
 *
 * Numbering shared with every driver: spi = tenant_id << 1 | direction (0 outbound,
 * 1 inbound); hop i of a path is sent with service index 255 - i and comes back with
 * 254 - i; index 255 - len(hops) means the chain is done. NSH C1 carries the tenant id.
 *
 * Tables, in the order a packet meets them:
 *   classify      (port, tagged?, VLAN id) -> host frame of a tenant, or "from an NF port".
 *                 An access port takes untagged frames only; a trunk port takes each tenant
 *                 on its VLAN (the tag is removed here). Miss: drop UNCLASSIFIED.
 *   nf_return     NSH from an NF port: only the exact (port, spi, si, C1) the plan allows;
 *                 NSH is removed. Miss: drop FORGED.
 *   next_hop      (spi, si) -> a pool, or delivery after the last hop. Miss: OUT_OF_PATH.
 *   bucket        (pool, hash of the inner 5-tuple mod 256) -> member port and MAC; NSH is
 *                 pushed toward it. The controller assigns buckets to members by highest
 *                 random weight (statelab/fabric/buckets.py). Miss (empty pool): NO_MEMBER.
 *   deliver       within the tenant, by priority as in OVS: IPv4 by destination address
 *                 (destination MAC set to the host's), ARP by destination MAC, broadcast and
 *                 multicast to the tenant's multicast group. Miss: drop UNDELIVERABLE.
 * Egress pushes the tenant's VLAN tag on delivery to a trunk, and drops a copy that would
 * go back where it came from (same port and VLAN), as OpenFlow's output does.
 *
 * Every ingress table's miss is an explicit, counted drop: a v1model packet that no action
 * sent anywhere would leave on port 0.
 */

#include <core.p4>
#include <v1model.p4>

const bit<16> ETHERTYPE_IPV4 = 0x0800;
const bit<16> ETHERTYPE_ARP  = 0x0806;
const bit<16> ETHERTYPE_VLAN = 0x8100;
const bit<16> ETHERTYPE_NSH  = 0x894F;
const bit<8>  IPPROTO_ICMP = 1;
const bit<8>  IPPROTO_TCP  = 6;
const bit<8>  IPPROTO_UDP  = 17;
const bit<4>  NSH_MD_TYPE_1 = 1;
const bit<6>  NSH_MD1_LEN = 6;         /* 4-byte words: base, service path, 4 context */
const bit<8>  NSH_NEXT_ETHERNET = 3;
const bit<6>  NSH_TTL = 63;
const bit<48> FABRIC_MAC = 0x025e00000001;
const bit<32> N_BUCKETS = 256;

/* Drop reasons: the index into the `drops` counter (statelab/fabric/bmv2.py reads them). */
const bit<32> DROP_UNCLASSIFIED  = 0;  /* unknown port/VLAN, tag on an access port, ... */
const bit<32> DROP_NSH_FROM_HOST = 1;
const bit<32> DROP_FORGED        = 2;  /* NSH from an NF port that the plan does not allow */
const bit<32> DROP_OUT_OF_PATH   = 3;  /* no next hop for (spi, si) */
const bit<32> DROP_NO_MEMBER     = 4;  /* the pool has no member */
const bit<32> DROP_UNDELIVERABLE = 5;  /* no host of the tenant has that address */
const bit<32> N_DROP_REASONS     = 8;

typedef bit<9> port_t;

header ethernet_t {
    bit<48> dst;
    bit<48> src;
    bit<16> ether_type;
}

header vlan_t {
    bit<3>  pcp;
    bit<1>  dei;
    bit<12> vid;
    bit<16> ether_type;
}

header nsh_base_t {
    bit<2> ver;
    bit<1> oam;
    bit<1> unused1;
    bit<6> ttl;
    bit<6> len;
    bit<4> unused2;
    bit<4> md_type;
    bit<8> next_proto;
}

header nsh_sp_t {
    bit<24> spi;
    bit<8>  si;
}

header nsh_md1_t {
    bit<32> c1;
    bit<32> c2;
    bit<32> c3;
    bit<32> c4;
}

header ipv4_t {
    bit<4>  version;
    bit<4>  ihl;
    bit<8>  diffserv;
    bit<16> total_len;
    bit<16> identification;
    bit<3>  flags;
    bit<13> frag_offset;
    bit<8>  ttl;
    bit<8>  protocol;
    bit<16> checksum;
    bit<32> src;
    bit<32> dst;
}

header l4_ports_t {    /* the first 4 bytes of TCP and UDP */
    bit<16> sport;
    bit<16> dport;
}

header icmp_t {
    bit<8>  type;
    bit<8>  code;
    bit<16> checksum;
}

struct headers_t {
    ethernet_t outer;     /* NSH frames only: the NF link's Ethernet header */
    nsh_base_t nsh_base;
    nsh_sp_t   nsh_sp;
    nsh_md1_t  nsh_md1;
    ethernet_t eth;       /* the tenant's frame (inner frame of NSH) */
    vlan_t     vlan;
    ipv4_t     ipv4;
    l4_ports_t tcp;
    l4_ports_t udp;
    icmp_t     icmp;
}

struct metadata_t {
    bit<32> tenant;
    bit<24> spi;
    bit<8>  si;
    bit<16> pool;
    bit<8>  bucket;
    bit<16> sport;
    bit<16> dport;
    bit<32> ip_dst;
    bit<1>  tagged;       /* the frame came in with an 802.1Q tag (not inside NSH) */
    bit<12> in_vid;       /* VLAN the frame came in on (0: untagged) */
    bit<12> out_vid;      /* VLAN to push on unicast delivery (0: none) */
    bit<1>  from_nf;
    bit<1>  delivering;
    bit<1>  flooding;
}

parser SteeringParser(packet_in packet, out headers_t hdr, inout metadata_t meta,
                      inout standard_metadata_t standard_metadata) {
    state start {
        transition select(packet.lookahead<bit<112>>()[15:0]) {   /* the first EtherType */
            ETHERTYPE_NSH: parse_outer;
            default: parse_eth;
        }
    }
    state parse_outer {
        packet.extract(hdr.outer);
        packet.extract(hdr.nsh_base);
        transition select(hdr.nsh_base.md_type, hdr.nsh_base.len) {
            (NSH_MD_TYPE_1, NSH_MD1_LEN): parse_nsh_md1;
            default: accept;      /* no service path header: dropped as forged */
        }
    }
    state parse_nsh_md1 {
        packet.extract(hdr.nsh_sp);
        packet.extract(hdr.nsh_md1);
        transition select(hdr.nsh_base.next_proto) {
            NSH_NEXT_ETHERNET: parse_eth;
            default: accept;      /* no inner Ethernet frame: dropped as forged */
        }
    }
    state parse_eth {
        packet.extract(hdr.eth);
        transition select(hdr.eth.ether_type) {
            ETHERTYPE_VLAN: parse_vlan;
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }
    state parse_vlan {
        packet.extract(hdr.vlan);
        transition select(hdr.vlan.ether_type) {
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;      /* a tagged NSH frame stops here: NSH from a host */
        }
    }
    state parse_ipv4 {
        packet.extract(hdr.ipv4);
        transition select(hdr.ipv4.ihl, hdr.ipv4.frag_offset, hdr.ipv4.protocol) {
            (5, 0, IPPROTO_TCP): parse_tcp;
            (5, 0, IPPROTO_UDP): parse_udp;
            (5, 0, IPPROTO_ICMP): parse_icmp;
            default: accept;      /* options or a later fragment: hashed with ports 0 */
        }
    }
    state parse_tcp {
        packet.extract(hdr.tcp);
        transition accept;
    }
    state parse_udp {
        packet.extract(hdr.udp);
        transition accept;
    }
    state parse_icmp {
        packet.extract(hdr.icmp);
        transition accept;
    }
}

control SteeringVerifyChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply { }
}

control SteeringIngress(inout headers_t hdr, inout metadata_t meta,
                        inout standard_metadata_t standard_metadata) {
    counter(4096, CounterType.packets_and_bytes) tenant_classified;
    counter(512, CounterType.packets_and_bytes) member_sent;
    counter(N_DROP_REASONS, CounterType.packets_and_bytes) drops;

    action drop(bit<32> reason) {
        drops.count(reason);
        mark_to_drop(standard_metadata);
        exit;
    }

    /* -- classify ------------------------------------------------------------------ */

    action host_frame(bit<32> tenant, bit<24> spi) {
        meta.tenant = tenant;
        meta.spi = spi;
        tenant_classified.count(tenant);
    }

    action nf_frame() {
        meta.from_nf = 1;
    }

    table classify {
        key = {
            standard_metadata.ingress_port : exact @name("port");
            meta.tagged                    : exact @name("tagged");
            meta.in_vid                    : exact @name("vid");
        }
        actions = { host_frame; nf_frame; drop; }
        default_action = drop(DROP_UNCLASSIFIED);
        size = 4096;
    }

    /* -- return from an NF ------------------------------------------------------------ */

    action accept_return(bit<32> tenant) {
        meta.tenant = tenant;
        meta.spi = hdr.nsh_sp.spi;
        meta.si = hdr.nsh_sp.si;
        hdr.outer.setInvalid();
        hdr.nsh_base.setInvalid();
        hdr.nsh_sp.setInvalid();
        hdr.nsh_md1.setInvalid();
    }

    table nf_return {
        key = {
            standard_metadata.ingress_port : exact @name("port");
            hdr.nsh_sp.spi                 : exact @name("spi");
            hdr.nsh_sp.si                  : exact @name("si");
            hdr.nsh_md1.c1                 : exact @name("c1");
        }
        actions = { accept_return; drop; }
        default_action = drop(DROP_FORGED);
        size = 16384;
    }

    /* -- next hop ------------------------------------------------------------------- */

    action to_pool(bit<16> pool) {
        meta.pool = pool;
    }

    action end_of_chain() {
        meta.delivering = 1;
    }

    table next_hop {
        key = {
            meta.spi : exact @name("spi");
            meta.si  : exact @name("si");
        }
        actions = { to_pool; end_of_chain; drop; }
        default_action = drop(DROP_OUT_OF_PATH);
        size = 4096;
    }

    /* -- instance selection and NSH encapsulation ----------------------------------- */

    action to_member(port_t port, bit<48> mac) {
        standard_metadata.egress_spec = port;
        member_sent.count((bit<32>) port);
        hdr.outer.setValid();
        hdr.outer.dst = mac;
        hdr.outer.src = FABRIC_MAC;
        hdr.outer.ether_type = ETHERTYPE_NSH;
        hdr.nsh_base.setValid();
        hdr.nsh_base.ver = 0;
        hdr.nsh_base.oam = 0;
        hdr.nsh_base.unused1 = 0;
        hdr.nsh_base.ttl = NSH_TTL;
        hdr.nsh_base.len = NSH_MD1_LEN;
        hdr.nsh_base.unused2 = 0;
        hdr.nsh_base.md_type = NSH_MD_TYPE_1;
        hdr.nsh_base.next_proto = NSH_NEXT_ETHERNET;
        hdr.nsh_sp.setValid();
        hdr.nsh_sp.spi = meta.spi;
        hdr.nsh_sp.si = meta.si;
        hdr.nsh_md1.setValid();
        hdr.nsh_md1.c1 = meta.tenant;
        hdr.nsh_md1.c2 = 0;
        hdr.nsh_md1.c3 = 0;
        hdr.nsh_md1.c4 = 0;
    }

    table bucket {
        key = {
            meta.pool   : exact @name("pool");
            meta.bucket : exact @name("bucket");
        }
        actions = { to_member; drop; }
        default_action = drop(DROP_NO_MEMBER);
        size = 65536;
    }

    /* -- delivery within the tenant ------------------------------------------------- */

    action to_host(port_t port, bit<48> mac, bit<12> vid) {
        standard_metadata.egress_spec = port;
        hdr.eth.dst = mac;
        meta.out_vid = vid;
    }

    action to_port(port_t port, bit<12> vid) {
        standard_metadata.egress_spec = port;
        meta.out_vid = vid;
    }

    action flood(bit<16> group) {
        standard_metadata.mcast_grp = group;
        meta.flooding = 1;
    }

    table deliver {
        key = {
            meta.tenant         : exact @name("tenant");
            hdr.eth.ether_type  : ternary @name("ether_type");
            hdr.eth.dst         : ternary @name("eth_dst");
            meta.ip_dst         : ternary @name("ip_dst");
        }
        actions = { to_host; to_port; flood; drop; }
        default_action = drop(DROP_UNDELIVERABLE);
        size = 16384;
    }

    apply {
        if (hdr.vlan.isValid() && !hdr.outer.isValid()) {
            meta.tagged = 1;
            meta.in_vid = hdr.vlan.vid;
        }
        classify.apply();
        if (meta.from_nf == 1) {
            if (!hdr.outer.isValid()) {
                drop(DROP_UNCLASSIFIED);       /* an NF port carries NSH only */
            }
            if (!hdr.nsh_sp.isValid() || !hdr.eth.isValid() || hdr.vlan.isValid()) {
                drop(DROP_FORGED);             /* not MD type 1 over Ethernet, or tagged */
            }
            nf_return.apply();
        } else {
            if (hdr.outer.isValid() || (hdr.vlan.isValid() && hdr.vlan.ether_type == ETHERTYPE_NSH)) {
                drop(DROP_NSH_FROM_HOST);
            }
            if (hdr.vlan.isValid()) {
                hdr.eth.ether_type = hdr.vlan.ether_type;
                hdr.vlan.setInvalid();
            }
            if (hdr.ipv4.isValid()) {
                meta.si = 255;                 /* IPv4 starts its tenant's path */
            } else {
                meta.delivering = 1;           /* ARP, broadcast: within the tenant, no chain */
            }
        }
        if (meta.delivering == 0) {
            next_hop.apply();
        }
        if (meta.delivering == 0) {
            if (hdr.tcp.isValid()) {
                meta.sport = hdr.tcp.sport;
                meta.dport = hdr.tcp.dport;
            } else if (hdr.udp.isValid()) {
                meta.sport = hdr.udp.sport;
                meta.dport = hdr.udp.dport;
            }
            hash(meta.bucket, HashAlgorithm.crc32, (bit<8>) 0,
                 { hdr.ipv4.src, hdr.ipv4.dst, hdr.ipv4.protocol, meta.sport, meta.dport },
                 N_BUCKETS);
            bucket.apply();
        } else {
            if (hdr.ipv4.isValid()) {
                meta.ip_dst = hdr.ipv4.dst;
            }
            hdr.outer.setInvalid();
            hdr.nsh_base.setInvalid();
            hdr.nsh_sp.setInvalid();
            hdr.nsh_md1.setInvalid();
            deliver.apply();
        }
    }
}

control SteeringEgress(inout headers_t hdr, inout metadata_t meta,
                       inout standard_metadata_t standard_metadata) {
    apply {
        if (meta.delivering == 1) {
            bit<12> vid = meta.out_vid;
            if (meta.flooding == 1) {
                vid = (bit<12>) standard_metadata.egress_rid;   /* replica = (port, VLAN) */
            }
            if (standard_metadata.egress_port == standard_metadata.ingress_port
                    && vid == meta.in_vid) {
                mark_to_drop(standard_metadata);               /* never back where it came from */
            } else if (vid != 0) {
                hdr.vlan.setValid();
                hdr.vlan.pcp = 0;
                hdr.vlan.dei = 0;
                hdr.vlan.vid = vid;
                hdr.vlan.ether_type = hdr.eth.ether_type;
                hdr.eth.ether_type = ETHERTYPE_VLAN;
            }
        }
    }
}

control SteeringComputeChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply { }
}

control SteeringDeparser(packet_out packet, in headers_t hdr) {
    apply {
        packet.emit(hdr.outer);
        packet.emit(hdr.nsh_base);
        packet.emit(hdr.nsh_sp);
        packet.emit(hdr.nsh_md1);
        packet.emit(hdr.eth);
        packet.emit(hdr.vlan);
        packet.emit(hdr.ipv4);
        packet.emit(hdr.tcp);
        packet.emit(hdr.udp);
        packet.emit(hdr.icmp);
    }
}

V1Switch(SteeringParser(), SteeringVerifyChecksum(), SteeringIngress(), SteeringEgress(),
         SteeringComputeChecksum(), SteeringDeparser()) main;
