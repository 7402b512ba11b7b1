"""The lab's record: only processes whose identity is proven (PID and start time) are ours."""

from __future__ import annotations

import os
import subprocess
import sys

from statelab.record import Record, alive, proc_start_time


def test_a_process_is_ours_only_with_its_start_time() -> None:
    me = os.getpid()
    assert alive(me, proc_start_time(me))
    assert not alive(me, proc_start_time(me) + 1)   # the PID was reused by another process
    assert not alive(me, None)                      # identity never proven: never signalled


def test_a_process_gone_before_it_was_recorded_is_never_signalled(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    rec = Record(lab="t", owner=os.getpid(), owner_start=proc_start_time(os.getpid()), run_dir=str(tmp_path))
    rec.add_process(child.pid, "gone already")
    assert rec.processes[0].start is None
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec.processes[0].pid = survivor.pid  # as if the PID had been reused
        rec.clean(grace=0.1)
        assert survivor.poll() is None
    finally:
        survivor.kill()
        survivor.wait()
