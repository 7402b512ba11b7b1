"""Traffic generators and checkers that run inside lab hosts.

``python -m statelab.traffic udp-sink|udp-send|tcp-sink|tcp-send ...``; each prints one JSON
object on stdout when done, so a test (or a person) reads exactly what arrived.

- UDP: every flow is its own socket (its own source port, so its own 5-tuple). Each datagram
  carries ``flow id, sequence number, send time``; the sink counts per flow what arrived,
  duplicates and reordering.
- TCP: every connection streams random bytes that the sink echoes back; the sender compares
  SHA-256 digests of what it sent and what came back, and reports resets and stalls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import socket
import struct
import sys
import subprocess
import threading
import time
from typing import Any, Optional, Sequence

HEADER = struct.Struct("!IId")  # flow id, sequence number, send time


def udp_send(dst: str, port: int, flows: int, packets: int, rate: float, size: int = 64,
             first_sport: int = 20000) -> dict[str, Any]:
    """Send ``packets`` datagrams on each of ``flows`` flows, round robin, at ``rate`` pkt/s in all.

    Args:
        dst: destination address.
        port: destination UDP port.
        flows: number of flows (source ports ``first_sport`` ...).
        packets: datagrams per flow.
        rate: total datagrams per second.
        size: datagram payload size (at least the 16-byte header).
        first_sport: source port of flow 0.

    Returns:
        ``{"sent": {flow: count}, "duration": s}``.
    """
    socks = []
    for i in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", first_sport + i))
        socks.append(s)
    pad = b"\0" * max(0, size - HEADER.size)
    sent = {i: 0 for i in range(flows)}
    t0 = time.monotonic()
    interval = 1.0 / rate if rate > 0 else 0.0
    n = 0
    for seq in range(packets):
        for i, s in enumerate(socks):
            due = t0 + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                s.sendto(HEADER.pack(i, seq, time.time()) + pad, (dst, port))
                sent[i] += 1
            except OSError:
                pass
            n += 1
    for s in socks:
        s.close()
    return {"sent": sent, "duration": time.monotonic() - t0}


def udp_sink(port: int, duration: float, idle: float) -> dict[str, Any]:
    """Receive datagrams for up to ``duration`` s (stop after ``idle`` s of silence once some came).

    Returns:
        ``{"flows": {flow: {"received", "duplicates", "reordered", "src"}}, "total": n}``.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    print(json.dumps({"ready": True}), flush=True)
    flows: dict[int, dict[str, Any]] = {}
    seen: dict[int, set[int]] = {}
    last: dict[int, int] = {}
    end = time.monotonic() + duration
    last_rx: Optional[float] = None
    while time.monotonic() < end:
        wait = 0.1
        if last_rx is not None and time.monotonic() - last_rx > idle:
            break
        r, _, _ = select.select([s], [], [], wait)
        if not r:
            continue
        data, addr = s.recvfrom(65535)
        last_rx = time.monotonic()
        if len(data) < HEADER.size:
            continue
        fid, seq, _ts = HEADER.unpack_from(data)
        f = flows.setdefault(fid, {"received": 0, "duplicates": 0, "reordered": 0, "src": f"{addr[0]}:{addr[1]}"})
        if seq in seen.setdefault(fid, set()):
            f["duplicates"] += 1
            continue
        seen[fid].add(seq)
        f["received"] += 1
        if seq < last.get(fid, -1):
            f["reordered"] += 1
        last[fid] = max(seq, last.get(fid, -1))
    return {"flows": {str(k): v for k, v in sorted(flows.items())},
            "total": sum(f["received"] for f in flows.values())}


def _echo(conn: socket.socket) -> None:
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)


