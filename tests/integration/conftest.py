"""Helpers shared by the integration tests (root, real OVS, Redis and Mininet)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from statelab.traffic import host_rx as host_rx  # noqa: F401  (re-exported for the tests)
from statelab.traffic import quiet as _quiet


def quiet(lab: Any, *hosts: str) -> None:
    _quiet(lab, hosts)


def nf_rx(lab: Any) -> dict[str, int]:
    """Packets each NF instance has received so far (its runtime's counter)."""
    return {iid: c.get("rx", 0) for iid, c in lab.settled_counters().items()}


def delivered(result: dict[str, Any]) -> int:
    return result["received"]["total"]


def sent(result: dict[str, Any]) -> int:
    return sum(result["sent"]["sent"].values())


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    """The default lab (forward NFs), whatever --topology the run was given."""
    from statelab.lab import Lab
    from statelab.spec import DEFAULT_TOPOLOGY, load
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veths, Open vSwitch): run with sudo")
    with Lab(load(DEFAULT_TOPOLOGY)) as running:
        yield running
