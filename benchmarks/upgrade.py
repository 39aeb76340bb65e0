"""What an upgrade in place (SIGUSR2 to ``icafast serve`` or ``icafast connect``) costs the
sessions that live through it.

    python -m benchmarks.upgrade [--side server|client] [--sessions 100] [--rounds 3] [--tls]
                                 [--pin] [--quick]

One ``icafast serve`` process; this driver is the backend (an echo) and the clients
(``open_session``). With ``--side client``, an ``icafast connect`` process too, and the
driver's sessions are application connections to its port. Every session sends a numbered
16-byte message, waits for its echo, pauses ``--interval`` and goes on, throughout. Each round
sends the server (or the client) SIGUSR2 and reports, from the signal on:

- ``reloading_ms``: until it says RELOADING=1 (it has checked that the installed program
  starts, and hands over now); ``ready_ms``: until the new program says READY=1;
- per session, the longest round trip that ended after the signal (a message sent just before
  the hand-over waits for the client to resume at the new program): p50, p99, max;
- that every echo came back in order, each message once, over one backend connection per
  session.

The upgraded process's pid must stay the same through every round. Results go to JSON
(``--out``).

Before it measures, it byte-compiles icafast's modules (``compileall``), as pip does when it
installs a wheel: the program an upgrade execs then starts as an installed icafast does. Where
Python writes no bytecode itself (``PYTHONDONTWRITEBYTECODE=1``), every start of a checkout
would otherwise compile them from source first, which lengthened the pause by about 45 ms on
the Xeon host. ``--as-found`` leaves them as they are (the JSON's ``bytecode`` says which).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._chains import (
    Busy,
    exclusive_run,
    free_port,
    icafast_argv,
    tls_files,
    wait_listening,
)

_MSG = struct.Struct(">QQ")  # session number, message number


def _percentile(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


class _Session:
    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0
        self.rtts: list[tuple[float, float]] = []  # (end time, round trip)
        self.ok = True


async def _drive(a: argparse.Namespace) -> dict[str, Any]:
    from icafast.aio import open_session
    from icafast.tls import client_context

    tmp = Path(tempfile.mkdtemp(prefix="icafast-upgrade-"))
    backends = 0

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal backends
        backends += 1
        try:
            while data := await r.read(65536):
                w.write(data)
        except ConnectionError:
            pass

    bport, sport = free_port(), free_port()
    backend = await asyncio.start_server(echo, "127.0.0.1", bport)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.setblocking(False)
    tls = tls_files(tmp) if a.tls else None
    client_side = a.side == "client"
    cport = free_port()
    procs = []
    for role, extra in [("serve", ["--control", str(tmp / "ctl.sock")]),
                        *([("connect", [])] if client_side else [])]:
        argv = icafast_argv(role, sport if role == "serve" else cport,
                            bport if role == "serve" else sport, extra, tls=tls)
        if a.pin:
            argv = ["taskset", "-c", "0", *argv]
        log = open(tmp / f"{role}.log", "wb")
        upgraded = (role == "connect") == client_side
        procs.append(await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=log,
            env={**os.environ, **({"NOTIFY_SOCKET": str(tmp / "notify")} if upgraded else {})}))
        if not upgraded:
            await asyncio.to_thread(wait_listening, sport)
    proc = procs[-1]  # (the one upgraded)
    loop = asyncio.get_running_loop()

    async def said(prefix: str, timeout: float = 60.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = await asyncio.wait_for(loop.sock_recv(notify, 4096), end - time.monotonic())
            except asyncio.TimeoutError:
                break
            if msg.decode().startswith(prefix):
                return time.monotonic()
        raise RuntimeError(f"the {a.side} did not say {prefix} within {timeout}s:\n"
                           + (tmp / f"{'connect' if client_side else 'serve'}.log").read_text(
                               errors="replace")[-3000:])

    await said("READY=1")
    await asyncio.to_thread(wait_listening, cport if client_side else sport)
    ctx = client_context(fingerprint=tls.fingerprint) if tls is not None else None
    sessions = [_Session(i) for i in range(a.sessions)]
    streams = [await (asyncio.open_connection("127.0.0.1", cport) if client_side
                      else open_session("127.0.0.1", sport, tls=ctx)) for _ in sessions]
    stop = asyncio.Event()

    async def run(s: _Session, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while not stop.is_set():
            t = time.monotonic()
            w.write(_MSG.pack(s.n, s.sent))
            got = _MSG.unpack(await r.readexactly(_MSG.size))
            end = time.monotonic()
            s.ok = s.ok and got == (s.n, s.sent)
            s.sent += 1
            s.rtts.append((end, end - t))
            await asyncio.sleep(a.interval)

    tasks = [asyncio.ensure_future(run(s, *rw)) for s, rw in zip(sessions, streams, strict=True)]
    await asyncio.sleep(1.0)
    rounds = []
    pid = proc.pid
    for _ in range(a.rounds):
        t0 = time.monotonic()
        os.kill(pid, signal.SIGUSR2)
        t_reloading = await said("RELOADING=1")
        t_ready = await said("READY=1")
        await asyncio.sleep(a.after)
        worst = [max((rt for end, rt in s.rtts if end > t0), default=float("nan"))
                 for s in sessions]
        done = [v for v in worst if v == v]
        rounds.append({
            "reloading_ms": (t_reloading - t0) * 1000, "ready_ms": (t_ready - t0) * 1000,
            "longest_rtt_ms": {"p50": _percentile(done, 50) * 1000,
                               "p99": _percentile(done, 99) * 1000, "max": max(done) * 1000},
            "sessions_through": len(done)})
        print(f"  SIGUSR2: RELOADING=1 after {rounds[-1]['reloading_ms']:.0f} ms, READY=1 after "
              f"{rounds[-1]['ready_ms']:.0f} ms; longest round trip per session: p50 "
              f"{rounds[-1]['longest_rtt_ms']['p50']:.0f} ms, max "
              f"{rounds[-1]['longest_rtt_ms']['max']:.0f} ms", file=sys.stderr, flush=True)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    same_pid = proc.returncode is None
    for _r, w in streams:
        w.close()
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        await asyncio.wait_for(p.wait(), 30)
    backend.close()
    notify.close()
    ok = all(s.ok for s in sessions) and backends == a.sessions and same_pid
    return {"side": a.side, "sessions": a.sessions, "interval_s": a.interval,
            "tls": bool(a.tls),
            "pinned": bool(a.pin), "ok": ok, "backend_connections": backends,
            "rounds": rounds,
            "median": {k: statistics.median(r[k] for r in rounds)
                       for k in ("reloading_ms", "ready_ms")} | {
                "longest_rtt_p50_ms": statistics.median(
                    r["longest_rtt_ms"]["p50"] for r in rounds),
                "longest_rtt_max_ms": statistics.median(
                    r["longest_rtt_ms"]["max"] for r in rounds)},
            "python": platform.python_version(), "bytecode": a.bytecode}


def _byte_compile() -> str:
    """icafast's modules compiled to bytecode where Python looks for it (their
    ``__pycache__``), as pip does when it installs a wheel: what the JSON says of them."""
    import compileall

    import icafast

    where = Path(icafast.__file__).parent
    if not compileall.compile_dir(str(where), quiet=1):
        raise SystemExit(f"python -m benchmarks.upgrade: could not byte-compile {where}")
    return "compiled before the run (as an installed package has it)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.upgrade", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=["server", "client"], default="server",
                   help="upgrade icafast serve (default), or icafast connect")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.05,
                   help="pause between a session's round trips (s)")
    p.add_argument("--after", type=float, default=2.0, help="seconds measured after READY=1")
    p.add_argument("--tls", action="store_true", help="TLS links (the run's certificate)")
    p.add_argument("--pin", action="store_true",
                   help="the icafast processes on CPU 0 (taskset)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--as-found", action="store_true",
                   help="do not byte-compile icafast first (see above)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 5 sessions, one round, half a second after it (the "
                        "figures mean nothing; the checks hold)")
    a = p.parse_args(argv)
    from icafast.aio import run

    if a.quick:
        a.sessions, a.rounds, a.after = 5, 1, 0.5
    else:
        try:  # (held until the process ends: timed runs never overlap)
            a.lock = exclusive_run(say=lambda m: print(m, file=sys.stderr))
        except Busy as e:
            print(f"python -m benchmarks.upgrade: {e}", file=sys.stderr)
            return 2

    a.bytecode = ("as found" + (" (Python writes none: PYTHONDONTWRITEBYTECODE)"
                                if sys.dont_write_bytecode else "")
                  if a.as_found or a.quick else _byte_compile())
    res = run(_drive(a))
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
