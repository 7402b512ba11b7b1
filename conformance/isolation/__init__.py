"""Tenant isolation: ISO-1 .. ISO-3 at the fabric, ISO-4 at the state server."""

from conformance.isolation import checks, state  # noqa: F401  (registers the checks)
