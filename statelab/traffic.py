"""Traffic generators and checkers that run inside lab hosts, and their drivers.

``python -m statelab.traffic udp-sink|udp-send|tcp-sink|tcp-send ...``; each prints JSON lines
on stdout (``{"ready": true}`` when listening, then its result), so a test or a person reads
exactly what happened.

- UDP: every flow is its own socket (own source port, so own 5-tuple). Each datagram carries
  ``flow id, sequence number, send time``. The sink counts per flow what arrived, duplicates,
  reordered packets (RFC 4737: a packet whose sequence number is below the highest seen so
  far), the longest gap between arrivals, and every source address:port the flow arrived from
  (a NAT mapping that changed shows as two). Loss is ``sent - received`` and outage in ms is
  ``lost / per-flow offered rate`` (RFC 6201 §4.1 loss-derived outage).
- TCP: every connection streams chunks that the sink echoes back; the sender checks the echo
  byte for byte as it comes (SHA-256 of all of it at the end) and reports resets, stalls (no
  progress for ``--stall`` s) and the longest wait for an echo. The sink reports each peer it
  accepted (an LB backend shows which connections it served).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

HEADER = struct.Struct("!IId")  # flow id, sequence number, send time


# -- UDP ----------------------------------------------------------------------------------

def udp_send(dst: str, port: int, flows: int, rate: float, packets: Optional[int] = None,
             duration: Optional[float] = None, size: int = 64, first_sport: int = 20000) -> dict[str, Any]:
    """Send datagrams on ``flows`` flows, round robin, ``rate`` datagrams/s in all.

    Args:
        dst: destination address.
        port: destination UDP port.
        flows: number of flows (source ports ``first_sport`` ...).
        rate: total datagrams per second.
        packets: datagrams per flow (or give ``duration``).
        duration: seconds to send for (or give ``packets``).
        size: datagram payload size (at least the 16-byte header).
        first_sport: source port of flow 0.

    Returns:
        ``{"sent": {flow: n}, "send_errors": n, "rate_per_flow": pps, "start": t, "duration": s,
        "by_send_time": {bin start (s since the epoch, 100 ms bins): datagrams offered}}``;
        ``sent`` counts every datagram offered, including those whose send failed.
    """
    socks = []
    for i in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", first_sport + i))
        socks.append(s)
    pad = b"\0" * max(0, size - HEADER.size)
    sent = {i: 0 for i in range(flows)}
    send_errors = 0
    by_send_time: dict[int, int] = {}
    interval = 1.0 / rate
    total = packets * flows if packets is not None else int((duration or 0) * rate)
    start, t0 = time.time(), time.monotonic()
    for n in range(total):
        i, seq = n % flows, n // flows
        delay = t0 + n * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[i] += 1  # offered: a datagram whose send fails (e.g. an ICMP error came back) is lost
        now = time.time()
        sent_bin = int(now * 10)
        by_send_time[sent_bin] = by_send_time.get(sent_bin, 0) + 1
        try:
            socks[i].sendto(HEADER.pack(i, seq, now) + pad, (dst, port))
        except OSError:
            send_errors += 1
    for s in socks:
        s.close()
    return {"sent": sent, "send_errors": send_errors, "rate_per_flow": rate / flows, "start": start,
            "duration": time.monotonic() - t0,
            "by_send_time": {str(k / 10): n for k, n in sorted(by_send_time.items())}}


def udp_sink(port: int, duration: float, idle: float, sending: float = 0.0) -> dict[str, Any]:
    """Receive datagrams for up to ``duration`` s; stop after ``idle`` s of silence once some
    came and ``sending`` s (how long the sender sends) have passed: an outage while the sender
    still sends (a failover of several seconds) is measured, it does not end the sink.

    Returns:
        ``{"flows": {flow: {"received", "duplicates", "reordered", "max_gap_ms", "sources"}}, "total",
        "by_send_time": {bin start (s since the epoch, 100 ms bins): datagrams first received}}``.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    print(json.dumps({"ready": True}), flush=True)
    flows: dict[int, dict[str, Any]] = {}
    seen: dict[int, set[int]] = {}
    top: dict[int, int] = {}
    last_at: dict[int, float] = {}
    end = time.monotonic() + duration
    busy_until = time.monotonic() + sending
    last_rx: Optional[float] = None
    by_send_time: dict[int, int] = {}
    while time.monotonic() < end:
        now = time.monotonic()
        if last_rx is not None and now - last_rx > idle and now > busy_until:
            break
        r, _, _ = select.select([s], [], [], 0.1)
        if not r:
            continue
        data, addr = s.recvfrom(65535)
        now = time.monotonic()
        last_rx = now
        if len(data) < HEADER.size:
            continue
        fid, seq, ts = HEADER.unpack_from(data)
        f = flows.setdefault(fid, {"received": 0, "duplicates": 0, "reordered": 0, "max_gap_ms": 0.0,
                                   "sources": []})
        src = f"{addr[0]}:{addr[1]}"
        if src not in f["sources"]:
            f["sources"].append(src)
        if seq in seen.setdefault(fid, set()):
            f["duplicates"] += 1
            continue
        seen[fid].add(seq)
        f["received"] += 1
        sent_bin = int(ts * 10)
        by_send_time[sent_bin] = by_send_time.get(sent_bin, 0) + 1
        if seq < top.get(fid, -1):
            f["reordered"] += 1
        top[fid] = max(seq, top.get(fid, -1))
        if fid in last_at:
            f["max_gap_ms"] = max(f["max_gap_ms"], round((now - last_at[fid]) * 1000, 1))
        last_at[fid] = now
    return {"flows": {str(k): v for k, v in sorted(flows.items())},
            "total": sum(f["received"] for f in flows.values()),
            "by_send_time": {str(k / 10): n for k, n in sorted(by_send_time.items())}}


