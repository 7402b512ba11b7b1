"""Topology YAML -> frozen, typed model, with every problem reported at its file:line.

A topology names a lab, its fabric, its state server and management network, and its
tenants. Each tenant has hosts (whose addresses may overlap other tenants'), pools of NF
instances, and the chains its traffic takes through those pools. The JSON Schema in
``statelab/schema/topology.schema.json`` defines the structure; this module adds what a
schema cannot say (addresses parse, names and ids are unique, chains name existing pools)
and builds the model.

:func:`load` and :func:`loads` return a :class:`Topology` or raise :class:`SpecError` listing
every problem found; :func:`validate` returns the problems and never raises. Each
:class:`Problem` names the file, the line, what is wrong and what to write instead.

:data:`DEFAULT_TOPOLOGY` is ``topologies/default.yaml`` of the source tree, or
``default.yaml`` in the directory named by the ``STATELAB_TOPOLOGIES`` environment variable.
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Tuple, Union

import jsonschema
import yaml

from nfs import KNOWN_KINDS

FABRIC_KINDS = ("ovs", "bmv2", "tofino-model")
ZONES = ("inside", "outside")
DIRECTIONS = ("outbound", "inbound")
DEFAULT_FABRIC = "ovs"
DEFAULT_STATE_PORT = 6379
DEFAULT_MANAGEMENT = ipaddress.IPv4Network("198.18.0.0/24")  # RFC 2544 benchmarking range
MIN_MANAGEMENT_ADDRESSES = 64

_HERE = Path(__file__).resolve().parent
SCHEMA_PATH = _HERE / "schema" / "topology.schema.json"
DEFAULT_TOPOLOGY = (
    Path(os.environ.get("STATELAB_TOPOLOGIES", _HERE.parent / "topologies")) / "default.yaml"
)

# Where a value sits in a document: the mapping keys and sequence indices leading to it.
_Path = Tuple[Union[str, int], ...]


# ------------------------------------------------------------------------------ the model


def _find(items: Iterable[Any], name: str, what: str, owner: str) -> Any:
    for item in items:
        if item.name == name:
            return item
    raise KeyError(f"{owner} has no {what} {name!r}")


@dataclass(frozen=True)
class Host:
    """An end host of one tenant; ``line`` is where the file defines it."""

    name: str
    ip: ipaddress.IPv4Interface
    zone: str
    mac: str | None
    line: int
    trunk: str | None = None
    vlan: int | None = None


@dataclass(frozen=True)
class Pool:
    """A pool of instances of one NF; ``command``, if set, replaces ``python -m nfs.<kind>``."""

    name: str
    kind: str
    instances: int
    command: tuple[str, ...] | None
    config: Mapping[str, Any] = field(hash=False)
    line: int


@dataclass(frozen=True)
class Tenant:
    """A tenant: its hosts, its NF pools and the chains (pool names) its traffic takes."""

    name: str
    id: int
    hosts: tuple[Host, ...]
    pools: tuple[Pool, ...]
    outbound: tuple[str, ...]
    inbound: tuple[str, ...]
    line: int

    def host(self, name: str) -> Host:
        """Return the host called ``name``; raise KeyError if there is none.

        Args:
            name: host name.
        """
        return _find(self.hosts, name, "host", f"tenant {self.name!r}")

    def pool(self, name: str) -> Pool:
        """Return the pool called ``name``; raise KeyError if there is none.

        Args:
            name: pool name.
        """
        return _find(self.pools, name, "pool", f"tenant {self.name!r}")

    def chain(self, direction: str) -> tuple[Pool, ...]:
        """Return the pools, in order, that traffic in ``direction`` passes.

        Args:
            direction: "outbound" (sent by an inside host) or "inbound" (by an outside one).
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}: {direction!r}")
        return tuple(self.pool(name) for name in getattr(self, direction))


