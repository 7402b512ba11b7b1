"""IPsec gateway NF: ESP tunnel mode (RFC 4303) with AES-GCM (RFC 4106), its state in Redis.

In the direction it encrypts (``encrypt``: outbound or inbound, by NSH service path id & 1),
the gateway turns each inner IPv4 packet into
``outer IPv4 (local -> remote, proto 50) / ESP (SPI, seq) / IV / ciphertext / ICV``, keeping
the inner Ethernet header; in the other direction it does the reverse for packets of its
inbound SA. AES-GCM as RFC 4106: 8-byte explicit IV, 16-byte ICV, nonce = salt (the last 4
bytes of the key material) + IV, AAD = SPI + 32-bit sequence number (§5). The IV is the
sequence number itself (a counter, §3.1): unique per key because sequence numbers never repeat.

State (keys under the pool's prefix, see nfs/state.py):

* ``seq:{spi}`` — the outbound sequence counter. An instance claims numbers in blocks with
  INCRBY (one claim per batch at most, sized for the batch); ``(n - amount, n]`` is its lease.
  The lease lives in the process: a crash only skips the rest of it, never reuses a number,
  so every number sent after a crash is above every number sent before it (RFC 4303 §3.3.3).
  Past 2**32 - 1 packets are dropped (``seq_exhausted``): no ESN, the SA must be rekeyed.
  Leased numbers need no state server, so an instance with numbers left keeps encrypting
  while the server is down. The counter must survive a state-server restart (persistence):
  a counter that starts again at 0 reuses (SPI, seq), and with it the AES-GCM nonce.
* ``replay:{spi}`` — the inbound anti-replay window (RFC 4303 §3.4.3), checked and marked by
  the state server's atomic ``replay`` script, only after the ICV verified.

A batch needs at most one round trip: the claim and every replay check go in one Batch.

Also per RFC 4301/4303/6040: the outer header copies DSCP/ECN and DF from the inner one (its
IP ID is the low 16 bits of the sequence number); a decapsulated packet whose outer header
says CE gets CE if it is ECN-capable and is dropped if not; the receiver checks the default
padding (1, 2, 3, ...), drops dummy packets (next header 59), strips TFC padding by the inner
packet's length, and drops a packet whose outer IPv4 packet would exceed ``mtu``.

Pool config (see :data:`CONFIG_SCHEMA`)::

    config:
      local: 192.0.2.1            # this site's tunnel endpoint
      remote: 192.0.2.2           # the peer's
      encrypt: outbound           # direction this gateway encrypts; it decrypts the other
      sa_out: {spi: 0x1001, key: "00112233445566778899aabbccddeeff01020304"}   # AES-128 + salt
      sa_in: {spi: 0x2001, key: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0a0b0c0d"}
      block: 100                  # sequence numbers claimed at once
      replay_window: 64
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import jsonschema
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nfs import nsh
from nfs.nsh import ETH_HLEN, Malformed
from nfs.packet import IPV4_PATTERN, PROTO_ESP, Packet, checksum, ip_bytes, parse
from nfs.runtime import Drop, NetworkFunction, Verdict, main
from nfs.state import Batch, Ref


SEQ_MAX = 2**32 - 1        # no extended sequence numbers: the SA ends here (RFC 4303 §3.3.3)
ESP_HLEN, IV_LEN, ICV_LEN, SALT_LEN = 8, 8, 16, 4
IPV4_HLEN = 20
NEXT_HEADER_IPV4, NEXT_HEADER_DUMMY = 4, 59
OUTER_TTL = 64
ECN_MASK, ECN_CE = 0x03, 0x03
IP_DF = 0x4000
_OVERHEAD = IPV4_HLEN + ESP_HLEN + IV_LEN + 2 + ICV_LEN  # plus 0-3 bytes of padding


def _sa_schema(role: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["spi", "key"],
        "description": f"the {role} security association, e.g. {{spi: 0x1001, key: <40 hex digits>}}",
        "properties": {
            "spi": {
                "type": "integer", "minimum": 256, "maximum": SEQ_MAX,
                "description": "Security Parameters Index, 256 .. 2**32-1 (1-255 are reserved, "
                               "RFC 4303 §2.1), e.g. 0x1001; the peer's SA of the other direction "
                               "has the same SPI and key",
            },
            "key": {
                "type": "string", "pattern": "^([0-9A-Fa-f]{40}|[0-9A-Fa-f]{56}|[0-9A-Fa-f]{72})$",
                "description": "AES key followed by the 4-byte salt, in hex and quoted (RFC 4106 §8.1): "
                               "40 digits for AES-128, 56 for AES-192, 72 for AES-256",
            },
        },
    }


CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ipsec pool config",
    "description": "An ESP tunnel-mode gateway (AES-GCM): its tunnel addresses and its two SAs.",
    "type": "object",
    "additionalProperties": False,
    "required": ["local", "remote", "sa_out", "sa_in"],
    "properties": {
        "local": {"type": "string", "pattern": f"^{IPV4_PATTERN}$",
                  "description": "this gateway's tunnel address, source of the ESP packets it sends, "
                                 "e.g. 192.0.2.1"},
        "remote": {"type": "string", "pattern": f"^{IPV4_PATTERN}$",
                   "description": "the peer gateway's tunnel address, destination of the ESP packets, "
                                  "e.g. 192.0.2.2"},
        "encrypt": {"enum": ["outbound", "inbound"],
                    "description": "the direction this gateway encrypts (outbound: packets sent by "
                                   "inside hosts); it decrypts the other. Default outbound; the "
                                   "peer site's gateway uses the other value"},
        "sa_out": _sa_schema("outbound (encrypting)"),
        "sa_in": _sa_schema("inbound (decrypting)"),
        "block": {"type": "integer", "minimum": 1, "maximum": 1 << 20,
                  "description": "sequence numbers an instance claims at once (default 1: exactly "
                                 "what each batch needs, so a pool of instances stays in order). With "
                                 "several instances encrypting one SA, one instance's numbers trail "
                                 "the others' by up to a block and the peer drops them as too old "
                                 "once that exceeds its replay_window: keep instances x block well "
                                 "under it, or use 1 (claim exactly what each batch needs)"},
        "replay_window": {"type": "integer", "minimum": 32, "maximum": 4096,
                          "description": "anti-replay window in packets (RFC 4303 §3.4.3: at least "
                                         "32, default 64)"},
        "mtu": {"type": "integer", "minimum": 128, "maximum": 9000,
                "description": "largest outer IPv4 packet sent (default 1500); larger ones are "
                               "dropped as too_big"},
        "keys": {"enum": ["per-run", "pinned"],
                 "description": "per-run (default): in a lab, the SA keys used are derived from the "
                                "ones written here and a random value new for every lab run (HKDF), "
                                "so the sequence counter, which starts again at 1 in a new lab, never "
                                "meets a nonce it used before; both gateways of the lab derive the "
                                "same keys. pinned: the keys as written (a peer outside the lab): "
                                "then the lab keeps the tenant's state server on disk (AOF, "
                                "/var/lib/statelab/LAB) so the counter goes on where it stopped"},
    },
}


class ConfigError(ValueError):
    """The pool config does not match :data:`CONFIG_SCHEMA`."""


@dataclass(frozen=True)
class SecurityAssociation:
    """One direction's SA: SPI and AES-GCM key with its salt (RFC 4106 §3.1, §8.1).

    Attributes:
        spi: Security Parameters Index.
        aead: the AES-GCM cipher with the SA's key.
        salt: the 4-byte salt that starts every nonce.
    """

    spi: int
    aead: AESGCM
    salt: bytes

    @classmethod
    def from_config(cls, sa: Mapping[str, Any]) -> "SecurityAssociation":
        """Build from a config entry ``{spi, key}`` (key = hex AES key + 4-byte salt)."""
        material = bytes.fromhex(sa["key"])
        return cls(int(sa["spi"]), AESGCM(material[:-SALT_LEN]), material[-SALT_LEN:])

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        """The ESP packet (header, IV, ciphertext, ICV) carrying ``plaintext``.

        Args:
            seq: the packet's sequence number; also its IV.
            plaintext: payload data, padding, pad length and next header.
        """
        header = struct.pack("!II", self.spi, seq)
        iv = struct.pack("!Q", seq)
        return header + iv + self.aead.encrypt(self.salt + iv, plaintext, header)

    def open(self, esp: bytes) -> Optional[bytes]:
        """The plaintext of an ESP packet, or None if its ICV does not verify.

        Args:
            esp: the ESP packet from its header to the end of the ICV.
        """
        header, iv = esp[:ESP_HLEN], esp[ESP_HLEN:ESP_HLEN + IV_LEN]
        try:
            return self.aead.decrypt(self.salt + iv, esp[ESP_HLEN + IV_LEN:], header)
        except InvalidTag:
            return None


def esp_trailer(length: int, next_header: int = NEXT_HEADER_IPV4) -> bytes:
    """Default padding (1, 2, 3, ...), pad length and next header for ``length`` payload bytes.

    Pads so that the trailer ends on a 4-byte boundary (RFC 4303 §2.4; GCM needs no more).
    """
    pad = -(length + 2) % 4
    return bytes(range(1, pad + 1)) + bytes((pad, next_header))


def outer_ipv4(src: bytes, dst: bytes, tos: int, df: bool, ident: int, payload: bytes) -> bytes:
    """The tunnel's IPv4 header (protocol ESP, TTL 64) followed by ``payload``."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, IPV4_HLEN + len(payload), ident,
                                IP_DF if df else 0, OUTER_TTL, PROTO_ESP, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return bytes(hdr) + payload


