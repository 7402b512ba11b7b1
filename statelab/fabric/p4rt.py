"""A small P4Runtime client: just what statelab's P4 fabric drivers need, over gRPC.

It speaks P4Runtime 1.x with the protobufs of the ``p4runtime`` package: primary arbitration on
the StreamChannel (election id), SetForwardingPipelineConfig (a target's device config, e.g.
the bmv2 JSON, plus P4Info), name lookups in the P4Info, single table entries (INSERT, MODIFY,
DELETE) with exact, ternary or LPM matches, default actions, multicast groups of the packet
replication engine, and counter reads.

Every write is one WriteRequest with one update: PI (the P4Runtime server of bmv2) accepts only
``CONTINUE_ON_ERROR`` batches, which give ordering, not atomicity, so a driver that needs an
order writes the entries one by one in that order. Every RPC has a deadline. A failed RPC raises
:class:`P4RuntimeError`, which keeps the gRPC status and the P4Runtime per-update errors and
offers predicates (``not_found``, ``already_exists``, ``unavailable``).
"""

from __future__ import annotations

import ipaddress
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from statelab.errors import LabError

try:
    import grpc
    from google.protobuf import text_format
    from google.rpc import code_pb2, status_pb2
    from p4.config.v1 import p4info_pb2
    from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc
except TypeError as err:  # p4runtime's generated code under a protobuf newer than 3.20
    raise ImportError(f"the p4runtime package does not load with this protobuf ({err}); "
                      f"install protobuf>=3.20,<3.21 (as p4runtime-shell pins it)") from None

Value = Union[int, bytes, str]  # int, raw bytes, "aa:bb:cc:dd:ee:ff" or "10.0.0.1"

INSERT = p4runtime_pb2.Update.INSERT
MODIFY = p4runtime_pb2.Update.MODIFY
DELETE = p4runtime_pb2.Update.DELETE
_UPDATE_NAMES = {INSERT: "INSERT", MODIFY: "MODIFY", DELETE: "DELETE"}


# -- errors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateError:
    """The P4Runtime error of one update of a WriteRequest (``p4.v1.Error``)."""

    canonical_code: int
    message: str
    space: str = ""
    code: int = 0

    @property
    def code_name(self) -> str:
        """The canonical code's name, e.g. ``NOT_FOUND``."""
        return code_pb2.Code.Name(self.canonical_code) if self.canonical_code in code_pb2.Code.values() \
            else str(self.canonical_code)


class P4RuntimeError(LabError):
    """A P4Runtime RPC failed.

    Args:
        what: what was attempted (e.g. ``INSERT into SteeringIngress.classify``).
        status: the gRPC status code, or None if the failure was not an RPC status.
        details: the gRPC status message.
        errors: the per-update P4Runtime errors the server sent, if any.
    """

    def __init__(self, what: str, status: Optional[grpc.StatusCode], details: str,
                 errors: Sequence[UpdateError] = ()) -> None:
        self.what = what
        self.status = status
        self.details = details
        self.errors = tuple(errors)
        failed = [e for e in self.errors if e.canonical_code != code_pb2.OK]
        text = f"P4Runtime: {what} failed"
        if status is not None:
            text += f" ({status.name})"
        if details:
            text += f": {details}"
        for e in failed:
            text += f"\n  update error {e.code_name}: {e.message}"
        super().__init__(text)

    def _codes(self) -> set[int]:
        return {e.canonical_code for e in self.errors if e.canonical_code != code_pb2.OK}

    @property
    def not_found(self) -> bool:
        """The entry to modify or delete does not exist."""
        return self.status == grpc.StatusCode.NOT_FOUND or code_pb2.NOT_FOUND in self._codes()

    @property
    def already_exists(self) -> bool:
        """The entry to insert exists already."""
        return self.status == grpc.StatusCode.ALREADY_EXISTS or code_pb2.ALREADY_EXISTS in self._codes()

    @property
    def unavailable(self) -> bool:
        """The server did not answer (not running, not listening yet, or gone)."""
        return self.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.CANCELLED)


