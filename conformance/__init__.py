"""The statelab conformance suite (a pytest plugin; see conformance/plugin.py)."""
