"""A statelab NF that does not wait for a replica before it uses what it wrote (``wait=0`` in
its Sentinel URL): with asynchronous replication, a primary that dies can take the NF's last
claims with it, and the promoted replica hands the same ESP sequence numbers out again.

``python -m tests.brokennfs.nowait KIND --iface ... --state redis+sentinel://...?wait=1 ...``
"""

from __future__ import annotations

import sys

from nfs.runtime import main
from tests.brokennfs.localstate import nf_class

if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if "--state" in args:
        i = args.index("--state") + 1
        args[i] = args[i].replace("wait=1", "wait=0")
    sys.exit(main(nf_class(kind), args))