def _from_rpc_error(what: str, err: grpc.RpcError) -> P4RuntimeError:
    """Translate a gRPC error, with its P4Runtime details, into a :class:`P4RuntimeError`."""
    if not isinstance(err, grpc.Call):
        return P4RuntimeError(what, None, str(err))
    errors: list[UpdateError] = []
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        rich = status_pb2.Status.FromString(value)
        for any_detail in rich.details:
            if any_detail.Is(p4runtime_pb2.Error.DESCRIPTOR):
                e = p4runtime_pb2.Error()
                any_detail.Unpack(e)
                errors.append(UpdateError(e.canonical_code, e.message, e.space, e.code))
    return P4RuntimeError(what, err.code(), err.details() or "", errors)


# -- values and matches ------------------------------------------------------------------


def encode(value: Value, bitwidth: int) -> bytes:
    """Encode a value as a P4Runtime byte string of ``ceil(bitwidth / 8)`` bytes.

    Args:
        value: an int, bytes, a MAC address ``aa:bb:cc:dd:ee:ff`` or an IPv4 address.
        bitwidth: the field's or parameter's width in bits.

    Raises:
        ValueError: the value does not fit in ``bitwidth`` bits.
    """
    size = (bitwidth + 7) // 8
    if isinstance(value, str):
        if ":" in value:
            value = bytes.fromhex(value.replace(":", ""))
        else:
            value = int(ipaddress.IPv4Address(value))
    if isinstance(value, (bytes, bytearray)):
        value = int.from_bytes(value, "big")
    if not isinstance(value, int) or value < 0 or value >> bitwidth:
        raise ValueError(f"{value!r} does not fit in {bitwidth} bits")
    return value.to_bytes(size, "big")


@dataclass(frozen=True)
class Exact:
    """An exact match on a field."""

    value: Value


@dataclass(frozen=True)
class Ternary:
    """A ternary match: the bits set in ``mask`` must equal those of ``value``."""

    value: Value
    mask: Value


@dataclass(frozen=True)
class Lpm:
    """A longest-prefix match."""

    value: Value
    prefix_len: int


Match = Union[Exact, Ternary, Lpm, int, str, bytes]


@dataclass(frozen=True)
class TableEntry:
    """One table entry, named as in the P4Info (full names or aliases).

    Args:
        table: the table.
        match: field name -> match; a bare value means :class:`Exact`. Ternary fields left
            out are wildcards.
        action: the action the entry runs (not needed for DELETE).
        params: action parameter name -> value.
        priority: needed for tables with ternary or range fields (higher wins).
    """

    table: str
    match: Mapping[str, Match]
    action: str = ""
    params: Mapping[str, Value] = field(default_factory=dict)
    priority: int = 0


@dataclass(frozen=True)
class CounterValue:
    """One cell of a counter array."""

    packets: int
    bytes: int


# -- P4Info ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    id: int
    bitwidth: int
    match_type: int


@dataclass(frozen=True)
class _Table:
    id: int
    name: str
    fields: Mapping[str, _Field]


@dataclass(frozen=True)
class _Action:
    id: int
    name: str
    params: Mapping[str, tuple[int, int]]  # name -> (id, bitwidth)


class P4Info:
    """Name -> id lookups in a P4Info message.

    Args:
        message: the parsed P4Info.
    """

    def __init__(self, message: p4info_pb2.P4Info) -> None:
        self.message = message
        self._tables: dict[str, _Table] = {}
        self._actions: dict[str, _Action] = {}
        self._counters: dict[str, tuple[int, int]] = {}
        for t in message.tables:
            table = _Table(t.preamble.id, t.preamble.name,
                           {f.name: _Field(f.id, f.bitwidth, f.match_type) for f in t.match_fields})
            self._add(self._tables, t.preamble, table)
        for a in message.actions:
            action = _Action(a.preamble.id, a.preamble.name,
                             {p.name: (p.id, p.bitwidth) for p in a.params})
            self._add(self._actions, a.preamble, action)
        for c in message.counters:
            self._add(self._counters, c.preamble, (c.preamble.id, c.size))

    @staticmethod
    def _add(index: dict, preamble, item) -> None:
        index[preamble.name] = item
        if preamble.alias:
            index.setdefault(preamble.alias, item)

    @classmethod
    def from_file(cls, path: Path) -> "P4Info":
        """Read a P4Info in protobuf text format (``.txtpb``/``.txt``) or binary (``.bin``)."""
        data = Path(path).read_bytes()
        message = p4info_pb2.P4Info()
        if Path(path).suffix == ".bin":
            message.ParseFromString(data)
        else:
            text_format.Parse(data.decode(), message)
        return cls(message)

    @staticmethod
    def _get(index: dict, kind: str, name: str):
        try:
            return index[name]
        except KeyError:
            known = ", ".join(sorted(k for k in index if "." in k)) or "none"
            raise LabError(f"P4Info has no {kind} {name!r}; {kind}s: {known}") from None

    def table(self, name: str) -> _Table:
        """The table ``name`` (full name or alias)."""
        return self._get(self._tables, "table", name)

    def action(self, name: str) -> _Action:
        """The action ``name`` (full name or alias)."""
        return self._get(self._actions, "action", name)

    def counter(self, name: str) -> tuple[int, int]:
        """The id and size of counter array ``name``."""
        return self._get(self._counters, "counter", name)


