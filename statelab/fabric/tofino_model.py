"""tofino-model fabric: the steering contract on open-p4studio's Tofino model, over P4Runtime.

UNVERIFIED: written against open-p4studio's sources and documented interfaces on a machine
that has neither ``tofino-model`` nor ``bf_switchd``; nothing here has run against them (see
docs/targets.md). What was checked, and where:

- ``tofino-model`` (pkgsrc/tofino-model, model main): ``--chip-type`` (2 Tofino, 5 Tofino 2,
  as open-p4studio's run_tofino_model.sh passes them), ``-d`` devices, ``-f`` port map,
  ``-t``/``--tcp-port-base`` (it uses base..base+3), ``--no-cli`` (no CLI port, and SIGTERM
  ends it), ``--log-dir``, ``--logs-disable``. Ports are fixed when it starts: it opens every
  interface of the port map and then drops its privileges. The port map's ``PortToVeth``
  entries name interfaces by number only (``"veth1": 4`` opens ``veth4``); ``PortToIf`` maps a
  device port to any interface name (open-p4studio's own
  p4-examples/ptf-tests/basic_switching/model_eth_port.json), so the driver uses ``PortToIf``
  and names every port after its switch: two models never meet in one global ``vethN`` space.
- ``bf_switchd`` (pkgsrc/bf-drivers/bf_switchd): ``--install-dir --conf-file --tcp-port-base
  --status-port --bfrt-grpc-port --p4rt-server ADDR:PORT --skip-p4 --background
  --server-listen-local-only``. The status server answers one byte, "1" once the device is
  ready, to a request of one byte, the device id ("0"). The P4Runtime server exists only in
  builds with ``P4RT`` (p4studio profile ``drivers: p4rt: true``); it is PI's DeviceMgr on
  bf-drivers' PI target, P4Runtime device id 0. Model and driver find each other on the TCP
  port base in either start order (both sides' clients retry every second).
- The pipeline (bf-drivers src/pi/pi_imp.c, ``_pi_update_device_start``): ``device_data`` is
  length-prefixed chunks, each a 32-bit length in host order (little-endian here) then the
  bytes: program name, tofino.bin, context.json, then the P4 pipeline name and bfrt.json --
  or a zero length for "no pipeline name" (the driver reads that length unconditionally, so
  it is always sent). PI's frontend takes ``p4_device_config`` either raw or wrapped in the
  legacy ``p4.tmp.P4DeviceConfig`` message (field 3, ``device_data``); the driver wraps it, as
  open-p4studio's own p4runtime_update_config.py does, which every PI version parses.

Ports. The model holds one interface per device port for its whole life, and each is half of
a veth pair the driver owns (``<switch>-t<dev>``, the model's end; ``<switch>-w<dev>``, the
wire end). The lab's own interfaces (``<switch>-p<port>``, one per link) are joined to a wire
end by two tc ``mirred`` redirects, a pure wire in both directions. At start every linked
interface gets a device port, and spare device ports are made for the instances pools may
still gain (:func:`default_spares`); :meth:`TofinoModelFabric.attach` joins a newly linked
interface to a free spare, :meth:`TofinoModelFabric.detach` frees it again. Mininet port
numbers are translated to device ports in everything the steering tables hold.

Tables. :class:`statelab.fabric.bmv2.Bmv2Steering` programs p4/steering_tna.p4, which keeps
the names of p4/steering.p4; the P4Info's pipeline prefix (``pipe.``) is taken off for the
lookups (:func:`steering_names`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from mininet.node import Switch

from statelab.errors import LabError, MissingDependency, ProcessFailed
from statelab.fabric import Fabric, Member, PoolKey, SteeringPlan, register
from statelab.fabric.bmv2 import P4_BUILD, P4_INFO, P4_JSON, Bmv2Steering, free_port
from statelab.fabric.p4rt import P4Info, P4RuntimeClient, P4RuntimeError

MODEL = "tofino-model"
SWITCHD = "bf_switchd"
PACKAGE = "open-p4studio"
PACKAGE_HINT = ("they come from open-p4studio (https://github.com/p4lang/open-p4studio), not from a "
                "Debian package: build it with a p4studio profile that has `drivers: {p4rt: true}` "
                "(bf_switchd's P4Runtime server), then source the setup script it writes "
                "(create-setup-script.sh) so that $SDE_INSTALL/bin is on PATH; see docs/targets.md")
PROGRAM = "steering_tna"          # the program name sent in device_data
PIPELINE = "pipe"                 # the Pipeline instance of p4/steering_tna.p4
MAX_NAME = 100                    # bf-drivers' _PI_UPDATE_MAX_NAME_SIZE
P4RT_DEVICE_ID = 0                # bf_switchd's PI device: the P4Runtime device id is the bf device id
DEVICE_STATUS_READY = b"1"
HUGEPAGES_WANTED = 196            # what open-p4studio's run_switchd.sh sets up for DMA
IFNAMSIZ = 15
PORT_MAP_PATH_MAX = 250           # tofino-model copies -f into char[250]; a path with "None" means none


# -- chips and their ports ----------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    """A Tofino generation as the model and the compiler name it.

    Attributes:
        name: the compiler's ``--target`` (and the build directory's suffix).
        chip_type: tofino-model's ``--chip-type``.
        family: ``chip_family`` in bf_switchd's conf file.
        arch: the compiler's ``--arch``.
        binary: the pipeline binary bf-p4c writes into ``<out>/pipe/``.
        first_port: the first front-panel port of each pipe (Tofino 2's pipe 0 starts with
            CPU ports 0..7, which the model maps at 8 and up).
    """

    name: str
    chip_type: int
    family: str
    arch: str
    binary: str
    first_port: int
    pipes: int = 4
    ports_per_pipe: int = 64

    def device_ports(self) -> tuple[int, ...]:
        """Every front-panel device port, pipe 0 first (a device port is pipe << 7 | port)."""
        return tuple(pipe << 7 | (self.first_port + i)
                     for pipe in range(self.pipes) for i in range(self.ports_per_pipe))


CHIPS: Mapping[str, Chip] = {
    "tofino": Chip("tofino", 2, "Tofino", "tna", "tofino.bin", first_port=0),
    "tofino2": Chip("tofino2", 5, "Tofino2", "t2na", "tofino2.bin", first_port=8),
}


def chip_of(name: str) -> Chip:
    """The chip called ``name``.

    Raises:
        LabError: not a chip this driver knows; lists those it does.
    """
    try:
        return CHIPS[name]
    except KeyError:
        raise LabError(f"unknown Tofino chip {name!r}; known: {', '.join(CHIPS)}") from None


def max_pool_instances() -> int:
    """The most instances a pool may start with: the topology schema's maximum."""
    from statelab.spec import SCHEMA_PATH
    schema = json.loads(SCHEMA_PATH.read_text())
    return int(schema["$defs"]["pool"]["properties"]["instances"]["maximum"])


