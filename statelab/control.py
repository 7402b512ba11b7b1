"""Pool control: scale out, scale in (drain), kill, and fail-over on an instance's death.

The lab owns each instance's lifecycle (``Lab.add_instance``, ``wait_ready``,
``remove_instance``); the controller decides when and tells the fabric, in the order of the
steering contract. This module imports nothing of the lab at run time.

Every membership change is an ordered fabric update (docs/contracts.md: a member's return
path before its traffic, its traffic stopped before its return path goes). A watcher
thread notices an instance whose process died and takes it out of its pool, so the survivors
carry its flows; that is the whole fail-over, because no instance holds state of its own.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING, Optional

from statelab.errors import LabError, ProcessFailed

if TYPE_CHECKING:
    from statelab.lab import Instance, Lab

WATCH_INTERVAL = 0.05
KILL_POLL = 0.0005  # s between looks at a SIGKILLed NF, until the kernel has it exiting
DRAIN_GRACE = 0.3
STOP_TIMEOUT = 5.0
PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()
MAX_INSTANCES = 16  # per pool, as the topology schema allows


def process_exiting(pid: int) -> bool:
    """Whether process ``pid`` is exiting or gone: ``PF_EXITING`` (set as the kernel enters
    ``do_exit``, before it frees the memory and closes the sockets: for an NF's packet socket an
    RCU grace period, often ten or more milliseconds), a zombie, or no process at all."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) on
    return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & PF_EXITING)


