"""End-to-end relay benchmark: ``python -m benchmarks.relay [--quick] [--pin]``.

Measures, in one run and side by side, the same workloads through

- ``direct``: no relay (the physical limit of this machine);
- socat two-hop (default buffer, ``-b 65536``, ``-b 131072``) and HAProxy two-hop (``mode tcp``,
  ``option splice-request`` + ``option splice-response``): peers from Debian packages; one that
  is not installed is reported as skipped;
- ``icafast``: ``icafast connect`` -> ``icafast serve`` -> backend, separate processes, with the
  compiled core, and ``icafast-pure`` with the pure-Python core (``ICAFAST_PURE_PYTHON=1``,
  given a small size / short duration);
- the encrypted path (TLS between the two hops; bulk, rr and redis): socat ``OPENSSL:`` two-hop
  (``socat-tls``; ``socat-tls-nodelay`` with TCP_NODELAY), HAProxy ``ssl`` two-hop
  (``haproxy-tls``) and icafast with TLS: run by its links through the compiled pipe on uvloop
  (``icafast-tls``, the default), by uvloop's TLS transport (``icafast-tls-loop``) and by stdlib
  asyncio's (``icafast-tls-asyncio``), all with one certificate made for the run. Encrypted
  chains are compared only with the encrypted peers, plain chains only with the plain peers.

Workloads: bulk throughput each direction (iperf3, else the built-in sender/sink), 64-byte
round trips, pipelined redis (``redis-benchmark -P 16 -d 1024 -t set,get``), resume after a
forced reset (one session x 200 resets; 1,000 sessions at once) and N idle sessions (server
RSS and CPU). Each measured figure is the median of ``--repeats`` runs, with min and max; the
repeats are interleaved across chains, so that the machine's noise spreads over all of them.
Every chain first carries a byte-checked transfer (or echo / SET+GET) so that the figures come
from relays that delivered correct bytes.

Results: a JSON file (``--out``) and a table on standard output. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._chains import (
    CHAINS,
    ENCRYPTED,
    PY,
    REF_ROOT,
    REF_TWINS,
    ROOT,
    TLS_KEY,
    TLS_PEERS,
    Busy,
    Chain,
    Procs,
    at_least,
    exclusive_run,
    free_port,
    git_commit,
    icafast_argv,
    missing,
    negotiated_from_logs,
    peers_of,
    stop_on_signals,
    tls_files,
    tls_probe,
    tool_version,
    unbuilt,
    wait_listening,
    wait_ready,
    which,
)

WORKLOADS = ("bulk", "rr", "redis", "resume", "scale")
MiB = 1 << 20
#: ``icafast serve``'s default ``--max-handshakes`` (the scale workload's server runs with it)
SERVE_MAX_HANDSHAKES = 1024
#: rounds of 50 new connections per run of the redis workload (see Bench.redis)
NEW_CONN_ROUNDS = 30
#: the encrypted chains, in every workload that runs them (bulk, rr, redis)
TLS_CHAINS = ["socat-tls", "socat-tls-nodelay", "haproxy-tls", "icafast-tls",
              "icafast-tls-loop", "icafast-tls-asyncio"]
#: the chains each workload runs (--chains picks among them; with --ref, the REF_TWINS of
#: icafast and icafast-tls too). resume and scale measure icafast alone.
WORKLOAD_CHAINS = {
    "bulk": ("direct", "socat", "socat-b131072", "haproxy", "uvloop-min", "icafast",
             "icafast-pure", *TLS_CHAINS),
    "rr": ("direct", "socat", "socat-b131072", "haproxy", "uvloop-min", "icafast",
           "icafast-pure", *TLS_CHAINS),
    "redis": ("direct", "socat", "socat-b65536", "haproxy", "uvloop-min", "icafast",
              "icafast-pure", *TLS_CHAINS),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": values}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "runs": values}


def scale_room(resource_mod: Any = resource) -> int:
    """The most idle sessions the scale workload asks of its server: as many as ``icafast
    serve`` (default settings) has room for under this process's open-files limits, at most
    10,000. The server raises its soft limit to the hard one and keeps descriptors for its
    handshakes and a spare (:mod:`icafast.rlimits`), and refuses sessions beyond that room as
    busy: asking for more made the run fail instead of measuring."""
    from icafast.rlimits import handshakes_within, sessions_within

    hard = resource_mod.getrlimit(resource_mod.RLIMIT_NOFILE)[1]
    if hard == resource_mod.RLIM_INFINITY:  # (the server raises its limit as far as it needs)
        return 10_000
    return min(10_000, sessions_within(hard, handshakes_within(hard, SERVE_MAX_HANDSHAKES)))


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.quick: bool = a.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="icafast-bench-"))
        self.procs = Procs(self.tmp, a.pin)
        self.results: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        #: chain -> what its TLS handshake negotiated (icafast: probed once per chain)
        self.negotiated: dict[str, list[str]] = {}

    # -- helpers -----------------------------------------------------------------------------
    def worker(self, name: str, args: list[str], timeout: float,
               env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run a worker to completion; its last stdout line is its JSON result."""
        p = self.procs.start(name, [PY, "-m", "benchmarks._workers", *args], env=env,
                             capture=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(p)
            raise RuntimeError(f"{name} timed out after {timeout}s:\n{Procs.tail(p)}") from None
        self.procs.stop(p)
        return self._parse(p, out)

    @staticmethod
    def _parse(p: subprocess.Popen[bytes], out: bytes) -> dict[str, Any]:
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"worker gave no result (exit {p.returncode}):\n{Procs.tail(p)}")
        return json.loads(lines[-1])

    def server(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start a long-running worker (a backend) and wait for its 'ready'."""
        p = self.procs.start(name, [PY, "-m", "benchmarks._workers", *args], capture=True)
        wait_ready(p)
        return p

    def chains_for(self, wanted: list[str]) -> list[str]:
        names = []
        twin_of = {}
        if REF_ROOT:
            for a, b in REF_TWINS.items():
                if a in wanted:
                    wanted.insert(wanted.index(a) + 1, b)
                    twin_of[b] = a
        for c in wanted:
            if self.a.chains and c not in self.a.chains and twin_of.get(c) not in self.a.chains:
                continue
            why = missing(c)
            if why:
                self.skipped[c] = why
                continue
            names.append(c)
        return names

    def start_chains(self, names: list[str], backend: int, **kw: Any) -> dict[str, Chain]:
        out = {}
        for n in names:
            out[n] = Chain(n, backend, self.procs, **kw).start()
            if n in ENCRYPTED and out[n].kind == "icafast" and n not in self.negotiated:
                try:
                    self.negotiated[n] = [tls_probe(out[n].mid_port, tls_files(self.tmp))]
                except Exception as e:  # noqa: BLE001 - informational only
                    self.negotiated[n] = [f"probe failed: {e}"]
        return out

    def stop_chains(self, chains: dict[str, Chain]) -> None:
        for c in chains.values():
            c.stop()

    def repeats_for(self, chain: str) -> int:
        return self.a.repeats

    def measure(self, chains: dict[str, Chain], what: str,
                fn: Callable[[str, Chain], dict[str, float]]) -> dict[str, dict[str, Any]]:
        """Run ``fn`` ``repeats`` times per chain, interleaved; summarise each metric."""
        runs: dict[str, dict[str, list[float]]] = {n: {} for n in chains}
        for r in range(self.a.repeats):
            for n, c in chains.items():
                try:
                    dead = [p for p in c.started if p.poll() is not None]
                    if dead:  # (a crashed hop: its clients would only wait for their timeouts)
                        raise RuntimeError(f"a process of the chain exited (pid {dead[0].pid}, "
                                           f"status {dead[0].returncode})")
                    m = fn(n, c)
                except Exception as e:  # noqa: BLE001 - report, go on with the others
                    log(f"  {what} {n} run {r + 1}: FAILED: {e}")
                    m = {"error": 1.0}
                for k, v in m.items():
                    runs[n].setdefault(k, []).append(v)
                log(f"  {what} {n} run {r + 1}: " + ", ".join(
                    f"{k}={v:,.4g}" for k, v in m.items()))
        return {n: {k: summary(v) for k, v in ms.items()} for n, ms in runs.items()}

    # -- 1. bulk -----------------------------------------------------------------------------
    def bulk_check(self, n: str, c: Chain, d: str, size: int) -> bool:
        """One direction of a chain's byte check: True if the bytes arrived intact."""
        try:
            return bool(self.worker("bulk-check", ["bulk-client", "--port", str(c.listen_port),
                                                   "--dir", d, "--size", str(size), "--verify"],
                                    120)["ok"])
        except Exception as e:
            raise RuntimeError(f"the bulk check of {n} ({d}): {e}") from e

    def bulk(self) -> dict[str, Any]:
        names = self.chains_for(list(WORKLOAD_CHAINS["bulk"]))
        bport = free_port()
        procs = [self.server("bulk-server", ["bulk-server", "--port", str(bport)])]
        iperf = which("iperf3") if not self.a.no_iperf else None
        res: dict[str, Any] = {"tool": "iperf3" if iperf else "built-in sender/sink",
                               "chains": {}, "verified": {}}
        check = 1 * MiB if self.quick else 16 * MiB
        chains = self.start_chains(names, bport)
        try:
            for n, c in chains.items():  # the byte check: seeded stream, SHA-256 both ends
                size = min(check, 2 * MiB) if n == "icafast-pure" else check
                ok = all(self.bulk_check(n, c, d, size) for d in ("up", "down"))
                res["verified"][n] = ok
                log(f"  bulk check {n}: {'OK' if ok else 'BAD BYTES'} ({size} B each way)")
            if iperf:
                self.stop_chains(chains)
                iport = free_port()
                procs.append(self.procs.start("iperf3-server", [iperf, "-s", "-p", str(iport),
                                                                "-B", "127.0.0.1"]))
                wait_listening(iport, procs[-1])
                chains = self.start_chains(names, iport)

            def run(n: str, c: Chain) -> dict[str, float]:
                out = {}
                pure = n == "icafast-pure"
                for d in ("up", "down"):
                    cpu0, user0, faults0 = _chain_counts(c.pids())
                    if iperf:
                        t = 1.0 if self.quick or pure else self.a.duration
                        omit = "0" if self.quick or pure else "1"
                        # --quick: a fixed amount instead of a duration (a few tenths of a
                        # second per run: the smoke test checks bytes, not speed)
                        span = ["-n", "2M" if pure else "32M"] if self.quick else ["-t", str(t)]
                        argv = [iperf, "-c", "127.0.0.1", "-p", str(c.listen_port), *span,
                                "-O", omit, "-J"] + (["-R"] if d == "down" else [])
                        p = self.procs.start(f"iperf3-{n}-{d}", argv, capture=True)
                        try:
                            o, _ = p.communicate(timeout=t + 60)
                        finally:
                            self.procs.stop(p)
                        j = json.loads(o)
                        if "error" in j:
                            raise RuntimeError(j["error"])
                        out[d + "_GBps"] = j["end"]["sum_received"]["bits_per_second"] / 8e9
                        # all bytes of the run, the omitted warm-up included (as the CPU is)
                        moved = sum(i["sum"]["bytes"] for i in j["intervals"])
                    else:
                        size = (4 if pure else 64 if self.quick else 2048) * MiB
                        j = self.worker("bulk", ["bulk-client", "--port", str(c.listen_port),
                                                 "--dir", d, "--size", str(size)], 300)
                        out[d + "_GBps"] = j["rate"] / 1e9
                        moved = j["bytes"]
                    if c.pids():
                        time.sleep(0.3)  # socat's per-connection child exits and is reaped
                        cpu, user, faults = _chain_counts(c.pids())
                        gb = moved / 1e9
                        out[d + "_cpu_s_per_GB"] = (cpu - cpu0) / gb if moved else float("nan")
                        # the part in user space (the rest is the kernel's: copies, TCP)
                        out[d + "_user_s_per_GB"] = ((user - user0) / gb if moved
                                                     else float("nan"))
                        # pages the relays touched for the first time (fresh heap memory):
                        # each is a fault, and the kernel zeroes the page
                        out[d + "_faults_per_GB"] = ((faults - faults0) / gb if moved
                                                     else float("nan"))
                return out

            res["chains"] = self.measure(chains, "bulk", run)
        finally:
            self.stop_chains(chains)
            for p in procs:
                self.procs.stop(p)
        return res

    # -- 2. round trips ----------------------------------------------------------------------
    def rr(self) -> dict[str, Any]:
        names = self.chains_for(list(WORKLOAD_CHAINS["rr"]))
        eport = free_port()
        echo = self.server("echo-server", ["echo-server", "--port", str(eport)])
        chains = self.start_chains(names, eport)
        res: dict[str, Any] = {"size": 64, "verified": {}}
        # (a chain is verified by the runs that completed: one whose every run failed echoed
        # nothing that was checked, and gets no entry)
        ok_all: dict[str, bool] = {}
        try:
            def run(n: str, c: Chain) -> dict[str, float]:
                count = 300 if self.quick else (2000 if n == "icafast-pure" else self.a.rr_count)
                warmup = 50 if self.quick else 500
                cpu0 = _chain_counts(c.pids())[0]
                j = self.worker("rr", ["rr-client", "--port", str(c.listen_port), "--count",
                                       str(count), "--warmup", str(warmup)], 120)
                ok_all[n] = ok_all.get(n, True) and j["ok"]
                out = {"p50_us": j["p50_us"], "p99_us": j["p99_us"], "p999_us": j["p999_us"]}
                if c.pids():
                    cpu = _chain_counts(c.pids())[0] - cpu0
                    out["cpu_us_per_rt"] = cpu / (count + warmup) * 1e6
                return out

            res["chains"] = self.measure(chains, "rr", run)
            res["verified"] = ok_all
            res["count"] = 300 if self.quick else self.a.rr_count
        finally:
            self.stop_chains(chains)
            self.procs.stop(echo)
        return res

    # -- 3. pipelined redis ------------------------------------------------------------------
    def redis(self) -> dict[str, Any]:
        server, bench = which("redis-server"), which("redis-benchmark")
        if not server or not bench:
            self.skipped["redis"] = "redis-server / redis-benchmark not installed " \
                                    "(apt-get install redis-server redis-tools)"
            return {"skipped": self.skipped["redis"]}
        names = self.chains_for(list(WORKLOAD_CHAINS["redis"]))
        rport = free_port()
        rs = self.procs.start("redis-server", [server, "--port", str(rport), "--bind",
                                               "127.0.0.1", "--save", "", "--appendonly", "no",
                                               "--maxclients", "10000"])
        wait_listening(rport, rs)
        chains = self.start_chains(names, rport)
        res: dict[str, Any] = {"command": "redis-benchmark -P 16 -d 1024 -t set,get -c 50",
                               "new_connections": f"{NEW_CONN_ROUNDS} x redis-benchmark -t "
                                                  "ping_mbulk -n 50 -c 50",
                               "verified": {}}
        try:
            for n, c in chains.items():
                res["verified"][n] = self.worker("redis-check", ["redis-check", "--port",
                                                                 str(c.listen_port)], 60)["ok"]

            def run(n: str, c: Chain) -> dict[str, float]:
                req = 2000 if self.quick else (5000 if n == "icafast-pure" else
                                               self.a.redis_requests)
                argv = [bench, "-h", "127.0.0.1", "-p", str(c.listen_port), "-P", "16", "-d",
                        "1024", "-t", "set,get", "-n", str(req), "-c", "50", "--csv"]
                p = self.procs.start(f"redis-benchmark-{n}", argv, capture=True)
                try:
                    o, _ = p.communicate(timeout=300)
                finally:
                    self.procs.stop(p)
                rows = {r[0]: r for r in csv.reader(io.StringIO(o.decode())) if r}
                out = {"set_rps": float(rows["SET"][1]), "get_rps": float(rows["GET"][1])}
                out.update(new_connections(n, c))
                return out

            def new_connections(n: str, c: Chain) -> dict[str, float]:
                """What a new session costs: rounds of 50 new connections with one request
                each (``redis-benchmark -t ping_mbulk -n 50 -c 50``, which also opens one to
                read the server's settings), the relays' CPU and minor page faults per
                connection from /proc."""
                rounds = 2 if self.quick else (4 if n == "icafast-pure" else NEW_CONN_ROUNDS)
                argv = [bench, "-h", "127.0.0.1", "-p", str(c.listen_port), "-t", "ping_mbulk",
                        "-n", "50", "-c", "50", "--csv"]
                cpu0, _, faults0 = _chain_counts(c.pids()) if c.pids() else (0.0, 0.0, 0)
                t0 = time.perf_counter()
                for i in range(rounds):
                    p = self.procs.start(f"redis-benchmark-{n}-conn{i}", argv, capture=True)
                    try:
                        o, _ = p.communicate(timeout=60)
                    finally:
                        self.procs.stop(p)
                    if p.returncode != 0 or b"PING" not in o:
                        raise RuntimeError(f"redis-benchmark ping_mbulk failed: {o[-200:]!r}")
                elapsed = time.perf_counter() - t0
                conns = rounds * 51
                out = {"newconn_per_s": conns / elapsed}
                if c.pids():
                    time.sleep(0.3)  # socat's per-connection children exit and are reaped
                    cpu, _, faults = _chain_counts(c.pids())
                    out["newconn_cpu_us"] = (cpu - cpu0) / conns * 1e6
                    out["newconn_faults"] = (faults - faults0) / conns
                return out

            res["chains"] = self.measure(chains, "redis", run)
        finally:
            self.stop_chains(chains)
            self.procs.stop(rs)
        return res

    # -- 4. resume ---------------------------------------------------------------------------
    def resume(self) -> dict[str, Any]:
        res: dict[str, Any] = {}
        # --resume-tls: TLS links (the run's certificate, pinned by the clients), each new link
        # resuming the TLS session of the one before; else plain links
        tls = tls_files(self.tmp) if self.a.resume_tls else None
        res["tls"] = "TLS links" if tls is not None else "plain links"
        tls_client = ["--tls-fingerprint", tls.fingerprint] if tls is not None else []
        # one session, 200 resets: app -> connect -> proxy -> serve -> backend (in the driver)
        b, s, pp, ctl, lport = (free_port() for _ in range(5))
        driver = self.procs.start("resume-one", [
            PY, "-m", "benchmarks._workers", "resume-one", "--app-port", str(lport),
            "--backend-port", str(b), "--control-port", str(ctl), "--resets",
            str(10 if self.quick else self.a.resets)], capture=True)
        started = [driver]
        try:
            wait_ready(driver)
            started.append(self.procs.start("resume-serve", icafast_argv(
                "serve", s, b, ["--control", str(self.tmp / "ctl-resume.sock")], tls=tls)))
            wait_listening(s, started[-1])
            started.append(self.server("resume-proxy", ["proxy", "--listen", str(pp),
                                                        "--target", str(s), "--control",
                                                        str(ctl)]))
            started.append(self.procs.start("resume-connect", icafast_argv("connect", lport,
                                                                           pp, tls=tls)))
            out, _ = driver.communicate(timeout=300)
            res["one_session"] = self._parse(driver, out)
            r1 = res["one_session"]["resume"]
            log(f"  resume, one session: p50 {r1['p50_ms']:.2f} ms, p99 {r1['p99_ms']:.2f} ms,"
                f" max {r1['max_ms']:.2f} ms over {r1['n']} resets")
        finally:
            for p in reversed(started):
                self.procs.stop(p)
        # many sessions at once, through the library API (open_session) in the driver
        b, s, pp, ctl = (free_port() for _ in range(4))
        n = 20 if self.quick else self.a.resume_sessions
        driver = self.procs.start("resume-many", [
            PY, "-m", "benchmarks._workers", "resume-many", "--server-port", str(pp),
            "--backend-port", str(b), "--control-port", str(ctl), "--sessions", str(n),
            "--rounds", str(1 if self.quick else 3), *tls_client], capture=True)
        started = [driver]
        try:
            wait_ready(driver)
            started.append(self.procs.start("resume-many-serve", icafast_argv(
                "serve", s, b, ["--control", str(self.tmp / "ctl-resume-many.sock")], tls=tls)))
            wait_listening(s, started[-1])
            started.append(self.server("resume-many-proxy", [
                "proxy", "--listen", str(pp), "--target", str(s), "--control", str(ctl)]))
            out, _ = driver.communicate(timeout=600)
            many = self._parse(driver, out)
            many["all_done_ms"] = summary([r["all_done_ms"] for r in many["rounds"]])
            many["p50_ms"] = summary([r["p50_ms"] for r in many["rounds"]])
            res["many_sessions"] = many
            log(f"  resume, {n} sessions at once: all done in "
                f"{[round(r['all_done_ms'], 1) for r in many['rounds']]} ms")
        finally:
            for p in reversed(started):
                self.procs.stop(p)
        res["verified"] = {"icafast": res["one_session"]["ok"] and res["many_sessions"]["ok"]}
        return res

    # -- 5. scale ----------------------------------------------------------------------------
    def scale(self) -> dict[str, Any]:
        from icafast.heap import TRIM_EVERY

        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = scale_room()
        top = min(self.a.sessions, cap)
        levels = [10, 40] if self.quick else sorted({100, 1000, 5000, top} - {0})
        levels = [x for x in levels if x <= top]
        per_client = 2500  # 3 descriptors per session in a client process (socketpair + link)
        nclients = max(1, -(-levels[-1] // per_client))
        window = 1.0 if self.quick else self.a.window
        settle = 0.5 if self.quick else 5.0
        extra = ["--keepalive-interval", "0.5", "--dead-timeout", "3"] if self.quick else []
        b, s = free_port(), free_port()
        started = [self.server("idle-backend", ["idle-backend", "--port", str(b)])]
        res: dict[str, Any] = {"fd_limit": nofile, "levels": []}
        # --scale-tls: TLS links (the run's certificate, pinned by the clients); how TLS runs
        # follows ICAFAST_TLS_IO in the environment (default: the links' compiled pipe)
        tls = tls_files(self.tmp) if self.a.scale_tls else None
        client_tls = ["--tls-fingerprint", tls.fingerprint] if tls is not None else []
        if tls is not None:
            from icafast.tlspipe import describe

            res["tls"] = f"TLS links; TLS records: {describe()}"
        try:
            srv = self.procs.start("scale-serve", icafast_argv(
                "serve", s, b, ["--control", str(self.tmp / "ctl-scale.sock"), "-q", *extra],
                tls=tls))
            started.append(srv)
            wait_listening(s, srv)
            clients = []
            for i in range(nclients):
                p = self.procs.start(f"idle-clients-{i}", [
                    PY, "-m", "benchmarks._workers", "idle-clients", "--server-port", str(s),
                    *client_tls], stdin=True, capture=True)
                started.append(p)
                wait_ready(p)
                clients.append(p)
            res["keepalive"] = "0.5 s (quick)" if self.quick else "3 s (default)"
            res["server_rss_start_kib"] = _rss_kib(srv.pid)
            ok = True
            for level in levels:
                t0 = time.monotonic()
                shares = [level * (i + 1) // nclients - level * i // nclients
                          for i in range(nclients)]
                # each client holds its share of the level's sessions (a total, not a delta)
                replies = self._ask(clients, [f"open {c}" for c in shares], 600)
                ok = ok and all(r["ok"] for r in replies)
                opened = sum(r["sessions"] for r in replies)
                opened_at = time.monotonic()
                open_s = opened_at - t0
                time.sleep(settle)
                rss_opened = _rss_kib(srv.pid)
                # What the opening burst freed stays in the server's heap until its next trim
                # (icafast.heap: every TRIM_EVERY s); read before one, the RSS per session
                # came out 7.6 or 14 KiB for the same code, by the trim timer's phase. So the
                # RSS that counts is read after a trim (the burst's figure is kept as well).
                if not self.quick:
                    time.sleep(max(0.0, opened_at + TRIM_EVERY + 1.0 - time.monotonic()))
                c0, cc0, t_a = _cpu_s(srv.pid), sum(_cpu_s(p.pid) for p in clients), \
                    time.monotonic()
                time.sleep(window)
                c1, cc1, t_b = _cpu_s(srv.pid), sum(_cpu_s(p.pid) for p in clients), \
                    time.monotonic()
                row = {"sessions": opened, "open_seconds": round(open_s, 2),
                       "server_rss_kib": _rss_kib(srv.pid),
                       "server_rss_opened_kib": rss_opened,
                       "server_cpu_pct": 100 * (c1 - c0) / (t_b - t_a),
                       "clients_cpu_pct": 100 * (cc1 - cc0) / (t_b - t_a),
                       "window_s": round(t_b - t_a, 2),
                       "links_lost": sum(r["lost"] for r in replies)}
                res["levels"].append(row)
                log(f"  scale {opened} sessions: server RSS {row['server_rss_kib'] / 1024:.1f} "
                    f"MiB ({rss_opened / 1024:.1f} MiB {settle:g} s after opening), "
                    f"server CPU {row['server_cpu_pct']:.2f} %, clients CPU "
                    f"{row['clients_cpu_pct']:.2f} % (opened in {open_s:.1f}s)")
            replies = self._ask(clients, ["check"] * nclients, 600)
            ok = ok and all(r["ok"] for r in replies)
            res["links_lost"] = sum(r["lost"] for r in replies)
            first = res["levels"][0]
            for row in res["levels"][1:]:
                dn = row["sessions"] - first["sessions"]
                row["rss_per_session_kib"] = (row["server_rss_kib"] - first["server_rss_kib"]) \
                    / dn if dn else None
                row["rss_per_session_opened_kib"] = (
                    row["server_rss_opened_kib"] - first["server_rss_opened_kib"]) / dn \
                    if dn else None
            res["verified"] = {"icafast": ok}
            for p in clients:
                assert p.stdin is not None
                try:
                    p.stdin.write(b"quit\n")
                    p.stdin.flush()
                except OSError:
                    pass
        finally:
            for p in reversed(started):
                self.procs.stop(p)
        return res

    def _ask(self, clients: list[subprocess.Popen[bytes]], cmds: list[str],
             timeout: float) -> list[dict[str, Any]]:
        for p, cmd in zip(clients, cmds, strict=True):
            assert p.stdin is not None
            p.stdin.write(cmd.encode() + b"\n")
            p.stdin.flush()
        out = []
        deadline = time.monotonic() + timeout
        for p in clients:
            assert p.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(p.stdout, selectors.EVENT_READ)
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"client timed out:\n{Procs.tail(p)}")
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"client exited:\n{Procs.tail(p)}")
            out.append(json.loads(line))
        return out

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        meta = {
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "mode": ("pinned: every process on CPU 0 (taskset -c 0)" if self.a.pin else
                     f"unpinned ({os.cpu_count()} CPUs, shared)"),
            "pinned": self.a.pin,
            "quick": self.quick,
            "repeats": self.a.repeats,
            "cpus": os.cpu_count(),
            # verdicts depend on the host (benchmarks/README.md): say which one ran
            "cpu_model": _cpu_model(),
            "kernel": platform.release(),
            "loadavg_start": os.getloadavg(),
            "python": platform.python_version(),
            "icafast_commit": git_commit(ROOT),
            # what the relays of every chain inherit (ICAFAST_TLS_IO=loop, say), beside what a
            # chain sets for its own (benchmarks/README.md, the chains)
            "icafast_env": {k: v for k, v in sorted(os.environ.items())
                            if k.startswith("ICAFAST_") and k != "ICAFAST_BENCH_LOCK"},
            "ref": {"commit": git_commit(Path(self.a.ref))}
            if self.a.ref else None,
            "tools": {
                "socat": tool_version([which("socat") or "socat", "-V"])[:80] if which("socat")
                else None,
                "haproxy": tool_version([which("haproxy") or "haproxy", "-v"])
                if which("haproxy") else None,
                "iperf3": tool_version(["iperf3", "--version"]) if which("iperf3") else None,
                "redis": tool_version(["redis-server", "--version"])
                if which("redis-server") else None,
            },
            "icafast_serve_argv": icafast_argv("serve", 0, 0)[2:],
            "icafast_connect_argv": icafast_argv("connect", 0, 0)[2:],
        }
        if any(not missing(c) and (not self.a.chains or c in self.a.chains)
               for c in TLS_CHAINS):
            import ssl

            tls = tls_files(self.tmp)
            meta["tls"] = {
                "certificate": f"{TLS_KEY}; one pair for every encrypted chain of the run "
                               f"(made with {tls.how})",
                "icafast_serve_argv": icafast_argv("serve", 0, 0, tls=tls)[2:],
                "icafast_connect_argv": icafast_argv("connect", 0, 0, tls=tls)[2:],
                "python_ssl": ssl.OPENSSL_VERSION,
                "system_openssl": tool_version([which("openssl") or "openssl", "version"])
                if which("openssl") else None,
                "haproxy_openssl": next((ln.strip() for ln in subprocess.run(
                    [which("haproxy") or "haproxy", "-vv"], capture_output=True, text=True,
                    timeout=10).stdout.splitlines() if "Running on OpenSSL" in ln), None)
                if which("haproxy") else None,
            }
        import icafast

        meta["core"] = icafast.IMPLEMENTATION
        meta["crc32c"] = icafast.crc32c_backend()
        out: dict[str, Any] = {"meta": meta, "skipped": self.skipped, "workloads": {}}
        todo = [w for w in WORKLOADS if not self.a.only or w in self.a.only]
        try:
            for w in todo:
                log(f"== {w} ({meta['mode']})")
                t0 = time.monotonic()
                try:
                    out["workloads"][w] = getattr(self, w)()
                except Exception as e:  # noqa: BLE001 - a failed workload is reported
                    log(f"  {w} FAILED: {e}")
                    out["workloads"][w] = {"error": str(e)}
                out["workloads"].setdefault(w, {})["seconds"] = round(time.monotonic() - t0, 1)
        finally:
            self.procs.stop_all()
        meta["loadavg_end"] = os.getloadavg()
        if "tls" in meta:  # what each encrypted chain negotiated (socat / HAProxy: their logs)
            meta["tls"]["negotiated"] = {**negotiated_from_logs(self.tmp), **self.negotiated}
        return out


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_counts(pid: int) -> tuple[float, float, int]:
    """CPU seconds (all, and in user space) and minor page faults of ``pid``, its threads, its
    reaped children (socat forks one per connection) and its live descendants."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0, 0
    hz = os.sysconf("SC_CLK_TCK")
    cpu = sum(int(x) for x in fields[11:15]) / hz  # utime, stime, cutime, cstime
    user = (int(fields[11]) + int(fields[13])) / hz
    faults = int(fields[7]) + int(fields[8])  # minflt, cminflt
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    c, u, m = _chain_counts([int(k) for k in kids])
    return cpu + c, user + u, faults + m


def _cpu_model() -> str | None:
    """The CPU's model name, family and model numbers as /proc/cpuinfo gives them (a virtual
    machine's name can be as vague as "Intel(R) Xeon(R) Processor"); None where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return None
    if "model name" not in fields:
        return None
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')})")


def _chain_counts(pids: list[int]) -> tuple[float, float, int]:
    """CPU seconds (all, and in user space) and minor page faults of a chain's relay
    processes (see _tree_counts)."""
    cpu, user, faults = 0.0, 0.0, 0
    for pid in pids:
        c, u, m = _tree_counts(pid)
        cpu += c
        user += u
        faults += m
    return cpu, user, faults


# -- the table -------------------------------------------------------------------------------
def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "GB/s":
        return f"{v:.2f}"
    if unit == "µs":
        return f"{v:.0f}"
    if unit == "ms":
        return f"{v:.2f}"
    if unit == "k/s":
        return f"{v / 1000:.0f}k"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "/s":
        return f"{v:,.0f}"
    if unit == "k":
        return f"{v / 1000:.1f}k"
    return f"{v:.3g}"


def _best_peer(chains: dict[str, Any], chain: str, key: str, higher: bool) -> str | None:
    """The best of ``chain``'s peer group (encrypted or plain) for ``key`` in one run."""
    peers = {p: chains[p][key]["median"] for p in peers_of(chain)
             if p in chains and key in chains[p] and chains[p][key]["median"]}
    return (max if higher else min)(peers, key=peers.__getitem__) if peers else None


def _metric_rows(res: dict[str, Any],
                 metrics: list[tuple[str, str, str, bool | None]]) -> list[str]:
    """metrics: (key, label, unit, higher_is_better; None: a diagnostic, no ratio)."""
    rows = []
    chains = res.get("chains", {})
    for key, label, unit, higher in metrics:
        for n, c in chains.items():
            if key not in c:
                continue
            s = c[key]
            ratio = ""
            best = None if higher is None else _best_peer(chains, n, key, higher)
            if best is not None and s["median"] is not None:
                ratio = f"{s['median'] / chains[best][key]['median']:.2f}× {best}"
            ok = res.get("verified", {}).get(n)
            rows.append(f"| {label} | {n} | {_fmt(s['median'], unit)} | "
                        f"{_fmt(s['min'], unit)} – {_fmt(s['max'], unit)} | {ratio} | "
                        f"{'ok' if ok else 'BAD' if ok is False else ''} |")
    return rows


def table(out: dict[str, Any]) -> str:
    meta = out["meta"]
    w = out["workloads"]
    lines = [f"mode: {meta['mode']}; medians of {meta['repeats']} runs "
             f"(min – max); ratio = median / best peer's median (plain chains: the best of "
             f"socat, socat -b, HAProxy; encrypted chains: the best of "
             f"{', '.join(TLS_PEERS)})", "",
             "| workload | chain | median | min – max | vs best peer | bytes |",
             "|---|---|---|---|---|---|"]
    if "bulk" in w and "chains" in w["bulk"]:
        lines += _metric_rows(w["bulk"], [("up_GBps", f"bulk up GB/s ({w['bulk']['tool']})",
                                           "GB/s", True),
                                          ("down_GBps", "bulk down GB/s", "GB/s", True),
                                          ("up_cpu_s_per_GB", "bulk up: relay CPU s per GB",
                                           "s", False),
                                          ("down_cpu_s_per_GB", "bulk down: relay CPU s per GB",
                                           "s", False),
                                          ("up_user_s_per_GB", "bulk up: of that, user space",
                                           "s", None),
                                          ("down_user_s_per_GB",
                                           "bulk down: of that, user space", "s", None),
                                          ("up_faults_per_GB", "bulk up: relay page faults per GB",
                                           "k", None),
                                          ("down_faults_per_GB",
                                           "bulk down: relay page faults per GB", "k", None)])
    if "rr" in w and "chains" in w["rr"]:
        lines += _metric_rows(w["rr"], [("p50_us", "64 B round trip p50 µs", "µs", False),
                                        ("p99_us", "64 B round trip p99 µs", "µs", False),
                                        ("p999_us", "64 B round trip p99.9 µs", "µs", False),
                                        ("cpu_us_per_rt", "64 B round trip: relay CPU µs",
                                         "µs", False)])
    if "redis" in w and "chains" in w["redis"]:
        lines += _metric_rows(w["redis"], [("set_rps", "redis -P16 -d1024 SET req/s", "k/s",
                                            True),
                                           ("get_rps", "redis -P16 -d1024 GET req/s", "k/s",
                                            True),
                                           ("newconn_per_s", "new connections per s (one "
                                            "request each)", "/s", True),
                                           ("newconn_cpu_us", "new connection: relay CPU µs",
                                            "µs", False),
                                           ("newconn_faults", "new connection: relay page "
                                            "faults", "", None)])
    r = w.get("resume", {})
    if "one_session" in r:
        o = r["one_session"]["resume"]
        ok = "ok" if r["verified"]["icafast"] else "BAD"
        over = " (TLS links)" if r.get("tls") == "TLS links" else ""
        lines.append(f"| resume{over}, 1 session × {o['n']} resets: p50 / p99 / max ms | icafast | "
                     f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} / {o['max_ms']:.2f} | | | {ok} |")
    if "many_sessions" in r:
        m = r["many_sessions"]
        a = m["all_done_ms"]
        over = " (TLS links)" if r.get("tls") == "TLS links" else ""
        lines.append(f"| resume{over}, {m['sessions']} sessions at once: all done ms | icafast | "
                     f"{a['median']:.0f} | {a['min']:.0f} – {a['max']:.0f} | | "
                     f"{'ok' if m['ok'] else 'BAD'} |")
    sc = w.get("scale", {})
    for row in sc.get("levels", []):
        per = row.get("rss_per_session_kib")
        burst = row.get("rss_per_session_opened_kib")
        lines.append(f"| scale: {row['sessions']} idle sessions, keepalive {sc['keepalive']}: "
                     f"server RSS MiB / KiB per session / server CPU % | icafast | "
                     f"{row['server_rss_kib'] / 1024:.1f} / "
                     f"{'–' if per is None else f'{per:.1f}'} / {row['server_cpu_pct']:.2f}"
                     f"{'' if burst is None else f' (before a heap trim: {burst:.1f} KiB)'} | | "
                     f"| {'ok' if sc.get('verified', {}).get('icafast') else 'BAD'} |")
    for n, why in out["skipped"].items():
        lines.append(f"| skipped | {n} | {why} | | | |")
    for name, res in w.items():
        if "error" in res:
            lines.append(f"| {name} | FAILED | {gist(res['error']).replace('|', '/')} | | | |")
    for name, chain, failed in failed_runs(out):
        lines.append(f"| {name} | {chain} | FAILED: {failed} of {meta['repeats']} runs (the "
                     f"figures above, if any, are from the others; the log says why) | | | |")
    return "\n".join(lines)


def gist(error: str, width: int = 240) -> str:
    """A failure's message on one line: its first line and, if it goes on (a worker's
    traceback), its last one, which names the exception."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return text if len(text) <= width else text[:width - 1] + "…"


def failed_runs(out: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(workload, chain, number of its runs that failed) for every chain with a failed run
    (``Bench.measure`` keeps its figures from the other runs)."""
    return [(name, chain, len(m["error"]["runs"]))
            for name, res in out["workloads"].items()
            for chain, m in (res.get("chains") or {}).items() if "error" in m]


def problems(out: dict[str, Any]) -> list[str]:
    """What makes a run fail (exit status 1): a workload that failed, a chain that delivered
    wrong bytes, a chain with a failed run, a chain measured whose bytes were never checked."""
    said = [f"{n}: FAILED ({gist(r['error'])})" for n, r in out["workloads"].items()
            if "error" in r]
    said += [f"{n}/{c}: BAD BYTES" for n, r in out["workloads"].items()
             for c, ok in r.get("verified", {}).items() if not ok]
    said += [f"{n}/{c}: {k} failed run(s)" for n, c, k in failed_runs(out)]
    said += [f"{n}/{c}: bytes not checked" for n, r in out["workloads"].items()
             if "verified" in r for c in r.get("chains") or {} if c not in r["verified"]]
    return said


_METRICS: list[tuple[str, str, str, str, bool]] = [
    # workload, key, label, unit, higher is better
    ("bulk", "up_GBps", "bulk up, GB/s", "GB/s", True),
    ("bulk", "down_GBps", "bulk down, GB/s", "GB/s", True),
    ("bulk", "up_cpu_s_per_GB", "bulk up, relay CPU s/GB", "s", False),
    ("bulk", "down_cpu_s_per_GB", "bulk down, relay CPU s/GB", "s", False),
    ("rr", "p50_us", "64 B RTT p50, µs", "µs", False),
    ("rr", "p99_us", "64 B RTT p99, µs", "µs", False),
    ("rr", "p999_us", "64 B RTT p99.9, µs", "µs", False),
    ("rr", "cpu_us_per_rt", "64 B RTT, relay CPU µs", "µs", False),
    ("redis", "set_rps", "redis -P16 SET, req/s", "k/s", True),
    ("redis", "get_rps", "redis -P16 GET, req/s", "k/s", True),
    ("redis", "newconn_per_s", "new connections per s", "/s", True),
    ("redis", "newconn_cpu_us", "new connection, relay CPU µs", "µs", False),
]


def report(paths: list[str]) -> str:
    """One markdown table for several result files (e.g. unpinned and pinned), side by side:
    median (min–max) and, for icafast, the ratio to the best peer of the same run and the same
    group (encrypted chains: the best encrypted peer; plain chains: the best plain peer)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    head = "| metric | chain | " + " | ".join(
        ("pinned" if r["meta"]["pinned"] else "unpinned") + f" ({r['meta']['icafast_commit']})"
        for r in runs) + " |"
    lines = [head, "|---|---|" + "---|" * len(runs)]
    for wl, key, label, unit, higher in _METRICS:
        chains: list[str] = []
        for r in runs:
            for n, c in r["workloads"].get(wl, {}).get("chains", {}).items():
                if key in c and n not in chains:
                    chains.append(n)
        for n in chains:
            cells = []
            for r in runs:
                cs = r["workloads"].get(wl, {}).get("chains", {})
                c = cs.get(n, {}).get(key)
                if not c or c["median"] is None:
                    cells.append("–")
                    continue
                cell = f"{_fmt(c['median'], unit)} ({_fmt(c['min'], unit)}–{_fmt(c['max'], unit)})"
                if n.startswith("icafast") or n == "uvloop-min":
                    best = _best_peer(cs, n, key, higher)
                    if best is not None:
                        cell += f" **{c['median'] / cs[best][key]['median']:.2f}×** {best}"
                if n in ("icafast-tls-loop", "icafast-tls-asyncio") and cs.get(
                        "icafast-tls", {}).get(key, {}).get("median"):  # against the pipe
                    cell += f"; {c['median'] / cs['icafast-tls'][key]['median']:.2f}× icafast-tls"
                cells.append(cell)
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    for r in runs:
        mode = "pinned" if r["meta"]["pinned"] else "unpinned"
        res = r["workloads"].get("resume", {})
        if "one_session" in res:
            o = res["one_session"]["resume"]
            over = " (TLS links)" if res.get("tls") == "TLS links" else ""
            lines.append(f"| resume{over}, 1 session, {o['n']} resets: p50 / p99 / max ms "
                         "| icafast | "
                         + " | ".join(f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} / {o['max_ms']:.2f}"
                                      if x is r else "" for x in runs) + " |")
        if "many_sessions" in res:
            m = res["many_sessions"]
            a = m["all_done_ms"]
            over = " (TLS links)" if res.get("tls") == "TLS links" else ""
            lines.append(f"| resume{over}, {m['sessions']} sessions at once: all done, ms "
                         f"(rounds) | icafast | " + " | ".join(
                             f"{a['median']:.0f} ({', '.join(f'{x:.0f}' for x in a['runs'])})"
                             if x is r else "" for x in runs) + " |")
        for row in r["workloads"].get("scale", {}).get("levels", []):
            per = row.get("rss_per_session_kib")
            lines.append(f"| {row['sessions']} idle sessions ({mode}): server RSS MiB, KiB per "
                         f"session, server CPU % | icafast | " + " | ".join(
                             f"{row['server_rss_kib'] / 1024:.0f}, "
                             f"{'–' if per is None else f'{per:.1f}'}, "
                             f"{row['server_cpu_pct']:.1f}" if x is r else "" for x in runs) + " |")
    for i, r in enumerate(runs):  # (a workload that failed has no figure above)
        for wl, res in r["workloads"].items():
            if "error" in res:
                lines.append(f"| {wl}: FAILED | | " + " | ".join(
                    gist(res["error"]).replace("|", "/") if j == i else ""
                    for j in range(len(runs))) + " |")
    for i, r in enumerate(runs):  # (the medians above are from the other runs)
        for wl, n, k in failed_runs(r):
            lines.append(f"| {wl}: runs that failed | {n} | " + " | ".join(
                f"{k} of {r['meta']['repeats']}" if j == i else "" for j in range(len(runs)))
                + " |")
    tls_chains: list[str] = []
    for r in runs:
        for n in r["meta"].get("tls", {}).get("negotiated", {}):
            if n not in tls_chains:
                tls_chains.append(n)
    for n in tls_chains:
        lines.append(f"| TLS negotiated | {n} | " + " | ".join(
            ", ".join(r["meta"].get("tls", {}).get("negotiated", {}).get(n, [])) or "–"
            for r in runs) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds: the CI smoke test "
                   "(tiny sizes, one run; checks that every workload runs and delivers the "
                   "right bytes, not speed)")
    p.add_argument("--pin", action="store_true", help="run every process on CPU 0 "
                   "(taskset -c 0), as the pinned figures in benchmarks/README.md")
    p.add_argument("--repeats", type=at_least(1), default=None, help="runs per chain "
                   "(default 5; --quick: 1)")
    p.add_argument("--only", nargs="+", choices=WORKLOADS, help="run only these workloads")
    p.add_argument("--chains", nargs="+", choices=list(CHAINS), help="run only these chains")
    p.add_argument("--duration", type=at_least(1), default=3, help="iperf3 seconds per "
                   "bulk run, whole (plus 1 s omitted warm-up; default 3)")
    p.add_argument("--no-iperf", action="store_true", help="use the built-in sender/sink even "
                   "if iperf3 is installed")
    p.add_argument("--rr-count", type=at_least(1), default=10_000,
                   help="round trips per run")
    p.add_argument("--redis-requests", type=at_least(1), default=100_000,
                   help="requests per test")
    p.add_argument("--resets", type=at_least(1), default=200,
                   help="resets of the one-session test")
    p.add_argument("--resume-sessions", type=at_least(1), default=1000,
                   help="sessions resuming at once")
    p.add_argument("--sessions", type=at_least(1), default=10_000, help="idle sessions at "
                   "most (the server needs 2 descriptors per session; capped by the open-files "
                   "limit)")
    p.add_argument("--resume-tls", action="store_true", help="resume: the links over TLS "
                   "(the run's certificate, pinned by the clients)")
    p.add_argument("--scale-tls", action="store_true", help="scale: the sessions' links over "
                   "TLS (how TLS runs follows ICAFAST_TLS_IO; default: the compiled pipe)")
    p.add_argument("--window", type=at_least(0.1), default=20.0, help="seconds of idle CPU "
                   "measured per scale level")
    p.add_argument("--ref", metavar="DIR", help="also run the icafast chain from another "
                   "checkout, as chains icafast-ref and icafast-tls-ref: an A/B comparison "
                   "(build it first: python setup.py build_ext --inplace in DIR)")
    p.add_argument("--out", help="JSON results file (default benchmarks/results/"
                   "relay-<mode>.json)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print one markdown table of "
                   "earlier result files (side by side) and exit")
    p.add_argument("--no-wait", action="store_true", help="exit (status 2) instead of waiting "
                   "when another timed run holds the machine (timed runs never overlap; "
                   "--quick runs do not take part)")
    return p


def chains_not_run(chains: list[str], only: list[str] | None, ref: bool) -> list[str]:
    """Why each of ``chains`` (``--chains``) would run in none of the workloads asked for
    (``--only``; None: all): a run that measures nothing it was asked to must not pass."""
    todo = [w for w in WORKLOADS if not only or w in only]
    why = []
    for c in chains:
        base = next((a for a, b in REF_TWINS.items() if b == c), None)
        if base is not None and not ref:
            why.append(f"{c} runs only with --ref DIR (icafast from that checkout)")
            continue
        runs_in = [w for w, cs in {**WORKLOAD_CHAINS, "resume": ("icafast", "icafast-tls"),
                                   "scale": ("icafast", "icafast-tls")}.items()
                   if (base or c) in cs]  # (resume and scale: icafast, plain or TLS links)
        if not any(w in todo for w in runs_in):
            why.append(f"{c} is measured in {', '.join(runs_in)} only, not in "
                       f"{', '.join(todo)}")
    return why


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.report:
        print(report(a.report))
        return 0
    if a.chains:
        why = chains_not_run(a.chains, a.only, bool(a.ref))
        if why:
            parser.error("; ".join(why))
    if a.ref and (unready := unbuilt(Path(a.ref).resolve())):
        parser.error(f"--ref: {unready}")
    if a.repeats is None:
        a.repeats = 1 if a.quick else 5
    if not a.quick:
        try:  # (the open lock file is kept with the arguments: held until the process ends)
            a.lock = exclusive_run(wait=not a.no_wait, say=log)
        except Busy as e:
            print(f"python -m benchmarks.relay: {e}", file=sys.stderr)
            return 2
    if a.pin:
        os.sched_setaffinity(0, {0})
    if a.ref:
        REF_ROOT.append(Path(a.ref).resolve())
    if a.out is None:
        mode = ("pinned" if a.pin else "unpinned") + ("-quick" if a.quick else "")
        a.out = str(ROOT / "benchmarks" / "results" / f"relay-{mode}.json")
    stop_on_signals()  # (SIGTERM, SIGHUP: every process started is stopped)
    bench = Bench(a)
    out = bench.run()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(out))
    print(f"\nJSON: {a.out}; logs: {bench.tmp}")
    wrong = problems(out)
    if wrong:
        print("FAILED: " + "; ".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
