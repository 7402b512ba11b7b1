"""The ``statelab`` command: up, down, clean, status, validate.

``statelab up [FILE]`` brings a lab up (the default topology if no file is given) and opens the
Mininet CLI with statelab's own commands added (``tenants``, ``pools``, ``scale``, ``kill``,
``counters``). Leaving the CLI, Ctrl-C, or ``statelab down`` from another terminal tears the lab
down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from statelab import spec as specmod
from statelab.errors import LabError
from statelab.record import Record, alive, lab_records


def _progress() -> "callable":
    t0 = time.monotonic()

    def show(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {msg}", flush=True)
    return show


def _load(path: Optional[str]) -> "specmod.Topology":
    return specmod.load(Path(path) if path else specmod.DEFAULT_TOPOLOGY)


def _sigterm_exits() -> None:
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def pools_table(lab) -> str:
    """One line per NF instance: pool, instance, state, and its packet counters."""
    rows = [f"{'tenant':8} {'pool':10} {'instance':18} {'state':9} {'rx':>8} {'tx':>8} {'dropped':>8}"]
    for inst in lab.iter_instances():
        c = inst.counters()
        state = c.get("state", "starting") if inst.alive() else f"dead({inst.proc.returncode})"
        if inst.alive() and inst.standby:
            state = "standby"
        elif inst.alive() and not inst.in_pool:
            state = "draining"
        rows.append(f"{inst.tenant.name:8} {inst.pool.name:10} {inst.id:18} {state:9} "
                    f"{c.get('rx', 0):>8} {c.get('tx', 0):>8} {c.get('dropped', 0):>8}")
    return "\n".join(rows)


def tenants_table(topo: "specmod.Topology") -> str:
    """One line per tenant: id, hosts with addresses and zones, chains."""
    rows = []
    for t in topo.tenants:
        hosts = ", ".join(f"{h.name} {h.ip} ({h.zone})" for h in t.hosts)
        rows.append(f"{t.name} (id {t.id}): {hosts}\n"
                    f"    outbound: {' -> '.join(t.outbound) or '(no NFs)'}\n"
                    f"    inbound:  {' -> '.join(t.inbound) or '(no NFs)'}")
    return "\n".join(rows)


def run_cli(lab, script: Optional[Path] = None) -> None:
    """The Mininet CLI with statelab's commands (``script``: run its lines, then return)."""
    from mininet.cli import CLI

    class StatelabCLI(CLI):
        prompt = "statelab> "

        def onecmd(self, line: str) -> bool:
            """Any command's error is one line; the lab stays up."""
            try:
                return CLI.onecmd(self, line)
            except LabError as err:
                print(f"error: {err}")
            except Exception as err:  # a bug must not take the lab down with it
                print(f"error: {type(err).__name__}: {err}")
            return False

        def do_tenants(self, _line: str) -> None:
            """tenants: list tenants, their hosts and NF chains."""
            print(tenants_table(lab.topo))

        def do_pools(self, _line: str) -> None:
            """pools: list NF instances with their state and counters."""
            print(pools_table(lab))

        def do_scale(self, line: str) -> None:
            """scale TENANT POOL +N|-N: add N instances to a pool, or drain and remove N."""
            args = line.split()
            if len(args) != 3 or not args[2].lstrip("+-").isdigit() or args[2][0] not in "+-":
                print("usage: scale TENANT POOL +N|-N   (e.g. scale red fw +1)")
                return
            n = int(args[2])
            if n == 0:
                print("nothing to do: give +N to add or -N to remove instances")
            elif n > 0:
                print("added: " + ", ".join(i.id for i in lab.control.scale_out(args[0], args[1], n)))
            else:
                print("removed: " + ", ".join(lab.control.scale_in(args[0], args[1], -n)))

        def do_kill(self, line: str) -> None:
            """kill INSTANCE: SIGKILL an NF instance; its pool fails over to the survivors."""
            if not line.strip():
                print("usage: kill INSTANCE   (see `pools` for instance ids)")
                return
            inst = lab.control.instance(line.strip())
            lab.control.kill(inst.id)
            left = [i.id for i in lab.pool_instances(inst.tenant.name, inst.pool.name)]
            print(f"killed {inst.id}; pool {inst.tenant.name}/{inst.pool.name} now: {', '.join(left)}")

        def do_counters(self, line: str) -> None:
            """counters [INSTANCE]: full counters (JSON) of one or every instance."""
            wanted = [lab.control.instance(line.strip())] if line.strip() else lab.iter_instances()
            for inst in wanted:
                print(json.dumps(inst.counters(), indent=1))

    from mininet.log import setLogLevel
    setLogLevel("output")  # the Mininet CLI prints command output at this level
    print("statelab: extra commands: tenants, pools, scale TENANT POOL +N|-N, kill INSTANCE, counters")
    if script is None:
        StatelabCLI(lab.net)
        return
    with open(os.devnull) as stdin:
        StatelabCLI(lab.net, stdin=stdin, script=str(script))