def default_spares(linked_ports: Iterable[int]) -> int:
    """Spare device ports for a switch whose ports ``linked_ports`` are linked at start.

    Every pool starts with at least one instance, so there are no more pools than NF ports
    at start (the lab numbers NF ports from ``NF_PORT_BASE``), and each pool may grow to the
    schema's maximum: ``(maximum - 1) * NF ports`` spares let every pool grow that far.
    """
    from statelab.lab import NF_PORT_BASE
    nf_ports = sum(1 for p in linked_ports if p >= NF_PORT_BASE)
    return (max_pool_instances() - 1) * nf_ports


@dataclass(frozen=True)
class PortMap:
    """The device ports of one model: those of the ports linked at start, and the spares.

    Attributes:
        switch: the switch name (prefix of the driver's interfaces).
        assigned: Mininet port -> device port, for the ports linked when the model starts.
        spares: device ports kept free for ports attached later, in the order they are used.
    """

    switch: str
    assigned: Mapping[int, int]
    spares: tuple[int, ...]

    def device_ports(self) -> tuple[int, ...]:
        """Every device port the model has, ascending."""
        return tuple(sorted((*self.assigned.values(), *self.spares)))

    def model_intf(self, dev: int) -> str:
        """The interface the model holds as device port ``dev``."""
        return f"{self.switch}-t{dev}"

    def wire_intf(self, dev: int) -> str:
        """The free end of device port ``dev``'s veth pair, joined to a lab interface."""
        return f"{self.switch}-w{dev}"

    def to_json(self) -> dict[str, Any]:
        """tofino-model's ``-f`` port map: every device port on the interface named for it."""
        return {"PortToIf": [{"device_port": dev, "if": self.model_intf(dev)}
                             for dev in self.device_ports()]}


