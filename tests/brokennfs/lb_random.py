"""A load balancer that picks each new connection's backend at random and remembers it only
in its own memory: every instance that meets the connection may pick another backend.

``python -m tests.brokennfs.lb_random --iface ... --state URL ...`` (``--state`` is ignored).
"""

from __future__ import annotations

import random
import sys

import nfs.lb
from nfs.runtime import main


def _random_backend(service: nfs.lb.Service, client: nfs.lb.Endpoint) -> nfs.lb.Endpoint:
    return random.choice(service.backends)


if __name__ == "__main__":
    nfs.lb.choose_backend = _random_backend
    args = sys.argv[1:]
    if "--state" in args:
        args[args.index("--state") + 1] = "local:"
    sys.exit(main(nfs.lb.LoadBalancer, args))
