"""Redis through icafast: redis-server is the backend; redis-benchmark (many connections at
once, plain and pipelined) and a 50 MB value run through the tunnel while the link breaks."""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from acceptance_rig import PY, Rig, need

pytestmark = pytest.mark.acceptance

HERE = Path(__file__).resolve().parent


def start_redis(rig: Rig) -> tuple[int, dict[str, str]]:
    """redis-server on the server side's 127.0.0.1 and the relay; returns (local port, progs)."""
    progs = need("redis-server", "redis-cli", "redis-benchmark")
    port = rig.port()
    srv = rig.spawn("server", "redis-server", [
        progs["redis-server"], "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--daemonize", "no", "--dir", str(rig.tmp)])
    rig.wait_listening("server", port, srv)
    return rig.start_relay(port), progs


def redis_cli(rig: Rig, progs: dict[str, str], local: int, *args: str,
              timeout: float = 60.0) -> bytes:
    p = subprocess.run([*rig.net.prefix("client"), progs["redis-cli"], "-h", "127.0.0.1",
                        "-p", str(local), *args], capture_output=True, timeout=timeout)
    assert p.returncode == 0, (args, p.stdout[-300:], p.stderr[-300:])
    return p.stdout


def info_stat(rig: Rig, progs: dict[str, str], local: int, key: str) -> int:
    out = redis_cli(rig, progs, local, "INFO", "stats").decode()
    m = re.search(rf"^{key}:(\d+)", out, re.M)
    assert m, out
    return int(m.group(1))