def plan_ports(switch: str, linked: Iterable[int], spares: int, chip: Chip) -> PortMap:
    """Give each linked Mininet port a device port (ascending), then up to ``spares`` more.

    Args:
        switch: the switch name.
        linked: the Mininet ports linked before the model starts.
        spares: how many spare ports are wanted; fewer are made if the chip has no more.
        chip: the chip whose front-panel ports are used.

    Raises:
        LabError: more ports are linked than the chip has, or an interface name would be
            longer than Linux allows.
    """
    ports = sorted(set(linked))
    free = list(chip.device_ports())
    if len(ports) > len(free):
        raise LabError(f"fabric {switch}: {len(ports)} ports are linked but a {chip.name} model has "
                       f"{len(free)} front-panel ports")
    assigned = dict(zip(ports, free))
    rest = free[len(ports):]
    port_map = PortMap(switch, assigned, tuple(rest[:max(0, spares)]))
    longest = max((port_map.model_intf(d) for d in port_map.device_ports()), key=len, default="")
    if len(longest) > IFNAMSIZ:
        raise LabError(f"fabric {switch}: interface name {longest!r} is longer than {IFNAMSIZ} "
                       f"characters; use a shorter switch name")
    return port_map


# -- the pipeline -------------------------------------------------------------------------


