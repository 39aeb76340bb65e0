"""Smoke test of the end-to-end relay benchmark: ``python -m benchmarks.relay --quick``.

Asserts only that every workload ran and that every chain, plain and encrypted (TLS between the
two hops: socat-tls, socat-tls-nodelay, haproxy-tls, icafast-tls, icafast-tls-loop,
icafast-tls-asyncio), delivered the right bytes (SHA-256 checked transfers, echoed round trips,
SET/GET, resumed markers, echoes on every idle session).
Never asserts speed: this machine is shared and the figures are noise at these sizes. Peers that
are not installed (socat, haproxy, iperf3, redis) are skipped by the benchmark and reported.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the benchmark reads /proc and uses Linux tools")


@pytest.fixture
def bench_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """TMPDIR for a benchmark run: a relay run keeps its logs (tens of MB, the run's TLS key
    among them) in a directory of its own there, which would otherwise stay in /tmp, one per
    test run. Removed after the test unless it failed (its logs then tell why). Short, not
    under tmp_path: the run's control sockets live in it, and a Unix socket's path has room
    for 107 bytes."""
    tmp = Path(tempfile.mkdtemp(prefix="icafast-test-"))
    failed = request.session.testsfailed
    yield tmp
    if request.session.testsfailed == failed:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(argv: list[str], timeout: float, tmp: Path,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a benchmark in a process group of its own. If it overruns ``timeout``, stop the
    whole group by its id (the group is the benchmark's pid): the benchmark and every relay and
    peer it started, which would otherwise outlive it and load the machine. Its temporary
    files go under ``tmp`` (TMPDIR; see ``bench_tmp``)."""
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         env={**os.environ, **(env or {}), "TMPDIR": str(tmp)})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{argv[2]} timed out after {timeout} s:\n{out[-2000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def test_scale_over_tls_quick(tmp_path: Path, bench_tmp: Path) -> None:
    """``--scale-tls``: the idle sessions' links over TLS, run as ``ICAFAST_TLS_IO`` in the
    benchmark's environment says (here the pipe's Python twin), which the results record."""
    out = tmp_path / "scale-tls.json"
    proc = _run([sys.executable, "-m", "benchmarks.relay", "--quick", "--only", "scale",
                 "--scale-tls", "--out", str(out)], 120, bench_tmp, {"ICAFAST_TLS_IO": "pure"})
    assert proc.returncode == 0 and out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["icafast_env"]["ICAFAST_TLS_IO"] == "pure", res["meta"]
    r = res["workloads"]["scale"]
    assert r["verified"] == {"icafast": True}
    assert r["tls"] == "TLS links; TLS records: pure-Python pipe (ICAFAST_TLS_IO=pure)", r["tls"]
    assert [row["sessions"] for row in r["levels"]] == [10, 40]
    assert r["links_lost"] == 0


def test_relay_benchmark_quick(tmp_path: Path, bench_tmp: Path) -> None:
    out = tmp_path / "relay.json"
    proc = _run([sys.executable, "-m", "benchmarks.relay", "--quick", "--out", str(out)], 280,
                bench_tmp)
    assert out.exists(), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # a workload's error in full first: the output's tail may have scrolled past it
    errors = "".join(f"{n}: {r['error']}\n" for n, r in res["workloads"].items() if "error" in r)
    assert proc.returncode == 0, errors + proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"logs: {bench_tmp}{os.sep}icafast-bench-" in proc.stdout, proc.stdout[-300:]
    w = res["workloads"]
    assert set(w) == {"bulk", "rr", "redis", "resume", "scale"}
    for name, r in w.items():
        assert "error" not in r, (name, r["error"])
        if name == "redis" and "skipped" in r:
            continue
        assert r["verified"], name
        assert all(r["verified"].values()), (name, r["verified"])
    # every chain that is not reported as skipped ran and was checked; the encrypted chains
    # (TLS between the hops) run bulk, rr and redis like the plain ones
    for name in ("bulk", "rr", "redis"):
        if name == "redis" and "skipped" in w[name]:
            continue
        ran = set(w[name]["chains"]) | set(res["skipped"])
        assert {"direct", "icafast", "icafast-pure", "icafast-tls", "icafast-tls-loop",
                "icafast-tls-asyncio"} <= set(w[name]["chains"])
        assert {"socat", "haproxy", "socat-tls", "socat-tls-nodelay", "haproxy-tls"} <= ran
        assert set(w[name]["verified"]) == set(w[name]["chains"])
    for name in ("resume", "scale"):  # plain only
        assert set(w[name]["verified"]) == {"icafast"}
    negotiated = res["meta"]["tls"]["negotiated"]
    # the host is named: its verdicts depend on it
    assert res["meta"]["kernel"] and "cpu_model" in res["meta"]
    assert {"icafast-tls", "icafast-tls-loop", "icafast-tls-asyncio"} <= set(negotiated), negotiated
    assert w["resume"]["one_session"]["resume"]["n"] > 0
    assert w["resume"]["many_sessions"]["rounds"]
    levels = w["scale"]["levels"]
    assert levels and levels[-1]["sessions"] == 40


@pytest.mark.skipif(shutil.which("valgrind") is None,
                    reason="valgrind is not installed (Debian package valgrind)")
def test_instruction_count_benchmark_quick(tmp_path: Path, bench_tmp: Path) -> None:
    """``python -m benchmarks.instructions`` counts a relay hop's instructions per round trip:
    it runs, checks the echoed bytes, and gives a positive count for each chain. (Its
    ``--cache-sim``, which doubles the time valgrind takes, is run by the per-session test.)"""
    out = tmp_path / "instructions.json"
    proc = _run([sys.executable, "-m", "benchmarks.instructions", "--chains", "uvloop-min",
                 "icafast", "--hop", "server", "--warmup", "20", "--count", "400",
                 "--out", str(out)], 280, bench_tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [(r["chain"], r["hop"]) for r in res] == [("uvloop-min", "server"),
                                                       ("icafast", "server")]
    for r in res:
        short, long = r["runs"]
        assert 0 < short < long, r
        assert r["instructions_per_round_trip"] > 0, r
        assert "per_round_trip" not in r, r  # (the simulated caches' events: --cache-sim)


@pytest.mark.skipif(shutil.which("valgrind") is None,
                    reason="valgrind is not installed (Debian package valgrind)")
def test_instruction_count_benchmark_per_session_quick(tmp_path: Path,
                                                       bench_tmp: Path) -> None:
    """With ``--sessions`` each round trip runs through a new connection, and the figure is
    instructions per whole session: larger than per round trip by the session's set-up and
    teardown, and the echoed bytes and the chain's end of stream are checked. With
    ``--cache-sim``, the simulated caches' events per session come too."""
    out = tmp_path / "sessions.json"
    proc = _run([sys.executable, "-m", "benchmarks.instructions", "--chains", "icafast",
                 "--hop", "server", "--warmup", "5", "--count", "40", "--sessions",
                 "--cache-sim", "--out", str(out)], 280, bench_tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["workload"].startswith("new sessions")
    (r,) = doc["results"]
    # a session is tens of thousands of instructions at the very least (a round trip on an
    # open session is ~10,000): accept, handshake, backend connection, teardown
    assert r["instructions_per_session"] > 30_000, r
    # the simulated caches' events, per session (instruction-cache misses among them)
    events = r["per_session"]
    assert {"Ir", "I1mr", "D1mr", "D1mw"} <= set(events), r
    assert events["Ir"] == pytest.approx(r["instructions_per_session"], abs=1), r

@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_cpu_split_benchmark_quick(tmp_path: Path) -> None:
    """``python -m benchmarks.cpu_split`` reads each relay's user and system CPU around a run of
    round trips: one run per chain, each with CPU time counted."""
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_split", "--chains",
                           "uvloop-min", "icafast", "--repeats", "1", "--count", "3000",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"uvloop-min", "icafast"}
    for name, r in runs.items():
        assert len(r["user_us"]) == len(r["system_us"]) == 1, (name, r)
        # 3,000 round trips cost each relay tens of ms: more than one clock tick
        assert r["user_us"][0] + r["system_us"][0] > 0, (name, r)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR2")
@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_upgrade_benchmark_quick(tmp_path: Path, bench_tmp: Path, tls: bool, side: str) -> None:
    """``python -m benchmarks.upgrade --quick``: the server (or the client) upgraded in place
    once under five sessions; every echo came back in order, one backend connection each, the
    same pid."""
    out = tmp_path / "upgrade.json"
    r = _run([sys.executable, "-m", "benchmarks.upgrade", "--quick", "--out", str(out),
              "--side", side, *(["--tls"] if tls else [])], 180, bench_tmp)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["backend_connections"] == 5 and res["tls"] == tls
    assert res["side"] == side
    (rnd,) = res["rounds"]
    assert rnd["sessions_through"] == 5 and 0 < rnd["reloading_ms"] < rnd["ready_ms"]
    assert res["bytecode"].startswith("as found")


def test_the_upgrade_benchmark_starts_icafast_from_bytecode() -> None:
    """A timed ``benchmarks.upgrade`` run byte-compiles icafast first, as pip does when it
    installs a wheel: afterwards every module of the package has bytecode Python will load
    (on a host where Python writes none itself, each start would compile them from source).
    The quick run leaves the modules as it found them, and says so."""
    import importlib.util

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.upgrade import _byte_compile
    finally:
        sys.path.remove(str(ROOT))
    import icafast

    said = _byte_compile()
    assert "compiled" in said
    sources = list(Path(icafast.__file__).parent.rglob("*.py"))
    assert len(sources) > 10
    for src in sources:
        assert Path(importlib.util.cache_from_source(str(src))).is_file(), src


def test_a_chain_whose_process_exited_fails_at_once(tmp_path: Path) -> None:
    """A crashed hop is reported as a failed run straight away: its workload is not started
    (whose client would only wait for its timeout against the dead listener)."""
    import argparse
    import types

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.relay import Bench
    finally:
        sys.path.remove(str(ROOT))
    bench = Bench(argparse.Namespace(quick=True, pin=False, repeats=2))
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait(timeout=30)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ran: list[str] = []

        def fn(name: str, chain: object) -> dict[str, float]:
            ran.append(name)
            return {"x": 1.0}

        chains = {"crashed": types.SimpleNamespace(started=[dead]),
                  "fine": types.SimpleNamespace(started=[alive])}
        res = bench.measure(chains, "rr", fn)  # type: ignore[arg-type]
    finally:
        alive.kill()
        alive.wait(timeout=30)
        shutil.rmtree(bench.tmp, ignore_errors=True)
    assert ran == ["fine", "fine"]
    assert "error" in res["crashed"] and "x" not in res["crashed"]
    assert "x" in res["fine"]


def test_timed_runs_never_overlap(tmp_path, monkeypatch):
    # two timed runs at once would each load the CPUs the other measures: the second waits
    # (or, asked not to, refuses) until the first one's lock is released
    import threading

    from benchmarks._chains import Busy, exclusive_run

    monkeypatch.setenv("ICAFAST_BENCH_LOCK", str(tmp_path / "bench.lock"))
    first = exclusive_run(say=lambda m: None)
    assert first is not None
    assert (tmp_path / "bench.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(Busy, match=rf"pid {os.getpid()}\)"):
        exclusive_run(wait=False)
    said: list[str] = []
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(exclusive_run(say=said.append)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # still waiting
    assert said and "waiting for another timed benchmark run" in said[0]
    first.close()  # the first run ends
    waiter.join(10)
    assert not waiter.is_alive() and got[0] is not None
    got[0].close()  # type: ignore[attr-defined]
    again = exclusive_run(wait=False)  # free again
    assert again is not None
    again.close()


def test_a_second_timed_run_can_refuse_to_wait(tmp_path):
    env = {**os.environ, "ICAFAST_BENCH_LOCK": str(tmp_path / "bench.lock")}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from benchmarks._chains import exclusive_run; "
        "f = exclusive_run(); print('held', flush=True); sys.stdin.read()")],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        p = subprocess.run([sys.executable, "-m", "benchmarks.relay", "--no-wait", "--only",
                            "rr", "--chains", "direct", "--out", str(tmp_path / "x.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"(pid {holder.pid}) holds" in p.stderr
        assert not (tmp_path / "x.json").exists()
    finally:
        holder.stdin.close()  # type: ignore[union-attr]  (the holder then ends)
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            holder.kill()  # (by its pid)
            holder.wait(10)
        holder.stdout.close()  # type: ignore[union-attr]


def _main_in_process(relay, argv: list[str]) -> int:
    """``relay.main(argv)`` in this process, with the signal handlers it sets (SIGTERM and
    SIGHUP unwind, :func:`benchmarks._chains.stop_on_signals`) put back after it."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return relay.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _relay_module():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import relay
    finally:
        sys.path.remove(str(ROOT))
    return relay


def test_a_chain_whose_runs_failed_fails_the_run(tmp_path, monkeypatch, capsys):
    """A run that fails (its client crashed or timed out) leaves its chain without figures:
    the run must say so in the table and end with status 1, and a chain none of whose round
    trips came back is not "verified". (Each failed run used to be dropped in silence: the
    chain left the table, its bytes showed as checked, and the benchmark exited 0.)"""
    relay = _relay_module()
    real = relay.Bench.worker

    def worker(self, name, args, timeout, env=None):
        if name == "rr":
            raise RuntimeError("worker gave no result (exit 1)")
        return real(self, name, args, timeout, env)

    monkeypatch.setattr(relay.Bench, "worker", worker)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (the run's logs)
    out = tmp_path / "rr.json"
    rc = _main_in_process(relay, ["--quick", "--only", "rr", "--chains", "direct", "--repeats",
                                  "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 1, printed.out + printed.err
    assert "| rr | direct | FAILED: 2 of 2 runs" in printed.out, printed.out
    assert "rr/direct: 2 failed run(s)" in printed.err, printed.err
    res = json.loads(out.read_text())
    assert res["workloads"]["rr"]["verified"] == {}
    assert "rr/direct: bytes not checked" in relay.problems(res)
    # the side-by-side report names them too, and a workload that failed
    assert "| rr: runs that failed | direct | 2 of 2 |" in relay.report([str(out)])
    res["workloads"]["bulk"] = {"error": "nothing listening on 4242 after 20.0s"}
    out.write_text(json.dumps(res))
    assert ("| bulk: FAILED | | nothing listening on 4242 after 20.0s |"
            in relay.report([str(out)]))


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--rr-count", "0"],
                                  ["--redis-requests", "-5"], ["--resets", "0"],
                                  ["--resume-sessions", "0"], ["--sessions", "0"],
                                  ["--duration", "0.5"], ["--duration", "0"],
                                  ["--window", "0"], ["--window", "nan"]])
def test_relay_refuses_settings_that_measure_nothing(argv, capsys):
    """No runs, no round trips or an iperf3 run of ``-t 0`` (iperf3 reads it, and any
    fraction of a second, as no time limit) measure nothing or hang: refused at once."""
    relay = _relay_module()
    with pytest.raises(SystemExit) as e:
        relay.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert f"argument {argv[0]}: " in capsys.readouterr().err


def _group(pgid: int) -> list[str]:
    """The command lines of the live processes in process group ``pgid`` (from /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{d.name} {cmd}")
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_cpu_split_stopped_mid_run_stops_what_it_started(sig, bench_tmp):
    """``kill`` (or a closed terminal) in the middle of a run: the benchmark's chain, echo
    backend and load client are stopped and its temporary directory removed. (The signal's
    default action used to end the benchmark alone: the relays and the echo server ran on.)"""
    env = {**os.environ, "TMPDIR": str(bench_tmp)}
    p = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_split", "--chains", "icafast",
                          "--repeats", "1", "--count", "10000000"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # the echo server, both relays and the load client
        while not any("rr-client" in c for c in _group(p.pid)):
            assert p.poll() is None and time.monotonic() < deadline, _group(p.pid)
            time.sleep(0.1)
        os.kill(p.pid, sig)
        p.wait(30)
        time.sleep(0.5)
        left = _group(p.pid)
    finally:
        if p.poll() is None or _group(p.pid):
            os.killpg(p.pid, signal.SIGKILL)  # (the group of the benchmark started here)
            p.wait(30)
        p.stderr.close()  # type: ignore[union-attr]
    assert p.returncode == 128 + sig, p.returncode
    assert left == [], left
    assert not list(bench_tmp.glob("icafast-cpu-*"))


@pytest.mark.parametrize("n, q, rank", [(10_000, 50, 5000), (10_000, 99, 9900),
                                        (10_000, 99.9, 9990), (2000, 99.9, 1998),
                                        (300, 50, 150), (300, 99, 297), (300, 99.9, 300),
                                        (10, 50, 5), (200, 99, 198), (7, 50, 4), (1, 99.9, 1),
                                        (10, 0, 1), (10, 100, 10)])
def test_percentiles_are_nearest_rank(n, q, rank):
    """The p50 / p99 / p99.9 of round trips and resumes are the value of rank ceil(q/100 * n).
    (Rounding half to even made it one rank higher wherever q/100 * n was an odd whole
    number, and floating-point error did where q/100 * n came out a hair above a whole
    number: the p99.9 of the 10,000 round trips of a timed run was the 9,991st.)"""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks._workers import percentile
    finally:
        sys.path.remove(str(ROOT))
    assert percentile([float(i) for i in range(1, n + 1)], q) == rank


@pytest.mark.parametrize("argv", [
    ["cpu_split", "--chains", "uvloop-min", "--repeats", "0"],
    ["cpu_split", "--chains", "uvloop-min", "--count", "0"],
    ["cpu_split", "--chains", "uvloop-min", "--warmup", "-1"],
    ["instructions", "--chains", "uvloop-min", "--count", "0"],
    ["instructions", "--chains", "uvloop-min", "--warmup", "0"],
    ["profile_relay", "rr", "--seconds", "0.5"],
    ["profile_relay", "idle", "--sessions", "0"],
    ["engine_exchange", "--count", "0"],
    ["engine_exchange", "--repeats", "0"],
], ids=lambda a: " ".join(a))
def test_helpers_refuse_settings_that_measure_nothing(argv):
    """No run or no round trip: a usage error at once, not a traceback (median of nothing,
    division by zero) after the chains ran, under valgrind for the instruction count."""
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{argv[0]}", *argv[1:]], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"argument {argv[-2]}: must be at least" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("argv, message", [
    (["--only", "rr", "--chains", "icafast-ref"], "icafast-ref runs only with --ref DIR"),
    (["--only", "bulk", "rr", "--chains", "direct", "socat-b65536"],
     "socat-b65536 is measured in redis only, not in bulk, rr"),
    (["--only", "scale", "--chains", "haproxy"], "haproxy is measured in bulk, rr, redis only"),
])
def test_relay_refuses_chains_that_no_workload_asked_for_runs(argv, message, capsys):
    """A chain asked for that none of the workloads asked for runs (or an A/B twin without
    --ref): a usage error, not an empty table and exit status 0."""
    relay = _relay_module()
    with pytest.raises(SystemExit) as e:
        relay.main(["--quick", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_documented_chain_selections_are_accepted():
    relay = _relay_module()
    for only, chains, ref in [
        (["bulk", "rr", "redis"], ["socat", "socat-b65536", "socat-b131072", "haproxy"], False),
        (["bulk"], ["icafast", "icafast-ref"], True),
        (["bulk"], ["socat-tls", "haproxy-tls", "icafast-tls", "icafast-tls-ref"], True),
        (["rr"], ["socat", "socat-b131072", "haproxy", "uvloop-min", "icafast"], False),
        (["resume", "scale"], ["icafast"], False),
        (None, ["socat-b65536"], False),
    ]:
        assert relay.chains_not_run(chains, only, ref) == [], (only, chains)


@pytest.mark.parametrize("tool, argv", [
    ("relay", ["--only", "rr", "--chains", "icafast", "--repeats", "1"]),
    ("instructions", ["--chains", "icafast-ref"]),
    ("cpu_split", ["--chains", "icafast-ref"]),
])
def test_an_a_b_run_refuses_a_reference_checkout_that_is_not_built(tmp_path, tool, argv):
    """A reference checkout whose extensions were never built runs icafast from Python
    source, thirty times the instructions per message: its A/B figures would compare that,
    not the two commits. Each tool that takes --ref says so and how to build it, measuring
    nothing; a built checkout (this one) passes the check."""
    from benchmarks._chains import unbuilt

    ref = tmp_path / "ref"
    shutil.copytree(Path(ROOT) / "icafast", ref / "icafast",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{tool}", *argv, "--ref", str(ref)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"--ref: {ref} is not built (icafast._core" in p.stderr, p.stderr
    assert "python setup.py build_ext --inplace" in p.stderr and "Traceback" not in p.stderr
    if os.environ.get("ICAFAST_REQUIRE_COMPILED") == "1":  # (CI: this checkout is built)
        assert unbuilt(Path(ROOT)) is None


@pytest.mark.parametrize("soft,hard", [(20_000, 20_000), (1024, 20_000), (1024, 4096),
                                       (1024, 1024), (1024, -1), (65_536, 65_536)])
def test_the_scale_benchmark_asks_no_more_sessions_than_the_server_has_room_for(soft, hard):
    """``python -m benchmarks.relay --only scale`` opens up to 10,000 idle sessions against an
    ``icafast serve`` of default settings. It asked for (soft limit - 200) / 2, while the
    server keeps room for its 1,024 handshakes as well: at a hard limit of 20,000 it asked
    9,900 of a server with room for 9,360, got 540 refused, and reported the run failed.
    (A hard limit of -1: no limit, test_rlimits.FakeResource's RLIM_INFINITY.)"""
    from test_rlimits import FakeResource

    from benchmarks.relay import SERVE_MAX_HANDSHAKES, scale_room
    from icafast.aio.server import RelayServer
    from icafast.rlimits import raise_nofile

    default = inspect.signature(RelayServer).parameters["max_handshakes"].default
    assert SERVE_MAX_HANDSHAKES == default
    server_room, _line = raise_nofile(10_000, SERVE_MAX_HANDSHAKES,
                                      resource_mod=FakeResource(soft, hard))
    assert scale_room(FakeResource(soft, hard)) == server_room


def _request_then_half_close(port: int, request: bytes) -> bytes:
    """Send ``request`` to 127.0.0.1:``port``, half-close, and return all that comes back
    until the end of the stream (bounded in reads and time)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        for _ in range(1000):
            b = s.recv(4096)
            if not b:
                break
            reply += b
    return reply


@pytest.mark.skipif(shutil.which("socat") is None,
                    reason="socat is not installed (Debian package socat)")
@pytest.mark.parametrize("chain", ["socat", "socat-b131072", "socat-tls"])
def test_the_socat_chains_carry_a_half_closed_stream_to_its_end(tmp_path, chain):
    """The bulk check's upload half-closes, then waits for the backend's digest. socat closes
    both directions 0.5 s after one has ended (its default ``-t``), and so drops a digest
    that a busy machine holds up for longer: the check would fail with the end of the stream
    instead of a reply, and the whole bulk workload with it. Here the backend answers 1.5 s
    after the end of the upload; the reply must come through."""
    import socket
    import threading

    from benchmarks._chains import Chain, Procs

    ls = socket.create_server(("127.0.0.1", 0))
    ls.settimeout(30)
    got_upload = threading.Event()

    def backend() -> None:
        conn, _ = ls.accept()
        with conn:
            conn.settimeout(30)
            for _ in range(10_000):  # (bounded: 100 KB arrive in far fewer reads)
                if not conn.recv(65536):
                    break
            got_upload.set()
            time.sleep(1.5)
            conn.sendall(b"digest" * 8)

    t = threading.Thread(target=backend, daemon=True)
    t.start()
    procs = Procs(tmp_path, pin=False)
    c = Chain(chain, ls.getsockname()[1], procs)
    try:
        c.start()
        reply = _request_then_half_close(c.listen_port, b"u" * 100_000)
        assert got_upload.is_set()
        assert reply == b"digest" * 8
    finally:
        procs.stop_all()
        ls.close()
        t.join(5)


def test_a_failed_bulk_check_names_its_chain_and_the_exception(tmp_path, monkeypatch, capsys):
    """A byte check whose client crashed fails the bulk workload. The run's summary, the last
    thing it prints (all that a CI log may keep), names the chain, the direction and the
    exception: it used to give the first 100 characters of the worker's traceback, which
    named none of them."""
    relay = _relay_module()

    def worker(self, name, args, timeout, env=None):
        assert name == "bulk-check"
        raise RuntimeError("worker gave no result (exit 1):\nTraceback (most recent call "
                           "last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_"
                           "main\n  [...]\nConnectionError: EOF after 0 of 40 bytes")

    monkeypatch.setattr(relay.Bench, "worker", worker)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (the run's logs)
    out = tmp_path / "bulk.json"
    rc = _main_in_process(relay, ["--quick", "--only", "bulk", "--chains", "direct",
                                  "--no-iperf", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 1, printed.out + printed.err
    last = printed.err.strip().splitlines()[-1]
    assert last == ("FAILED: bulk: FAILED (the bulk check of direct (up): worker gave no "
                    "result (exit 1): … ConnectionError: EOF after 0 of 40 bytes)"), last
    assert ("| bulk | FAILED | the bulk check of direct (up): worker gave no result (exit 1): "
            "… ConnectionError: EOF after 0 of 40 bytes |") in printed.out
    # the JSON keeps the whole of it
    assert json.loads(out.read_text())["workloads"]["bulk"]["error"].endswith(
        "\nConnectionError: EOF after 0 of 40 bytes")


def test_the_bare_forwarder_closes_each_connection_once_both_directions_end(tmp_path):
    """The reference forwarder (the ``uvloop-min`` chain) passes each end of stream on and
    closes both connections once both directions have ended. It used to leave them open for
    the garbage collector, which freed such a pair with its connections still open; uvloop
    then freed a pending half-close with it and corrupted the heap ("double free or
    corruption", which failed a smoke run). Here 50 connections half-close both ways through
    it, and its descriptors must come back to what it had before."""
    import socket
    import threading

    from benchmarks._chains import free_port

    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(30)
    stop = threading.Event()

    def serve() -> None:
        for _ in range(1000):  # (50 connections come; each accept waits 30 s at most)
            if stop.is_set():
                return
            try:
                conn, _ = backend.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                for _ in range(100):  # until the end of the request (bounded)
                    if not conn.recv(65536):
                        break
                conn.sendall(b"ok")
                conn.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    port = free_port()
    fwd = subprocess.Popen([sys.executable, "-m", "benchmarks._workers", "forward", "--listen",
                            str(port), "--target", str(backend.getsockname()[1])], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert fwd.stdout is not None and fwd.stdout.readline() == "ready\n"
        fds = Path(f"/proc/{fwd.pid}/fd")
        before = len(list(fds.iterdir()))
        for i in range(50):
            assert _request_then_half_close(port, b"request %d" % i) == b"ok"
        left = None
        for _ in range(100):  # up to 10 s for the last closes
            left = len(list(fds.iterdir())) - before
            if left <= 0:
                break
            time.sleep(0.1)
        assert fwd.poll() is None, "the forwarder died"
        assert left is not None and left <= 0, f"{left} descriptors still open"
    finally:
        stop.set()
        fwd.kill()  # (by its pid)
        fwd.wait(10)
        fwd.stdout.close()  # type: ignore[union-attr]
        backend.close()
        t.join(5)