# -- TCP ----------------------------------------------------------------------------------

def _echo(conn: socket.socket) -> None:
    with conn:
        while True:
            try:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
            except OSError:
                return


def tcp_sink(port: int, duration: float) -> dict[str, Any]:
    """Echo every accepted connection's bytes back for ``duration`` s (or until SIGTERM).

    Returns:
        ``{"accepted": n, "peers": ["ip:port", ...]}``.
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1024)
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + duration
    peers: list[str] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while time.monotonic() < end and not stop.is_set():
        r, _, _ = select.select([srv], [], [], 0.1)
        if r:
            conn, addr = srv.accept()
            peers.append(f"{addr[0]}:{addr[1]}")
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()
    return {"accepted": len(peers), "peers": peers}


def _tcp_stream(dst: str, port: int, nbytes: int, duration: float, chunk: int, stall: float) -> dict[str, Any]:
    """One connection: send ``chunk`` bytes, wait for the echo, repeat until ``nbytes`` are
    echoed or ``duration`` s passed. A reset, a stall or a wrong byte ends it with an error."""
    result: dict[str, Any] = {"ok": False, "error": None, "sent": 0, "received": 0,
                              "max_wait_ms": 0.0, "local": None}
    try:
        s = socket.create_connection((dst, port), timeout=stall)
    except OSError as err:
        result["error"] = f"connect: {err}"
        return result
    result["local"] = "%s:%d" % s.getsockname()
    sent_hash, back_hash = hashlib.sha256(), hashlib.sha256()
    end = time.monotonic() + duration
    try:
        s.settimeout(stall)
        while result["sent"] < nbytes and (duration <= 0 or time.monotonic() < end or result["sent"] == 0):
            data = os.urandom(min(chunk, nbytes - result["sent"]))
            t0 = time.monotonic()
            s.sendall(data)
            sent_hash.update(data)
            result["sent"] += len(data)
            got = b""
            while len(got) < len(data):
                part = s.recv(len(data) - len(got))
                if not part:
                    raise ConnectionError("closed by peer")
                got += part
            result["max_wait_ms"] = max(result["max_wait_ms"], round((time.monotonic() - t0) * 1000, 1))
            back_hash.update(got)
            result["received"] += len(got)
            if got != data:
                result["error"] = "echo differs from what was sent"
                return result
            if duration > 0:
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        result["ok"] = sent_hash.digest() == back_hash.digest()
        if not result["ok"]:
            result["error"] = "digest mismatch"
    except socket.timeout:
        result["error"] = f"stalled: no echo for {stall}s"
    except ConnectionResetError:
        result["error"] = "reset"
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        s.close()
    return result


def tcp_send(dst: str, port: int, connections: int, nbytes: int, duration: float = 0.0,
             chunk: int = 1024, stall: float = 5.0) -> dict[str, Any]:
    """Run ``connections`` concurrent echo-verified connections.

    Args:
        dst, port: where to connect.
        connections: how many at once.
        nbytes: most bytes per connection.
        duration: if > 0, each connection keeps streaming (a chunk every 50 ms) this long.
        chunk: bytes per send.
        stall: seconds without an echo that count as a stall.

    Returns:
        ``{"connections", "ok", "failed": [...], "results": [...]}``.
    """
    results: list[dict[str, Any]] = [{} for _ in range(connections)]

    def run(i: int) -> None:
        results[i] = _tcp_stream(dst, port, nbytes, duration, chunk, stall)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join()
    return {"connections": connections, "ok": sum(1 for r in results if r.get("ok")),
            "failed": [r for r in results if not r.get("ok")], "results": results}


# -- raw frames ---------------------------------------------------------------------------

def inject(iface: str) -> None:
    """Send raw Ethernet frames on ``iface``: each stdin line is a JSON list of hex frames;
    each answer line is ``{"sent": n, "errors": [...]}``, counting only frames the kernel took."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        sent, errors = 0, []
        for frame in json.loads(line):
            data = bytes.fromhex(frame)
            try:
                if s.send(data) == len(data):
                    sent += 1
            except OSError as err:
                errors.append(str(err))
        print(json.dumps({"sent": sent, "errors": errors}), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: one of the four tools; prints its JSON result."""
    ap = argparse.ArgumentParser(prog="python -m statelab.traffic")
    sub = ap.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("udp-send")
    p.add_argument("dst")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--flows", type=int, default=16)
    p.add_argument("--packets", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--first-sport", type=int, default=20000)
    p = sub.add_parser("udp-sink")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--sending", type=float, default=0.0)
    p = sub.add_parser("tcp-sink")
    p.add_argument("--port", type=int, default=5002)
    p.add_argument("--duration", type=float, default=60.0)
    p = sub.add_parser("tcp-send")
    p.add_argument("dst")
    p.add_argument("--port", type=int, default=5002)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--bytes", type=int, default=65536)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--stall", type=float, default=5.0)
    p = sub.add_parser("inject")
    p.add_argument("--iface", default="eth0")
    args = ap.parse_args(argv)
    if args.tool == "inject":
        inject(args.iface)
        return 0
    if args.tool == "udp-send":
        if (args.packets is None) == (args.duration is None):
            ap.error("udp-send needs exactly one of --packets and --duration")
        out = udp_send(args.dst, args.port, args.flows, args.rate, args.packets, args.duration,
                       args.size, args.first_sport)
    elif args.tool == "udp-sink":
        out = udp_sink(args.port, args.duration, args.idle, args.sending)
    elif args.tool == "tcp-sink":
        out = tcp_sink(args.port, args.duration)
    else:
        out = tcp_send(args.dst, args.port, args.connections, args.bytes, args.duration, args.chunk, args.stall)
    print(json.dumps(out), flush=True)
    return 0


# -- driving the tools in a running lab ---------------------------------------------------

def _json_line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Read the next JSON line a tool prints, or fail with what the tool said."""
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if r else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"{' '.join(map(str, proc.args[3:7]))}: no result within {timeout}s "
                           f"(exit code {proc.poll()})")
    return json.loads(line)