@dataclass(frozen=True)
class Topology:
    """A whole lab; ``source`` is the file it was loaded from (None for :func:`loads`)."""

    name: str
    fabric_kind: str
    state_port: int
    management: ipaddress.IPv4Network
    tenants: tuple[Tenant, ...]
    source: Path | None
    state_replicas: int = 0  # replicas of each tenant's state server (Sentinel promotes one)
    state_cluster: int = 0   # Redis Cluster nodes per tenant (0: one server)

    def tenant(self, name: str) -> Tenant:
        """Return the tenant called ``name``; raise KeyError if there is none.

        Args:
            name: tenant name.
        """
        return _find(self.tenants, name, "tenant", f"lab {self.name!r}")

    def hosts(self) -> Iterator[tuple[Tenant, Host]]:
        """Yield every (tenant, host) pair of the lab, in file order."""
        for tenant in self.tenants:
            for host in tenant.hosts:
                yield tenant, host


# ------------------------------------------------------------------------------ problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a topology file: where, what, and what to write instead."""

    file: str
    line: int
    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}; {self.hint}"


class SpecError(Exception):
    """A topology could not be loaded; ``problems`` holds everything wrong with it."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


_HOST_UNIQUE = "host names must be unique across the lab; rename one"
_UNIQUE_KEYS = {  # role of a mapping -> hint for a key repeated in it
    "tenants": "tenant names must be unique; rename one",
    "tenants.*.hosts": _HOST_UNIQUE,
    "tenants.*.pools": "pool names must be unique within a tenant; rename one",
}
_NAMES = {  # key of a mapping keyed by names -> (what the names are, what to write)
    "tenants": (
        "tenant name",
        "use 1 to 8 lowercase letters or digits, starting with a letter, e.g. red",
    ),
    "hosts": (
        "host name",
        "use 1 to 10 lowercase letters or digits, starting with a letter, e.g. r1: Linux "
        "interface names are at most 15 characters and a host's are named after it (r1-eth0)",
    ),
    "pools": (
        "pool name",
        "use 1 to 10 lowercase letters or digits, starting with a letter, e.g. fw",
    ),
}
_TENANT = "{id: 1, hosts: {r1: {ip: 10.0.0.1/24}}}"
_FIELDS = {  # role of a value -> (what it must be, what to write)
    "": ("a mapping with name and tenants", f"start from a copy of {DEFAULT_TOPOLOGY}"),
    "name": (
        "a lab name",
        "use 1 to 16 lowercase letters, digits or '-', starting with a letter, e.g. default",
    ),
    "fabric": ("a mapping with kind", "write e.g. 'fabric: {kind: ovs}', or leave it out"),
    "fabric.kind": ("a fabric kind", f"use one of {', '.join(FABRIC_KINDS)}"),
    "state": ("a mapping with port, replicas or cluster", "write e.g. 'state: {port: 6379, replicas: 1}', or leave it out"),
    "state.cluster": ("0 or a number of cluster nodes from 3 to 8", "use 0 (one server per tenant) or 3 to 8, e.g. 'cluster: 3'"),
    "state.replicas": ("a number of replicas from 0 to 4", "use 0 (no replica) to 4, e.g. 'replicas: 1'"),
    "state.port": ("a TCP port from 1 to 65535", "use a TCP port from 1 to 65535, e.g. 6379"),
    "management": ("a mapping with subnet", "write e.g. 'management: {subnet: 198.18.0.0/24}'"),
    "management.subnet": (
        "an IPv4 network with its prefix length",
        f"write a network of at least {MIN_MANAGEMENT_ADDRESSES} addresses, "
        f"e.g. {DEFAULT_MANAGEMENT}",
    ),
    "tenants": ("a mapping of tenant names to tenants", f"write e.g. 'red: {_TENANT}'"),
    "tenants.*": ("a mapping with id and hosts", f"write e.g. 'red: {_TENANT}'"),
    "tenants.*.id": ("an integer from 1 to 4095", "use an integer from 1 to 4095"),
    "tenants.*.hosts": (
        "a mapping of host names to hosts",
        "write e.g. 'hosts: {r1: {ip: 10.0.0.1/24}}'",
    ),
    "tenants.*.hosts.*": ("a mapping with ip", "write e.g. 'r1: {ip: 10.0.0.1/24, zone: inside}'"),
    "tenants.*.hosts.*.ip": (
        "an IPv4 address with its prefix length",
        "write an IPv4 address with its prefix length, e.g. 10.0.0.1/24",
    ),
    "tenants.*.hosts.*.trunk": (
        "a trunk name",
        "use 1 to 10 lowercase letters or digits, starting with a letter, e.g. site1 (with vlan)",
    ),
    "tenants.*.hosts.*.vlan": ("an integer from 1 to 4094", "use a VLAN id from 1 to 4094 (with trunk)"),
    "tenants.*.hosts.*.mac": (
        "a unicast MAC address",
        "write six hex octets, the first even, e.g. 02:00:00:00:00:01, or leave it out",
    ),
    "tenants.*.pools": (
        "a mapping of pool names to pools",
        "write e.g. 'pools: {fw: {kind: forward}}'",
    ),
    "tenants.*.pools.*": ("a mapping with kind", "write e.g. 'fw: {kind: forward, instances: 2}'"),
    "tenants.*.pools.*.kind": ("an NF kind", f"use one of {', '.join(KNOWN_KINDS)}"),
    "tenants.*.pools.*.instances": ("an integer from 1 to 16", "use an integer from 1 to 16"),
    "tenants.*.pools.*.command": (
        "a command line",
        "write the command as one string, e.g. \"python3 -m mynf\", or leave it out",
    ),
    "tenants.*.pools.*.config": (
        "a mapping",
        "write the NF's settings as a mapping, e.g. {timeout: 30}",
    ),
    "tenants.*.chains": (
        "a mapping with outbound and/or inbound",
        "write e.g. 'chains: {outbound: [fw], inbound: [fw]}'",
    ),
    "tenants.*.chains.*": ("a list of pool names", "write e.g. [fw, mon], or [] for none"),
    "tenants.*.chains.*.*": ("a pool name", "write the name of one of this tenant's pools"),
}
_YAML_HINT = (
    "check the indentation (spaces, not tabs), the ': ' after each key, "
    "and that every quote and bracket is closed"
)


def _role(path: _Path) -> str:
    """Name the place of ``path`` in the format, e.g. 'tenants.*.hosts.*.ip'."""
    parts = [str(part) for part in path]
    if parts[:1] == ["tenants"]:
        for index in (1, 3, 4):  # tenant; host, pool or direction; position in a chain
            if len(parts) > index and (index != 4 or parts[2] == "chains"):
                parts[index] = "*"
    return ".".join(parts)


def _where(path: _Path) -> str:
    """Spell ``path`` as a reader would look for it, e.g. 'tenants.red.chains.outbound[1]'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text or "top level"


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        kind = "mapping" if isinstance(value, dict) else "list"
        return f"a {kind}" if value else f"an empty {kind}"
    return repr(value)


