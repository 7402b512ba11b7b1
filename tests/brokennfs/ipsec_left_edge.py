"""An IPsec gateway whose anti-replay check looks only at the window's left edge.

``python -m tests.brokennfs.ipsec_left_edge --iface ...`` runs ``nfs.ipsec`` with sequence
numbers claimed from the state server as usual (no reuse), but its replay check drops only
numbers older than the window; a number inside the window that was already accepted passes
again. RFC 4303 §3.4.3 requires a bitmap of what was seen: CONT-4 must catch this NF.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from nfs import state
from nfs.ipsec import IPsecGateway
from nfs.runtime import main


def _left_edge_local(store: "state.LocalState", keys: Sequence[str], args: Sequence[Any]) -> int:
    key, = keys
    seq, window = int(args[0]), int(args[1])
    raw = store._get(key)
    top = int(raw) if raw else 0
    if seq == 0 or seq + window <= top:
        return 0
    store._set(key, str(max(top, seq)).encode(), 0)
    return 1


LEFT_EDGE = state.Script(lua="""
local seq = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
local top = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if seq == 0 or seq + w <= top then return 0 end
if seq > top then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
""", local=_left_edge_local)

if __name__ == "__main__":
    state.SCRIPTS["replay"] = LEFT_EDGE
    sys.exit(main(IPsecGateway))
