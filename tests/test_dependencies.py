"""A missing program fails with a message naming the package to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from statelab.lab import REQUIRED

REPO = Path(__file__).resolve().parents[1]
OVS = ("ovs-vsctl", "ovs-ofctl", "ovs-vswitchd", "ovsdb-server")


@pytest.mark.parametrize("missing,package", [("redis-server", "redis-server"), ("ethtool", "ethtool"),
                                             ("ovs-vswitchd", "openvswitch-switch")])
def test_missing_binary_names_its_package(tmp_path: Path, missing: str, package: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in [*REQUIRED, *OVS]:
        real = shutil.which(name)
        if real is None:
            pytest.skip(f"{name} is not installed here, so the others cannot be checked (run scripts/install.sh)")
        if name != missing:
            (bindir / name).symlink_to(real)
    env = dict(os.environ, PATH=str(bindir))
    proc = subprocess.run([sys.executable, "-m", "statelab.cli", "up", str(REPO / "tests/data/small.yaml"),
                           "--no-cli"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{missing} not found: install it with `sudo apt-get install {package}`" in proc.stderr