def _suggest(value: Any, choices: Iterable[str], label: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    listing = f"{label}: {', '.join(choices)}"
    return f"did you mean {close[0]!r}? {listing}" if close else listing


class _Report:
    """The problems of one file, at most one per path; the one place that words them."""

    def __init__(self, file: str, lines: Mapping[_Path, int]) -> None:
        self.file = file
        self.lines = lines
        self.problems: list[Problem] = []
        self.flagged: set[_Path] = set()

    def line(self, path: _Path) -> int:
        """Return the line of ``path``, or of its nearest ancestor that has one."""
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def add(self, path: _Path, message: str, hint: str, line: int | None = None) -> None:
        if path not in self.flagged:
            self.flagged.add(path)
            text = f"{_where(path)}: {message}"
            self.problems.append(Problem(self.file, line or self.line(path), text, hint))

    def expected(self, path: _Path, value: Any) -> None:
        what, hint = _FIELDS.get(_role(path), ("a valid value", f"see {SCHEMA_PATH}"))
        self.add(path, f"expected {what}, got {_show(value)}", hint)


# ------------------------------------------------------------------------------ reading


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


MAX_BYTES = 1 << 20     # a topology file's size limit
MAX_NODES = 200_000     # values a topology may expand to (aliases included)


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that records where every key and item starts and which keys repeat.

    Mapping keys are kept as written (strings). ``lines`` maps the path of every mapping key
    and sequence item, e.g. ``("tenants", "red", "id")``, to its 1-based line; ``duplicates``
    holds ``(path, line, first_line)`` for every key repeated within its mapping (which
    PyYAML would silently overwrite). ``<<`` merge keys work; keys they bring in may be
    overridden without counting as repeats.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.lines: dict[_Path, int] = {}
        self.duplicates: list[tuple[_Path, int, int]] = []
        self._merged: dict[int, int] = {}  # id(mapping node) -> number of merged entries
        self._open: set[int] = set()  # ids of the nodes being built, to stop self-aliases
        self._built = 0  # values built so far, aliases counted each time they are expanded

    def document(self) -> Any:
        """Build the single document of the stream (None if there is none)."""
        node = self.get_single_node()
        if node is None:
            return None
        self.lines[()] = node.start_mark.line + 1
        return self._build(node, ())

    def _build(self, node: yaml.Node, path: _Path) -> Any:
        self._built += 1
        if self._built > MAX_NODES:  # aliases of aliases ("billion laughs") grow without end
            raise yaml.constructor.ConstructorError(
                None, None, f"the topology expands to more than {MAX_NODES} values (aliases of "
                f"aliases?)", node.start_mark)
        is_map = isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG
        if not is_map and not (isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG):
            return self.construct_object(node, deep=True)
        if id(node) in self._open:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to a node that contains it", node.start_mark
            )
        self._open.add(id(node))
        try:
            return self._mapping(node, path) if is_map else self._sequence(node, path)
        finally:
            self._open.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, path: _Path) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            self.lines[path + (index,)] = item.start_mark.line + 1
            items.append(self._build(item, path + (index,)))
        return items

    def _mapping(self, node: yaml.MappingNode, path: _Path) -> dict[str, Any]:
        if id(node) not in self._merged:  # flatten_mapping puts merged entries first
            own = sum(key.tag != _MERGE_TAG for key, _ in node.value)
            self.flatten_mapping(node)
            self._merged[id(node)] = len(node.value) - own
        data: dict[str, Any] = {}
        first: dict[str, int] = {}
        for index, (key_node, value_node) in enumerate(node.value):
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
            else:
                key = str(self.construct_object(key_node, deep=True))
            line = key_node.start_mark.line + 1
            if index >= self._merged[id(node)]:
                if key in first:
                    self.duplicates.append((path + (key,), line, first[key]))
                first.setdefault(key, line)
            self.lines[path + (key,)] = line
            data[key] = self._build(value_node, path + (key,))
        return data