class IPsecGateway(NetworkFunction):
    """ESP tunnel-mode gateway; keeps nothing per flow in the process (a sequence lease only).

    Args:
        config: the pool config (see :data:`CONFIG_SCHEMA`).
        state_url: the state server URL.
        instance: this instance's id.

    Raises:
        ConfigError: the config does not match :data:`CONFIG_SCHEMA`.
    """

    kind = "ipsec"

    def __init__(self, config: Mapping[str, Any], state_url: Optional[str], instance: str) -> None:
        super().__init__(config, state_url, instance)
        problems = [f"{'/'.join(map(str, e.path)) or 'config'}: {e.message}"
                    for e in jsonschema.Draft202012Validator(CONFIG_SCHEMA).iter_errors(self.config)]
        if problems:
            raise ConfigError(f"{instance}: bad ipsec config: " + "; ".join(problems))
        c = self.config
        self.local, self.remote = ip_bytes(c["local"]), ip_bytes(c["remote"])
        self.encrypt_bit = 0 if c.get("encrypt", "outbound") == "outbound" else 1
        self.sa_out = SecurityAssociation.from_config(c["sa_out"])
        self.sa_in = SecurityAssociation.from_config(c["sa_in"])
        self.block = int(c.get("block", 1))
        self.window = int(c.get("replay_window", 64))
        self.mtu = int(c.get("mtu", 1500))
        self._lease: list[range] = []  # sequence numbers claimed and not yet used, in order

    # -- the batch -------------------------------------------------------------------

    def process(self, packets: Sequence[nsh.NshFrame]) -> list[Verdict]:
        verdicts: list[Optional[Verdict]] = [None] * len(packets)
        to_seal: list[tuple[int, bytes, bytes]] = []         # (index, Ethernet header, inner IP)
        opened: list[tuple[int, int, bytes]] = []            # (index, seq, decapsulated frame)
        for i, frame in enumerate(packets):
            try:
                if frame.spi & 1 == self.encrypt_bit:
                    to_seal.append((i, *self._plain(frame.inner)))
                else:
                    opened.append((i, *self._decapsulate(frame.inner)))
            except Malformed as err:
                verdicts[i] = Drop(err.reason)
        batch = self.state.batch()
        claim = self._claim(batch, len(to_seal))
        checks = [batch.script("replay", [f"replay:{self.sa_in.spi}"], [seq, self.window])
                  for _, seq, _ in opened]
        batch.execute()  # StateUnavailable propagates: the runtime drops the batch (fail closed)
        self._add_lease(claim)
        seqs = self._take(len(to_seal))
        for n, (i, eth, ip) in enumerate(to_seal):
            verdicts[i] = self._encapsulate(eth, ip, seqs[n]) if n < len(seqs) else Drop("seq_exhausted")
        for (i, _, inner), check in zip(opened, checks):
            verdicts[i] = inner if check.value == 1 else Drop("replay")
        return verdicts  # type: ignore[return-value]  # every slot is filled above

    # -- encrypting ------------------------------------------------------------------

    def _plain(self, frame: bytes) -> tuple[bytes, bytes]:
        """(Ethernet header, IPv4 packet) of a frame to encrypt; raises Malformed to drop it."""
        pkt = parse(frame)
        if pkt.ip is None:
            raise Malformed("not_ipv4")
        ip = bytes(pkt.buf[pkt.ip:pkt.end])  # without Ethernet padding
        if len(ip) + _OVERHEAD + (-(len(ip) + 2) % 4) > self.mtu:
            raise Malformed("too_big")
        return bytes(pkt.buf[:ETH_HLEN]), ip

    def _encapsulate(self, eth: bytes, ip: bytes, seq: int) -> bytes:
        esp = self.sa_out.seal(seq, ip + esp_trailer(len(ip)))
        df = bool(struct.unpack_from("!H", ip, 6)[0] & IP_DF)
        return eth + outer_ipv4(self.local, self.remote, ip[1], df, seq & 0xFFFF, esp)

    def _claim(self, batch: Batch, count: int) -> Optional[tuple[Ref, int]]:
        """Add one INCRBY for the blocks ``count`` numbers need beyond the lease, if any."""
        need = count - sum(len(r) for r in self._lease)
        if need <= 0:
            return None
        amount = -(-need // self.block) * self.block
        return batch.incrby(f"seq:{self.sa_out.spi}", amount), amount

    def _add_lease(self, claim: Optional[tuple[Ref, int]]) -> None:
        if claim is not None:
            ref, amount = claim
            top = int(ref.value)
            numbers = range(top - amount + 1, min(top, SEQ_MAX) + 1)
            if numbers:
                self._lease.append(numbers)

    def _take(self, count: int) -> list[int]:
        """Up to ``count`` sequence numbers from the lease, lowest first."""
        out: list[int] = []
        while len(out) < count and self._lease:
            head = self._lease[0]
            k = min(count - len(out), len(head))
            out.extend(head[:k])
            if k == len(head):
                self._lease.pop(0)
            else:
                self._lease[0] = head[k:]
        return out

    # -- decrypting ------------------------------------------------------------------

    def _decapsulate(self, frame: bytes) -> tuple[int, bytes]:
        """(sequence number, inner frame) of an authentic ESP packet; raises Malformed to drop it."""
        outer = parse(frame)
        if outer.ip is None:
            raise Malformed("not_ipv4")
        if outer.proto != PROTO_ESP:
            raise Malformed("not_esp")
        if outer.is_fragment:
            raise Malformed("esp_fragment")  # no reassembly here (RFC 4303 §3.4.1 wants it first)
        esp = bytes(outer.buf[outer.l4:outer.end])
        if len(esp) < ESP_HLEN + IV_LEN + 2 + ICV_LEN:
            raise Malformed("truncated_esp")
        spi, seq = struct.unpack_from("!II", esp)
        if spi != self.sa_in.spi:
            raise Malformed("unknown_spi")
        plain = self.sa_in.open(esp)
        if plain is None:
            raise Malformed("auth_failed")
        pad, next_header = plain[-2], plain[-1]
        if next_header == NEXT_HEADER_DUMMY:
            raise Malformed("dummy_packet")  # RFC 4303 §2.6: discard silently
        if next_header != NEXT_HEADER_IPV4:
            raise Malformed("bad_next_header")
        if pad + 2 > len(plain) or plain[-2 - pad:-2] != bytes(range(1, pad + 1)):
            raise Malformed("bad_padding")
        inner = parse(frame[:ETH_HLEN] + plain[:-2 - pad])  # IPv4 (ethertype kept), and sound
        self._propagate_ecn(outer.buf[outer.ip + 1], inner)
        return seq, inner.bytes()  # up to the inner total length: TFC padding goes (§2.7)

    @staticmethod
    def _propagate_ecn(outer_tos: int, inner: Packet) -> None:
        """RFC 6040 §4.2: outer CE marks an ECN-capable inner packet CE; a Not-ECT one is dropped."""
        if outer_tos & ECN_MASK != ECN_CE:
            return
        tos = inner.buf[inner.ip + 1]
        if tos & ECN_MASK == 0:
            raise Malformed("ecn_ce_not_ect")
        if tos & ECN_MASK != ECN_CE:
            inner.buf[inner.ip + 1] = tos | ECN_CE
            inner.fix_checksums(l4=False)


if __name__ == "__main__":
    sys.exit(main(IPsecGateway))
