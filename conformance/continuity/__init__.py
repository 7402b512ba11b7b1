"""State continuity across crashes: CONT-1 .. CONT-5."""

from conformance.continuity import checks  # noqa: F401  (registers the checks)