def _chunk(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def device_data(program: str, binary: bytes, context: bytes, pipeline: Optional[str] = None,
                bfrt: Optional[bytes] = None) -> bytes:
    """bf-drivers' ``device_data`` for SetForwardingPipelineConfig.

    Args:
        program: the program name (at most 100 bytes).
        binary: the compiler's tofino.bin (tofino2.bin).
        context: the compiler's context.json.
        pipeline: the P4 pipeline's name (``pipe``), sent with ``bfrt``; None sends a zero
            length ("no pipeline name").
        bfrt: the compiler's bfrt.json; needed with ``pipeline``.

    Raises:
        LabError: a name is too long, or ``pipeline`` and ``bfrt`` are not given together.
    """
    name = program.encode()
    if not name or len(name) > MAX_NAME:
        raise LabError(f"program name {program!r}: 1 to {MAX_NAME} bytes, as bf-drivers reads it")
    data = _chunk(name) + _chunk(binary) + _chunk(context)
    if (pipeline is None) != (bfrt is None):
        raise LabError("device_data: a pipeline name goes with its bfrt.json, and neither without the other")
    if pipeline is None:
        return data + struct.pack("<I", 0)
    pipe = pipeline.encode()
    if not pipe or len(pipe) > MAX_NAME:
        raise LabError(f"pipeline name {pipeline!r}: 1 to {MAX_NAME} bytes, as bf-drivers reads it")
    return data + _chunk(pipe) + _chunk(bfrt)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def p4_device_config(data: bytes) -> bytes:
    """``data`` wrapped in PI's ``p4.tmp.P4DeviceConfig`` (proto/p4/tmp/p4config.proto:
    ``bytes device_data = 3``), the form every PI version accepts."""
    return b"\x1a" + _varint(len(data)) + data


@dataclass(frozen=True)
class TnaBuild:
    """The compiler's outputs for p4/steering_tna.p4, laid out as ``p4c --target tofino
    --arch tna -o DIR`` writes them (docs/targets.md).

    Attributes:
        directory: the ``-o`` directory (default ``p4/build/steering_tna.<chip>``).
        chip: the chip it was compiled for.
    """

    directory: Path
    chip: Chip

    @property
    def p4info(self) -> Path:
        return self.directory / "p4info.txtpb"

    @property
    def binary(self) -> Path:
        return self.directory / PIPELINE / self.chip.binary

    @property
    def context(self) -> Path:
        return self.directory / PIPELINE / "context.json"

    @property
    def bfrt(self) -> Path:
        return self.directory / "bfrt.json"

    def missing(self) -> list[Path]:
        """The files the driver needs that are not there (bfrt.json is optional)."""
        return [p for p in (self.p4info, self.binary, self.context) if not p.is_file()]

    def device_data(self) -> bytes:
        """This build's ``device_data`` (with the pipeline name and bfrt.json if there is one)."""
        bfrt = self.bfrt.read_bytes() if self.bfrt.is_file() else None
        return device_data(PROGRAM, self.binary.read_bytes(), self.context.read_bytes(),
                           PIPELINE if bfrt is not None else None, bfrt)

    def stage(self, dest: Path) -> Path:
        """Write the P4Info and the ``p4_device_config`` where :class:`Bmv2Steering` takes a
        pipeline from (``P4_INFO`` and ``P4_JSON`` in one directory); return ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.p4info, dest / P4_INFO)
        (dest / P4_JSON).write_bytes(p4_device_config(self.device_data()))
        return dest


def default_build(chip: Chip) -> TnaBuild:
    """Where the docs tell bf-p4c to write the program for ``chip``."""
    return TnaBuild(P4_BUILD / f"{PROGRAM}.{chip.name}", chip)


def steering_names(info: P4Info, pipeline: str = PIPELINE) -> P4Info:
    """``info`` for lookups by p4/steering.p4's names: bf-p4c prefixes tables and externs
    with the pipeline's name (``pipe.SteeringIngress.classify``); the copy drops the prefix.
    The switch keeps the P4Info as compiled."""
    message = type(info.message)()
    message.CopyFrom(info.message)
    prefix = pipeline + "."
    for kind in ("tables", "actions", "counters"):
        for item in getattr(message, kind):
            if item.preamble.name.startswith(prefix):
                item.preamble.name = item.preamble.name[len(prefix):]
    return P4Info(message)


class TnaP4RuntimeClient(P4RuntimeClient):
    """A P4Runtime client that looks up p4/steering.p4's names on the TNA P4Info.

    Args:
        *args: as :class:`P4RuntimeClient`.
        pipeline: the P4 pipeline's name (the prefix bf-p4c gives names).
        **kwargs: as :class:`P4RuntimeClient`.
    """

    def __init__(self, *args: Any, pipeline: str = PIPELINE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def set_pipeline(self, p4info: Path, device_config: Path) -> None:
        super().set_pipeline(p4info, device_config)
        self.p4info = steering_names(self.info, self.pipeline)


# -- the processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePorts:
    """The TCP ports of one model and its driver, all on 127.0.0.1.

    Attributes:
        tcp_base: the model channels (the model and bf_switchd use tcp_base..tcp_base+3).
        status: bf_switchd's device status server.
        bfrt_grpc: bf_switchd's BF Runtime gRPC server.
        p4rt: bf_switchd's P4Runtime server.
    """

    tcp_base: int
    status: int
    bfrt_grpc: int
    p4rt: int


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def allocate_ports(rng: Optional[random.Random] = None) -> ServicePorts:
    """Free ports for one model: four consecutive ones for the model channels, three more.

    Raises:
        LabError: no four consecutive free ports were found.
    """
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000, 4)
        if all(_bindable(base + i) for i in range(4)):
            taken = set(range(base, base + 4))
            others = []
            while len(others) < 3:
                port = free_port()
                if port not in taken:
                    taken.add(port)
                    others.append(port)
            return ServicePorts(base, *others)
    raise LabError("no four consecutive free TCP ports between 20000 and 30000 for tofino-model")


def model_command(binary: str, chip: Chip, port_map: Path, ports: ServicePorts, log_dir: Path,
                  logs: bool = False) -> list[str]:
    """The command line of tofino-model.

    Args:
        binary: the program (``tofino-model`` or its path).
        chip: the chip to model.
        port_map: the ``-f`` file (:meth:`PortMap.to_json`).
        ports: the TCP ports (only ``tcp_base`` is the model's).
        log_dir: where its logs go.
        logs: keep its per-packet logs (slow); otherwise ``--logs-disable``.
    """
    command = [binary, "--chip-type", str(chip.chip_type), "-d", "1", "-f", str(port_map),
               "--tcp-port-base", str(ports.tcp_base), "--no-cli", "--log-dir", str(log_dir)]
    if not logs:
        command.append("--logs-disable")
    return command


def switchd_command(binary: str, install_dir: Path, conf_file: Path, ports: ServicePorts) -> list[str]:
    """The command line of bf_switchd: no P4 program (it comes over P4Runtime), no shell,
    servers on 127.0.0.1 only."""
    return [binary, "--install-dir", str(install_dir), "--conf-file", str(conf_file),
            "--tcp-port-base", str(ports.tcp_base), "--status-port", str(ports.status),
            "--bfrt-grpc-port", str(ports.bfrt_grpc), "--p4rt-server", f"127.0.0.1:{ports.p4rt}",
            "--skip-p4", "--background", "--server-listen-local-only"]


def switchd_conf(chip: Chip) -> dict[str, Any]:
    """bf_switchd's conf file for a device without a P4 program: what open-p4studio installs
    as share/p4/targets/<chip>/<chip>_skip_p4.conf (paths relative to ``--install-dir``)."""
    asic: dict[str, Any] = {"chip_family": chip.family,
                            "pcie_sysfs_prefix": "/sys/devices/pci0000:00/0000:00:03.0/0000:05:00.0",
                            "pcie_int_mode": 1, "instance": 0,
                            "sds_fw_path": "share/tofino_sds_fw/avago/firmware"}
    if chip.name == "tofino":
        asic["id"] = "asic-0"
    return {"chip_list": [asic],
            "p4_program_list": [{"pd-thrift": "", "program-name": "dummy", "tofino-bin": "",
                                 "instance": 0, "pd": "", "agent0": "lib/libpltfm_mgr.so",
                                 "path": "dummy", "table-config": ""}]}


def switchd_ready(status_port: int, timeout: float = 1.0) -> bool:
    """Ask bf_switchd's status server whether device 0 is ready."""
    try:
        with socket.create_connection(("127.0.0.1", status_port), timeout=timeout) as s:
            s.sendall(b"0")
            return s.recv(1) == DEVICE_STATUS_READY
    except OSError:
        return False


def install_dir(switchd: Optional[str] = None) -> Path:
    """$SDE_INSTALL, or the directory above the bin/ that holds bf_switchd."""
    if os.environ.get("SDE_INSTALL"):
        return Path(os.environ["SDE_INSTALL"])
    found = switchd or shutil.which(SWITCHD)
    if found is None:
        raise MissingDependency(SWITCHD, PACKAGE)
    return Path(found).resolve().parent.parent


def process_env(install: Path) -> dict[str, str]:
    """The environment open-p4studio's run scripts give the model and the driver."""
    env = dict(os.environ)
    env["SDE_INSTALL"] = str(install)
    env["PATH"] = f"{install / 'bin'}:{env.get('PATH', '')}"
    libs = [str(install / "lib")] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    return env


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} cannot be read)"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _run(args: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{what}: `{' '.join(args)}` failed (exit code {proc.returncode}): "
                       f"{proc.stderr.strip()}")


