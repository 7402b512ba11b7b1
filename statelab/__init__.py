"""statelab: testbed and conformance suite for stateless network functions."""

__version__ = "0.1.0"