class Controller:
    """Changes a running lab's NF pools.

    Args:
        lab: the lab whose pools this controller changes.
    """

    def __init__(self, lab: "Lab") -> None:
        self.lab = lab
        self.lock = threading.RLock()
        self.events: list[tuple[float, str, str]] = []  # (time, event, instance)
        self._watch: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # -- looking up --------------------------------------------------------------------

    def _pool(self, tenant: str, pool: str):
        try:
            t = self.lab.topo.tenant(tenant)
        except KeyError:
            raise LabError(f"no tenant {tenant!r}; tenants: {', '.join(x.name for x in self.lab.topo.tenants)}") from None
        for p in t.pools:
            if p.name == pool:
                return t, p
        raise LabError(f"tenant {tenant!r} has no pool {pool!r}; its pools: "
                       f"{', '.join(p.name for p in t.pools)}")

    def instance(self, iid: str) -> "Instance":
        """The running instance called ``iid`` (e.g. ``red-fw-1``)."""
        try:
            return self.lab.instances[iid]
        except KeyError:
            raise LabError(f"no NF instance {iid!r}; instances: {', '.join(self.lab.instances)}") from None

    def _event(self, what: str, iid: str) -> None:
        self.events.append((time.time(), what, iid))

    # -- changes -----------------------------------------------------------------------

    def scale_out(self, tenant: str, pool: str, count: int = 1) -> list["Instance"]:
        """Start ``count`` new instances and add each to its pool once it is ready.

        Args:
            tenant: tenant name.
            pool: pool name within the tenant.
            count: how many instances to add.

        Returns:
            The new instances.
        """
        t, p = self._pool(tenant, pool)
        if count < 1:
            raise LabError(f"scale out by {count}: give a number of instances from 1")
        have = len([i for i in self.lab.pool_instances(tenant, pool) if i.in_pool])
        if have + count > MAX_INSTANCES:
            raise LabError(f"pool {tenant}/{pool} has {have} instance(s); it may have at most "
                           f"{MAX_INSTANCES} (the topology's limit), so at most +{MAX_INSTANCES - have} now")
        added = []
        with self.lock:
            for _ in range(count):
                inst = self.lab.take_standby(t, p)
                if inst is None:
                    inst = self.lab.add_instance(t, p, attach=True)
                    try:
                        self.lab.wait_ready(inst)
                    except ProcessFailed:
                        self.lab.remove_instance(inst)
                        raise
                self.lab.fabric.add_member(inst.key, inst.member)
                inst.in_pool = True
                self._event("scale-out", inst.id)
                added.append(inst)
            try:  # the next scale-out's warm instance; the one just added already carries traffic
                self.lab.replenish_standby(t, p)
            except ProcessFailed as err:
                self._event(f"standby-error: {err}", "")
        return added

    def scale_in(self, tenant: str, pool: str, count: int = 1) -> list[str]:
        """Drain and remove the ``count`` newest instances of a pool.

        Each instance is first taken out of the pool (atomically: new packets go to the
        others), given :data:`DRAIN_GRACE` seconds for packets in flight, then sent SIGTERM,
        which drains its queue and exits 0.

        Returns:
            The ids of the removed instances.

        Raises:
            LabError: the pool would be left empty, or an instance did not exit cleanly.
        """
        self._pool(tenant, pool)
        with self.lock:
            live = [i for i in self.lab.pool_instances(tenant, pool) if i.in_pool]
            if count >= len(live):
                raise LabError(f"pool {tenant}/{pool} has {len(live)} instance(s); "
                               f"it cannot lose {count} and keep serving")
            removed = []
            for inst in live[-count:]:
                self.lab.fabric.remove_member(inst.key, inst.member)
                inst.in_pool = False
                self._event("scale-in", inst.id)
                time.sleep(DRAIN_GRACE)
                inst.proc.send_signal(signal.SIGTERM)
                try:
                    code = inst.proc.wait(STOP_TIMEOUT)
                except Exception:
                    inst.proc.kill()
                    code = inst.proc.wait()
                self._event("stopped", inst.id)
                self.lab.fabric.forget_member(inst.key, inst.member)
                self.lab.remove_instance(inst)
                if code != 0:
                    raise LabError(f"NF {inst.id} exited with code {code} on SIGTERM (expected 0)")
                removed.append(inst.id)
        return removed

    def kill(self, iid: str) -> None:
        """Crash an instance (SIGKILL), take it out of its pool once seen dead, remove its host.

        Args:
            iid: the instance id, e.g. ``red-fw-1``.
        """
        with self.lock:
            inst = self.instance(iid)
            inst.proc.send_signal(signal.SIGKILL)
            self._event("kill", iid)
            # SIGKILL cannot be caught: once the kernel has the task exiting, it will never send
            # again, so fail over then, not after the kernel's teardown (which the reap waits for)
            deadline = time.monotonic() + STOP_TIMEOUT
            while not process_exiting(inst.proc.pid) and time.monotonic() < deadline:
                time.sleep(KILL_POLL)
            self._failover(inst)
            inst.proc.wait()
            self.lab.fabric.forget_member(inst.key, inst.member)
            self.lab.remove_instance(inst)

    def _failover(self, inst: "Instance") -> None:
        if inst.in_pool:
            self.lab.fabric.remove_member(inst.key, inst.member)
            inst.in_pool = False
            self._event("failover", inst.id)

    # -- liveness ----------------------------------------------------------------------

    def check(self) -> list[str]:
        """Take every instance whose process died out of its pool; return their ids."""
        dead = []
        with self.lock:
            for inst in self.lab.iter_instances():
                if inst.in_pool and not inst.alive():
                    self._failover(inst)
                    dead.append(inst.id)
        return dead

    def start_watch(self) -> None:
        """Start the liveness watcher thread (the lab does this once it is up)."""
        self._stop.clear()
        self._watch = threading.Thread(target=self._run_watch, name="statelab-liveness", daemon=True)
        self._watch.start()

    def stop_watch(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join()
            self._watch = None

    def _run_watch(self) -> None:
        """Wait on the instances' processes themselves (a pidfd each: readable the moment the
        process exits), so a death is seen at once; :data:`WATCH_INTERVAL` only bounds how
        late a new instance joins the watched set."""
        fds: dict[int, int] = {}  # pid -> pidfd
        try:
            while not self._stop.is_set():
                live = {i.proc.pid for i in self.lab.iter_instances() if i.in_pool}
                for pid in set(fds) - live:
                    os.close(fds.pop(pid))
                for pid in live - set(fds):
                    try:
                        fds[pid] = os.pidfd_open(pid)
                    except OSError:  # already gone (reaped): check() below sees it
                        pass
                select.select(list(fds.values()), [], [], WATCH_INTERVAL)
                try:
                    self.check()
                except Exception as err:  # keep watching; the lab's owner sees the error in status
                    self._event(f"watch-error: {err}", "")
        finally:
            for fd in fds.values():
                os.close(fd)
