"""Hostile load: 1,000 sessions whose backend stops reading, against a server process.

Server memory must stay within sessions x (replay limit + a small per-session overhead) + a fixed
overhead, and other sessions must keep flowing meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from relay_helpers import free_port, stop_process

from icafast import IMPLEMENTATION

PY = sys.executable
# (the pure-Python core checksums a few MB/s, and each stalled session carries a few MB before
# it stalls: with it, as many sessions as take a similar time)
SESSIONS = 1000 if IMPLEMENTATION == "cython" else 40
LIMIT = 256 * 1024
# more than the kernel's socket buffers on the path (loopback autotunes the server's send buffer
# toward the backend to ~1.3 MB) plus both replay buffers: every session stalls
PER_SESSION_WRITE = 4 * 1024 * 1024

BACKENDS = textwrap.dedent("""
    import asyncio, socket, sys
    async def stall(r, w):
        await asyncio.sleep(3600)          # accept, never read
    async def echo(r, w):
        while data := await r.read(65536):
            w.write(data); await w.drain()
        w.close()
    async def main():
        ls = socket.socket()                # a small receive window, so the kernel cannot
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # soak up the stream
        ls.bind(("127.0.0.1", int(sys.argv[1])))
        a = await asyncio.start_server(stall, sock=ls, backlog=2048)
        b = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[2]))
        print("ready", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")

CLIENTS = textwrap.dedent("""
    import asyncio, json, sys, time
    from icafast.aio import open_session, run
    from icafast.protocol import Config
    stall_port, echo_port, n, size, limit = map(int, sys.argv[1:6])
    cfg = Config(keepalive_interval=1.0, dead_timeout=5.0, replay_limit=limit)
    def say(**kw): print(json.dumps(kw), flush=True)
    sent = [0] * n
    async def push(i, w):
        chunk = b"x" * 65536
        while sent[i] < size:
            w.write(chunk)
            await w.drain()               # blocks for good once the session is full
            sent[i] += len(chunk)
    async def main():
        writers, tasks = [], []
        for i in range(n):
            r, w = await open_session("127.0.0.1", stall_port, config=cfg)
            writers.append(w)
            tasks.append(asyncio.ensure_future(push(i, w)))
        say(opened=n)
        last = None
        for _ in range(60):               # until nothing moves any more (bounded)
            await asyncio.sleep(1.0)
            if sum(sent) == last:
                break
            last = sum(sent)
        say(stalled=sum(1 for x in sent if x < size), sent=sum(sent))
        sys.stdin.readline()              # the test measured the server; now the echo check
        t0 = time.monotonic()
        pairs = [await open_session("127.0.0.1", echo_port, config=cfg) for _ in range(5)]
        rtts = []
        for k in range(50):
            for r, w in pairs:
                t = time.monotonic()
                w.write(b"ping%04d" % k)
                assert await asyncio.wait_for(r.readexactly(8), 10) == b"ping%04d" % k
                rtts.append(time.monotonic() - t)
        rtts.sort()
        say(echo_ok=len(rtts), p50_ms=rtts[len(rtts)//2]*1e3, max_ms=rtts[-1]*1e3,
            took=time.monotonic() - t0)
        sys.stdin.readline()
    run(main())
""")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _line(p: subprocess.Popen, timeout: float = 120.0) -> str:
    import select

    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("process said nothing")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"process exited with {p.wait()}")
    return line


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for RSS")
def test_thousand_stalled_sessions_bounded_memory_and_others_flow(tmp_path):
    stall, echo = free_port(), free_port()
    p_stall, p_echo = free_port(), free_port()
    control = str(tmp_path / "ctl.sock")
    procs: list[subprocess.Popen] = []
    try:
        backends = subprocess.Popen([PY, "-c", BACKENDS, str(stall), str(echo)],
                                    stdout=subprocess.PIPE, text=True)
        procs.append(backends)
        assert _line(backends).strip() == "ready"
        server = subprocess.Popen(
            [PY, "-m", "icafast", "serve", "--no-tls", "-q", "--control", control,
             "--replay-limit", str(LIMIT), "--keepalive-interval", "1", "--dead-timeout", "5",
             "--max-handshakes", "4096",
             "--listen", f"127.0.0.1:{p_stall}", "--backend", f"127.0.0.1:{stall}",
             "--listen", f"127.0.0.1:{p_echo}", "--backend", f"127.0.0.1:{echo}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(server)
        for _ in range(200):
            if os.path.exists(control):
                break
            time.sleep(0.05)
        base = _rss(server.pid)
        clients = subprocess.Popen(
            [PY, "-c", CLIENTS, str(p_stall), str(p_echo), str(SESSIONS),
             str(PER_SESSION_WRITE), str(LIMIT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(clients)
        assert json.loads(_line(clients))["opened"] == SESSIONS
        st = json.loads(_line(clients))
        assert st["stalled"] == SESSIONS, st  # every writer is blocked by back-pressure
        peak = _rss(server.pid)
        from icafast.aio.server import control_request

        rows = control_request(control, {"cmd": "list"})["sessions"]
        assert len(rows) == SESSIONS and all(r["state"] == "ACTIVE" for r in rows)
        # the stalled direction is full everywhere: the clients hold the rest
        total_in = sum(r["bytes_in"] for r in rows)
        assert total_in < SESSIONS * PER_SESSION_WRITE
        per_session = (peak - base) / SESSIONS
        print(f"\nserver RSS: base {base / 2**20:.1f} MiB, with {SESSIONS} stalled sessions "
              f"{peak / 2**20:.1f} MiB: {per_session / 1024:.1f} KiB per session "
              f"(replay limit {LIMIT // 1024} KiB); {total_in / 2**20:.1f} MiB accepted")
        assert peak - base <= SESSIONS * (LIMIT + 192 * 1024) + 64 * 2**20
        # every other session keeps flowing
        assert clients.stdin is not None
        clients.stdin.write("\n")
        clients.stdin.flush()
        echo_res = json.loads(_line(clients))
        print(f"echo sessions meanwhile: {echo_res}")
        assert echo_res["echo_ok"] == 250 and echo_res["max_ms"] < 5000
        clients.stdin.write("\n")
        clients.stdin.flush()
    finally:
        for p in reversed(procs):
            stop_process(p)
