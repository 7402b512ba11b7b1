/*
 * statelab steering fabric for tofino-model (P4_16, TNA: Tofino Native Architecture; T2NA
 * for Tofino 2). It is p4/steering.p4 (v1model, bmv2) carried over table for table: the
 * same tables, actions, action parameters, match field names, drop reasons and counters,
 * so that one control plane (statelab/fabric/bmv2.py's Bmv2Steering, reused by
 * statelab/fabric/tofino_model.py) programs both. Read steering.p4's header for what each
 * table does; only what TNA makes different is described here.
 *
 * UNVERIFIED: no Tofino compiler (bf-p4c / p4c's Tofino back end) and no tofino-model were
 * at hand where this was written; see docs/targets.md for how to build and run it.
 *
 * Where TNA differs from v1model, and what this program does about it:
 *   - Intrinsic metadata: the ingress parser first extracts ingress_intrinsic_metadata_t and
 *     skips the port metadata (PORT_METADATA_SIZE); the egress parser extracts
 *     egress_intrinsic_metadata_t. The ingress port is ig_intr_md.ingress_port (9 bits,
 *     PortId_t, as port_t in steering.p4).
 *   - Forwarding: ig_tm_md.ucast_egress_port for unicast, ig_tm_md.mcast_grp_a for the
 *     tenant's flood group (the PRE's multicast group; each replica's rid arrives in egress
 *     as eg_intr_md.egress_rid, the replica's VLAN as in steering.p4).
 *   - Drop: ig_dprsr_md.drop_ctl = 1 (and eg_dprsr_md.drop_ctl = 1 in egress), not
 *     mark_to_drop.
 *   - Counters: the TNA Counter extern (indexed, packets and bytes), with the names of
 *     steering.p4's counter arrays; their index is as narrow as their size (drop reason:
 *     3 bits, tenant: 12 bits, port: PortId_t). DirectCounter is not used: the control plane
 *     reads counter arrays by index, as on bmv2. Compile with --p4runtime-force-std-externs
 *     so that the P4Info lists them as standard P4Runtime counters.
 *   - Hash: the Hash extern, Hash<bit<8>>(CRC32).get(5-tuple), in place of v1model's
 *     hash(..., crc32, 0, ..., 256); a bucket is the hash's low 8 bits, as crc32 mod 256 is
 *     on bmv2 (the controller never predicts a flow's bucket, it only owns the 256 of them).
 *   - Metadata is not zeroed by the architecture: the parser initialises every field.
 *   - Egress sees neither the ingress port nor ingress metadata: the ingress deparser
 *     prepends a bridged header (ingress port, VLANs, delivering/flooding flags) that the
 *     egress parser extracts and the egress deparser does not emit again.
 *   - Control-plane names: bf-p4c prefixes tables and externs with the pipeline's instance
 *     name ("pipe.SteeringIngress.classify"); the driver resolves steering.p4's names
 *     ("SteeringIngress.classify") on that P4Info.
 */

#include <core.p4>
#if __TARGET_TOFINO__ == 2
#include <t2na.p4>
#else
#include <tna.p4>
#endif

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

/* Drop reasons: the index into the `drops` counter (statelab/fabric/bmv2.py reads them). */
const bit<32> DROP_UNCLASSIFIED  = 0;  /* unknown port/VLAN, tag on an access port, ... */
const bit<32> DROP_NSH_FROM_HOST = 1;
const bit<32> DROP_FORGED        = 2;  /* NSH from an NF port that the plan does not allow */
const bit<32> DROP_OUT_OF_PATH   = 3;  /* no next hop for (spi, si) */
const bit<32> DROP_NO_MEMBER     = 4;  /* the pool has no member */
const bit<32> DROP_UNDELIVERABLE = 5;  /* no host of the tenant has that address */
const bit<32> N_DROP_REASONS     = 8;

typedef PortId_t port_t;

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

/* What egress needs to know of ingress (v1model's egress reads it from standard and user
 * metadata; TNA's does not see them). Whole bytes: 7. */
header bridge_t {
    bit<7>  pad0;
    port_t  in_port;      /* the port the frame came in on */
    bit<4>  pad1;
    bit<12> in_vid;       /* VLAN the frame came in on (0: untagged) */
    bit<4>  pad2;
    bit<12> out_vid;      /* VLAN to push on unicast delivery (0: none) */
    bit<6>  pad3;
    bit<1>  delivering;   /* leaves toward a tenant host, not toward an NF */
    bit<1>  flooding;     /* a replica of the tenant's flood group */
}