def schema() -> dict[str, Any]:
    """Return the topology JSON Schema (Draft 2020-12), a fresh copy on each call."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


def _check(text: str, file: str) -> tuple[list[Problem], Any, Mapping[_Path, int]]:
    """Parse and check one topology text; return its problems, its data and its lines."""
    if len(text) > MAX_BYTES:
        return [Problem(file, 1, f"the file is {len(text)} characters long; a topology may have "
                        f"at most {MAX_BYTES}", "split it, or check that this is the topology file")], None, {}
    try:
        loader = _LineLoader(text)
        try:
            data = loader.document()
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as exc:
        return [_yaml_problem(exc, text, file)], None, {}
    if data is None:
        return [Problem(file, 1, "the file holds no topology", _FIELDS[""][1])], None, {}
    report = _Report(file, loader.lines)
    for path, line, first in loader.duplicates:
        hint = _UNIQUE_KEYS.get(_role(path[:-1]), "each key may appear once here; remove one")
        report.add(path, f"defined twice (first on line {first})", hint, line=line)
    _check_schema(data, report)
    _check_meaning(data, report)
    return sorted(report.problems, key=lambda problem: problem.line), data, loader.lines


def _yaml_problem(exc: Exception, text: str, file: str) -> Problem:
    if isinstance(exc, RecursionError):
        return Problem(file, 1, "not valid YAML: nested too deeply", "nest fewer levels")
    mark = getattr(exc, "problem_mark", None)
    position = getattr(exc, "position", None) or 0  # a ReaderError has no mark
    line = mark.line + 1 if mark else text.count("\n", 0, position) + 1
    detail = getattr(exc, "problem", None) or str(exc).split("\n")[0]
    context = getattr(exc, "context", None)
    detail = f"{context}, {detail}" if context else detail
    if "expands to more than" in detail:
        return Problem(file, line, f"too large: {detail}", "use each alias where it is needed, not "
                       "inside other aliases")
    return Problem(file, line, f"not valid YAML: {detail}", _YAML_HINT)


def _check_schema(data: Any, report: _Report) -> None:
    """Report every way ``data`` breaks the JSON Schema."""
    for error in _validator().iter_errors(data):
        path: _Path = tuple(error.path)
        value, keyword = error.instance, error.validator
        if list(error.schema_path)[-2:-1] == ["propertyNames"]:  # value is the bad name
            what, hint = _NAMES[str(path[-1])]
            report.add(path + (value,), f"not a valid {what}", hint)
        elif keyword == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in value:
                if key not in allowed:
                    hint = _suggest(key, allowed, "allowed keys here")
                    report.add(path + (key,), "unknown key", hint)
        elif keyword == "required":
            for key in error.validator_value:
                if key not in value:
                    hint = _FIELDS.get(_role(path + (key,)), ("", f"see {SCHEMA_PATH}"))[1]
                    report.add(path + (key,), "required key is missing", f"add '{key}:' ({hint})")
        elif keyword == "enum":
            label = str(path[-1])
            hint = _suggest(value, error.validator_value, f"known {label}s")
            report.add(path, f"{_show(value)} is not a known {label}", hint)
        elif keyword == "dependentRequired":  # trunk and vlan come together
            for key, needs in error.validator_value.items():
                for need in needs:
                    if key in value and need not in value:
                        report.add(path + (key,), f"'{key}' needs '{need}' beside it",
                                   "a host behind a trunk names both, e.g. {trunk: site1, vlan: 101}")
        elif keyword == "uniqueItems":  # only chains have it
            for index, item in enumerate(value):
                if item in value[:index]:
                    report.add(
                        path + (index,),
                        f"{item!r} appears twice in this chain",
                        "a chain passes each pool once; remove the repeat",
                    )
        elif keyword == "type" and "string" in str(error.validator_value) and isinstance(value, (bool, int, float)):
            what = _FIELDS.get(_role(path), ("a string",))[0]
            report.add(path, f"expected {what}, but YAML read {value!r} ({type(value).__name__})",
                       "quote it: YAML reads an unquoted yes/no/on/off as true/false and "
                       "digits with colons, e.g. 12:34:56, as a number")
        else:
            report.expected(path, value)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check_meaning(data: Any, report: _Report) -> None:
    """Report what the schema cannot see: bad addresses, repeats, chains naming no pool.

    Values the schema already flagged are skipped.
    """
    top = _mapping(data)
    state = _mapping(top.get("state"))
    if state.get("cluster") and state.get("replicas") and ("state", "cluster") not in report.flagged:
        report.add(("state", "cluster"), "a cluster cannot have replicas in this version",
                   "use either 'cluster: N' (spread keys over N nodes) or 'replicas: N' (failover), not both")
    subnet = _mapping(top.get("management")).get("subnet")
    if isinstance(subnet, str) and ("management", "subnet") not in report.flagged:
        _check_subnet(subnet, ("management", "subnet"), report)
    tenants = {name: _mapping(tenant) for name, tenant in _mapping(top.get("tenants")).items()}
    ids = {tenant.get("id") for tenant in tenants.values() if isinstance(tenant.get("id"), int)}
    free_id = min(set(range(1, 4096)) - ids, default=None)
    id_owners: dict[Any, tuple[str, int]] = {}
    host_owners: dict[str, tuple[str, int]] = {}
    vlan_owners: dict[tuple[str, int], tuple[str, str, int]] = {}
    for name, tenant in tenants.items():
        base: _Path = ("tenants", name)
        tenant_id = tenant.get("id")
        if tenant_id is not None and base + ("id",) not in report.flagged:
            if tenant_id in id_owners:
                owner, line = id_owners[tenant_id]
                message = f"{tenant_id} is already the id of tenant {owner!r} (line {line})"
                report.add(base + ("id",), message, f"give each tenant its own id, e.g. {free_id}")
            id_owners.setdefault(tenant_id, (name, report.line(base + ("id",))))
        hosts = {host: _mapping(spec) for host, spec in _mapping(tenant.get("hosts")).items()}
        for host in hosts:
            path = base + ("hosts", host)
            if host in host_owners:
                owner, line = host_owners[host]
                message = f"already defined in tenant {owner!r} (line {line})"
                report.add(path, message, _HOST_UNIQUE)
            host_owners.setdefault(host, (name, report.line(path)))
            trunk, vlan = hosts[host].get("trunk"), hosts[host].get("vlan")
            if host in trunk_names(top) and path not in report.flagged:
                report.add(path, f"host {host!r} has the name of a trunk", "give hosts and trunks distinct names")
            if isinstance(trunk, str) and isinstance(vlan, int) and path + ("vlan",) not in report.flagged:
                owner = vlan_owners.setdefault((trunk, vlan), (name, host, report.line(path)))
                if owner[1] != host:
                    report.add(path + ("vlan",), f"VLAN {vlan} on trunk {trunk!r} is already host {owner[1]!r} "
                               f"of tenant {owner[0]!r} (line {owner[2]})",
                               "give each host on a trunk its own VLAN id")
        _check_addresses(base, hosts, report)
        pools = _mapping(tenant.get("pools"))
        for pool, spec in pools.items():
            _check_pool_config(base + ("pools", pool), _mapping(spec), report)
            path = base + ("pools", pool, "command")
            command = _mapping(spec).get("command")
            if isinstance(command, str) and path not in report.flagged:
                try:
                    shlex.split(command)
                except ValueError as exc:
                    message = f"cannot split {command!r} into words ({exc})"
                    report.add(path, message, "close every quote")
                _check_command(path, command, report)
        for direction, chain in _mapping(tenant.get("chains")).items():
            if direction not in DIRECTIONS or not isinstance(chain, list):
                continue
            for index, pool in enumerate(chain):
                if isinstance(pool, str) and pool not in pools:
                    hint = (
                        _suggest(pool, pools, f"pools of tenant {name!r}")
                        if pools
                        else f"tenant {name!r} has no pools; define one under 'pools:' first"
                    )
                    message = f"no pool {pool!r} in tenant {name!r}"
                    report.add(base + ("chains", direction, index), message, hint)


def trunk_names(top: Mapping[str, Any]) -> set[str]:
    """Every trunk name the topology's hosts use."""
    names = set()
    for tenant in _mapping(top.get("tenants")).values():
        for spec in _mapping(_mapping(tenant).get("hosts")).values():
            trunk = _mapping(spec).get("trunk")
            if isinstance(trunk, str):
                names.add(trunk)
    return names


