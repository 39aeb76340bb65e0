"""User and system CPU per round trip of each relay process, side by side.

``python -m benchmarks.cpu_split [--pin] [--chains icafast uvloop-min] [--ref DIR]``

Sends 64-byte round trips through each two-hop chain (after a short warm-up) and reads the
relay processes' user and system CPU time from ``/proc/PID/stat`` before and after: the split
tells whether a relay's extra cost per message is its own code (user) or the kernel's work for
it (system). Chains run in turn, ``--repeats`` times, so that A and B see the same machine;
the figures are per hop (the mean of the chain's relay processes) and per round trip, with the
median over the repeats. Linux only. Chains whose relays fork per connection (socat) are not
measurable this way: the forked children are not the processes started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ._chains import (
    REF_ROOT,
    ROOT,
    Chain,
    Procs,
    at_least,
    checked_round_trips,
    git_commit,
    missing,
    start_echo,
    stop_on_signals,
    unbuilt,
)

CHAINS = ("icafast", "icafast-tls", "uvloop-min", "haproxy", "haproxy-tls", "icafast-ref",
          "icafast-tls-ref")
HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / HZ, int(fields[12]) / HZ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_split",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", nargs="+", choices=CHAINS, default=["uvloop-min", "icafast"])
    p.add_argument("--pin", action="store_true", help="run every process on CPU 0 (taskset)")
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--count", type=at_least(1), default=20000, help="round trips per run")
    p.add_argument("--warmup", type=at_least(1), default=500)
    p.add_argument("--ref", type=Path, help="checkout for the -ref chains (build it "
                   "first: python setup.py build_ext --inplace in it)")
    p.add_argument("--out", type=Path, help="JSON results file")
    a = p.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        print("needs Linux /proc: nothing measured")
        return 0
    if a.ref is not None:
        if why := unbuilt(a.ref.resolve()):
            p.error(f"--ref: {why}")
        REF_ROOT.append(a.ref.resolve())
    stop_on_signals()  # (SIGTERM, SIGHUP: the chains stopped, the directory removed)
    runs: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="icafast-cpu-") as t:
        procs = Procs(Path(t), a.pin)
        try:
            eport = start_echo(procs)
            chains = []
            for name in a.chains:
                why = missing(name)
                if why:
                    print(f"{name}: skipped ({why})")
                else:
                    chains.append(name)
                    runs[name] = {"user_us": [], "system_us": []}
            for r in range(a.repeats):
                for name in chains:
                    chain = Chain(name, eport, procs).start()  # (a new Chain per run)
                    try:
                        pids = chain.pids()
                        time.sleep(0.3)
                        checked_round_trips(procs, chain.listen_port, a.warmup, name)
                        before = [cpu_seconds(pid) for pid in pids]
                        checked_round_trips(procs, chain.listen_port, a.count, name)
                        after = [cpu_seconds(pid) for pid in pids]
                    finally:
                        chain.stop()
                    scale = 1e6 / a.count / len(pids)
                    user = sum(x[0] - y[0] for x, y in zip(after, before, strict=True)) * scale
                    system = sum(x[1] - y[1] for x, y in zip(after, before, strict=True)) * scale
                    runs[name]["user_us"].append(user)
                    runs[name]["system_us"].append(system)
                    print(f"{name} run {r + 1}: per hop and round trip: user {user:.1f} µs, "
                          f"system {system:.1f} µs", flush=True)
        finally:
            procs.stop_all()
    print(f"\nper hop and round trip, median of {a.repeats} "
          f"({'pinned to CPU 0' if a.pin else 'unpinned'}):")
    for name, split in runs.items():
        print(f"  {name:16s} user {statistics.median(split['user_us']):6.1f} µs   "
              f"system {statistics.median(split['system_us']):6.1f} µs")
    if a.out:
        a.out.write_text(json.dumps({"pinned": a.pin, "count": a.count, "repeats": a.repeats,
                                     "commit": git_commit(ROOT),
                                     "ref_commit": git_commit(a.ref) if a.ref else None,
                                     "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