def tcp_sink(port: int, duration: float) -> dict[str, Any]:
    """Echo every accepted connection's bytes back for ``duration`` s; count connections."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(512)
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + duration
    accepted = 0
    while time.monotonic() < end:
        r, _, _ = select.select([srv], [], [], 0.1)
        if r:
            conn, _ = srv.accept()
            accepted += 1
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()
    return {"accepted": accepted}


def _tcp_one(dst: str, port: int, nbytes: int, timeout: float, chunk: int, pause: float) -> dict[str, Any]:
    payload = os.urandom(nbytes)
    result: dict[str, Any] = {"ok": False, "error": None, "sent": 0, "received": 0}
    try:
        s = socket.create_connection((dst, port), timeout=timeout)
    except OSError as err:
        result["error"] = f"connect: {err}"
        return result
    back = hashlib.sha256()
    got = 0
    try:
        s.settimeout(timeout)
        for off in range(0, nbytes, chunk):
            s.sendall(payload[off:off + chunk])
            result["sent"] = off + len(payload[off:off + chunk])
            while got < result["sent"]:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed by peer")
                back.update(data)
                got += len(data)
            if pause:
                time.sleep(pause)
        result["received"] = got
        result["ok"] = back.digest() == hashlib.sha256(payload).digest()
        if not result["ok"]:
            result["error"] = "digest mismatch"
    except socket.timeout:
        result["error"] = f"stalled: nothing for {timeout}s"
    except ConnectionResetError:
        result["error"] = "reset"
    except OSError as err:
        result["error"] = str(err)
    finally:
        result["received"] = got
        s.close()
    return result


def tcp_send(dst: str, port: int, connections: int, nbytes: int, timeout: float = 5.0,
             chunk: int = 4096, pause: float = 0.0) -> dict[str, Any]:
    """Open ``connections`` concurrent connections, each streaming ``nbytes`` and verifying the echo.

    Returns:
        ``{"connections": n, "ok": n_ok, "failed": [{"error", "sent", "received"}, ...]}``.
    """
    results: list[dict[str, Any]] = [{} for _ in range(connections)]

    def run(i: int) -> None:
        results[i] = _tcp_one(dst, port, nbytes, timeout, chunk, pause)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"connections": connections, "ok": sum(1 for r in results if r.get("ok")),
            "failed": [r for r in results if not r.get("ok")]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: one of the four tools; prints its JSON result."""
    ap = argparse.ArgumentParser(prog="python -m statelab.traffic")
    sub = ap.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("udp-send")
    p.add_argument("dst")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--flows", type=int, default=16)
    p.add_argument("--packets", type=int, default=10)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--first-sport", type=int, default=20000)
    p = sub.add_parser("udp-sink")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--idle", type=float, default=1.0)
    p = sub.add_parser("tcp-sink")
    p.add_argument("--port", type=int, default=5002)
    p.add_argument("--duration", type=float, default=30.0)
    p = sub.add_parser("tcp-send")
    p.add_argument("dst")
    p.add_argument("--port", type=int, default=5002)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--bytes", type=int, default=65536)
    p.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.tool == "udp-send":
        out = udp_send(args.dst, args.port, args.flows, args.packets, args.rate, args.size, args.first_sport)
    elif args.tool == "udp-sink":
        out = udp_sink(args.port, args.duration, args.idle)
    elif args.tool == "tcp-sink":
        out = tcp_sink(args.port, args.duration)
    else:
        out = tcp_send(args.dst, args.port, args.connections, args.bytes, args.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- driving the tools in a running lab ---------------------------------------------------

def _json_line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Read the next JSON line a tool prints, or fail with what the tool said."""
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if r else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"{' '.join(proc.args[3:7])}: no result within {timeout}s "
                           f"(exit code {proc.poll()})")
    return json.loads(line)


def _tool(lab: Any, host: str, *args: str) -> subprocess.Popen:
    return lab.spawn(host, [sys.executable, "-m", "statelab.traffic", *map(str, args)])


def run_udp(lab: Any, src: str, dst: str, dst_ip: str, flows: int = 16, packets: int = 10,
            rate: float = 2000.0, port: int = 5001, first_sport: int = 20000,
            sink_duration: float = 30.0) -> dict[str, Any]:
    """Send UDP flows from host ``src`` to ``dst_ip`` with a sink on host ``dst``.

    Args:
        lab: the running lab.
        src: sending host.
        dst: host the sink runs on (``dst_ip`` need not be its address: that is the point
            of isolation tests).
        dst_ip: address the sender sends to.
        flows, packets, rate, port, first_sport: see :func:`udp_send`.
        sink_duration: longest the sink waits.

    Returns:
        ``{"sent": {...}, "received": {...}}`` as reported by the two tools.
    """
    sink = _tool(lab, dst, "udp-sink", "--port", port, "--duration", sink_duration, "--idle", 1.0)
    _json_line(sink, 10)
    sender = _tool(lab, src, "udp-send", dst_ip, "--port", port, "--flows", flows, "--packets", packets,
                   "--rate", rate, "--first-sport", first_sport)
    sent = _json_line(sender, 60 + flows * packets / rate)
    received = _json_line(sink, sink_duration + 5)
    sender.wait()
    sink.wait()
    return {"sent": sent, "received": received}


def run_tcp(lab: Any, src: str, dst: str, dst_ip: str, connections: int = 4, nbytes: int = 65536,
            port: int = 5002, timeout: float = 5.0) -> dict[str, Any]:
    """Open TCP connections from ``src`` to ``dst_ip`` (echo sink on ``dst``); verify digests.

    Returns:
        The sender's result: ``{"connections", "ok", "failed"}``.
    """
    sink = _tool(lab, dst, "tcp-sink", "--port", port, "--duration", 30 + timeout)
    _json_line(sink, 10)
    sender = _tool(lab, src, "tcp-send", dst_ip, "--port", port, "--connections", connections,
                   "--bytes", nbytes, "--timeout", timeout)
    result = _json_line(sender, 60 + timeout * 2)
    sender.wait()
    sink.kill()
    sink.wait()
    return result