def nf_config_schema(kind: str) -> dict[str, Any] | None:
    """The JSON Schema of an NF kind's pool ``config`` (``CONFIG_SCHEMA`` of ``nfs.<kind>``)."""
    try:
        module = importlib.import_module(f"nfs.{kind}")
    except ImportError:
        return None
    return getattr(module, "CONFIG_SCHEMA", None)


def nf_class(kind: str) -> Any:
    """The NetworkFunction class of ``nfs.<kind>`` (None if there is none)."""
    try:
        module = importlib.import_module(f"nfs.{kind}")
    except ImportError:
        return None
    from nfs.runtime import NetworkFunction
    return next((obj for obj in vars(module).values() if isinstance(obj, type)
                 and issubclass(obj, NetworkFunction) and getattr(obj, "kind", None) == kind), None)


def _check_command(path: _Path, command: str, report: _Report) -> None:
    """A pool's ``command`` must name a program this machine has."""
    try:
        words = shlex.split(command)
    except ValueError:
        return  # reported with its own message
    if words and shutil.which(words[0]) is None and not Path(words[0]).is_file():
        report.add(path, f"no program {words[0]!r} on this machine",
                   "give the NF's program by a name on PATH or its full path, e.g. \"python3 -m mynf\"")


def _check_pool_config(path: _Path, pool: Mapping[str, Any], report: _Report) -> None:
    """Check a pool's ``config`` against its NF's own schema, then as the NF itself reads it at
    ``up`` (ours; a vendor ``command`` is free)."""
    kind, config = pool.get("kind"), pool.get("config", {})
    if pool.get("command") is not None or not isinstance(kind, str) or not isinstance(config, dict):
        return
    if path + ("kind",) in report.flagged or path + ("config",) in report.flagged:
        return
    schema = nf_config_schema(kind)
    if schema is None:
        return
    for error in jsonschema.Draft202012Validator(schema).iter_errors(config):
        where = path + ("config",) + tuple(error.path)
        if error.validator == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in error.instance:
                if key not in allowed:
                    report.add(where + (key,), f"unknown {kind} setting",
                               _suggest(key, allowed, f"{kind} settings here"))
        elif error.validator == "required":
            for key in error.validator_value:
                if key not in error.instance:
                    desc = error.schema.get("properties", {}).get(key, {}).get("description", "")
                    report.add(where + (key,), f"{kind} needs '{key}'", desc or f"see nfs/{kind}.py")
        else:
            desc = error.schema.get("description") or f"see CONFIG_SCHEMA in nfs/{kind}.py"
            report.add(where, error.message, desc)
    if any(p[:len(path) + 1] == path + ("config",) for p in report.flagged):
        return
    cls = nf_class(kind)
    if cls is None:
        return
    try:  # what the NF itself refuses when it starts (e.g. a route with host bits set)
        cls({**config, "statelab": {"tenant": "validate", "tenant_id": 1, "pool": path[-1]}}, None, "validate")
    except (ValueError, TypeError, KeyError) as err:
        report.add(path + ("config",), f"the {kind} NF refuses this config: {err}", f"see nfs/{kind}.py")


