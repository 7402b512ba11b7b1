"""pytest plugin of statelab: options, the lab fixture, and the conformance report.

Registered through the ``pytest11`` entry point, so ``pytest conformance/ --target ovs
--topology FILE --report DIR`` works wherever statelab is installed. A run writes, in DIR:
``junit.xml`` (with each check's figures as properties), ``report.json`` (target, versions,
topology, every check's verdict, sentence and figures) and a PNG timeline per scale/kill check,
and prints a one-screen summary table at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

TARGETS = ("ovs", "bmv2", "tofino-model")
REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "topologies" / "conformance.yaml"
_REPORT = pytest.StashKey["object"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("statelab")
    group.addoption("--target", choices=TARGETS, default="ovs", help="fabric under test (default: ovs)")
    group.addoption("--topology", default=None,
                    help="topology YAML (default: topologies/conformance.yaml, the reference lab)")
    group.addoption("--report", default=None, metavar="DIR",
                    help="write junit.xml, report.json and PNG timelines into DIR")
    group.addoption("--state", default=None, metavar="single|replicas=N|cluster=N",
                    help="the state servers of the run, in place of the topology's 'state:' "
                         "(e.g. cluster=3: every tenant's state on a 3-node Redis Cluster)")


def state_override(text: Optional[str]) -> dict[str, int]:
    """``--state`` as topology fields: ``single`` (one server per tenant), ``replicas=N``, ``cluster=N``."""
    if text is None:
        return {}
    if text == "single":
        return {"state_replicas": 0, "state_cluster": 0}
    what, _, n = text.partition("=")
    limits = {"replicas": (1, 4), "cluster": (3, 8)}
    if what not in limits or not n.isdigit() or not limits[what][0] <= int(n) <= limits[what][1]:
        raise pytest.UsageError(f"--state {text}: write single, replicas=N (1 to 4) or cluster=N (3 to 8)")
    other = "cluster" if what == "replicas" else "replicas"
    return {f"state_{what}": int(n), f"state_{other}": 0}


def _topology_path(config: pytest.Config) -> Path:
    opt = config.getoption("--topology")
    if opt:
        return Path(opt)
    from statelab.spec import DEFAULT_TOPOLOGY
    return REFERENCE if REFERENCE.exists() else DEFAULT_TOPOLOGY


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root, Open vSwitch, Redis and Mininet")
    from conformance.core import Report
    report_dir = config.getoption("--report")
    if report_dir and not config.option.xmlpath:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        config.option.xmlpath = str(Path(report_dir) / "junit.xml")
    state_override(config.getoption("--state"))  # a wrong --state is a usage error before anything runs
    config.stash[_REPORT] = Report(config.getoption("--target"), _topology_path(config),
                                   Path(report_dir) if report_dir else None, config.getoption("--state"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veths, Open vSwitch): run with sudo")


_CHECK_TEST = re.compile(r"^test_(iso|scale|cont)_(\d+)_")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A conformance test skipped before its check ran (no driver for the target, not root)
    still gets its check into the report, as SKIP with the reason."""
    outcome = yield
    rep = outcome.get_result()
    m = _CHECK_TEST.match(item.name)
    if not (m and rep.skipped and call.when == "setup"):
        return
    from conformance.core import SKIP, Result, registry
    report = item.config.stash.get(_REPORT, None)
    check_id = f"{m.group(1).upper()}-{m.group(2)}"
    c = registry().get(check_id)
    if report is not None and c is not None and all(r.id != check_id for r in report.records):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        report.add(c, Result(SKIP, details=reason.removeprefix("Skipped: ")), 0.0)


def pytest_sessionfinish(session: pytest.Session) -> None:
    report = session.config.stash.get(_REPORT, None)
    if report is not None:
        report.write()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is None or not report.records:
        return
    terminalreporter.section("statelab conformance")
    terminalreporter.write_line(report.table())
    if report.directory:
        terminalreporter.write_line(f"report: {report.directory / 'report.json'}")


@pytest.fixture(scope="session")
def topology_path(pytestconfig: pytest.Config) -> Path:
    """The topology file the run uses."""
    return _topology_path(pytestconfig)


@pytest.fixture(scope="session")
def target(pytestconfig: pytest.Config) -> str:
    """The fabric kind under test; a target without a driver here is skipped with the reason."""
    from statelab.errors import LabError
    from statelab.fabric import fabric_class
    kind = pytestconfig.getoption("--target")
    try:
        fabric_class(kind).setup()
    except LabError as err:
        pytest.skip(f"target {kind!r}: {err}")
    return kind


def running_lab(topology: Any) -> Iterator[Any]:
    """For fixtures: yield a running lab of ``topology`` (a path or a loaded spec), tear it
    down afterwards; skip the tests that use it where not root."""
    from statelab.lab import Lab
    from statelab.spec import load
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veths, Open vSwitch): run with sudo")
    with Lab(load(topology) if isinstance(topology, (str, Path)) else topology) as running:
        yield running


@pytest.fixture(scope="module")
def lab(topology_path: Path, target: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A running lab of the run's topology on the run's target (and ``--state``); always torn down."""
    from statelab.spec import load
    topo = load(topology_path)
    topo = dataclasses.replace(topo, fabric_kind=target, **state_override(request.config.getoption("--state")))
    yield from running_lab(topo)


@pytest.fixture
def conformance(lab: Any, request: pytest.FixtureRequest,
                record_property: Callable[[str, Any], None]) -> Callable[[str], Any]:
    """Run a check by ID: record its figures and verdict; fail or skip the test accordingly."""
    from conformance.core import FAIL, SKIP, registry
    from conformance.load import Context

    report = request.config.stash[_REPORT]

    def run(check_id: str) -> Any:
        c = registry()[check_id]
        t0 = time.monotonic()
        result = c.func(Context(lab, report.directory))
        report.add(c, result, time.monotonic() - t0)
        record_property("check", c.id)
        record_property("sentence", c.sentence)
        record_property("verdict", result.verdict)
        for key, value in result.figures.items():
            record_property(key, value if isinstance(value, str) else json.dumps(value))
        if result.verdict == SKIP:
            pytest.skip(f"{c.id}: {result.details}")
        if result.verdict == FAIL:
            figs = {k: v for k, v in result.figures.items() if not isinstance(v, dict)}
            pytest.fail(f"{c.id} FAIL: {c.sentence}\n{result.details}\nfigures: {figs}", pytrace=False)
        return result

    return run
