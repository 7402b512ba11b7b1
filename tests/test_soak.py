"""The soak's short version (bench/soak.py): 50 faults in a row under load, nothing broken,
duplicated, remapped or left behind; its counts printed into the test log. In the default run
(CI): the 1000-event figures are in the README."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.mark.root
def test_fifty_faults_in_a_row_lose_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0 or shutil.which("redis-server") is None:
        pytest.skip("needs root and redis-server")
    from bench.soak import MUST_BE_ZERO, soak
    res = soak(events=50, seed=7, round_seconds=8.0, progress=lambda line: None)
    with capsys.disabled():  # the counts belong in CI's log
        print("\nsoak (50 events):", {k: res[k] for k in ("by_event", "seconds", "tcp_connections", "udp_sent",
                                                           "udp_lost", "esp_packets", *MUST_BE_ZERO)})
    assert res["events"] == 50 and {"scale-out", "scale-in", "kill"} <= set(res["by_event"]) <= \
        {"scale-out", "scale-in", "kill", "state-kill"}
    assert res["tcp_connections"] > 0 and res["udp_sent"] > 0 and res["esp_packets"] > 0  # it was exercised
    assert {k: res[k] for k in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), res["problems"]
    assert res["passed"]
