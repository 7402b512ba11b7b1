"""Stateless network functions, each runnable as ``python -m nfs.<kind>``."""

KNOWN_KINDS = ("forward", "firewall", "nat", "router", "ipsec", "lb")
