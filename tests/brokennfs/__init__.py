"""Deliberately broken NFs, for showing that each conformance check can fail."""
