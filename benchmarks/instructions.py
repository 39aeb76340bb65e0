"""User-space instructions per round trip in one relay process: a figure the machine's noise
cannot move.

``python -m benchmarks.instructions [--chains icafast uvloop-min] [--hop server client]``

Wall-clock figures on a shared machine move by tens of percent from run to run (see
benchmarks/README.md); instruction counts do not. This runs one hop of a two-hop chain under
``valgrind --tool=callgrind`` (the other hop and the echo backend run normally), sends 64-byte
round trips through the chain, and counts the instructions that hop executes in user space
(kernel time is not counted: the syscalls are the same for every Python relay here, six per round
trip). It does that twice, with ``--warmup`` and with ``--warmup + --count`` round trips, and
reports the difference divided by ``--count``: start-up, imports and shutdown cancel out.
With ``--sessions``, each round trip goes through a connection of its own (the client opens
it, sends 64 bytes, reads them back, closes, and waits for the chain's end of stream): the
figure is then user-space instructions per whole session, from accept to free, in that hop.
Copies and fills made with ``rep movsb`` / ``rep stosb`` (glibc's ``memcpy`` and ``memset``
above a few KiB) count one instruction per byte under valgrind, far above what they cost:
compare such counts with care where large buffers are copied or cleared.
With ``--cache-sim``, valgrind also simulates this CPU's caches for the measured process (alone:
the other processes that share a CPU with it in a real run are not in the model) and the same
difference gives first-level cache misses per round trip.

Chains: ``icafast`` (compiled), ``icafast-tls``, ``uvloop-min`` (the minimal uvloop forwarder of
``benchmarks/_workers.py``: the floor for a relay on Python + uvloop), and ``icafast-ref`` /
``icafast-tls-ref`` (icafast from the checkout given with ``--ref``, for A/B comparisons).
Needs valgrind (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from ._chains import (
    PY,
    ROOT,
    Procs,
    at_least,
    checked_round_trips,
    free_port,
    icafast_argv,
    start_echo,
    stop_on_signals,
    tls_files,
    unbuilt,
    wait_listening,
    which,
)

CHAINS = ("icafast", "icafast-tls", "uvloop-min", "icafast-ref", "icafast-tls-ref")
#: String hashing seeded the same in both runs: with random seeds the imports alone vary by
#: hundreds of thousands of instructions from run to run (dictionary probes), which the
#: difference of the two runs would otherwise carry.
SAME_HASHES = {"PYTHONHASHSEED": "0"}
#: With --cache-sim: first-level misses for instructions, data reads and data writes.
CACHE_EVENTS = ("I1mr", "D1mr", "D1mw")


def _hop_argv(chain: str, hop: str, listen: int, target: int, tmp: Path) -> list[str]:
    if chain == "uvloop-min":
        return [PY, "-m", "benchmarks._workers", "forward", "--listen", str(listen),
                "--target", str(target)]
    tls = tls_files(tmp) if "tls" in chain else None
    return icafast_argv("serve" if hop == "server" else "connect", listen, target, tls=tls)


def _summary(path: Path) -> dict[str, int]:
    """The run's totals by event: ``Ir`` (instructions), and with the cache simulation also
    ``I1mr`` (first-level instruction cache misses), ``D1mr`` and ``D1mw`` (data, read and
    write), ``ILmr``, ``DLmr``, ``DLmw`` (last level), ``Dr`` and ``Dw`` (data accesses)."""
    events: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        m = re.match(r"(?:summary|totals):((?: \d+)+)", line)
        if m and events:
            return dict(zip(events, map(int, m.group(1).split()), strict=False))
    raise RuntimeError(f"no instruction total in {path}")


def measure(chain: str, hop: str, rounds: int, ref: Path | None, tmp: Path,
            cache_sim: bool = False, sessions: bool = False) -> dict[str, int]:
    """Instructions (and with ``cache_sim``, simulated cache misses) of the measured hop in
    user space over the whole run, by callgrind event name."""
    procs = Procs(tmp, pin=False)
    root = ref if chain.endswith("-ref") else ROOT
    base = chain.removesuffix("-ref")
    out = tmp / f"callgrind-{chain}-{hop}-{rounds}-{time.monotonic_ns()}.out"
    grind = [which("valgrind") or "valgrind", "--tool=callgrind", "-q",
             f"--callgrind-out-file={out}", *(["--cache-sim=yes"] if cache_sim else [])]
    try:
        eport = start_echo(procs)
        mid, front = free_port(), free_port()
        argv = _hop_argv(base, "server", mid, eport, tmp)
        server = procs.start("server", [*grind, *argv] if hop == "server" else argv, root=root,
                             env=SAME_HASHES)
        wait_listening(mid, server, timeout=120)
        argv = _hop_argv(base, "client", front, mid, tmp)
        client = procs.start("client", [*grind, *argv] if hop == "client" else argv, root=root,
                             env=SAME_HASHES)
        wait_listening(front, client, timeout=120)
        checked_round_trips(procs, front, rounds, chain, new_connections=sessions)
        measured = server if hop == "server" else client
        os.kill(measured.pid, signal.SIGINT)  # a clean exit: callgrind writes its counts
        measured.wait(120)
        return _summary(out)
    finally:
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", nargs="+", choices=CHAINS, default=["uvloop-min", "icafast"])
    p.add_argument("--hop", nargs="+", choices=("server", "client"),
                   default=["server", "client"])
    p.add_argument("--warmup", type=at_least(1), default=300, help="round trips of the shorter run")
    p.add_argument("--count", type=at_least(1), default=2000,
                   help="extra round trips of the longer run (the divisor)")
    p.add_argument("--ref", type=Path, help="checkout for the -ref chains (build it "
                   "first: python setup.py build_ext --inplace in it)")
    p.add_argument("--cache-sim", action="store_true",
                   help="also simulate the caches (valgrind's model of this CPU's first-level "
                        "and last-level caches, one process alone): misses per round trip")
    p.add_argument("--sessions", action="store_true",
                   help="a new connection (a whole session) for each round trip: "
                        "instructions per session")
    p.add_argument("--out", type=Path, help="JSON results file")
    a = p.parse_args(argv)
    if which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind): nothing measured")
        return 1
    if any(c.endswith("-ref") for c in a.chains) and a.ref is None:
        p.error("the -ref chains need --ref DIR")
    if a.ref is not None and (why := unbuilt(a.ref.resolve())):
        p.error(f"--ref: {why}")
    stop_on_signals()  # (SIGTERM, SIGHUP: the chains stopped, the directory removed)
    unit = "session" if a.sessions else "round trip"
    per_unit = "per_" + unit.replace(" ", "_")  # the JSON keys: per_session, per_round_trip
    results = []
    with tempfile.TemporaryDirectory(prefix="icafast-instr-") as t:
        tmp = Path(t)
        for chain in a.chains:
            for hop in a.hop:
                short = measure(chain, hop, a.warmup, a.ref, tmp, a.cache_sim, a.sessions)
                long = measure(chain, hop, a.warmup + a.count, a.ref, tmp, a.cache_sim,
                               a.sessions)
                per = {e: (long[e] - short.get(e, 0)) / a.count for e in long}
                row = {"chain": chain, "hop": hop, f"instructions_{per_unit}":
                       round(per["Ir"]), "runs": [short["Ir"], long["Ir"]],
                       "warmup": a.warmup, "count": a.count}
                misses = ""
                if a.cache_sim:
                    row[per_unit] = {e: round(v, 1) for e, v in per.items()}
                    misses = "".join(f", {per.get(e, 0):6,.0f} {e}" for e in CACHE_EVENTS)
                results.append(row)
                print(f"{chain:16s} {hop:7s} {per['Ir']:9,.0f} instructions per {unit}"
                      + misses, flush=True)
    if a.out:
        workload = ("new sessions, one 64-byte round trip each" if a.sessions
                    else "64-byte round trips")
        a.out.write_text(json.dumps({"workload": workload, "results": results},
                                    indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
