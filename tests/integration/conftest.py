"""Helpers shared by the integration tests (root, real OVS, Redis and Mininet)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from conformance.plugin import running_lab


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
    from statelab.spec import DEFAULT_TOPOLOGY
    yield from running_lab(DEFAULT_TOPOLOGY)