def _tool(lab: Any, host: str, *args: Any) -> subprocess.Popen:
    return lab.spawn(host, [sys.executable, "-m", "statelab.traffic", *map(str, args)])


class Injector:
    """Raw frames sent from a lab node's data interface; counts what was really sent.

    Args:
        lab: the running lab.
        node: a tenant host or NF instance name.
    """

    def __init__(self, lab: Any, node: str) -> None:
        self.proc = lab.spawn(node, [sys.executable, "-m", "statelab.traffic", "inject", "--iface", "eth0"],
                              stdin=True)
        _json_line(self.proc, 15)

    def send(self, frames: Sequence[bytes]) -> int:
        """Send ``frames``; return how many the kernel accepted."""
        self.proc.stdin.write(json.dumps([f.hex() for f in frames]) + "\n")
        self.proc.stdin.flush()
        return _json_line(self.proc, 15)["sent"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)

    def __enter__(self) -> "Injector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class UdpStream:
    """UDP flows running in the background between two lab hosts (start, then ``result()``).

    Args:
        lab: the running lab.
        src: sending host.
        dst: host the sink runs on (``dst_ip`` need not be its address: that is the point
            of isolation tests and of NAT/LB addresses).
        dst_ip: address the sender sends to.
        flows, rate, packets, duration, port, first_sport: see :func:`udp_send`.
    """

    def __init__(self, lab: Any, src: str, dst: str, dst_ip: str, flows: int = 16, rate: float = 1000.0,
                 packets: Optional[int] = None, duration: Optional[float] = None, port: int = 5001,
                 first_sport: int = 20000, idle: float = 1.0) -> None:
        self.expected = duration if duration is not None else (packets or 0) * flows / rate
        self.sink = _tool(lab, dst, "udp-sink", "--port", port, "--duration", self.expected + 30, "--idle", idle,
                          "--sending", self.expected)
        _json_line(self.sink, 15)
        args = ["--packets", packets] if packets is not None else ["--duration", duration]
        self.sender = _tool(lab, src, "udp-send", dst_ip, "--port", port, "--flows", flows, "--rate", rate,
                            *args, "--first-sport", first_sport)

    def result(self) -> dict[str, Any]:
        """Wait for both ends; return ``{"sent": ..., "received": ..., "flows": per-flow figures}``."""
        sent = _json_line(self.sender, self.expected + 60)
        received = _json_line(self.sink, 45)
        self.sender.wait()
        self.sink.wait()
        return {"sent": sent, "received": received, "flows": udp_figures(sent, received)}


