"""Profile the icafast processes of a two-hop chain under load with py-spy (``pip install
py-spy``): ``python -m benchmarks.profile_relay WORKLOAD [--seconds S] [--native]
[--chain icafast-tls]``.

WORKLOAD is ``bulk-up`` / ``bulk-down`` (iperf3, else the built-in sender), ``rr`` (64-byte round
trips), ``sessions`` (the same, each through a session of its own: what a new session costs),
``redis`` (redis-benchmark -P 16 -d 1024) or ``idle`` (N idle sessions with keepalives;
``--sessions``). py-spy samples ``icafast connect`` and ``icafast serve`` at 250 Hz while the load
runs (``--chain icafast-tls`` / ``icafast-tls-loop`` / ``icafast-tls-asyncio``: the encrypted
chains of ``benchmarks.relay``, TLS between the two processes; not with ``idle``, whose sessions
are plain);
the summary lists, per process, the frames with the largest share of samples: *self* (the frame
was on top of the stack) and *total* (anywhere on the stack). Raw collapsed stacks are kept in
the directory printed at the end (for a flame graph, run ``py-spy record -o x.svg --pid PID``
yourself).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._chains import (
    PY,
    Chain,
    Procs,
    at_least,
    free_port,
    stop_on_signals,
    wait_listening,
    wait_ready,
    which,
)


def summarise(raw: Path, top: int) -> str:
    """Top frames of a py-spy ``--format raw`` (collapsed stacks) file."""
    if not raw.exists():
        return f"  (no profile: see {raw.parent}/py-spy-*.log)"
    self_c: collections.Counter[str] = collections.Counter()
    total_c: collections.Counter[str] = collections.Counter()
    n = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        frames = [_short(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        n += c
        self_c[frames[-1]] += c
        for f in set(frames):
            total_c[f] += c
    if not n:
        return "  (no samples)"
    out = [f"  {n} samples"]
    out.append("  self %  frame")
    for f, c in self_c.most_common(top):
        out.append(f"  {100 * c / n:5.1f}  {f}")
    out.append("  total %  frame")
    for f, c in total_c.most_common(top):
        out.append(f"  {100 * c / n:5.1f}  {f}")
    return "\n".join(out)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    file = loc.rsplit("/", 1)[-1].split(":")[0]
    return f"{name} ({file})" if file else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_relay")
    p.add_argument("workload",
                   choices=["bulk-up", "bulk-down", "rr", "sessions", "redis", "idle"])
    p.add_argument("--seconds", type=at_least(1.0), default=10.0)
    p.add_argument("--sessions", type=at_least(1), default=5000, help="idle: sessions")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--pin", action="store_true")
    p.add_argument("--chain", default="icafast", choices=["icafast", "icafast-tls",
                                                          "icafast-tls-loop",
                                                          "icafast-tls-asyncio"],
                   help="the icafast chain to profile (default: plain links)")
    a = p.parse_args(argv)
    if a.workload == "idle" and a.chain != "icafast":
        p.error("idle: plain sessions only (--chain icafast)")
    spy = which("py-spy")
    if not spy:
        print("py-spy not installed: pip install py-spy", file=sys.stderr)
        return 2
    if a.pin:
        os.sched_setaffinity(0, {0})
    stop_on_signals()  # (SIGTERM, SIGHUP: every process started is stopped)
    tmp = Path(tempfile.mkdtemp(prefix="icafast-profile-"))
    procs = Procs(tmp, a.pin)
    try:
        return _run(a, spy, procs, tmp)
    finally:
        procs.stop_all()


def _run(a: argparse.Namespace, spy: str, procs: Procs, tmp: Path) -> int:
    w = a.workload
    load: subprocess.Popen[bytes] | None = None
    clients: list[subprocess.Popen[bytes]] = []
    if w.startswith("bulk"):
        iperf = which("iperf3")
        bport = free_port()
        if iperf:
            procs.start("iperf3-server", [iperf, "-s", "-p", str(bport), "-B", "127.0.0.1"])
            wait_listening(bport)
        else:
            wait_ready(procs.start("bulk-server", [PY, "-m", "benchmarks._workers",
                                                   "bulk-server", "--port", str(bport)],
                                   capture=True))
        chain = Chain(a.chain, bport, procs).start()
        if iperf:
            argv = [iperf, "-c", "127.0.0.1", "-p", str(chain.listen_port), "-t",
                    str(int(a.seconds) + 3)] + (["-R"] if w == "bulk-down" else [])
        else:
            argv = [PY, "-m", "benchmarks._workers", "bulk-client", "--port",
                    str(chain.listen_port), "--dir", w[5:], "--size", str(1 << 36)]
        load = procs.start("load", argv)
    elif w in ("rr", "sessions"):
        eport = free_port()
        wait_ready(procs.start("echo", [PY, "-m", "benchmarks._workers", "echo-server",
                                        "--port", str(eport)], capture=True))
        chain = Chain(a.chain, eport, procs).start()
        load = procs.start("load", [PY, "-m", "benchmarks._workers", "rr-client", "--port",
                                    str(chain.listen_port), "--count", "10000000",
                                    *(["--new-connections"] if w == "sessions" else [])])
    elif w == "redis":
        rport = free_port()
        rs = procs.start("redis-server", [which("redis-server") or "redis-server", "--port",
                                          str(rport), "--save", "", "--appendonly", "no"])
        wait_listening(rport, rs)
        chain = Chain(a.chain, rport, procs).start()
        load = procs.start("load", [which("redis-benchmark") or "redis-benchmark", "-p",
                                    str(chain.listen_port), "-P", "16", "-d", "1024", "-t",
                                    "set,get", "-n", "100000000", "-c", "50", "-q"])
    else:  # idle: no connect process; sessions opened through the library API
        bport = free_port()
        wait_ready(procs.start("idle-backend", [PY, "-m", "benchmarks._workers",
                                                "idle-backend", "--port", str(bport)],
                               capture=True))
        chain = Chain(a.chain, bport, procs)
        mid = free_port()
        srv = chain._hop(mid, bport, "server")
        chain.started.append(srv)
        wait_listening(mid, srv)
        per = 2500
        for i in range(-(-a.sessions // per)):
            c = procs.start(f"idle-clients-{i}", [PY, "-m", "benchmarks._workers",
                                                  "idle-clients", "--server-port", str(mid)],
                            stdin=True, capture=True)
            wait_ready(c)
            n = min(per, a.sessions - i * per)
            assert c.stdin is not None and c.stdout is not None
            c.stdin.write(f"open {n}\n".encode())
            c.stdin.flush()
            print(c.stdout.readline().decode().strip(), file=sys.stderr)
            clients.append(c)
        time.sleep(4)
    time.sleep(1.5)  # past the start of the load
    names = ["client", "server"] if w != "idle" else ["server"]
    pids = chain.pids() if w != "idle" else [chain.started[0].pid]
    # chain.started is [server hop, client hop]
    pids = list(reversed(pids)) if w != "idle" else pids
    spies = []
    for name, pid in zip(names, pids, strict=True):
        raw = tmp / f"{w}-{name}.txt"
        argv = [spy, "record", "--pid", str(pid), "--duration", str(int(a.seconds)), "--rate",
                "250", "--format", "raw", "--output", str(raw)]
        argv.append("--native" if a.native else "--nonblocking")
        with open(tmp / f"py-spy-{name}.log", "wb") as err:
            spies.append((name, raw, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                      stderr=err)))
    for _name, _raw, sp in spies:
        sp.wait(a.seconds + 60)
    print(f"workload {w}, chain {a.chain}, {a.seconds:g} s, py-spy 250 Hz"
          f"{' --native' if a.native else ''}"
          f"{', pinned' if a.pin else ''}")
    for name, raw, _sp in spies:
        print(f"icafast {'connect' if name == 'client' else 'serve'}:")
        print(summarise(raw, a.top))
    print(f"raw stacks: {tmp}")
    if load is not None:
        procs.stop(load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
