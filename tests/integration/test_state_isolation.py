"""Tenants apart around the state server: no secret on a command line, NFs unprivileged, and a
management network on which an NF reaches the state server only and can take over no address.

Every attempt is made for real from an NF host's namespace (as root there, which is more than an
NF has) and paired with the same probe that must work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conformance.plugin import running_lab
from statelab.lab import MGMT_IF, NF_CAPS

pytestmark = pytest.mark.root
PROBE = 0x88B5  # IEEE local experimental ethertype: nothing else in the lab sends it

# Run inside a namespace: send frames on mgmt0. argv: JSON list of [dst, src, ethertype, count].
SEND = r"""
import json, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("mgmt0", 0))
for dst, src, etype, n, payload in json.loads(sys.argv[1]):
    frame = bytes.fromhex(dst.replace(":", "") + src.replace(":", "")) + etype.to_bytes(2, "big") + bytes.fromhex(payload)
    for _ in range(n):
        s.send(frame.ljust(60, b"\0"))
print("sent")
"""

# Run inside a namespace: count frames of ethertypes argv[2:] on mgmt0 for argv[1] seconds,
# by source MAC; print JSON once the socket is open ("ready") and at the end.
SNIFF = r"""
import json, select, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("mgmt0", 0))
types = {int(t) for t in sys.argv[2:]}
print("ready", flush=True)
seen = {}
end = time.monotonic() + float(sys.argv[1])
while (left := end - time.monotonic()) > 0:
    if not select.select([s], [], [], left)[0]:
        continue
    data, addr = s.recvfrom(2048)
    if addr[2] == socket.PACKET_OUTGOING or int.from_bytes(data[12:14], "big") not in types:
        continue
    src = ":".join(f"{b:02x}" for b in data[6:12])
    seen[src] = seen.get(src, 0) + 1
print(json.dumps(seen), flush=True)
"""


def arp_reply(src_mac: str, claimed_ip: str, dst_mac: str, target_ip: str) -> str:
    """The payload (hex) of an ARP reply: ``claimed_ip`` is at ``src_mac``."""
    def ip(a: str) -> str:
        return bytes(int(x) for x in a.split(".")).hex()

    def mac(m: str) -> str:
        return m.replace(":", "")
    return "0001080006040002" + mac(src_mac) + ip(claimed_ip) + mac(dst_mac) + ip(target_ip)


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    """The default lab (two tenants, forward NFs) under a name of its own."""
    from statelab.spec import DEFAULT_TOPOLOGY, load
    yield from running_lab(dataclasses.replace(load(DEFAULT_TOPOLOGY), name="stateiso"))


def run_in(node: Any, code: str, *args: str, timeout: float = 10) -> str:
    """Run Python ``code`` in ``node``'s namespaces (as root) and return its stdout."""
    proc = node.popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out


class Sniffer:
    """Counts frames of some ethertypes arriving on a node's mgmt0, by source MAC."""

    def __init__(self, node: Any, seconds: float, *ethertypes: int) -> None:
        self.proc = node.popen([sys.executable, "-c", SNIFF, str(seconds), *map(str, ethertypes)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()

    def counts(self) -> dict[str, int]:
        out, err = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def mac_of(lab: Any, ip: str) -> str:
    return lab._mgmt_mac(ip)


def neighbour(node: Any, ip: str, dev: str = MGMT_IF) -> str:
    return node.cmd(f"ip neigh show {ip} dev {dev}").strip()


# -- credentials ---------------------------------------------------------------------------

def command_lines() -> dict[int, str]:
    out = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out[int(path.parent.name)] = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return out


def test_no_password_of_the_lab_on_any_command_line(lab) -> None:
    lines = command_lines()
    for who, pw in lab.passwords.items():
        holders = {pid: line for pid, line in lines.items() if pw in line}
        assert not holders, f"the {who} password is on a command line: {holders}"
    # the positive half: the NFs and state servers are running, and their command lines are
    # where the password would have been
    for inst in lab.iter_instances():
        line = lines[inst.proc.pid]
        assert f"--state redis://tenant-{inst.tenant.name}@" in line, line
        assert f"--state-password-file {lab.state_password_file(inst.tenant.name)}" in line, line
    assert sum("redis-server" in line for line in lines.values()) >= len(lab.state_ports)


def test_password_files_belong_to_their_tenant_only(lab) -> None:
    for tenant, uid in lab.nf_uids.items():
        st = lab.state_password_file(tenant).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, uid)
        assert lab.state_password_file(tenant).read_text().strip() == lab.passwords[tenant]
    for conf in lab.run_dir.glob("redis-*.conf"):
        st = conf.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)


# -- unprivileged NFs ------------------------------------------------------------------------

def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def as_uid(uid: int, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                           sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=20)