def make_port_pairs(pairs: Sequence[tuple[str, str]], mtu: int = 1500) -> None:
    """Create one veth pair per device port (model end, wire end): up, no IPv6 (so the kernel
    sends nothing on them), TX checksum offload off (the model reads what a raw socket gets).

    Raises:
        LabError: ``ip`` refused (the message names the first failing line).
    """
    if not pairs:
        return
    lines = [f"link add {t} mtu {mtu} type veth peer name {w} mtu {mtu}" for t, w in pairs]
    _ip_batch(lines, "creating the model's device ports")
    for t, w in pairs:
        for name in (t, w):
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
            subprocess.run(["ethtool", "-K", name, "tx", "off"], capture_output=True)
    _ip_batch([f"link set {name} up" for pair in pairs for name in pair], "bringing the device ports up")


def _ip_batch(lines: Sequence[str], what: str) -> None:
    proc = subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{what}: `ip -batch` failed (exit code {proc.returncode}): {proc.stderr.strip()}")


def wire(a: str, b: str) -> None:
    """Join two interfaces into a wire: all a receives leaves by b, and back (tc mirred)."""
    for src, dst in ((a, b), (b, a)):
        subprocess.run(["tc", "qdisc", "del", "dev", src, "clsact"], capture_output=True)
        _run(["tc", "qdisc", "add", "dev", src, "clsact"], f"wiring {a} to {b}")
        _run(["tc", "filter", "add", "dev", src, "ingress", "protocol", "all", "u32", "match", "u32",
              "0", "0", "action", "mirred", "egress", "redirect", "dev", dst], f"wiring {a} to {b}")


def unwire(*names: str) -> None:
    """Undo :func:`wire` on whichever of ``names`` still exist."""
    for name in names:
        if Path(f"/sys/class/net/{name}").exists():
            subprocess.run(["tc", "qdisc", "del", "dev", name, "clsact"], capture_output=True)


