"""The bare packet loop the NF runtime is measured against: read a frame, send it back.

``python bench/echo.py IFACE`` - one AF_PACKET socket, blocking reads, the frame's own copies
going out ignored by the kernel (as the runtime does); no parsing, no batching, no counters.
Runs until SIGTERM. What a Python packet loop can do at best on this machine: ``forward`` and
every NF are reported as a fraction of it.
"""

import signal
import sys

from nfs.mmsg import packet_socket

SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23


def main(iface: str) -> None:
    sock = packet_socket(iface)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"echo ready on {iface}", flush=True)
    recv, send = sock.recv, sock.send
    while True:
        send(recv(65535))


if __name__ == "__main__":
    main(sys.argv[1])