def test_nfs_run_as_their_tenants_uid_with_only_cap_net_raw(lab) -> None:
    if not lab.nf_uids:
        pytest.skip("STATELAB_NF_ROOT=1: NFs run as root")
    raw = 1 << 13  # CAP_NET_RAW
    assert NF_CAPS == "net_raw"
    uids = {}
    for inst in lab.iter_instances():
        st = status(inst.proc.pid)
        uid = int(st["Uid"].split()[0])
        assert uid != 0 and set(st["Uid"].split()) == {str(uid)}, (inst.id, st["Uid"])
        assert set(st["Gid"].split()) == {str(uid)} and st["Groups"].strip() in ("", str(uid)), inst.id
        for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == raw, (inst.id, cap, st[cap])
        assert st["NoNewPrivs"].strip() == "1", inst.id
        uids.setdefault(inst.tenant.name, set()).add(uid)
    assert all(len(u) == 1 for u in uids.values()), uids
    assert len({next(iter(u)) for u in uids.values()}) == len(uids), f"tenants share a uid: {uids}"


TRY = r"""
import os, sys
what, target = sys.argv[1], sys.argv[2]
try:
    if what == "read":
        open(target).read()
    else:
        os.kill(int(target), 0)
    print("ok")
except OSError as err:
    print(type(err).__name__)
"""


def test_an_nf_uid_can_read_its_own_secret_only_and_signal_no_other_tenant(lab) -> None:
    if not lab.nf_uids:
        pytest.skip("STATELAB_NF_ROOT=1: NFs run as root")
    red, blue = lab.nf_uids["red"], lab.nf_uids["blue"]
    blue_nf = lab.pool_instances("blue", "fw")[0]
    red_nf = lab.pool_instances("red", "fw")[0]
    own = as_uid(red, TRY, "read", str(lab.state_password_file("red")))
    assert own.stdout.strip() == "ok", own
    assert as_uid(red, TRY, "signal", str(red_nf.proc.pid)).stdout.strip() == "ok"
    for what, target in [("read", lab.state_password_file("blue")), ("read", next(lab.run_dir.glob("redis-*.conf"))),
                         ("read", blue_nf.log_path), ("read", lab.run_dir / "tenant-blue" / f"{blue_nf.id}.config.yaml"),
                         ("read", f"/proc/{blue_nf.proc.pid}/environ"), ("signal", blue_nf.proc.pid),
                         ("signal", os.getpid())]:
        got = as_uid(red, TRY, what, str(target))
        assert got.stdout.strip() in ("PermissionError",), (what, target, got)
    assert blue != red


# -- the management network ------------------------------------------------------------------

def test_bridge_ports_of_nfs_are_isolated_and_locked(lab) -> None:
    links = json.loads(subprocess.run(["bridge", "-d", "-j", "link", "show"], capture_output=True, text=True).stdout)
    ports = {p["ifname"]: p for p in links if p.get("master") == lab.mgmt_bridge}
    assert len(ports) == len(lab.instances) + 1, sorted(ports)
    guarded = [p for p in ports.values() if p.get("isolated")]
    assert len(guarded) == len(lab.instances)
    for p in guarded:
        assert p.get("locked") and not p.get("learning") and not p.get("flood"), p
    open_ports = [p for p in ports.values() if not p.get("isolated")]
    assert len(open_ports) == 1 and not open_ports[0].get("learning"), open_ports  # the state server's


def test_nf_hosts_reach_the_state_server_but_not_each_other(lab) -> None:
    red1, red2 = lab.pool_instances("red", "fw")[:2]
    blue1 = lab.pool_instances("blue", "fw")[0]
    node = red1.node
    assert " 0% packet loss" in node.cmd(f"ping -c 2 -i 0.2 -W 1 {lab.state_ip}")
    for other in (red2, blue1):
        out = node.cmd(f"ping -c 2 -i 0.2 -W 1 {other.mgmt_ip}")
        assert "100% packet loss" in out, (other.id, out)
    # and the root namespace (controller, tests) reaches every one of them
    for ip in (lab.state_ip, red1.mgmt_ip, blue1.mgmt_ip):
        out = subprocess.run(["ping", "-c", "1", "-W", "1", ip], capture_output=True, text=True).stdout
        assert " 0% packet loss" in out, (ip, out)


def test_frames_from_an_nf_reach_only_the_state_server_and_only_with_its_own_mac(lab) -> None:
    red1 = lab.pool_instances("red", "fw")[0]
    blue1 = lab.pool_instances("blue", "fw")[0]
    me, state, victim = mac_of(lab, red1.mgmt_ip), mac_of(lab, lab.state_ip), mac_of(lab, blue1.mgmt_ip)
    at_state = Sniffer(lab.state_node, 2.0, PROBE)
    at_victim = Sniffer(blue1.node, 2.0, PROBE)
    run_in(red1.node, SEND, json.dumps([
        [state, me, PROBE, 10, "01"],                    # legitimate: must arrive
        [state, victim, PROBE, 10, "02"],                # forged source: another NF's MAC
        [state, state, PROBE, 10, "03"],                 # forged source: the state server's own
        [victim, me, PROBE, 10, "04"],                   # to another NF, unicast
        ["ff:ff:ff:ff:ff:ff", me, PROBE, 10, "05"],      # broadcast: the state server only
    ]))
    state_seen, victim_seen = at_state.counts(), at_victim.counts()
    assert state_seen == {me: 20}, state_seen
    assert victim_seen == {}, victim_seen
    fdb = subprocess.run(["bridge", "fdb", "show", "br", lab.mgmt_bridge], capture_output=True, text=True).stdout
    state_entries = [line for line in fdb.splitlines() if line.startswith(state)]
    assert len(state_entries) == 1 and "static" in state_entries[0] and red1.mgmt_ip not in state_entries[0], fdb


