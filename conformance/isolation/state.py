"""Tenant isolation at the state server: ISO-4."""

from __future__ import annotations

import itertools

import redis

from conformance.core import SKIP, Result, check, verdict
from conformance.load import Context

@check("ISO-4")
def iso_4(ctx: Context) -> Result:
    """One tenant's state credentials MUST NOT read or write another tenant's keys.

    With each tenant's ACL user, GET, SET, DEL, EVAL on another tenant's key prefix and
    KEYS/SCAN/FLUSHALL are tried against the lab's state server; every one must be refused.
    """
    lab = ctx.lab
    tenants = [t.name for t in lab.topo.tenants]
    if len(tenants) < 2:
        return Result(SKIP, details="the topology has one tenant")
    allowed: list[str] = []
    attempts = 0
    lab.redis().set(f"t:{tenants[1]}:iso4:secret", "x")
    for a, b in itertools.permutations(tenants, 2):
        r = lab.redis(a)
        key = f"t:{b}:iso4:secret"
        tries = {
            "GET": lambda: r.get(key), "SET": lambda: r.set(key, "stolen"), "DEL": lambda: r.delete(key),
            "EVAL": lambda: r.eval("return redis.call('GET', KEYS[1])", 1, key),
            "KEYS": lambda: r.keys("*"), "SCAN": lambda: r.scan(0, match=f"t:{b}:*"),
            "FLUSHALL": lambda: r.flushall(),
        }
        for name, op in tries.items():
            attempts += 1
            try:
                op()
                allowed.append(f"{a} {name} {key}")
            except redis.exceptions.NoPermissionError:
                pass
            except redis.exceptions.ResponseError as err:
                if "NOPERM" not in str(err) and "permission" not in str(err).lower():
                    allowed.append(f"{a} {name}: {err}")
    figures = {"attempts": attempts, "allowed": len(allowed), "allowed_operations": allowed}
    return verdict(not allowed, figures, f"cross-tenant state access allowed: {allowed}")