class FaultLoop(threading.Thread):
    """Once ``ready()`` holds, breaks the link once for each entry of ``schedule`` while
    ``proc`` runs, ``gap`` seconds apart (a fixed schedule: a link broken all the time would
    only measure the reconnect backoff)."""

    def __init__(self, rig: Rig, proc, schedule: list[str], ready, sessions: int,
                 gap: float = 0.4) -> None:
        super().__init__(daemon=True)
        self.rig = rig
        self.sessions = sessions
        self.proc = proc
        self.schedule = schedule
        self.ready = ready
        self.gap = gap
        self.done: list[tuple[str, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            end = time.monotonic() + 30
            while not self.ready() and time.monotonic() < end and self.proc.poll() is None:
                time.sleep(0.01)
            for kind in self.schedule:
                time.sleep(self.gap)
                if self.proc.poll() is not None:
                    return
                # a break hits every connection, and each must resume before the next one
                killed = self.rig.fault_and_recover(kind, self.sessions,
                                                    alive=lambda: self.proc.poll() is None)
                if self.proc.poll() is None:  # count only breaks that hit a running peer
                    self.done.append((kind, killed))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


CLIENTS = 20
# requests per run at least; more on a host fast enough to finish these before its breaks
REQUESTS = {("plain", "set"): 100_000, ("plain", "get"): 100_000,
            ("pipelined", "set"): 800_000, ("pipelined", "get"): 1_500_000}
#: how long a run should last unbroken at the speed measured first (breaks only lengthen it)
RUN_SECONDS = 6.0
SCHEDULE = {"set": ["reset", "blackhole", "reset", "reset"],
            "get": ["reset", "outage", "reset", "reset"]}


def bench_argv(progs: dict[str, str], local: int, requests: int, test: str,
               extra: list[str]) -> list[str]:
    """redis-benchmark's command line: ``requests`` of ``test`` with CLIENTS connections to
    the relay's local port."""
    return [progs["redis-benchmark"], "-h", "127.0.0.1", "-p", str(local), "-c", str(CLIENTS),
            "-n", str(requests), "-t", test, "-q", *extra]


def sized_requests(rig: Rig, progs: dict[str, str], local: int, mode: str, test: str,
                   extra: list[str]) -> int:
    """Requests for a run that outlasts its breaks on this host: a tenth of ``REQUESTS``
    through the relay first, unbroken, gives the rate; the run gets ``RUN_SECONDS`` of it
    (never fewer than ``REQUESTS``: a fixed count finished before the third break on a fast
    host)."""
    probe = rig.spawn("client", f"redis-benchmark-{mode}-{test}-rate",
                      bench_argv(progs, local, REQUESTS[mode, test] // 10, test, extra))
    assert probe.p.wait(120) == 0, probe.text()
    m = re.search(r"([\d.]+) requests per second", probe.text())
    assert m, probe.text()
    return max(REQUESTS[mode, test], int(float(m.group(1)) * RUN_SECONDS))


@pytest.mark.parametrize("mode", ["plain", "pipelined"])
def test_redis_benchmark_through_link_kills(rig: Rig, mode: str) -> None:
    """redis-benchmark SET, then GET, each with 20 connections at once (plain, and pipelined
    -P 16 with 1 KiB values), completes with no error while all 20 links are reset (ss -K),
    blackholed and taken down under it; Redis sees exactly one connection per session, so no
    break ever turned into a new connection.

    The breaks start once the benchmark's connections are up: icafast fails a connection
    whose very first link attempt fails (the application gets a reset, as from a plain TCP
    connect), so a break while redis-benchmark is still connecting would fail it by design.
    """
    local, progs = start_redis(rig)
    conns_before = info_stat(rig, progs, local, "total_connections_received")
    for test in ("set", "get"):
        extra = ["-P", "16", "-d", "1024"] if mode == "pipelined" else []
        requests = sized_requests(rig, progs, local, mode, test, extra)
        base = rig.new_sessions()
        bench = rig.spawn("client", f"redis-benchmark-{mode}-{test}",
                          bench_argv(progs, local, requests, test, extra))
        # connections: one for redis-benchmark's CONFIG GET, then the clients
        faults = FaultLoop(rig, bench.p, SCHEDULE[test],
                           ready=lambda base=base: rig.new_sessions() >= base + 1 + CLIENTS,
                           sessions=CLIENTS)
        faults.start()
        try:
            rc = bench.p.wait(120)
        finally:
            faults.join(30)
        out = bench.text()
        final = [x.strip() for x in re.split(r"[\r\n]", out) if "requests per second" in x]
        assert faults.error is None, faults.error
        # redis-benchmark (7.x) exits at once, non-zero, on any error
        assert rc == 0, f"redis-benchmark exit {rc}:\n{out}\n{rig.logs()}"
        assert len(final) == 1 and final[0].startswith(f"{test.upper()}: "), final
        assert not re.search(r"error|reset|refused|closed", out, re.I), out
        resets = [n for k, n in faults.done if k == "reset" and n >= CLIENTS]
        # on a loaded machine the run may end before the last scheduled break: at least three
        # breaks (two of them resets of every link) must have hit it while it ran
        assert len(faults.done) >= 3 and len(resets) >= 2, (
            f"{test}: breaks while it ran: {faults.done}")
        print(f"{mode} {test}: {requests} requests, {final[0]}; breaks {faults.done}")
    assert rig.resumes() >= 2 * 3 * CLIENTS
    # Redis saw exactly one connection per session: no break turned into a new connection
    conns = info_stat(rig, progs, local, "total_connections_received") - conns_before - 1
    assert conns == rig.new_sessions() - 2, (conns, rig.new_sessions())
    assert info_stat(rig, progs, local, "total_error_replies") == 0
    rig.check_icafast_logs()


SIZE = 50_000_000
RATE = 25_000_000


def test_redis_50mb_value_through_link_kills(rig: Rig) -> None:
    """A 50 MB value SET and read back (GET), each paced at 25 MB/s and broken three times on
    the way; it reads back identical, through the faulted client and through redis-cli."""
    local, progs = start_redis(rig)
    p = rig.spawn("client", "resp-big", [PY, str(HERE / "resp_big.py"), str(local), str(SIZE),
                                         str(RATE), "6379"], log=False, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    plan = {"SET": [(10_000_000, "reset"), (22_000_000, "blackhole"), (38_000_000, "reset")],
            "GET": [(8_000_000, "reset"), (20_000_000, "outage"), (35_000_000, "reset")]}
    hit: list[str] = []
    lines: list[str] = []
    assert p.p.stdout is not None
    for raw in p.p.stdout:  # ends when resp_big exits (bounded by its socket timeout)
        line = raw.decode(errors="replace").strip()
        lines.append(line)
        parts = line.split()
        if len(parts) == 2 and parts[0] in plan and parts[1].isdigit():
            todo = plan[parts[0]]
            if todo and int(parts[1]) >= todo[0][0] and int(parts[1]) < SIZE:
                _, kind = todo.pop(0)
                # the previous break must have been recovered from, so this one hits a live link
                rig.wait_resumes(len(hit))
                killed = rig.fault(kind)
                assert kind != "reset" or killed >= 1
                hit.append(f"{parts[0]}@{parts[1]}:{kind}")
    rc = p.p.wait(60)
    assert rc == 0, "\n".join(lines[-10:]) + "\n" + rig.logs()
    sha_line = [x for x in lines if x.startswith("SHA ")]
    assert sha_line, lines[-10:]
    _, sent_sha, got_sha = sha_line[0].split()
    assert sent_sha == got_sha, "the value read back differs from the value written"
    assert len(hit) == 6, f"breaks that landed mid-transfer: {hit}"
    rig.wait_resumes(6)
    # read it again with redis-cli (no faults now): same bytes
    assert redis_cli(rig, progs, local, "STRLEN", "big").strip() == str(SIZE).encode()
    raw = redis_cli(rig, progs, local, "--raw", "GET", "big")
    assert raw.endswith(b"\n") and len(raw) == SIZE + 1
    assert hashlib.sha256(raw[:-1]).hexdigest() == sent_sha
    up, down = rig.replayed()
    assert up > 0 and down > 0, f"no data in flight at a break: replayed {up}/{down}"
    assert rig.new_sessions() == 3  # resp_big, STRLEN, GET: never a new one for a break
    rig.check_icafast_logs()
