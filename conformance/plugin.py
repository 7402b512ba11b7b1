"""pytest plugin of statelab: target and topology options, and the lab fixture.

Registered through the ``pytest11`` entry point, so ``pytest conformance/ --target ovs
--topology FILE`` works from any directory once statelab is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

TARGETS = ("ovs", "bmv2", "tofino-model")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("statelab")
    group.addoption("--target", choices=TARGETS, default="ovs",
                    help="fabric under test (default: ovs)")
    group.addoption("--topology", default=None,
                    help="topology YAML (default: statelab's topologies/default.yaml)")
    group.addoption("--report", default=None, metavar="DIR",
                    help="write the run's reports (JUnit XML) into DIR")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root, Open vSwitch, Redis and Mininet")
    report = config.getoption("--report")
    if report and not config.option.xmlpath:
        Path(report).mkdir(parents=True, exist_ok=True)
        config.option.xmlpath = str(Path(report) / "junit.xml")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veths, Open vSwitch): run with sudo")


@pytest.fixture(scope="session")
def topology_path(pytestconfig: pytest.Config) -> Path:
    """The topology file the run uses."""
    from statelab.spec import DEFAULT_TOPOLOGY
    opt = pytestconfig.getoption("--topology")
    return Path(opt) if opt else DEFAULT_TOPOLOGY


@pytest.fixture(scope="session")
def target(pytestconfig: pytest.Config) -> str:
    """The fabric kind under test; a target without a driver here is skipped with the reason."""
    from statelab.fabric import FABRIC_DRIVERS
    kind = pytestconfig.getoption("--target")
    if kind not in FABRIC_DRIVERS:
        pytest.skip(f"target {kind!r} has no fabric driver in this version of statelab")
    return kind


@pytest.fixture(scope="module")
def lab(topology_path: Path, target: str) -> Iterator["object"]:
    """A running lab of the run's topology on the run's target; always torn down."""
    import dataclasses

    from statelab.lab import Lab
    from statelab.spec import load
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veths, Open vSwitch): run with sudo")
    topo = load(topology_path)
    if topo.fabric_kind != target:
        topo = dataclasses.replace(topo, fabric_kind=target)
    with Lab(topo) as running:
        yield running
