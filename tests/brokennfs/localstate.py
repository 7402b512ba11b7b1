"""A statelab NF run with in-process state instead of the state server: the classic stateful NF.

``python -m tests.brokennfs.localstate KIND --iface ... --state URL ...`` runs ``nfs.KIND`` but
ignores ``--state`` and keeps every per-flow fact in its own memory. Each instance then
knows only the flows it saw: exactly what the conformance checks must catch.
"""

from __future__ import annotations

import importlib
import inspect
import sys

from nfs.runtime import NetworkFunction, main


def nf_class(kind: str) -> type[NetworkFunction]:
    module = importlib.import_module(f"nfs.{kind}")
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, NetworkFunction) and obj.kind == kind:
            return obj
    raise SystemExit(f"nfs.{kind} defines no NetworkFunction with kind {kind!r}")


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if "--state" in args:
        args[args.index("--state") + 1] = "local:"
    sys.exit(main(nf_class(kind), args))
