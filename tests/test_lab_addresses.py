"""The lab's management addresses: those of removed NFs are given out again, and running out
of the subnet is a clear error (no root needed: only the allocator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from statelab.spec import load

REPO = Path(__file__).resolve().parents[1]



def test_management_addresses_of_removed_nfs_are_given_out_again() -> None:
    """A lab that scales for hours must not run out of its management subnet (the soak found
    it: after ~240 NFs had come and gone, new ones got addresses outside it)."""
    import heapq
    from statelab.errors import LabError
    from statelab.lab import Lab
    lab = Lab(load(REPO / "tests" / "data" / "small.yaml"))
    first = [lab._take_mgmt_index() for _ in range(3)]
    assert first == [10, 11, 12]
    heapq.heappush(lab._free_mgmt, 11)  # what _leave_management does for a removed NF
    assert lab._take_mgmt_index() == 11 and lab._take_mgmt_index() == 13
    taken = 5
    with pytest.raises(LabError, match="no address left"):
        for _ in range(lab.mgmt.num_addresses):
            lab._take_mgmt_index()
            taken += 1
    assert taken == lab.mgmt.num_addresses - 1 - 10 + 1  # .10 .. the last host address, each once