def udp_figures(sent: dict[str, Any], received: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-flow loss, duplicates, reordering, outage (ms) and sources, from both ends' reports."""
    rate = sent["rate_per_flow"]
    out = {}
    for fid, n in sent["sent"].items():
        r = received["flows"].get(str(fid), {"received": 0, "duplicates": 0, "reordered": 0,
                                             "max_gap_ms": 0.0, "sources": []})
        lost = n - r["received"]
        out[str(fid)] = {"sent": n, "received": r["received"], "lost": lost, "duplicates": r["duplicates"],
                         "reordered": r["reordered"], "outage_ms": round(lost / rate * 1000, 1),
                         "max_gap_ms": r["max_gap_ms"], "sources": r["sources"]}
    return out


class TcpStream:
    """Echo-verified TCP connections running in the background (start, then ``result()``).

    Args:
        lab: the running lab.
        src: host that connects.
        dst: host the echo sink runs on (or ``sinks``: several, e.g. LB backends).
        dst_ip, port: where the client connects (``sink_port``: where the sinks listen, if
            different, as behind a load balancer's virtual IP).
        connections, nbytes, duration, stall: see :func:`tcp_send`.
    """

    def __init__(self, lab: Any, src: str, dst: str, dst_ip: str, connections: int = 8,
                 nbytes: int = 1 << 30, duration: float = 5.0, port: int = 5002, stall: float = 5.0,
                 sinks: Optional[Sequence[str]] = None, sink_port: Optional[int] = None) -> None:
        self.sinks = [_tool(lab, h, "tcp-sink", "--port", sink_port or port, "--duration", duration + 120)
                      for h in (sinks or [dst])]
        for sink in self.sinks:
            _json_line(sink, 15)
        self.duration = duration
        self.stall = stall
        self.sender = _tool(lab, src, "tcp-send", dst_ip, "--port", port, "--connections", connections,
                            "--bytes", nbytes, "--duration", duration, "--stall", stall)

    def result(self) -> dict[str, Any]:
        """Wait for the sender, stop the sinks; ``{"sender": ..., "sinks": [...]}``."""
        sender = _json_line(self.sender, self.duration + self.stall + 60)
        self.sender.wait()
        sinks = []
        for sink in self.sinks:
            sink.terminate()
            sinks.append(_json_line(sink, 10))
            sink.wait()
        return {"sender": sender, "sinks": sinks}


def run_udp(lab: Any, src: str, dst: str, dst_ip: str, flows: int = 16, packets: int = 10,
            rate: float = 2000.0, port: int = 5001, first_sport: int = 20000) -> dict[str, Any]:
    """Send ``packets`` datagrams on each of ``flows`` flows and wait for the result (see UdpStream)."""
    return UdpStream(lab, src, dst, dst_ip, flows=flows, rate=rate, packets=packets, port=port,
                     first_sport=first_sport).result()


def run_tcp(lab: Any, src: str, dst: str, dst_ip: str, connections: int = 4, nbytes: int = 65536,
            port: int = 5002, timeout: float = 5.0) -> dict[str, Any]:
    """Open connections that each echo ``nbytes``; return the sender's result."""
    return TcpStream(lab, src, dst, dst_ip, connections=connections, nbytes=nbytes, duration=0.0,
                     port=port, stall=timeout).result()["sender"]


if __name__ == "__main__":
    sys.exit(main())


# -- observing hosts -----------------------------------------------------------------------

def host_rx(lab: Any, host: str) -> int:
    """Packets a tenant host's data interface has received (its kernel's counter)."""
    out = lab.host(host).cmd("ip -s -j link show eth0")
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def quiet(lab: Any, hosts: Sequence[str]) -> None:
    """Flush the hosts' neighbour tables so they send no ARP probes of their own while watched."""
    for h in hosts:
        lab.host(h).cmd("ip neigh flush dev eth0")  # permanent entries (the gateway) stay