def _mtu(name: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{name}/mtu").read_text())
    except (OSError, ValueError):
        return 1500


@dataclass
class _Process:
    what: str
    command: list[str]
    log: Path
    proc: subprocess.Popen

    def describe(self) -> str:
        return f"{self.what} (pid {self.proc.pid}: {' '.join(self.command)})"


# -- the driver -----------------------------------------------------------------------------


@register
class TofinoModelFabric(Fabric, Switch):
    """The tofino-model driver: open-p4studio's model and bf_switchd, programmed over P4Runtime.

    Args:
        name: the switch name (also the prefix of its interfaces).
        chip: ``tofino`` (TNA) or ``tofino2`` (T2NA).
        p4_build: the compiler's output directory for the chip (default
            ``p4/build/steering_tna.<chip>``, docs/targets.md).
        spare_ports: device ports kept for ports attached while running (default
            :func:`default_spares` of the ports linked at start).
        log_dir: where the logs go (default: the lab's run directory once bound, else a
            directory in /tmp).
        model_logs: let the model log every packet (slow); otherwise ``--logs-disable``.
        start_timeout: how long ``start`` waits for the device and the pipeline, in seconds
            (open-p4studio: "one to two minutes" to initialise).
        rpc_timeout: the deadline of every P4Runtime call, in seconds (a pipeline push
            reconfigures the model).
        **params: passed to :class:`mininet.node.Switch` (e.g. ``dpid``).
    """

    kind = "tofino-model"
    package = PACKAGE
    binaries = (MODEL, SWITCHD)
    chip_name = "tofino"

    def __init__(self, name: str, chip: Optional[str] = None, p4_build: Union[str, Path, None] = None,
                 spare_ports: Optional[int] = None, log_dir: Union[str, Path, None] = None,
                 model_logs: bool = False, start_timeout: float = 240.0, rpc_timeout: float = 120.0,
                 **params: Any) -> None:
        Switch.__init__(self, name, **params)
        self.chip = chip_of(chip or self.chip_name)
        self.build = TnaBuild(Path(p4_build), self.chip) if p4_build else default_build(self.chip)
        self.spare_ports = spare_ports
        self.log_dir = Path(log_dir) if log_dir else None
        self.model_logs = model_logs
        self.start_timeout = start_timeout
        self.rpc_timeout = rpc_timeout
        self.ports_in_use: Optional[ServicePorts] = None
        self.port_map: Optional[PortMap] = None
        self._device_of: dict[int, int] = {}     # Mininet port -> device port
        self._free: list[int] = []              # spare device ports, longest free first
        self._procs: list[_Process] = []
        self.client: Optional[TnaP4RuntimeClient] = None
        self.plan: Optional[SteeringPlan] = None
        self.steering = Bmv2Steering(self._switch, self.build.directory, f"fabric {name}")

    @classmethod
    def setup(cls) -> None:
        """Check that tofino-model, bf_switchd and the compiled program are there.

        Raises:
            MissingDependency: a program is not installed (the message says open-p4studio).
            LabError: the program has not been compiled for the chip.
        """
        for binary in cls.binaries:
            if shutil.which(binary) is None:
                err = MissingDependency(binary, cls.package)
                err.args = (f"{binary} not found: {PACKAGE_HINT}",)
                raise err
        build = default_build(chip_of(cls.chip_name))
        missing = build.missing()
        if missing:
            raise LabError(f"{', '.join(map(str, missing))} missing: compile p4/steering_tna.p4 with "
                           f"open-p4studio's compiler into {build.directory} (docs/targets.md, "
                           f"\"tofino-model\")")

    # -- the processes ---------------------------------------------------------------------

    def _logs(self) -> Path:
        base = self.log_dir or (Path(self.run_dir) if self.run_dir else
                                Path(tempfile.gettempdir()) / f"statelab-{self.name}")
        base.mkdir(parents=True, exist_ok=True)
        return base

    def _linked(self) -> dict[int, str]:
        return {port: intf.name for port, intf in self.intfs.items() if port > 0 and intf.name != "lo"}

    def start(self, controllers: Sequence[Any] = ()) -> None:
        """Make the device ports, start tofino-model and bf_switchd, wait until the device is
        ready and has accepted the program.

        Raises:
            ProcessFailed: a process exited, or the device was not ready in ``start_timeout``.
            LabError: a port could not be made, or the compiled program is missing.
        """
        if self._procs and all(p.proc.poll() is None for p in self._procs):
            return
        missing = self.build.missing()
        if missing:
            raise LabError(f"fabric {self.name}: {', '.join(map(str, missing))} missing (docs/targets.md)")
        logs = self._logs()
        linked = self._linked()
        spares = default_spares(linked) if self.spare_ports is None else self.spare_ports
        self.port_map = plan_ports(self.name, linked, spares, self.chip)
        try:
            self._make_ports(linked)
            self.steering.p4_build = self.build.stage(logs / f"{self.name}-pipeline")
            self.ports_in_use = allocate_ports()
            port_map_file = logs / f"{self.name}-ports.json"
            if len(str(port_map_file)) >= PORT_MAP_PATH_MAX or "None" in str(port_map_file):
                raise LabError(f"fabric {self.name}: tofino-model takes a port map path of fewer than "
                               f"{PORT_MAP_PATH_MAX} characters without \"None\" in it: {port_map_file}")
            port_map_file.write_text(json.dumps(self.port_map.to_json(), indent=1) + "\n")
            conf = logs / f"{self.name}-switchd.conf"
            conf.write_text(json.dumps(switchd_conf(self.chip), indent=1) + "\n")
            install = install_dir()
            env = process_env(install)
            self._spawn("tofino-model", model_command(shutil.which(MODEL) or MODEL, self.chip, port_map_file,
                                                      self.ports_in_use, logs, self.model_logs),
                        logs / f"{self.name}-model.log", env, logs)
            self._spawn("bf_switchd", switchd_command(shutil.which(SWITCHD) or SWITCHD, install, conf,
                                                      self.ports_in_use),
                        logs / f"{self.name}-switchd.log", env, logs)
            self._connect()
        except BaseException:
            self._stop_processes()
            self._remove_ports()
            raise

    def _make_ports(self, linked: Mapping[int, str]) -> None:
        assert self.port_map is not None
        mtu = max([1500, *(_mtu(n) for n in linked.values())])   # NF links carry NSH: 1600
        pairs = [(self.port_map.model_intf(d), self.port_map.wire_intf(d)) for d in self.port_map.device_ports()]
        if self.record is not None:
            for t, _w in pairs:
                self.record.add_interface(t)   # deleting one end deletes the pair
        make_port_pairs(pairs, mtu)
        for port, dev in self.port_map.assigned.items():
            _ip("link", "set", linked[port], "up")
            wire(linked[port], self.port_map.wire_intf(dev))
        self._device_of = dict(self.port_map.assigned)
        self._free = list(self.port_map.spares)

    def _remove_ports(self) -> None:
        if self.port_map is None:
            return
        for port in list(self._device_of):
            if port in self.intfs:
                unwire(self.intfs[port].name)
        names = [self.port_map.model_intf(d) for d in self.port_map.device_ports()]
        existing = [n for n in names if Path(f"/sys/class/net/{n}").exists()]
        if existing:
            subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"link del {n}\n" for n in existing),
                           capture_output=True, text=True)
        self._device_of.clear()
        self._free.clear()

    def _spawn(self, what: str, command: list[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> None:
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            # its own session: a Ctrl-C meant for the lab does not end it mid-teardown; its cwd
            # is the log directory (bf_switchd and PI write their files there)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env), cwd=str(cwd), start_new_session=True)
        entry = _Process(f"{what} of fabric {self.name}", command, log_path, proc)
        self._procs.append(entry)
        if self.record is not None:
            self.record.add_process(proc.pid, entry.describe())

    def _failed(self, entry: Optional[_Process] = None, why: str = "") -> ProcessFailed:
        """The error for a process that exited (``entry``) or a start that did not finish."""
        if entry is None:
            dead = [p for p in self._procs if p.proc.poll() is not None]
            entry = dead[0] if dead else (self._procs[-1] if self._procs else None)
        if entry is None:
            return ProcessFailed(f"fabric {self.name} {why}".strip(), None, "")
        tails = "\n".join(f"--- {p.log}\n{_tail(p.log)}" for p in self._procs)
        hint = ""
        if entry.what.startswith("bf_switchd") and _hugepages() < HUGEPAGES_WANTED:
            hint = (f"\n(vm.nr_hugepages is {_hugepages()}; open-p4studio's run_switchd.sh sets it "
                    f"to {HUGEPAGES_WANTED} for DMA: `sudo sysctl -w vm.nr_hugepages={HUGEPAGES_WANTED}`)")
        return ProcessFailed(entry.describe() + (f" {why}" if why else ""), entry.proc.poll(), tails + hint)

    def _dead(self) -> Optional[_Process]:
        return next((p for p in self._procs if p.proc.poll() is not None), None)

    def _connect(self) -> None:
        """Wait for the device status "1", then for the P4Runtime server to take the program."""
        assert self.ports_in_use is not None
        deadline = time.monotonic() + self.start_timeout
        while not switchd_ready(self.ports_in_use.status):
            dead = self._dead()
            if dead is not None:
                raise self._failed(dead)
            if time.monotonic() > deadline:
                raise self._failed(why=f"did not report device 0 ready on status port "
                                       f"{self.ports_in_use.status} within {self.start_timeout:g}s")
            time.sleep(0.5)
        while True:
            dead = self._dead()
            if dead is not None:
                raise self._failed(dead)
            client = TnaP4RuntimeClient(f"127.0.0.1:{self.ports_in_use.p4rt}", P4RT_DEVICE_ID,
                                        timeout=self.rpc_timeout)
            try:
                client.connect(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                client.set_pipeline(self.steering.p4_build / P4_INFO, self.steering.p4_build / P4_JSON)
            except P4RuntimeError as err:
                client.close()
                dead = self._dead()
                if dead is not None:
                    raise self._failed(dead) from None
                if not err.unavailable or time.monotonic() > deadline:
                    raise self._failed(why=f"did not accept the program within {self.start_timeout:g}s "
                                           f"({err})") from None
                time.sleep(0.5)
                continue
            self.client = client
            return

    def processes(self) -> list[tuple[int, str]]:
        """The processes this switch started, by PID (also in the lab's record)."""
        return [(p.proc.pid, p.describe()) for p in self._procs]

    def _stop_processes(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        for entry in reversed(self._procs):        # the driver first, then the model
            if entry.proc.poll() is None:
                entry.proc.send_signal(signal.SIGTERM)
                try:
                    entry.proc.wait(5)
                except subprocess.TimeoutExpired:
                    entry.proc.kill()
                    entry.proc.wait()
        self._procs.clear()

    def stop(self, deleteIntfs: bool = True) -> None:  # noqa: N803 (Mininet's signature)
        """Stop bf_switchd and the model, delete the device ports, then let Mininet delete the
        lab's interfaces."""
        self._stop_processes()
        self._remove_ports()
        Switch.stop(self, deleteIntfs)

    @contextlib.contextmanager
    def _switch(self) -> Iterator[P4RuntimeClient]:
        """The P4Runtime client, checking first that both processes still run; a failed call
        to a device whose processes died raises :class:`ProcessFailed` with their logs."""
        if not self._procs or self.client is None:
            raise LabError(f"fabric {self.name} is not started")
        dead = self._dead()
        if dead is not None:
            raise self._failed(dead, "has died")
        try:
            yield self.client
        except P4RuntimeError:
            time.sleep(0.5)
            dead = self._dead()
            if dead is None:
                raise  # both run: the call itself was refused
            raise self._failed(dead, "has died") from None

    # -- ports -------------------------------------------------------------------------------

    def device_port(self, port: int) -> int:
        """The device port that Mininet port ``port`` is wired to.

        Raises:
            LabError: the port is not attached.
        """
        try:
            return self._device_of[port]
        except KeyError:
            raise LabError(f"port {port} of fabric {self.name} is not attached to a device port") from None

    def attach(self, intf: Any) -> None:
        """Wire an interface linked to the running switch to a spare device port."""
        port, name = self._port_of(intf)
        if not self._procs or self.port_map is None:
            return  # start() wires every interface linked by then
        if port in self._device_of:
            return
        if not self._free:
            raise LabError(f"fabric {self.name}: all {len(self.port_map.spares)} spare ports of the "
                           f"model are in use (tofino-model's ports are fixed when it starts); give "
                           f"the switch more with spare_ports=")
        dev = self._free.pop(0)
        w = self.port_map.wire_intf(dev)
        mtu = _mtu(name)
        for n in (self.port_map.model_intf(dev), w):
            _ip("link", "set", n, "mtu", str(mtu))
        _ip("link", "set", name, "up")
        try:
            wire(name, w)
        except LabError:
            unwire(name, w)
            self._free.insert(0, dev)
            raise
        self._device_of[port] = dev

    def detach(self, intf: Any) -> None:
        """Unwire an interface (its device port becomes a spare again)."""
        port, name = self._port_of(intf)
        dev = self._device_of.pop(port, None)
        if dev is None or self.port_map is None:
            return
        unwire(name, self.port_map.wire_intf(dev))
        self._free.append(dev)

    # -- the Fabric interface (Bmv2Steering does the work, on device ports) ----------------

    def _member(self, member: Member) -> Member:
        return dataclasses.replace(member, port=self.device_port(member.port))

    def device_plan(self, plan: SteeringPlan) -> SteeringPlan:
        """``plan`` with every Mininet port replaced by its device port."""
        return SteeringPlan(
            tuple(dataclasses.replace(hp, port=self.device_port(hp.port)) for hp in plan.host_ports),
            plan.paths,
            {key: tuple(self._member(m) for m in members) for key, members in plan.members.items()})

    def program(self, plan: SteeringPlan) -> None:
        """Install the whole plan on an empty pipeline (the program is pushed again)."""
        self.steering.program(self.device_plan(plan))
        self.plan = plan

    def add_member(self, key: PoolKey, member: Member) -> None:
        """Accept ``member``'s returns, then move to it the buckets it wins (one MODIFY each)."""
        self.steering.add_member(key, self._member(member))

    def remove_member(self, key: PoolKey, member: Member) -> None:
        """Move ``member``'s buckets to the remaining members; its returns are still accepted."""
        self.steering.remove_member(key, self._member(member))

    def forget_member(self, key: PoolKey, member: Member) -> None:
        """Remove the member's buckets (if still there) and its return path."""
        self.steering.forget_member(key, self._member(member))

    def dropped(self) -> int:
        """Packets dropped as unclassified, NSH from a host, forged or out of path."""
        return self.steering.dropped()

    def sent_to(self, member: Member) -> int:
        """Packets sent to a pool member since the plan was programmed."""
        return self.steering.sent_to(self._member(member))

    def dump(self) -> str:
        """Drops, bucket owners and where the logs are, for a person reading a failure."""
        ports = ", ".join(f"{p}->{d}" for p, d in sorted(self._device_of.items()))
        logs = ", ".join(str(p.log) for p in self._procs)
        return f"{self.steering.dump()}\nports (Mininet->device): {ports}\nlogs: {logs}"


def _hugepages() -> int:
    try:
        return int(Path("/proc/sys/vm/nr_hugepages").read_text())
    except (OSError, ValueError):
        return 0