def cmd_up(args: argparse.Namespace) -> int:
    from statelab.lab import Lab

    topo = _load(args.file)
    _sigterm_exits()
    with Lab(topo, progress=_progress()) as lab:
        print(tenants_table(topo))
        print(pools_table(lab))
        if args.no_cli:
            print(f"lab {topo.name!r} is up; Ctrl-C or `statelab down {topo.name}` stops it", flush=True)
            while True:
                time.sleep(3600)
        else:
            run_cli(lab)
    return 0


def _records(name: Optional[str]) -> list[Record]:
    records = lab_records()
    if name:
        records = [r for r in records if r.lab == name]
        if not records:
            raise LabError(f"no lab called {name!r} is recorded on this machine")
    return records


def cmd_down(args: argparse.Namespace) -> int:
    for rec in _records(args.name):
        if rec.owner_alive():
            print(f"stopping lab {rec.lab!r} (owner pid {rec.owner})", flush=True)
            os.kill(rec.owner, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while rec.path.exists() and alive(rec.owner, rec.owner_start) and time.monotonic() < deadline:
                time.sleep(0.2)
        if rec.path.exists():
            _clean(rec)
    return 0


def _clean(rec: Record) -> None:
    import shutil
    print(f"cleaning what lab {rec.lab!r} recorded", flush=True)
    rec.clean()
    left = rec.leftovers()
    if left:
        raise LabError("could not remove: " + ", ".join(left))
    shutil.rmtree(rec.run_dir, ignore_errors=True)


def cmd_clean(args: argparse.Namespace) -> int:
    records = _records(args.name)
    for rec in records:
        if rec.owner_alive():
            print(f"lab {rec.lab!r} is running (owner pid {rec.owner}): use `statelab down {rec.lab}`")
            continue
        _clean(rec)
    if not records:
        print("nothing to clean: no lab is recorded on this machine")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    records = lab_records()
    if not records:
        print("no lab is running")
        return 0
    for rec in records:
        state = f"running (owner pid {rec.owner})" if rec.owner_alive() else "dead: run `statelab clean`"
        print(f"lab {rec.lab}: {state}")
        for path in sorted(Path(rec.run_dir).glob("*.counters.json")):
            try:
                c = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            print(f"  {c['instance']:18} {c['kind']:9} {c['state']:9} rx {c['rx']:>8}  tx {c['tx']:>8}  "
                  f"dropped {c['dropped']:>6}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        problems = specmod.validate(Path(f))
        for p in problems:
            print(p)
        if problems:
            bad += 1
        else:
            print(f"{f}: ok")
    return 1 if bad else 0


def cmd_targets(args: argparse.Namespace) -> int:
    """Print the fabric kinds this machine can run (``--why``: every kind, and what is missing)."""
    from statelab.fabric import fabric_class
    for kind in specmod.FABRIC_KINDS:
        try:
            fabric_class(kind).setup()
        except LabError as err:
            if args.why:
                print(f"{kind}: cannot run here: {err}")
            continue
        print(f"{kind}: ready" if args.why else kind)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``statelab`` command."""
    ap = argparse.ArgumentParser(prog="statelab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="bring a lab up and open its CLI")
    p.add_argument("file", nargs="?", help="topology YAML (default: topologies/default.yaml)")
    p.add_argument("--no-cli", action="store_true", help="stay up without a CLI until Ctrl-C/SIGTERM")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop a running lab (asks its owner process to tear down)")
    p.add_argument("name", nargs="?", help="lab name (default: every lab)")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("clean", help="remove what a dead lab recorded it created")
    p.add_argument("name", nargs="?", help="lab name (default: every dead lab)")
    p.set_defaults(func=cmd_clean)
    p = sub.add_parser("status", help="list labs and their NF instances' counters")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("validate", help="check topology files; print every problem with file:line")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("targets", help="list the fabric kinds whose switch this machine has")
    p.add_argument("--why", action="store_true", help="also list the others, with what is missing")
    p.set_defaults(func=cmd_targets)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except specmod.SpecError as err:
        print(err, file=sys.stderr)
        return 2
    except LabError as err:
        print(f"statelab: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `statelab status | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