def _check_addresses(base: _Path, hosts: Mapping[str, dict[str, Any]], report: _Report) -> None:
    """Check each host's ip, and that no two hosts of one tenant share an ip or a MAC."""
    ips: dict[str, ipaddress.IPv4Interface] = {}
    for host, spec in hosts.items():
        path = base + ("hosts", host, "ip")
        text = spec.get("ip")
        if not isinstance(text, str) or path in report.flagged:
            continue
        try:
            ip = ipaddress.IPv4Interface(text)
        except ValueError:
            report.expected(path, text)
            continue
        net = ip.network
        if net.prefixlen < 31 and ip.ip in (net.network_address, net.broadcast_address):
            which = "network" if ip.ip == net.network_address else "broadcast"
            example = f"{next(net.hosts())}/{net.prefixlen}"
            hint = f"write a host address with its prefix length, e.g. {example}"
            report.add(path, f"{ip.ip} is the {which} address of {net}", hint)
            continue
        ips[host] = ip
    used = {ip.ip for ip in ips.values()}
    ip_owners: dict[ipaddress.IPv4Address, str] = {}
    for host, ip in ips.items():
        owner = ip_owners.setdefault(ip.ip, host)
        if owner != host:
            free = next((a for a in ip.network.hosts() if a not in used), None)
            example = f", e.g. {free}/{ip.network.prefixlen}" if free else ""
            line = report.line(base + ("hosts", owner))
            report.add(
                base + ("hosts", host, "ip"),
                f"{ip.ip} is already used by host {owner!r} (line {line})",
                f"give it an address no other host of tenant {base[1]!r} uses{example}",
            )
    mac_owners: dict[str, str] = {}
    for host, spec in hosts.items():
        path = base + ("hosts", host, "mac")
        mac = spec.get("mac")
        if isinstance(mac, str) and path not in report.flagged:
            owner = mac_owners.setdefault(mac.lower(), host)
            if owner != host:
                hint = "give each host of a tenant its own MAC address, or leave 'mac' out"
                report.add(path, f"{mac} is already used by host {owner!r}", hint)


