"""ESP nonce safety across labs: per-run SA keys (the default) and pinned keys whose sequence
counters persist (statelab.lab.esp_keys_for_run, Lab._persistence)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from nfs.ipsec import IPsecGateway
from statelab.lab import PERSIST_ROOT, derive_esp_key, esp_keys_for_run, pins_esp_keys
from statelab.spec import load, loads

REPO = Path(__file__).resolve().parents[1]
KEY = "000102030405060708090a0b0c0d0e0f10111213"


def green():
    return load(REPO / "topologies" / "conformance.yaml").tenant("green")


def test_a_run_derives_keys_both_gateways_share_and_the_next_run_does_not() -> None:
    gwa, gwb = (p for p in green().pools if p.kind == "ipsec")
    run1, run2 = os.urandom(32), os.urandom(32)
    a1, b1 = (esp_keys_for_run("ipsec", dict(p.config), run1) for p in (gwa, gwb))
    assert a1["sa_out"]["key"] == b1["sa_in"]["key"] and a1["sa_in"]["key"] == b1["sa_out"]["key"]  # interop
    assert a1["sa_out"]["key"] != gwa.config["sa_out"]["key"]                 # not the topology's
    a2 = esp_keys_for_run("ipsec", dict(gwa.config), run2)
    assert a2["sa_out"]["key"] != a1["sa_out"]["key"]                          # a new run, a new key
    assert len(a1["sa_out"]["key"]) == len(KEY) and int(a1["sa_out"]["key"], 16) >= 0
    assert derive_esp_key(KEY, 4097, run1) != derive_esp_key(KEY, 4098, run1)  # bound to the SPI
    assert derive_esp_key(KEY * 1, 4097, run1) == derive_esp_key(KEY, 4097, run1)


def test_pinned_keys_and_other_kinds_are_left_as_written() -> None:
    gwa = next(p for p in green().pools if p.name == "gwa")
    pinned = {**gwa.config, "keys": "pinned"}
    assert esp_keys_for_run("ipsec", pinned, os.urandom(32)) == pinned
    assert esp_keys_for_run("firewall", {"rules": []}, os.urandom(32)) == {"rules": []}
    assert not pins_esp_keys(green())
    IPsecGateway({**pinned, "statelab": {"tenant": "green", "pool": "gwa"}}, None, "g")  # the NF accepts it


TOPOLOGY = textwrap.dedent("""\
    name: {name}
    tenants:
      green:
        id: 3
        hosts:
          g1: {{ip: 10.0.0.1/24, zone: inside}}
          g2: {{ip: 10.0.0.2/24, zone: outside}}
        pools:
          gwa:
            kind: ipsec
            instances: 1
            config:
              local: 192.0.2.1
              remote: 192.0.2.2
              keys: {keys}
              sa_out: {{spi: 4097, key: "{key}"}}
              sa_in: {{spi: 8193, key: "{key}"}}
        chains:
          outbound: [gwa]
          inbound: [gwa]
    """)


@pytest.mark.root
def test_pinned_keys_keep_the_sequence_counter_across_labs() -> None:
    from statelab.lab import Lab
    if os.geteuid() != 0:
        pytest.skip("needs root")
    seen = {}
    for keys in ("pinned", "per-run"):
        name = f"esp{keys[:3]}"
        shutil.rmtree(PERSIST_ROOT / name, ignore_errors=True)
        topo = loads(TOPOLOGY.format(name=name, keys=keys, key=KEY), f"<{name}>")
        assert pins_esp_keys(topo.tenant("green")) == (keys == "pinned")
        try:
            for run in (1, 2):
                with Lab(dataclasses.replace(topo), standby=False) as lab:
                    r = lab.redis(server="green")
                    seen[(keys, run)] = r.get("t:green:gwa:seq:4097")
                    r.incrby("t:green:gwa:seq:4097", 500)  # what the gateway's INCRBY claims do
        finally:
            shutil.rmtree(PERSIST_ROOT / name, ignore_errors=True)
    assert seen[("pinned", 1)] is None and seen[("pinned", 2)] == b"500"  # it goes on counting
    assert seen[("per-run", 1)] is None and seen[("per-run", 2)] is None  # new keys: it starts again