def test_forged_arp_changes_nobodys_view(lab) -> None:
    red1 = lab.pool_instances("red", "fw")[0]
    blue1 = lab.pool_instances("blue", "fw")[0]
    me, state, victim = mac_of(lab, red1.mgmt_ip), mac_of(lab, lab.state_ip), mac_of(lab, blue1.mgmt_ip)
    bridge = mac_of(lab, str(lab.mgmt.network_address + 1))
    before = {"blue-nf": neighbour(blue1.node, lab.state_ip), "state": neighbour(lab.state_node, blue1.mgmt_ip)}
    at_state = Sniffer(lab.state_node, 2.0, 0x0806)
    frames = []
    for dst, target_ip in [("ff:ff:ff:ff:ff:ff", lab.state_ip), (bridge, str(lab.mgmt.network_address + 1)),
                           (victim, blue1.mgmt_ip), (state, lab.state_ip)]:
        # "the state server's address is at my MAC", to everyone and to each one
        frames.append([dst, me, 0x0806, 5, arp_reply(me, lab.state_ip, dst, target_ip)])
    # "blue's NF's address is at my MAC", to the state server and to the root namespace
    frames.append([state, me, 0x0806, 5, arp_reply(me, blue1.mgmt_ip, state, lab.state_ip)])
    frames.append([bridge, me, 0x0806, 5, arp_reply(me, blue1.mgmt_ip, bridge, str(lab.mgmt.network_address + 1))])
    run_in(red1.node, SEND, json.dumps(frames))
    # the forged replies did arrive where an NF may send (the state server: broadcast + 2 unicast)
    assert at_state.counts().get(me, 0) >= 15
    root_view = subprocess.run(["ip", "neigh", "show", lab.state_ip, "dev", lab.mgmt_bridge],
                               capture_output=True, text=True).stdout
    root_view_blue = subprocess.run(["ip", "neigh", "show", blue1.mgmt_ip, "dev", lab.mgmt_bridge],
                                    capture_output=True, text=True).stdout
    after_blue, after_state = neighbour(blue1.node, lab.state_ip), neighbour(lab.state_node, blue1.mgmt_ip)
    views = {"root, of the state server": (root_view, state), "root, of blue's NF": (root_view_blue, victim),
             "blue's NF, of the state server": (after_blue, state), "the state server, of blue's NF": (after_state, victim)}
    assert all(mac in view for view, mac in views.values()), views
    assert after_blue == before["blue-nf"] and after_state == before["state"], (before, views)
    assert all("PERMANENT" in view for view, _ in views.values()), views  # so no later ARP either
    # and blue's NF host still talks to its state server (which wants a password first)
    assert run_in(blue1.node, CONNECT, lab.state_ip, str(lab.state_port("blue"))).startswith("-NOAUTH")


CONNECT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)
s.sendall(b"PING\r\n")
print(s.recv(100).decode().strip())
"""


# -- how an NF takes its password --------------------------------------------------------------

def test_the_runtime_takes_the_password_from_a_private_file_the_environment_or_the_url(tmp_path, monkeypatch) -> None:
    from nfs.runtime import PASSWORD_ENV, state_url_with_password
    import redis
    url = "redis://tenant-red@198.18.0.2:6379/0"
    secret = tmp_path / "pw"
    secret.write_text("s3cr/t:@x\n")
    secret.chmod(0o600)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    parsed = redis.connection.parse_url(state_url_with_password(url, secret))
    assert (parsed["username"], parsed["password"], parsed["host"], parsed["port"]) == \
        ("tenant-red", "s3cr/t:@x", "198.18.0.2", 6379)
    secret.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        state_url_with_password(url, secret)
    with pytest.raises(ValueError, match="cannot read"):
        state_url_with_password(url, tmp_path / "missing")
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert redis.connection.parse_url(state_url_with_password(url, None))["password"] == "from-env"
    monkeypatch.delenv(PASSWORD_ENV)
    old = "redis://tenant-red:inline@198.18.0.2:6379/0"  # vendor NFs, tests: still accepted
    assert state_url_with_password(old, None) == old
    secret.chmod(0o600)
    assert state_url_with_password("local:", secret) == "local:"