# -- the client --------------------------------------------------------------------------


class P4RuntimeClient:
    """A P4Runtime connection to one device, as its primary controller.

    Args:
        address: the server's ``host:port``.
        device_id: the P4Runtime device id.
        election_id: this controller's election id (the highest one is primary).
        timeout: the deadline of every RPC, in seconds.
    """

    def __init__(self, address: str, device_id: int, election_id: int = 1,
                 timeout: float = 10.0) -> None:
        self.address = address
        self.device_id = device_id
        self.election_id = p4runtime_pb2.Uint128(high=0, low=election_id)
        self.timeout = timeout
        self.p4info: Optional[P4Info] = None
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[p4runtime_pb2_grpc.P4RuntimeStub] = None
        self._requests: "queue.Queue[Optional[p4runtime_pb2.StreamMessageRequest]]" = queue.Queue()
        self._arbitration: "queue.Queue[p4runtime_pb2.MasterArbitrationUpdate]" = queue.Queue()
        self._stream = None
        self._reader: Optional[threading.Thread] = None
        self.stream_error: Optional[P4RuntimeError] = None

    # -- connection ----------------------------------------------------------------------

    def connect(self, timeout: Optional[float] = None) -> None:
        """Wait for the server, open the StreamChannel and become primary.

        Args:
            timeout: how long to wait for the server and the arbitration (default: ``timeout``).

        Raises:
            P4RuntimeError: the server did not answer in time, or another controller is primary.
        """
        timeout = self.timeout if timeout is None else timeout
        self._channel = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.close()
            raise P4RuntimeError(f"connecting to {self.address}", grpc.StatusCode.UNAVAILABLE,
                                 f"no answer within {timeout:g}s") from None
        self._stub = p4runtime_pb2_grpc.P4RuntimeStub(self._channel)
        self._stream = self._stub.StreamChannel(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read_stream, name=f"p4rt-{self.address}",
                                        daemon=True)
        self._reader.start()
        self._requests.put(p4runtime_pb2.StreamMessageRequest(
            arbitration=p4runtime_pb2.MasterArbitrationUpdate(device_id=self.device_id,
                                                              election_id=self.election_id)))
        try:
            reply = self._arbitration.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise self.stream_error or P4RuntimeError(
                f"arbitration with {self.address}", grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {timeout:g}s") from None
        if reply.status.code != code_pb2.OK:
            self.close()
            raise P4RuntimeError(f"becoming primary controller of device {self.device_id} at "
                                 f"{self.address}", None,
                                 f"{code_pb2.Code.Name(reply.status.code)}: {reply.status.message} "
                                 f"(another controller is primary)")

    def _read_stream(self) -> None:
        try:
            for message in self._stream:
                if message.HasField("arbitration"):
                    self._arbitration.put(message.arbitration)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.stream_error = _from_rpc_error(f"StreamChannel with {self.address}", err)
                self._arbitration.put(p4runtime_pb2.MasterArbitrationUpdate(
                    status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(err.details()))))

    def close(self) -> None:
        """End the StreamChannel and the connection (idempotent)."""
        if self._stream is not None:
            self._requests.put(None)
            self._stream.cancel()
            self._stream = None
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._stub = None

    def __enter__(self) -> "P4RuntimeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stub(self) -> p4runtime_pb2_grpc.P4RuntimeStub:
        if self._stub is None:
            raise P4RuntimeError(f"talking to {self.address}", None, "not connected")
        return self._stub

    def _unary(self, what: str, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise _from_rpc_error(what, err) from None

    # -- pipeline ------------------------------------------------------------------------

    def set_pipeline(self, p4info: Path, device_config: Path) -> None:
        """Install a program (VERIFY_AND_COMMIT): all tables start empty again.

        Args:
            p4info: the P4Info (text format).
            device_config: the target's program, e.g. bmv2's JSON.
        """
        info = P4Info.from_file(p4info)
        config = p4runtime_pb2.ForwardingPipelineConfig(
            p4info=info.message, p4_device_config=Path(device_config).read_bytes())
        request = p4runtime_pb2.SetForwardingPipelineConfigRequest(
            device_id=self.device_id, election_id=self.election_id, config=config,
            action=p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT)
        self._unary(f"SetForwardingPipelineConfig({device_config.name})",
                    self.stub.SetForwardingPipelineConfig, request)
        self.p4info = info

    @property
    def info(self) -> P4Info:
        if self.p4info is None:
            raise P4RuntimeError(f"talking to {self.address}", None, "no pipeline set (set_pipeline first)")
        return self.p4info

    # -- writes --------------------------------------------------------------------------

    def write(self, update_type: int, entity: p4runtime_pb2.Entity, what: str) -> None:
        """Send one update in its own WriteRequest.

        Args:
            update_type: :data:`INSERT`, :data:`MODIFY` or :data:`DELETE`.
            entity: what to write.
            what: how to name it in an error.
        """
        request = p4runtime_pb2.WriteRequest(
            device_id=self.device_id, election_id=self.election_id,
            atomicity=p4runtime_pb2.WriteRequest.CONTINUE_ON_ERROR,
            updates=[p4runtime_pb2.Update(type=update_type, entity=entity)])
        self._unary(f"{_UPDATE_NAMES.get(update_type, update_type)} {what}", self.stub.Write, request)

    def table_entry(self, entry: TableEntry) -> p4runtime_pb2.TableEntry:
        """Build the protobuf of a table entry from names and values."""
        table = self.info.table(entry.table)
        message = p4runtime_pb2.TableEntry(table_id=table.id, priority=entry.priority)
        for name, match in entry.match.items():
            try:
                f = table.fields[name]
            except KeyError:
                raise LabError(f"table {table.name} has no match field {name!r}; fields: "
                               f"{', '.join(table.fields)}") from None
            fm = p4runtime_pb2.FieldMatch(field_id=f.id)
            if isinstance(match, Ternary):
                mask = int.from_bytes(encode(match.mask, f.bitwidth), "big")
                if mask == 0:
                    continue  # a wildcard is left out
                value = int.from_bytes(encode(match.value, f.bitwidth), "big") & mask
                fm.ternary.value = encode(value, f.bitwidth)
                fm.ternary.mask = encode(mask, f.bitwidth)
            elif isinstance(match, Lpm):
                if match.prefix_len == 0:
                    continue
                fm.lpm.value = encode(match.value, f.bitwidth)
                fm.lpm.prefix_len = match.prefix_len
            else:
                value = match.value if isinstance(match, Exact) else match
                fm.exact.value = encode(value, f.bitwidth)
            message.match.append(fm)
        if entry.action:
            message.action.action.CopyFrom(self._action(entry.action, entry.params))
        return message

    def _action(self, name: str, params: Mapping[str, Value]) -> p4runtime_pb2.Action:
        action = self.info.action(name)
        missing = set(action.params) - set(params)
        unknown = set(params) - set(action.params)
        if missing or unknown:
            raise LabError(f"action {action.name} takes parameters {', '.join(action.params) or 'none'}; "
                           f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        return p4runtime_pb2.Action(action_id=action.id, params=[
            p4runtime_pb2.Action.Param(param_id=pid, value=encode(params[pname], width))
            for pname, (pid, width) in action.params.items()])

    def _write_entry(self, update_type: int, entry: TableEntry) -> None:
        self.write(update_type, p4runtime_pb2.Entity(table_entry=self.table_entry(entry)),
                   f"{entry.table} {dict(entry.match)}")

    def insert(self, entry: TableEntry) -> None:
        """Insert one table entry."""
        self._write_entry(INSERT, entry)

    def modify(self, entry: TableEntry) -> None:
        """Change the action of an existing table entry."""
        self._write_entry(MODIFY, entry)

    def delete(self, entry: TableEntry) -> None:
        """Delete one table entry (its action is ignored)."""
        self._write_entry(DELETE, TableEntry(entry.table, entry.match, priority=entry.priority))

    def set_default(self, table: str, action: str, params: Optional[Mapping[str, Value]] = None) -> None:
        """Set the action a table runs on a miss.

        Args:
            table: the table.
            action: the action.
            params: its parameters.
        """
        message = p4runtime_pb2.TableEntry(table_id=self.info.table(table).id, is_default_action=True)
        message.action.action.CopyFrom(self._action(action, params or {}))
        self.write(MODIFY, p4runtime_pb2.Entity(table_entry=message), f"default action of {table}")

    def write_multicast_group(self, update_type: int, group_id: int,
                              replicas: Iterable[tuple[int, int]] = ()) -> None:
        """Insert, modify or delete a multicast group of the packet replication engine.

        Args:
            update_type: :data:`INSERT`, :data:`MODIFY` or :data:`DELETE`.
            group_id: the group (``standard_metadata.mcast_grp``), 1 or more.
            replicas: (egress port, instance) pairs; the instance is ``egress_rid`` in egress.
        """
        group = p4runtime_pb2.MulticastGroupEntry(multicast_group_id=group_id, replicas=[
            p4runtime_pb2.Replica(egress_port=port, instance=instance) for port, instance in replicas])
        entity = p4runtime_pb2.Entity(packet_replication_engine_entry=p4runtime_pb2.PacketReplicationEngineEntry(
            multicast_group_entry=group))
        self.write(update_type, entity, f"multicast group {group_id}")

    def read_multicast_groups(self) -> dict[int, list[tuple[int, int]]]:
        """Every multicast group the server holds: group id -> (egress port, instance) pairs."""
        entity = p4runtime_pb2.Entity(packet_replication_engine_entry=p4runtime_pb2.PacketReplicationEngineEntry(
            multicast_group_entry=p4runtime_pb2.MulticastGroupEntry()))
        return {e.packet_replication_engine_entry.multicast_group_entry.multicast_group_id:
                [(r.egress_port, r.instance) for r in e.packet_replication_engine_entry.multicast_group_entry.replicas]
                for e in self.read(entity, "multicast groups")}

    # -- reads ---------------------------------------------------------------------------

    def read(self, entity: p4runtime_pb2.Entity, what: str) -> list[p4runtime_pb2.Entity]:
        """Read every entity matching ``entity`` (a wildcard read where fields are unset)."""
        request = p4runtime_pb2.ReadRequest(device_id=self.device_id, entities=[entity])
        try:
            return [e for response in self.stub.Read(request, timeout=self.timeout)
                    for e in response.entities]
        except grpc.RpcError as err:
            raise _from_rpc_error(f"reading {what}", err) from None

    def read_counter(self, name: str, index: Optional[int] = None) -> dict[int, CounterValue]:
        """Read a counter array: every cell, or only ``index``.

        Returns:
            index -> packets and bytes.
        """
        counter_id, _size = self.info.counter(name)
        entry = p4runtime_pb2.CounterEntry(counter_id=counter_id)
        if index is not None:
            entry.index.index = index
        entities = self.read(p4runtime_pb2.Entity(counter_entry=entry), f"counter {name}")
        return {e.counter_entry.index.index: CounterValue(e.counter_entry.data.packet_count,
                                                          e.counter_entry.data.byte_count)
                for e in entities}

    def read_table(self, table: str) -> list[p4runtime_pb2.TableEntry]:
        """Read every entry of a table."""
        entry = p4runtime_pb2.TableEntry(table_id=self.info.table(table).id)
        return [e.table_entry for e in self.read(p4runtime_pb2.Entity(table_entry=entry), f"table {table}")]