def _check_subnet(text: str, path: _Path, report: _Report) -> None:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError:
        try:
            loose = ipaddress.IPv4Network(text, strict=False)
        except ValueError:
            report.expected(path, text)
        else:
            report.add(path, f"{text} has host bits set", f"write the network, e.g. {loose}")
        return
    if net.num_addresses < MIN_MANAGEMENT_ADDRESSES:
        report.add(
            path,
            f"{net} has only {net.num_addresses} addresses",
            f"use a /26 or larger network, e.g. {DEFAULT_MANAGEMENT}",
        )


# ------------------------------------------------------------------------------ building


def _topology(data: dict[str, Any], lines: Mapping[_Path, int], source: Path | None) -> Topology:
    """Build the model from data that passed every check."""
    tenants = []
    for name, spec in data["tenants"].items():
        base: _Path = ("tenants", name)
        hosts = tuple(
            Host(
                name=host,
                ip=ipaddress.IPv4Interface(h["ip"]),
                zone=h.get("zone", ZONES[0]),
                mac=h["mac"].lower() if "mac" in h else None,
                line=lines[base + ("hosts", host)],
                trunk=h.get("trunk"),
                vlan=h.get("vlan"),
            )
            for host, h in spec["hosts"].items()
        )
        pools = tuple(
            Pool(
                name=pool,
                kind=p["kind"],
                instances=int(p.get("instances", 1)),
                command=tuple(shlex.split(p["command"])) if "command" in p else None,
                config=MappingProxyType(p.get("config", {})),
                line=lines[base + ("pools", pool)],
            )
            for pool, p in spec.get("pools", {}).items()
        )
        chains = spec.get("chains", {})
        tenants.append(
            Tenant(
                name=name,
                id=int(spec["id"]),
                hosts=hosts,
                pools=pools,
                outbound=tuple(chains.get("outbound", ())),
                inbound=tuple(chains.get("inbound", ())),
                line=lines[base],
            )
        )
    return Topology(
        name=data["name"],
        fabric_kind=data.get("fabric", {}).get("kind", DEFAULT_FABRIC),
        state_port=int(data.get("state", {}).get("port", DEFAULT_STATE_PORT)),
        state_replicas=int(data.get("state", {}).get("replicas", 0)),
        state_cluster=int(data.get("state", {}).get("cluster", 0)),
        management=ipaddress.IPv4Network(
            data.get("management", {}).get("subnet", DEFAULT_MANAGEMENT)
        ),
        tenants=tuple(tenants),
        source=source,
    )


