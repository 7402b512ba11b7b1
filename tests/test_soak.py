"""The soak's short version (bench/soak.py): 50 faults in a row under load, nothing broken,
duplicated, remapped or left behind; its counts printed (``pytest -s`` shows them)."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.mark.root
@pytest.mark.skipif(os.environ.get("STATELAB_SOAK") != "1",
                    reason="not in the default run yet: the 1000-event soak saw 15 ESP (SPI, seq) pairs "
                           "carried twice in 331511 (issue #10, not yet diagnosed), so a short run may "
                           "fail by chance; STATELAB_SOAK=1 runs it")
def test_fifty_faults_in_a_row_lose_nothing() -> None:
    if os.geteuid() != 0 or shutil.which("redis-server") is None:
        pytest.skip("needs root and redis-server")
    from bench.soak import MUST_BE_ZERO, soak
    res = soak(events=50, seed=7, round_seconds=8.0, progress=lambda line: None)
    print("soak:", {k: v for k, v in res.items() if k != "problems"})
    assert res["events"] == 50 and {"scale-out", "scale-in", "kill"} <= set(res["by_event"]) <= \
        {"scale-out", "scale-in", "kill", "state-kill"}
    assert res["tcp_connections"] > 0 and res["udp_sent"] > 0 and res["esp_packets"] > 0  # it was exercised
    assert {k: res[k] for k in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), res["problems"]
    assert res["passed"]