struct headers_t {
    bridge_t   bridge;    /* emitted by the ingress deparser only: egress takes it off */
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

struct egress_headers_t {
    bridge_t   bridge;
    ethernet_t eth;
    vlan_t     vlan;
}

struct egress_metadata_t {
}

/* -- ingress ---------------------------------------------------------------------------- */

parser SteeringIngressParser(packet_in packet, out headers_t hdr, out metadata_t meta,
                             out ingress_intrinsic_metadata_t ig_intr_md) {
    state start {
        packet.extract(ig_intr_md);
        packet.advance(PORT_METADATA_SIZE);   /* no resubmit: always port metadata */
        meta.tenant = 0;
        meta.spi = 0;
        meta.si = 0;
        meta.pool = 0;
        meta.bucket = 0;
        meta.sport = 0;
        meta.dport = 0;
        meta.ip_dst = 0;
        meta.tagged = 0;
        meta.in_vid = 0;
        meta.out_vid = 0;
        meta.from_nf = 0;
        meta.delivering = 0;
        meta.flooding = 0;
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

control SteeringIngress(inout headers_t hdr, inout metadata_t meta,
                        in ingress_intrinsic_metadata_t ig_intr_md,
                        in ingress_intrinsic_metadata_from_parser_t ig_prsr_md,
                        inout ingress_intrinsic_metadata_for_deparser_t ig_dprsr_md,
                        inout ingress_intrinsic_metadata_for_tm_t ig_tm_md) {
    Counter<bit<64>, bit<12>>(4096, CounterType_t.PACKETS_AND_BYTES) tenant_classified;
    Counter<bit<64>, port_t>(512, CounterType_t.PACKETS_AND_BYTES) member_sent;
    Counter<bit<64>, bit<3>>(N_DROP_REASONS, CounterType_t.PACKETS_AND_BYTES) drops;
    Hash<bit<8>>(HashAlgorithm_t.CRC32) bucket_hash;

    action drop(bit<32> reason) {
        drops.count((bit<3>) reason);
        ig_dprsr_md.drop_ctl = 1;
        exit;
    }

    /* -- classify ------------------------------------------------------------------ */

    action host_frame(bit<32> tenant, bit<24> spi) {
        meta.tenant = tenant;
        meta.spi = spi;
        tenant_classified.count((bit<12>) tenant);
    }

    action nf_frame() {
        meta.from_nf = 1;
    }

    table classify {
        key = {
            ig_intr_md.ingress_port : exact @name("port");
            meta.tagged             : exact @name("tagged");
            meta.in_vid             : exact @name("vid");
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
            ig_intr_md.ingress_port : exact @name("port");
            hdr.nsh_sp.spi          : exact @name("spi");
            hdr.nsh_sp.si           : exact @name("si");
            hdr.nsh_md1.c1          : exact @name("c1");
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
        ig_tm_md.ucast_egress_port = port;
        member_sent.count(port);
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
        ig_tm_md.ucast_egress_port = port;
        hdr.eth.dst = mac;
        meta.out_vid = vid;
    }

    action to_port(port_t port, bit<12> vid) {
        ig_tm_md.ucast_egress_port = port;
        meta.out_vid = vid;
    }

    action flood(bit<16> group) {
        ig_tm_md.mcast_grp_a = group;
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
            meta.bucket = bucket_hash.get({ hdr.ipv4.src, hdr.ipv4.dst, hdr.ipv4.protocol,
                                            meta.sport, meta.dport });
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
        hdr.bridge.setValid();
        hdr.bridge.pad0 = 0;
        hdr.bridge.in_port = ig_intr_md.ingress_port;
        hdr.bridge.pad1 = 0;
        hdr.bridge.in_vid = meta.in_vid;
        hdr.bridge.pad2 = 0;
        hdr.bridge.out_vid = meta.out_vid;
        hdr.bridge.pad3 = 0;
        hdr.bridge.delivering = meta.delivering;
        hdr.bridge.flooding = meta.flooding;
    }
}

control SteeringIngressDeparser(packet_out packet, inout headers_t hdr, in metadata_t meta,
                                in ingress_intrinsic_metadata_for_deparser_t ig_dprsr_md) {
    apply {
        packet.emit(hdr.bridge);
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

/* -- egress ----------------------------------------------------------------------------- */

parser SteeringEgressParser(packet_in packet, out egress_headers_t hdr, out egress_metadata_t meta,
                            out egress_intrinsic_metadata_t eg_intr_md) {
    state start {
        packet.extract(eg_intr_md);
        packet.extract(hdr.bridge);
        transition select(hdr.bridge.delivering) {
            1: parse_eth;
            default: accept;      /* toward an NF: the frame leaves as ingress built it */
        }
    }
    state parse_eth {
        packet.extract(hdr.eth);
        transition accept;
    }
}

/* Pushes the tenant's VLAN tag on delivery to a trunk, and drops a copy that would go back
 * where it came from (same port and VLAN), as steering.p4's egress does. */
control SteeringEgress(inout egress_headers_t hdr, inout egress_metadata_t meta,
                       in egress_intrinsic_metadata_t eg_intr_md,
                       in egress_intrinsic_metadata_from_parser_t eg_prsr_md,
                       inout egress_intrinsic_metadata_for_deparser_t eg_dprsr_md,
                       inout egress_intrinsic_metadata_for_output_port_t eg_oport_md) {
    apply {
        if (hdr.bridge.delivering == 1) {
            bit<12> vid = hdr.bridge.out_vid;
            if (hdr.bridge.flooding == 1) {
                vid = (bit<12>) eg_intr_md.egress_rid;        /* replica = (port, VLAN) */
            }
            if (eg_intr_md.egress_port == hdr.bridge.in_port && vid == hdr.bridge.in_vid) {
                eg_dprsr_md.drop_ctl = 1;                      /* never back where it came from */
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

control SteeringEgressDeparser(packet_out packet, inout egress_headers_t hdr,
                               in egress_metadata_t meta,
                               in egress_intrinsic_metadata_for_deparser_t eg_dprsr_md) {
    apply {
        packet.emit(hdr.eth);     /* the bridged header is not emitted: it ends here */
        packet.emit(hdr.vlan);
    }
}

Pipeline(SteeringIngressParser(), SteeringIngress(), SteeringIngressDeparser(),
         SteeringEgressParser(), SteeringEgress(), SteeringEgressDeparser()) pipe;

Switch(pipe) main;
