"""Zero-downtime scaling: SCALE-1, SCALE-2."""

from conformance.scale import checks  # noqa: F401  (registers the checks)