def _read(path: Path) -> tuple[list[Problem], Any, Mapping[_Path, int]]:
    """Read and check one file; return what :func:`_check` returns."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason, hint = exc.strerror or str(exc), f"check the path, e.g. {DEFAULT_TOPOLOGY}"
    except UnicodeDecodeError:
        reason, hint = "not UTF-8 text", "save it as UTF-8"
    else:
        return _check(text, str(path))
    return [Problem(str(path), 1, f"cannot read the file: {reason}", hint)], None, {}


def _build(
    problems: list[Problem], data: Any, lines: Mapping[_Path, int], source: Path | None
) -> Topology:
    if problems:
        raise SpecError(problems)
    return _topology(data, lines, source)


def validate(path: Path | str) -> list[Problem]:
    """Check a topology file and return every problem found; an empty list means valid.

    Never raises for bad input: an unreadable file is a problem like any other.

    Args:
        path: the topology YAML file.
    """
    return _read(Path(path))[0]


def load(path: Path | str) -> Topology:
    """Read a topology file; raise SpecError listing every problem if it is not valid.

    An unreadable file raises SpecError too.

    Args:
        path: the topology YAML file, e.g. :data:`DEFAULT_TOPOLOGY`.
    """
    return _build(*_read(Path(path)), source=Path(path))


def loads(text: str, source: str = "<string>") -> Topology:
    """Parse a topology from text; raise SpecError listing every problem if it is not valid.

    Args:
        text: the topology YAML.
        source: the file name that problems give; the Topology's ``source`` is None.
    """
    return _build(*_check(text, source), source=None)
