"""The tofino-model driver without a model: its port map (spare ports included), the pipeline
it pushes (byte for byte), its command lines, its readiness probe, its setup check; the wire
that joins a lab interface to a device port (root); and a lab on the real model, which skips
where open-p4studio is not installed (it is not, where this was written: the driver is
unverified against the model, docs/targets.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nfs.mmsg import packet_socket
from statelab.errors import LabError, MissingDependency, ProcessFailed
from statelab.fabric import fabric_class
from statelab.fabric import tofino_model as tm
from statelab.fabric.bmv2 import P4_INFO, P4_JSON

REPO = Path(__file__).resolve().parents[1]
TOFINO, TOFINO2 = tm.CHIPS["tofino"], tm.CHIPS["tofino2"]


def test_the_driver_is_registered_under_its_kind():
    assert fabric_class("tofino-model") is tm.TofinoModelFabric


# -- the TNA program keeps steering.p4's control-plane names ----------------------------------

P4_DIR = REPO / "p4"


def _control_plane(path: Path) -> dict[str, object]:
    """What a P4Runtime controller of the program sees, read from its source: actions and
    their parameters, tables with their keys and actions, counters with their sizes, drop
    reasons."""
    import re
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    actions = {m[1]: tuple(" ".join(p.split()) for p in m[2].split(",") if p.strip())
               for m in re.finditer(r"\baction (\w+)\(([^)]*)\)", text)}
    tables = {}
    for m in re.finditer(r"\btable (\w+) \{(.*?)\n    \}", text, flags=re.S):
        body = m[2]
        keys = tuple(re.findall(r":\s*(\w+)\s*@name\(\"(\w+)\"\)", body))
        acts = tuple(a.strip() for a in re.search(r"actions = \{([^}]*)\}", body)[1].split(";") if a.strip())
        default = re.search(r"default_action = ([^;]+);", body)[1]
        size = re.search(r"size = (\d+);", body)[1]
        tables[m[1]] = (keys, acts, default, size)
    counters = dict(re.findall(r"\b(?:counter|Counter<.+?>)\((\w+),[^)]*\) (\w+);", text))
    counters = {name: size for size, name in counters.items()}
    drops = dict(re.findall(r"const bit<32> (DROP_\w+|N_DROP_REASONS)\s*= (\d+);", text))
    return {"actions": actions, "tables": tables, "counters": counters, "drops": drops}


def test_tna_program_has_steering_p4s_tables_actions_and_counters():
    v1, tna = _control_plane(P4_DIR / "steering.p4"), _control_plane(P4_DIR / "steering_tna.p4")
    assert v1["tables"] and v1["actions"] and v1["counters"], "the parser of this test found nothing"
    assert tna == v1


def _tna_p4include() -> Path | None:
    """A directory with TNA's architecture files (tna.p4): installed by a p4c built with its
    Tofino back end (open-p4studio's), or named by STATELAB_TNA_P4INCLUDE (p4c's source tree
    has them in backends/tofino/bf-p4c/p4include)."""
    candidates = [os.environ.get("STATELAB_TNA_P4INCLUDE", "")]
    if os.environ.get("SDE_INSTALL"):
        candidates.append(f"{os.environ['SDE_INSTALL']}/share/p4c/p4include")
    candidates += ["/usr/local/share/p4c/p4include", "/usr/share/p4c/p4include"]
    return next((Path(c) for c in candidates if c and (Path(c) / "tna.p4").is_file()), None)


@pytest.mark.parametrize("target", [1, 2])
def test_tna_program_passes_p4cs_front_and_mid_end(target, tmp_path):
    """p4test: syntax, types, TNA's signatures (tna.p4 for Tofino, t2na.p4 for Tofino 2) --
    nothing of what only bf-p4c decides (resources, placement)."""
    if shutil.which("p4test") is None:
        pytest.skip("p4test (p4c) is not installed")
    include = _tna_p4include()
    if include is None:
        pytest.skip("no tna.p4 (p4c's Tofino back end); set STATELAB_TNA_P4INCLUDE to "
                    "<p4c>/backends/tofino/bf-p4c/p4include")
    proc = subprocess.run(["p4test", "--std", "p4-16", "-I", str(include), f"-D__TARGET_TOFINO__={target}",
                           str(P4_DIR / "steering_tna.p4")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- ports ---------------------------------------------------------------------------------


def test_port_map_gives_linked_ports_device_ports_in_order_then_spares():
    pm = tm.plan_ports("s1a2b", [101, 1, 100, 2], spares=3, chip=TOFINO)
    assert dict(pm.assigned) == {1: 0, 2: 1, 100: 2, 101: 3}
    assert pm.spares == (4, 5, 6)
    assert pm.to_json() == {"PortToIf": [{"device_port": d, "if": f"s1a2b-t{d}"} for d in range(7)]}
    assert pm.model_intf(5) == "s1a2b-t5" and pm.wire_intf(5) == "s1a2b-w5"


def test_port_map_uses_every_pipe_and_tofino2_front_panel_ports():
    assert TOFINO.device_ports()[63:66] == (63, 128, 129)      # pipe 0 ends, pipe 1 begins
    assert len(TOFINO.device_ports()) == 256 and max(TOFINO.device_ports()) == 3 << 7 | 63
    assert TOFINO2.device_ports()[:2] == (8, 9)                # 0..7: CPU and recirculation
    assert TOFINO2.device_ports()[64] == 1 << 7 | 8
    pm = tm.plan_ports("s1", [1], spares=1000, chip=TOFINO)    # no more spares than the chip has
    assert len(pm.device_ports()) == 256 and max(pm.device_ports()) < 512   # PortId_t: 9 bits


def test_port_map_refuses_more_ports_than_the_chip_has_and_too_long_names():
    with pytest.raises(LabError, match="257 ports are linked"):
        tm.plan_ports("s1", range(1, 258), spares=0, chip=TOFINO)
    with pytest.raises(LabError, match="longer than 15"):
        tm.plan_ports("switch-name", [1], spares=200, chip=TOFINO)   # switch-name-t391


def test_spares_let_every_pool_grow_to_the_schema_maximum():
    from statelab.lab import NF_PORT_BASE
    assert tm.max_pool_instances() == 16
    # 2 host ports, 3 NF ports: at most 3 pools, each may reach 16 instances
    assert tm.default_spares([1, 2, NF_PORT_BASE, NF_PORT_BASE + 1, NF_PORT_BASE + 2]) == 15 * 3
    assert tm.default_spares([1, 2]) == 0


# -- the pipeline --------------------------------------------------------------------------


def test_device_data_is_bf_drivers_length_prefixed_chunks():
    data = tm.device_data("steering_tna", b"BIN!", b'{"ctx": 1}')
    assert data == (b"\x0c\x00\x00\x00" b"steering_tna"
                    b"\x04\x00\x00\x00" b"BIN!"
                    b"\x0a\x00\x00\x00" b'{"ctx": 1}'
                    b"\x00\x00\x00\x00")                   # no pipeline name (read anyway)
    with_bfrt = tm.device_data("p", b"", b"c", pipeline="pipe", bfrt=b"{}")
    assert with_bfrt == (b"\x01\x00\x00\x00p" b"\x00\x00\x00\x00" b"\x01\x00\x00\x00c"
                         b"\x04\x00\x00\x00pipe" b"\x02\x00\x00\x00{}")
    big = tm.device_data("p", b"\xff" * 70000, b"")
    assert big[5:9] == struct.pack("<I", 70000) == b"\x70\x11\x01\x00"


def test_device_data_refuses_what_bf_drivers_would_refuse():
    with pytest.raises(LabError, match="1 to 100 bytes"):
        tm.device_data("x" * 101, b"", b"")
    with pytest.raises(LabError, match="pipeline name goes with its bfrt.json"):
        tm.device_data("p", b"", b"", pipeline="pipe")


def _p4_device_config_class():
    """PI's p4.tmp.P4DeviceConfig (proto/p4/tmp/p4config.proto), built here: the PyPI
    p4runtime package does not ship it."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    f = descriptor_pb2.FileDescriptorProto(name="statelab_test_p4config.proto", package="p4.tmp",
                                           syntax="proto3")
    m = f.message_type.add(name="P4DeviceConfig")
    m.field.add(name="reassign", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    m.field.add(name="device_data", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.MessageFactory(pool).GetPrototype(pool.FindMessageTypeByName("p4.tmp.P4DeviceConfig"))


def test_p4_device_config_wraps_device_data_in_field_3():
    assert tm.p4_device_config(b"hello") == b"\x1a\x05hello"
    assert tm.p4_device_config(b"x" * 300)[:3] == b"\x1a\xac\x02"       # varint 300
    data = tm.device_data("steering_tna", b"\x00\x01" * 4000, b"{}")
    parsed = _p4_device_config_class().FromString(tm.p4_device_config(data))
    assert parsed.device_data == data and not parsed.reassign


def _fake_build(tmp_path: Path, chip: tm.Chip = TOFINO, bfrt: bool = False) -> tm.TnaBuild:
    build = tm.TnaBuild(tmp_path / "out", chip)
    (build.directory / "pipe").mkdir(parents=True)
    build.p4info.write_text('pkg_info { arch: "tna" }\n')
    build.binary.write_bytes(b"\x01\x02\x03")
    build.context.write_bytes(b'{"program_name": "steering_tna"}')
    if bfrt:
        build.bfrt.write_bytes(b'{"schema_version": "1.0.0"}')
    return build


def test_staged_pipeline_is_what_bmv2_steering_pushes(tmp_path):
    build = _fake_build(tmp_path)
    stage = build.stage(tmp_path / "stage")
    assert (stage / P4_INFO).read_text() == 'pkg_info { arch: "tna" }\n'
    expected = (b"\x0c\x00\x00\x00steering_tna" b"\x03\x00\x00\x00\x01\x02\x03"
                b"\x20\x00\x00\x00" b'{"program_name": "steering_tna"}' b"\x00\x00\x00\x00")
    assert (stage / P4_JSON).read_bytes() == b"\x1a" + bytes([len(expected)]) + expected


def test_staged_pipeline_names_the_pipeline_when_bfrt_json_is_there(tmp_path):
    build = _fake_build(tmp_path, TOFINO2, bfrt=True)
    assert build.binary.name == "tofino2.bin"
    data = _p4_device_config_class().FromString((build.stage(tmp_path / "s") / P4_JSON).read_bytes()).device_data
    assert data.endswith(b"\x04\x00\x00\x00pipe" b"\x1b\x00\x00\x00" b'{"schema_version": "1.0.0"}')


def test_missing_build_files_are_named(tmp_path):
    build = tm.TnaBuild(tmp_path, TOFINO)
    assert build.missing() == [tmp_path / "p4info.txtpb", tmp_path / "pipe" / "tofino.bin",
                               tmp_path / "pipe" / "context.json"]
    assert tm.default_build(TOFINO).directory == REPO / "p4" / "build" / "steering_tna.tofino"


def test_steering_names_resolve_on_a_tna_p4info():
    pytest.importorskip("p4.config.v1.p4info_pb2", reason="the p4runtime package (PyPI) is not installed")
    from p4.config.v1 import p4info_pb2

    from statelab.fabric.p4rt import P4Info
    msg = p4info_pb2.P4Info()
    t = msg.tables.add()
    t.preamble.id, t.preamble.name, t.preamble.alias = 1, "pipe.SteeringIngress.classify", "classify"
    t.match_fields.add(id=1, name="port", bitwidth=9, match_type=p4info_pb2.MatchField.EXACT)
    a = msg.actions.add()
    a.preamble.id, a.preamble.name = 2, "SteeringIngress.drop"            # actions: no prefix
    a.params.add(id=1, name="reason", bitwidth=32)
    c = msg.counters.add()
    c.preamble.id, c.preamble.name, c.size = 3, "pipe.SteeringIngress.drops", 8
    info = tm.steering_names(P4Info(msg))
    assert info.table("SteeringIngress.classify").id == 1
    assert info.table("classify").fields["port"].bitwidth == 9
    assert info.action("SteeringIngress.drop").params == {"reason": (1, 32)}
    assert info.counter("SteeringIngress.drops") == (3, 8)
    assert msg.tables[0].preamble.name == "pipe.SteeringIngress.classify"  # the switch's copy stays


# -- the processes -------------------------------------------------------------------------

PORTS = tm.ServicePorts(tcp_base=20004, status=31001, bfrt_grpc=31002, p4rt=31003)


def test_model_command_line(tmp_path):
    assert tm.model_command("tofino-model", TOFINO, tmp_path / "ports.json", PORTS, tmp_path) == [
        "tofino-model", "--chip-type", "2", "-d", "1", "-f", str(tmp_path / "ports.json"),
        "--tcp-port-base", "20004", "--no-cli", "--log-dir", str(tmp_path), "--logs-disable"]
    assert tm.model_command("m", TOFINO2, Path("p"), PORTS, Path("l"), logs=True)[:3] == ["m", "--chip-type", "5"]
    assert "--logs-disable" not in tm.model_command("m", TOFINO2, Path("p"), PORTS, Path("l"), logs=True)


def test_switchd_command_line():
    assert tm.switchd_command("bf_switchd", Path("/sde/install"), Path("/run/s1.conf"), PORTS) == [
        "bf_switchd", "--install-dir", "/sde/install", "--conf-file", "/run/s1.conf",
        "--tcp-port-base", "20004", "--status-port", "31001", "--bfrt-grpc-port", "31002",
        "--p4rt-server", "127.0.0.1:31003", "--skip-p4", "--background", "--server-listen-local-only"]


def test_switchd_conf_is_open_p4studios_skip_p4_conf():
    conf = tm.switchd_conf(TOFINO)
    assert conf["chip_list"] == [{"chip_family": "Tofino", "id": "asic-0", "instance": 0, "pcie_int_mode": 1,
                                  "pcie_sysfs_prefix": "/sys/devices/pci0000:00/0000:00:03.0/0000:05:00.0",
                                  "sds_fw_path": "share/tofino_sds_fw/avago/firmware"}]
    assert conf["p4_program_list"][0]["program-name"] == "dummy"
    assert conf["p4_program_list"][0]["agent0"] == "lib/libpltfm_mgr.so"
    assert tm.switchd_conf(TOFINO2)["chip_list"][0]["chip_family"] == "Tofino2"


def test_service_ports_are_free_and_the_model_gets_four_in_a_row():
    a, b = tm.allocate_ports(), tm.allocate_ports()
    for ports in (a, b):
        assert ports.tcp_base % 4 == 0
        used = {ports.tcp_base + i for i in range(4)} | {ports.status, ports.bfrt_grpc, ports.p4rt}
        assert len(used) == 7


@pytest.mark.parametrize("answer,ready", [(b"1", True), (b"0", False), (b"", False)])
def test_readiness_is_bf_switchds_status_byte(answer, ready):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    asked = []

    def serve():
        conn, _ = server.accept()
        with conn:
            asked.append(conn.recv(1))
            if answer:
                conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert tm.switchd_ready(server.getsockname()[1]) is ready
    finally:
        thread.join(5)
        server.close()
    assert asked == [b"0"]                                   # device 0


def test_readiness_is_false_while_nothing_listens():
    assert tm.switchd_ready(tm.free_port(), timeout=0.2) is False


def test_process_env_puts_the_sde_first(monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x")
    env = tm.process_env(Path("/sde/install"))
    assert env["SDE_INSTALL"] == "/sde/install"
    assert env["LD_LIBRARY_PATH"] == "/sde/install/lib:/opt/x"
    assert env["PATH"].startswith("/sde/install/bin:")


# -- setup ---------------------------------------------------------------------------------


def test_setup_names_open_p4studio_when_the_model_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependency) as err:
        tm.TofinoModelFabric.setup()
    assert err.value.binary == "tofino-model" and err.value.package == "open-p4studio"
    text = str(err.value)
    assert "open-p4studio" in text and "p4rt: true" in text and "docs/targets.md" in text
    assert "apt-get" not in text                               # it is no Debian package


def test_setup_names_bf_switchd_when_only_the_model_is_there(monkeypatch, tmp_path):
    (tmp_path / "tofino-model").write_text("#!/bin/sh\n")
    (tmp_path / "tofino-model").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependency) as err:
        tm.TofinoModelFabric.setup()
    assert err.value.binary == "bf_switchd"


def test_setup_asks_for_the_compiled_program_once_the_binaries_are_there(monkeypatch, tmp_path):
    for name in ("tofino-model", "bf_switchd"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    if not tm.default_build(TOFINO).missing():
        pytest.skip("p4/build/steering_tna.tofino is compiled here")
    with pytest.raises(LabError, match=r"steering_tna\.tofino.*docs/targets\.md"):
        tm.TofinoModelFabric.setup()


def test_install_dir_is_sde_install_or_above_bin(monkeypatch, tmp_path):
    monkeypatch.setenv("SDE_INSTALL", "/sde/install")
    assert tm.install_dir() == Path("/sde/install")
    monkeypatch.delenv("SDE_INSTALL")
    (tmp_path / "bin").mkdir()
    assert tm.install_dir(str(tmp_path / "bin" / "bf_switchd")) == tmp_path


# -- the wire (root: veths and tc, no model) -----------------------------------------------

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (veths, tc, raw sockets)")


def _raw(name: str) -> socket.socket:
    s = packet_socket(name)
    s.settimeout(2)
    return s


def _receive(s: socket.socket, frame: bytes) -> bool:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            if s.recv(4096) == frame:
                return True
        except socket.timeout:
            return False
    return False


@pytest.mark.root
@root
def test_attach_wire_joins_a_lab_interface_to_a_device_port_both_ways():
    """What attach() builds: the NF's veth (nf <-> lab) wired to a device port's pair (model
    <-> wire). A frame from the NF reaches the model's interface and back; a tap on the lab
    interface (conformance's FabricTap) sees both."""
    tag = os.urandom(2).hex()
    nf, lab, model, wire_end = f"tmn{tag}", f"tml{tag}", f"tmm{tag}", f"tmw{tag}"
    subprocess.run(["ip", "link", "add", nf, "type", "veth", "peer", "name", lab], check=True)
    try:
        tm.make_port_pairs([(model, wire_end)], mtu=1600)
        for name in (nf, lab):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True)
            subprocess.run(["ip", "link", "set", name, "mtu", "1600", "up"], check=True)
        tm.wire(lab, wire_end)
        s_nf, s_model, tap = _raw(nf), _raw(model), _raw(lab)
        out = bytes.fromhex("02000000000a025e00000001894f") + os.urandom(1500)   # 1514 bytes: NSH-sized
        back = bytes.fromhex("025e00000001024e46000064894f") + os.urandom(60)
        s_nf.send(out)
        assert _receive(s_model, out), "the model's end did not get the NF's frame"
        s_model.send(back)
        assert _receive(s_nf, back), "the NF did not get the model's frame"
        assert _receive(tap, out) and _receive(tap, back), "a tap on the lab interface missed a frame"
        tm.unwire(lab, wire_end)
        s_nf.send(out)
        assert not _receive(s_model, out), "unwire left the wire in place"
    finally:
        for name in (nf, model):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


# -- starting, with stand-ins for the two programs (root: a Mininet switch, veths) ----------

FAKE_MODEL = "#!/bin/sh\necho \"model: $*\"\n{body}\n"
FAKE_SWITCHD = "#!/bin/sh\necho \"switchd: $*\"\n{body}\n"


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """Put stand-ins for tofino-model and bf_switchd on PATH; returns a function that writes
    what each does."""
    bindir = tmp_path / "sde" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("SDE_INSTALL", str(tmp_path / "sde"))

    def write(model: str, switchd: str) -> None:
        for name, text in (("tofino-model", FAKE_MODEL.format(body=model)),
                           ("bf_switchd", FAKE_SWITCHD.format(body=switchd))):
            (bindir / name).write_text(text)
            (bindir / name).chmod(0o755)
    return write


@pytest.fixture
def fabric(tmp_path, monkeypatch):
    """A TofinoModelFabric with one linked NF port (so it makes 1 + 15 device ports), bound to
    a record of its own; afterwards nothing of it may be left."""
    from mininet.link import Intf
    # Mininet runs setup() when the first switch of a class is made; it wants the compiled
    # program in p4/build, this switch is given a stand-in elsewhere
    monkeypatch.setattr(tm.TofinoModelFabric, "isSetup", True, raising=False)

    from statelab.lab import NF_PORT_BASE
    from statelab.record import Record, alive
    tag = os.urandom(2).hex()
    name, lab_end, nf_end = f"q{tag}", f"q{tag}-p{NF_PORT_BASE}", f"q{tag}nf"
    sw = tm.TofinoModelFabric(name, p4_build=_fake_build(tmp_path).directory, log_dir=tmp_path / "logs",
                              start_timeout=3, dpid="3", inNamespace=False)
    record = Record(lab="t", owner=os.getpid(), owner_start=None, run_dir=str(tmp_path))
    try:
        subprocess.run(["ip", "link", "add", lab_end, "type", "veth", "peer", "name", nf_end], check=True)
        Intf(lab_end, node=sw, port=NF_PORT_BASE)
        sw.bind(record, tmp_path)
        yield sw
    finally:
        sw.stop()
        sw.terminate()
        subprocess.run(["ip", "link", "del", nf_end], capture_output=True)
        left = [p.what for p in record.processes if alive(p.pid, p.start)]
        left += [i for i in record.interfaces if Path(f"/sys/class/net/{i}").exists()]
        assert not left, f"left behind: {left}"


@pytest.mark.root
@root
def test_a_driver_that_exits_is_reported_with_code_command_and_log(stand_ins, fabric):
    stand_ins("exec sleep 60", "echo 'ERROR: no device found'; exit 3")
    with pytest.raises(ProcessFailed) as err:
        fabric.start()
    text = str(err.value)
    assert err.value.code == 3
    assert "bf_switchd of fabric" in text and "--p4rt-server 127.0.0.1:" in text and "--skip-p4" in text
    assert "ERROR: no device found" in text                   # its log's tail
    assert "model: --chip-type 2" in text                     # and the model's
    assert Path(fabric.build.directory).exists() and not fabric.processes()
    ports = list((fabric.log_dir).glob("*-ports.json"))
    assert len(json.loads(ports[0].read_text())["PortToIf"]) == 16   # 1 linked + 15 spares


@pytest.mark.root
@root
def test_a_model_that_exits_is_reported(stand_ins, fabric):
    stand_ins("echo 'Invalid port 72 in PortToVeth mapping'; exit 1", "exec sleep 60")
    with pytest.raises(ProcessFailed) as err:
        fabric.start()
    assert err.value.code == 1 and "tofino-model of fabric" in str(err.value)
    assert "Invalid port 72" in str(err.value)


@pytest.mark.root
@root
def test_a_device_that_never_gets_ready_times_out_with_both_logs(stand_ins, fabric):
    stand_ins("exec sleep 60", "echo 'waiting for the model'; exec sleep 60")
    with pytest.raises(ProcessFailed) as err:
        fabric.start()
    text = str(err.value)
    assert err.value.code is None
    assert "did not report device 0 ready on status port" in text and "within 3s" in text
    assert "waiting for the model" in text and "model: --chip-type" in text


STATUS_READY = """port=$(echo "$@" | sed 's/.*--status-port \\([0-9]*\\).*/\\1/')
exec python3 -c "
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(4)
while True:
    c, _ = s.accept(); c.recv(1); c.sendall(b'1'); c.close()
" $port"""


@pytest.mark.root
@root
def test_a_ready_device_without_p4runtime_is_reported(stand_ins, fabric):
    stand_ins("exec sleep 60", STATUS_READY)
    with pytest.raises(ProcessFailed) as err:
        fabric.start()
    assert "did not accept the program within 3s" in str(err.value)
    assert "UNAVAILABLE" in str(err.value)


# -- on the model (root, open-p4studio) -----------------------------------------------------

MODEL_REASON = "tofino-model not installed (open-p4studio)"


@pytest.fixture(scope="module")
def model_lab():
    if shutil.which("tofino-model") is None or shutil.which("bf_switchd") is None:
        pytest.skip(MODEL_REASON)
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veths)")
    missing = tm.default_build(TOFINO).missing()
    if missing:
        pytest.skip(f"p4/steering_tna.p4 is not compiled ({missing[0]} missing): docs/targets.md")
    from conformance.plugin import running_lab
    from statelab.spec import load
    topo = dataclasses.replace(load(REPO / "tests" / "data" / "small.yaml"), fabric_kind="tofino-model")
    yield from running_lab(topo)


@pytest.mark.root
def test_on_the_model_ping_passes_the_chain_and_a_new_instance_gets_a_spare_port(model_lab):
    out = model_lab.host("g1").cmd("ping -c 3 -i 0.2 -W 2 10.9.0.2")
    assert " 0% packet loss" in out, out + "\n" + model_lab.fabric.dump()
    (new,) = model_lab.control.scale_out("green", "fw")
    try:
        assert model_lab.fabric.device_port(new.member.port) in model_lab.fabric.port_map.spares
        out = model_lab.host("g1").cmd("ping -c 20 -i 0.05 -W 2 10.9.0.2")
        assert " 0% packet loss" in out, out + "\n" + model_lab.fabric.dump()
    finally:
        model_lab.control.scale_in("green", "fw")
    assert model_lab.fabric.dropped() >= 0
