"""Unit tests for statelab.spec: the model a topology yields and the problems a user sees."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest

from nfs import KNOWN_KINDS
from statelab import spec
from statelab.spec import (
    DEFAULT_TOPOLOGY,
    FABRIC_KINDS,
    Problem,
    SpecError,
    load,
    loads,
    schema,
    validate,
)

# A small valid lab; tests edit one line of it and check the problem reported at that line.
BASE = """\
name: lab
fabric:
  kind: ovs
tenants:
  red:
    id: 1
    hosts:
      r1: {ip: 10.0.0.1/24, zone: inside}
      r2: {ip: 10.0.0.2/24, zone: outside}
    pools:
      fw: {kind: forward, instances: 2}
      mon: {kind: forward}
    chains:
      outbound: [fw, mon]
      inbound: [mon, fw]
  blue:
    id: 2
    hosts:
      b1: {ip: 10.0.0.1/24}
"""
# line  6: red's id        line  8: host r1     line 11: pool fw    line 14: outbound chain
# line 16: tenant blue     line 17: blue's id   line 19: host b1

HOST_UNIQUE = "host names must be unique across the lab; rename one"
IP_HINT = "write an IPv4 address with its prefix length, e.g. 10.0.0.1/24"


def edit(old: str, new: str) -> str:
    """Return BASE with the first ``old`` replaced by ``new``."""
    assert old in BASE
    return BASE.replace(old, new, 1)


@pytest.fixture
def check(tmp_path: Path):
    """Write a topology to lab.yaml and return (its path, the problems validate() finds)."""

    def run(text: str) -> tuple[str, list[Problem]]:
        path = tmp_path / "lab.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path), validate(path)

    return run


@pytest.fixture
def problem(check):
    """Validate a topology that has exactly one problem, and return it."""

    def run(text: str) -> Problem:
        file, problems = check(text)
        assert len(problems) == 1, "\n".join(map(str, problems))
        assert problems[0].file == file
        return problems[0]

    return run


# ------------------------------------------------------------------------------ the model


def test_default_topology_loads_as_two_tenants_with_the_same_addresses() -> None:
    topo = load(DEFAULT_TOPOLOGY)
    root = Path(spec.__file__).resolve().parent.parent
    assert DEFAULT_TOPOLOGY == root / "topologies" / "default.yaml"
    assert (topo.name, topo.fabric_kind, topo.state_port) == ("default", "ovs", 6379)
    assert str(topo.management) == "198.18.0.0/24"
    assert topo.source == DEFAULT_TOPOLOGY
    assert [(t.name, t.id) for t in topo.tenants] == [("red", 1), ("blue", 2)]
    hosts = [(t.name, h.name, str(h.ip), h.zone) for t, h in topo.hosts()]
    assert hosts == [
        ("red", "r1", "10.0.0.1/24", "inside"),
        ("red", "r2", "10.0.0.2/24", "outside"),
        ("blue", "b1", "10.0.0.1/24", "inside"),
        ("blue", "b2", "10.0.0.2/24", "outside"),
    ]
    for tenant in topo.tenants:
        assert [(p.name, p.kind, p.instances) for p in tenant.pools] == [
            ("fw", "forward", 2),
            ("mon", "forward", 2),
        ]
        assert tenant.outbound == ("fw", "mon")
        assert tenant.inbound == ("mon", "fw")


def test_base_is_valid_although_tenants_overlap(check) -> None:
    assert check(BASE)[1] == []
    topo = loads(BASE)
    assert topo.tenant("red").host("r1").ip == topo.tenant("blue").host("b1").ip


def test_model_fields_defaults_lines_and_helpers() -> None:
    topo = loads(BASE)
    red = topo.tenant("red")
    assert topo.source is None
    assert topo.state_port == spec.DEFAULT_STATE_PORT
    assert topo.management == spec.DEFAULT_MANAGEMENT
    assert (red.line, red.host("r1").line, red.pool("fw").line) == (5, 8, 11)
    assert topo.tenant("blue").host("b1").zone == "inside"
    assert red.pool("mon").instances == 1
    assert red.pool("mon").command is None
    assert dict(red.pool("mon").config) == {}
    assert red.host("r1").mac is None
    assert [p.name for p in red.chain("outbound")] == ["fw", "mon"]
    assert [p.name for p in red.chain("inbound")] == ["mon", "fw"]
    assert topo.tenant("blue").outbound == () and topo.tenant("blue").inbound == ()
    assert isinstance(red.hosts, tuple) and isinstance(topo.tenants, tuple)
    with pytest.raises(KeyError, match="no host 'b1'"):
        red.host("b1")
    with pytest.raises(KeyError, match="no pool 'lb'"):
        red.pool("lb")
    with pytest.raises(KeyError, match="no tenant 'green'"):
        topo.tenant("green")
    with pytest.raises(ValueError, match="outbound, inbound"):
        red.chain("sideways")
    with pytest.raises(dataclasses.FrozenInstanceError):
        red.id = 3  # type: ignore[misc]


def test_pool_command_is_split_and_config_is_read_only() -> None:
    text = edit(
        "mon: {kind: forward}",
        "mon: {kind: firewall, command: \"python3 -m mynf --name 'a b'\", config: {ttl: 30}}",
    )
    pool = loads(text).tenant("red").pool("mon")
    assert pool.command == ("python3", "-m", "mynf", "--name", "a b")
    assert pool.config == {"ttl": 30}
    with pytest.raises(TypeError):
        pool.config["ttl"] = 1  # type: ignore[index]
    hash(pool)


def test_optional_sections_and_mac() -> None:
    text = edit("fabric:\n  kind: ovs\n", "fabric: {kind: bmv2}\nstate: {port: 7000}\n")
    text = text.replace("tenants:", "management: {subnet: 10.99.0.0/26}\ntenants:", 1)
    text = text.replace("b1: {ip: 10.0.0.1/24}", "b1: {ip: 10.0.0.1/24, mac: '02:AA:00:00:00:01'}")
    topo = loads(text)
    assert (topo.fabric_kind, topo.state_port, topo.state_replicas) == ("bmv2", 7000, 0)
    assert str(topo.management) == "10.99.0.0/26"
    assert topo.tenant("blue").host("b1").mac == "02:aa:00:00:00:01"


def test_state_replicas(problem) -> None:
    text = edit("fabric:\n  kind: ovs\n", "fabric: {kind: ovs}\nstate: {port: 7000, replicas: 2}\n")
    assert loads(text).state_replicas == 2
    found = problem(text.replace("replicas: 2", "replicas: 5"))
    assert "state.replicas" in found.message and "0 (no replica) to 4" in found.hint


def test_state_cluster(problem) -> None:
    text = edit("fabric:\n  kind: ovs\n", "fabric: {kind: ovs}\nstate:\n  port: 7000\n  cluster: 3\n")
    assert (loads(text).state_cluster, loads(text).state_replicas) == (3, 0)
    found = problem(text.replace("cluster: 3", "cluster: 2"))
    assert "state.cluster" in found.message and "3 to 8" in found.hint
    found = problem(text.replace("cluster: 3", "cluster: 3\n  replicas: 1"))
    assert found.line == text.splitlines().index("  cluster: 3") + 1
    assert "cannot have replicas" in found.message and "not both" in found.hint


def test_yaml_anchors_and_merge_keys_work_and_overrides_are_no_repeats() -> None:
    text = edit("fw: {kind: forward, instances: 2}", "fw: &nf {kind: forward, instances: 2}")
    text = text.replace("mon: {kind: forward}", "mon: {<<: *nf, instances: 3}")
    red = loads(text).tenant("red")
    assert (red.pool("mon").kind, red.pool("mon").instances) == ("forward", 3)


# ------------------------------------------------------------------------------ problems


def test_problem_str_and_spec_error_list_every_problem() -> None:
    text = edit("id: 1", "id: 0").replace("instances: 2", "instances: two")
    text = text.replace("kind: ovs", "kind: p4")
    with pytest.raises(SpecError) as caught:
        loads(text, source="x.yaml")
    problems = caught.value.problems
    assert [(p.file, p.line) for p in problems] == [("x.yaml", 3), ("x.yaml", 6), ("x.yaml", 11)]
    assert str(caught.value).splitlines() == [str(p) for p in problems]
    first = problems[0]
    assert str(first) == f"x.yaml:3: {first.message}; {first.hint}"


def test_yaml_syntax_error_points_at_its_line(problem) -> None:
    found = problem(edit("    hosts:\n", "    hosts:\n\t"))
    assert found.line == 8
    assert found.message.startswith("not valid YAML: ")
    assert "spaces, not tabs" in found.hint


def test_unclosed_bracket_is_a_yaml_error(problem) -> None:
    found = problem(edit("outbound: [fw, mon]", "outbound: [fw, mon"))
    assert found.message.startswith("not valid YAML: ")
    assert "bracket is closed" in found.hint


def test_unknown_top_level_key_suggests_the_closest(problem) -> None:
    found = problem(BASE + "tenent: {}\n")
    assert found.line == 20
    assert found.message == "tenent: unknown key"
    assert found.hint == (
        "did you mean 'tenants'? allowed keys here: name, fabric, state, management, tenants"
    )


def test_unknown_pool_key_suggests_instances(problem) -> None:
    found = problem(edit("instances: 2", "instance: 2"))
    assert found.line == 11
    assert found.message == "tenants.red.pools.fw.instance: unknown key"
    assert found.hint.startswith("did you mean 'instances'? ")
    assert found.hint.endswith("allowed keys here: kind, instances, command, config")


def test_unknown_key_without_close_match_lists_the_allowed(problem) -> None:
    found = problem(edit("    id: 2\n", "    id: 2\n    colour: blue\n"))
    assert found.line == 18
    assert found.hint == "allowed keys here: id, hosts, pools, chains"


def test_same_host_twice_in_a_tenant(problem) -> None:
    found = problem(edit("r2: {ip: 10.0.0.2/24", "r1: {ip: 10.0.0.2/24"))
    assert found.line == 9
    assert found.message == "tenants.red.hosts.r1: defined twice (first on line 8)"
    assert found.hint == HOST_UNIQUE


def test_same_host_in_two_tenants(problem) -> None:
    found = problem(edit("b1:", "r1:"))
    assert found.line == 19
    assert found.message == "tenants.blue.hosts.r1: already defined in tenant 'red' (line 8)"
    assert found.hint == HOST_UNIQUE


def test_other_repeated_keys(problem) -> None:
    found = problem(edit("    id: 2\n", "    id: 2\n    id: 3\n"))
    assert (found.line, found.message) == (18, "tenants.blue.id: defined twice (first on line 17)")
    assert found.hint == "each key may appear once here; remove one"
    found = problem(BASE + "  red:\n    id: 3\n    hosts: {x1: {ip: 10.0.0.1/24}}\n")
    assert (found.line, found.hint) == (20, "tenant names must be unique; rename one")


def test_same_ip_twice_in_a_tenant(problem) -> None:
    found = problem(edit("ip: 10.0.0.2/24", "ip: 10.0.0.1/16"))
    assert found.line == 9
    assert found.message == (
        "tenants.red.hosts.r2.ip: 10.0.0.1 is already used by host 'r1' (line 8)"
    )
    assert found.hint == "give it an address no other host of tenant 'red' uses, e.g. 10.0.0.2/16"


def test_same_tenant_id_twice(problem) -> None:
    found = problem(edit("id: 2", "id: 1"))
    assert found.line == 17
    assert found.message == "tenants.blue.id: 1 is already the id of tenant 'red' (line 6)"
    assert found.hint == "give each tenant its own id, e.g. 2"


@pytest.mark.parametrize(
    "ip, message",
    [
        ("10.0.0.300/24", "expected an IPv4 address with its prefix length, got '10.0.0.300/24'"),
        ("10.0.0.1", "expected an IPv4 address with its prefix length, got '10.0.0.1'"),
        ("10.0.0.1/33", "expected an IPv4 address with its prefix length, got '10.0.0.1/33'"),
        ("fe80::1/64", "expected an IPv4 address with its prefix length, got 'fe80::1/64'"),
        ("10.0.0.0/24", "10.0.0.0 is the network address of 10.0.0.0/24"),
        ("10.0.0.255/24", "10.0.0.255 is the broadcast address of 10.0.0.0/24"),
    ],
)
def test_bad_host_address(problem, ip: str, message: str) -> None:
    found = problem(edit("ip: 10.0.0.1/24", f"ip: '{ip}'"))
    assert found.line == 8
    assert found.message == f"tenants.red.hosts.r1.ip: {message}"
    assert found.hint.endswith("with its prefix length, e.g. 10.0.0.1/24")


def test_unknown_nf_kind_lists_known_kinds(problem) -> None:
    found = problem(edit("mon: {kind: forward}", "mon: {kind: quantum}"))
    assert found.line == 12
    assert found.message == "tenants.red.pools.mon.kind: 'quantum' is not a known kind"
    assert found.hint == "known kinds: forward, firewall, nat, router, ipsec, lb"
    found = problem(edit("mon: {kind: forward}", "mon: {kind: firewal}"))
    assert found.hint.startswith("did you mean 'firewall'? known kinds: forward, ")


def test_unknown_fabric_kind_lists_known_kinds(problem) -> None:
    found = problem(edit("kind: ovs", "kind: p4"))
    assert (found.line, found.message) == (3, "fabric.kind: 'p4' is not a known kind")
    assert found.hint == "known kinds: ovs, bmv2, tofino-model"
    assert problem(edit("kind: ovs", "kind: bmv")).hint.startswith("did you mean 'bmv2'? ")


def test_chain_names_a_missing_pool(problem) -> None:
    found = problem(edit("outbound: [fw, mon]", "outbound: [fw, mom]"))
    assert found.line == 14
    assert found.message == "tenants.red.chains.outbound[1]: no pool 'mom' in tenant 'red'"
    assert found.hint == "did you mean 'mon'? pools of tenant 'red': fw, mon"


def test_chain_in_a_tenant_without_pools(problem) -> None:
    found = problem(BASE + "    chains: {inbound: [fw]}\n")
    assert found.line == 20
    assert found.message == "tenants.blue.chains.inbound[0]: no pool 'fw' in tenant 'blue'"
    assert found.hint == "tenant 'blue' has no pools; define one under 'pools:' first"


def test_pool_twice_in_a_chain(problem) -> None:
    found = problem(edit("outbound: [fw, mon]", "outbound: [fw, mon, fw]"))
    assert found.line == 14
    assert found.message == "tenants.red.chains.outbound[2]: 'fw' appears twice in this chain"
    assert found.hint == "a chain passes each pool once; remove the repeat"


@pytest.mark.parametrize(
    "value, shown",
    [
        ("0", "0"),
        ("4096", "4096"),
        ("-1", "-1"),
        ("abc", "'abc'"),
        ("'1'", "'1'"),
        ("true", "True"),
        ("", "nothing"),
        ("[1]", "a list"),
    ],
)
def test_tenant_id_out_of_range_or_not_an_integer(problem, value: str, shown: str) -> None:
    found = problem(edit("id: 1", f"id: {value}"))
    assert found.line == 6
    assert found.message == f"tenants.red.id: expected an integer from 1 to 4095, got {shown}"
    assert found.hint == "use an integer from 1 to 4095"


@pytest.mark.parametrize(
    "value, shown", [('"two"', "'two'"), ("0", "0"), ("17", "17"), ("[2]", "a list")]
)
def test_instances_of_the_wrong_type_or_range(problem, value: str, shown: str) -> None:
    found = problem(edit("instances: 2", f"instances: {value}"))
    assert found.line == 11
    where = "tenants.red.pools.fw.instances"
    assert found.message == f"{where}: expected an integer from 1 to 16, got {shown}"
    assert found.hint == "use an integer from 1 to 16"


def test_hosts_of_the_wrong_type(problem) -> None:
    found = problem(edit("b1: {ip: 10.0.0.1/24}", "b1: 10.0.0.1/24"))
    assert found.line == 19
    assert found.message == "tenants.blue.hosts.b1: expected a mapping with ip, got '10.0.0.1/24'"
    assert found.hint == "write e.g. 'r1: {ip: 10.0.0.1/24, zone: inside}'"


def test_missing_required_keys(problem) -> None:
    found = problem(edit("    id: 2\n", ""))
    assert (found.line, found.message) == (16, "tenants.blue.id: required key is missing")
    assert found.hint == "add 'id:' (use an integer from 1 to 4095)"
    found = problem(edit("b1: {ip: 10.0.0.1/24}", "b1: {zone: inside}"))
    assert (found.line, found.message) == (19, "tenants.blue.hosts.b1.ip: required key is missing")
    assert found.hint == f"add 'ip:' ({IP_HINT})"
    found = problem(edit("mon: {kind: forward}", "mon: {instances: 2}"))
    assert found.line == 12
    assert found.message == "tenants.red.pools.mon.kind: required key is missing"
    assert found.hint == f"add 'kind:' (use one of {', '.join(KNOWN_KINDS)})"
    found = problem(edit("name: lab\n", ""))
    assert (found.line, found.message) == (1, "name: required key is missing")


@pytest.mark.parametrize(
    "old, new, line, where, hint",
    [
        ("r1:", "averylonghost:", 8, "tenants.red.hosts.averylonghost: not a valid host name",
         "Linux interface names are at most 15 characters"),
        ("r1:", "R1:", 8, "tenants.red.hosts.R1: not a valid host name", "e.g. r1"),
        ("  blue:", "  bluegreen1:", 16, "tenants.bluegreen1: not a valid tenant name",
         "use 1 to 8 lowercase letters or digits, starting with a letter, e.g. red"),
        ("mon: {", "mon_1: {", 12, "tenants.red.pools.mon_1: not a valid pool name",
         "use 1 to 10 lowercase letters or digits, starting with a letter, e.g. fw"),
        ("name: lab", "name: My Lab", 1, "name: expected a lab name, got 'My Lab'",
         "use 1 to 16 lowercase letters, digits or '-', starting with a letter"),
    ],
)
def test_bad_names(problem, old: str, new: str, line: int, where: str, hint: str) -> None:
    text = edit(old, new)
    if old == "mon: {":
        text = text.replace("[fw, mon]", "[fw]").replace("[mon, fw]", "[fw]")
    found = problem(text)
    assert (found.line, found.message) == (line, where)
    assert hint in found.hint


def test_management_subnet(problem) -> None:
    def subnet(value: str) -> Problem:
        return problem(edit("tenants:", f"management: {{subnet: {value}}}\ntenants:"))

    found = subnet("198.18.0.1/24")
    assert (found.line, found.message) == (4, "management.subnet: 198.18.0.1/24 has host bits set")
    assert found.hint == "write the network, e.g. 198.18.0.0/24"
    found = subnet("10.1.0.0/27")
    assert found.message == "management.subnet: 10.1.0.0/27 has only 32 addresses"
    assert found.hint == "use a /26 or larger network, e.g. 198.18.0.0/24"
    assert subnet("198.18.0.0").message.startswith("management.subnet: expected an IPv4 network")


def test_bad_and_repeated_mac(problem) -> None:
    found = problem(edit("zone: inside}", "zone: inside, mac: '01:00:00:00:00:01'}"))
    assert (found.line, found.message) == (
        8, "tenants.red.hosts.r1.mac: expected a unicast MAC address, got '01:00:00:00:00:01'")
    assert "e.g. 02:00:00:00:00:01" in found.hint
    text = edit("zone: inside}", "zone: inside, mac: '02:00:00:00:00:01'}")
    found = problem(text.replace("zone: outside}", "zone: outside, mac: '02:00:00:00:00:01'}"))
    assert (found.line, found.message) == (
        9, "tenants.red.hosts.r2.mac: 02:00:00:00:00:01 is already used by host 'r1'")


def test_command_with_an_unclosed_quote(problem) -> None:
    found = problem(edit("mon: {kind: forward}", "mon: {kind: forward, command: \"mynf 'x\"}"))
    assert (found.line, found.hint) == (12, "close every quote")
    assert found.message.startswith("tenants.red.pools.mon.command: cannot split")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file holds no topology"),
        (b"# only a comment\n", "the file holds no topology"),
        (b"- a\n- b\n", "top level: expected a mapping with name and tenants, got a list"),
        (b"name: &a [*a]\n", "not valid YAML: an alias refers to a node that contains it"),
        (b"name: x\n---\nname: y\n", "not valid YAML: expected a single document"),
        (b"a: " + b"[" * 600 + b"]" * 600, "not valid YAML: nested too deeply"),
        (b"name: \xff\n", "cannot read the file: not UTF-8 text"),
        (b"name: x\x07\n", "not valid YAML: unacceptable character"),
        (b"name: !python/object:os.system x\n", "not valid YAML: could not determine"),
    ],
)
def test_validate_never_raises_for_bad_input(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "lab.yaml"
    path.write_bytes(content)
    problems = validate(path)
    assert len(problems) == 1 and problems[0].message.startswith(message), problems


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    [found] = validate(missing)
    assert found.message == "cannot read the file: No such file or directory"
    assert found.hint == f"check the path, e.g. {DEFAULT_TOPOLOGY}"
    assert validate(tmp_path)[0].message.startswith("cannot read the file: ")
    with pytest.raises(SpecError, match="none.yaml:1: cannot read the file"):
        load(missing)


# ------------------------------------------------------------------------------ the schema


def test_schema_is_valid_and_rejects_unknown_keys() -> None:
    document = schema()
    jsonschema.Draft202012Validator.check_schema(document)
    validator = jsonschema.Draft202012Validator(document)
    data = {"name": "lab", "tenants": {"red": {"id": 1, "hosts": {"r1": {"ip": "10.0.0.1/24"}}}}}
    assert validator.is_valid(data)
    data["tenants"]["red"]["hosts"]["r1"]["ipv4"] = "10.0.0.1/24"
    [error] = validator.iter_errors(data)
    assert error.validator == "additionalProperties"
    assert schema() == json.loads(spec.SCHEMA_PATH.read_text(encoding="utf-8"))


def test_schema_agrees_with_the_code() -> None:
    document = schema()
    top, defs = document["properties"], document["$defs"]
    assert tuple(top["fabric"]["properties"]["kind"]["enum"]) == FABRIC_KINDS
    assert tuple(defs["pool"]["properties"]["kind"]["enum"]) == KNOWN_KINDS
    assert tuple(defs["host"]["properties"]["zone"]["enum"]) == spec.ZONES
    assert tuple(defs["tenant"]["properties"]["chains"]["properties"]) == spec.DIRECTIONS
    assert top["fabric"]["properties"]["kind"]["default"] == spec.DEFAULT_FABRIC
    assert top["state"]["properties"]["port"]["default"] == spec.DEFAULT_STATE_PORT
    assert top["management"]["properties"]["subnet"]["default"] == str(spec.DEFAULT_MANAGEMENT)
    assert defs["host"]["properties"]["zone"]["default"] == spec.ZONES[0]


# ------------------------------------------------------------------------------ 802.1Q trunks


def test_hosts_behind_a_trunk_load_with_their_vlan() -> None:
    topo = loads(edit("r1: {ip: 10.0.0.1/24, zone: inside}", "r1: {ip: 10.0.0.1/24, trunk: site1, vlan: 101}")
                 .replace("b1: {ip: 10.0.0.1/24}", "b1: {ip: 10.0.0.1/24, trunk: site1, vlan: 102}"))
    assert [(h.name, h.trunk, h.vlan) for _, h in topo.hosts()] == [
        ("r1", "site1", 101), ("r2", None, None), ("b1", "site1", 102)]


def test_trunk_without_vlan_names_what_is_missing(problem) -> None:
    found = problem(edit("r1: {ip: 10.0.0.1/24, zone: inside}", "r1: {ip: 10.0.0.1/24, trunk: site1}"))
    assert found.line == 8
    assert found.message == "tenants.red.hosts.r1.trunk: 'trunk' needs 'vlan' beside it"


def test_one_vlan_per_host_on_a_trunk(problem) -> None:
    found = problem(edit("r1: {ip: 10.0.0.1/24, zone: inside}", "r1: {ip: 10.0.0.1/24, trunk: site1, vlan: 7}")
                    .replace("b1: {ip: 10.0.0.1/24}", "b1: {ip: 10.0.0.1/24, trunk: site1, vlan: 7}"))
    assert found.line == 19
    assert "VLAN 7 on trunk 'site1' is already host 'r1' of tenant 'red' (line 8)" in found.message
    assert found.hint == "give each host on a trunk its own VLAN id"


def test_vlan_out_of_range(problem) -> None:
    found = problem(edit("r1: {ip: 10.0.0.1/24, zone: inside}", "r1: {ip: 10.0.0.1/24, trunk: site1, vlan: 4095}"))
    assert found.line == 8
    assert "VLAN id from 1 to 4094" in found.hint


# ------------------------------------------------------------------------------ bounded work


def test_aliases_of_aliases_are_refused_at_their_line(tmp_path: Path) -> None:
    lines = ["name: lol", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 20)]
    path = tmp_path / "lol.yaml"
    path.write_text("\n".join(lines + ["tenants: {}"]) + "\n")
    problems = validate(path)             # returns at once: 10**20 values are never built
    assert len(problems) == 1
    assert problems[0].message.startswith("too large: the topology expands to more than")
    assert 2 <= problems[0].line <= 21


def test_a_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: big\n" + "# padding\n" * 200_000)
    (found,) = validate(path)
    assert (found.line, found.message) == (1, "the file is 2000010 characters long; a topology may have at most 1048576")


# ------------------------------------------------------------------------------ caught before `up`


def test_nf_configs_the_nf_itself_refuses_are_caught_at_their_line(check) -> None:
    router = ('      rt:\n        kind: router\n        config:\n          mac: "02:00:00:00:00:fe"\n'
              '          address: 10.0.0.254\n          routes: [{prefix: 10.0.0.1/24, mac: "02:00:00:01:00:02"}]\n')
    text = edit("      mon: {kind: forward}\n", "      mon: {kind: nat, config: {public: [203.0.113.1], "
                "ports: [2000, 1000]}}\n" + router)
    file, problems = check(text)
    found = {p.line: p.message for p in problems}
    assert "lowest port 2000 is above highest port 1000" in found[12]
    assert "10.0.0.1/24 has host bits set" in found[15]


def test_a_command_this_machine_lacks(problem) -> None:
    found = problem(edit("mon: {kind: forward}", "mon: {kind: forward, command: nosuchprogram --x}"))
    assert (found.line, found.message) == (12, "tenants.red.pools.mon.command: no program 'nosuchprogram' on "
                                               "this machine")


@pytest.mark.parametrize("old, new, read", [
    ("r1: {ip: 10.0.0.1/24, zone: inside}", "r1: {ip: 10.0.0.1/24, zone: inside, mac: 12:34:56:00:00:01}",
     "9783936001 (int)"),
    ("mon: {kind: forward}", "mon: {kind: forward, command: no}", "False (bool)"),
])
def test_yaml_1_1_traps_say_quote_it(problem, old: str, new: str, read: str) -> None:
    found = problem(edit(old, new))
    assert f"but YAML read {read}" in found.message
    assert found.hint.startswith("quote it")
