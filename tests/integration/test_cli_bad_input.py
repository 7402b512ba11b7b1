"""Bad input at the lab's CLI: one line of error, the lab still up (issue: bad input never takes
a lab down). Each command runs through the real Mininet CLI of a running default lab."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from statelab.cli import run_cli

pytestmark = pytest.mark.root


def cli(lab: Any, tmp_path: Path, capsys: pytest.CaptureFixture, *lines: str) -> list[str]:
    script = tmp_path / "commands"
    script.write_text("\n".join(lines) + "\n")
    run_cli(lab, script)
    return [line for line in capsys.readouterr().out.splitlines()
            if line and not line.startswith("statelab: extra commands")]


@pytest.mark.parametrize("command, error", [
    ("scale green fw +1", "error: no tenant 'green'; tenants: red, blue"),
    ("scale red nosuch +1", "error: tenant 'red' has no pool 'nosuch'; its pools: fw, mon"),
    ("scale red fw +100", "error: pool red/fw has 2 instance(s); it may have at most 16 (the topology's "
                          "limit), so at most +14 now"),
    ("scale red fw +0", "nothing to do: give +N to add or -N to remove instances"),
    ("scale red fw -2", "error: pool red/fw has 2 instance(s); it cannot lose 2 and keep serving"),
    ("counters nosuch", "error: no NF instance 'nosuch'; instances: "),
    ("kill nosuch", "error: no NF instance 'nosuch'; instances: "),
])
def test_a_bad_command_prints_one_line_and_keeps_the_lab(lab, tmp_path, capsys, command: str, error: str) -> None:
    before = sorted(lab.instances)
    out = cli(lab, tmp_path, capsys, command)
    assert len(out) == 1 and out[0].startswith(error), out
    assert sorted(lab.instances) == before
    assert all(i.alive() for i in lab.iter_instances())
    assert "1 received" in lab.host("r1").cmd("ping -c 1 -W 2 10.0.0.2")  # still carries traffic
