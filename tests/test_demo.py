"""``icafast demo``: its arguments, its output with --quiet, and its shutdown on a signal
(run as separate processes, each stopped by its pid)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from test_cli import PY, _env, _Proc

from icafast.cli import build_parser


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], "the size must be at least 1 byte"),
    (["--size", "-5"], "invalid size '-5': must not be negative"),
    (["--size", "0.5"], "the size must be at least 1 byte"),
    (["--size", "inf"], "invalid size 'inf'"),
    (["--breaks", "-1"], "the number of breaks must not be negative"),
    (["--breaks", "two"], "invalid value 'two'"),
    (["--rate=-1M"], "invalid size '-1M': must not be negative"),
    # (a fraction of a byte per second used to round down to 0, which runs unlimited)
    (["--rate", "0.5"], "the rate must be 0 (unlimited) or at least 1 byte per second"),
    (["--rate", "0.0001k"], "the rate must be 0 (unlimited) or at least 1 byte per second"),
])
def test_demo_refuses_impossible_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["demo", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0].split('=')[0]}: {message}" in err, err


def test_demo_accepts_the_smallest_arguments():
    args = build_parser().parse_args(["demo", "--size", "1", "--breaks", "0", "--rate", "0"])
    assert (args.size, args.breaks, args.rate) == (1, 0, 0)
    for text, rate in [("0.0", 0), ("0k", 0), ("0MiB", 0), ("1", 1), ("0.5k", 512)]:
        assert build_parser().parse_args(["demo", "--rate", text]).rate == rate, text


@pytest.mark.parametrize("size, breaks", [("1", "0"), ("1", "3"), ("5", "7")])
def test_demo_with_fewer_bytes_than_breaks_still_breaks_a_live_session(size, breaks):
    """Each break is made while the session is open, even when the stream is too short to
    spread them over it."""
    p = subprocess.run([PY, "-m", "icafast", "demo", "--size", size, "--breaks", breaks,
                        "--rate", "0", "--no-tls"], env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no byte lost" in p.stdout
    assert f"resumes: {breaks};" in p.stdout, p.stdout
    # (the fourth break of every five: the server hands the session over to a new one; the
    # fifth: the client does)
    b = int(breaks)
    assert (f"half-open, {(b + 1) // 5} server hand-over, {b // 5} client hand-over;"
            in p.stdout), p.stdout
    assert "of 0 connection(s)" not in p.stdout, p.stdout
    # (the amounts in bytes, not "0.0 MiB")
    assert f"streaming {size} byte{'' if size == '1' else 's'} each way" in p.stdout, p.stdout
    assert "0.0 MiB" not in p.stdout, p.stdout


def test_demo_quiet_prints_the_result_only():
    """Nothing but the result, and no warning either, at the open-files limit most systems
    start a process with (1,024): the demo's server sizes its limits for its one session."""
    def usual_limit() -> None:  # (in the child, before it runs)
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    p = subprocess.run([PY, "-m", "icafast", "demo", "-q", "--size", "64k", "--breaks", "1",
                        "--rate", "0", "--no-tls"], env=_env(), capture_output=True,
                       text=True, timeout=60,
                       preexec_fn=usual_limit if os.name == "posix" else None)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines() == ["  RESULT: the session survived every break, no byte "
                                     "lost, duplicated or reordered"], p.stdout
    assert p.stderr == "", p.stderr


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_demo_shuts_down_cleanly_on_a_signal(sig, loop, tmp_path, monkeypatch):
    """SIGINT, SIGTERM and SIGHUP mid-stream: the usual shutdown, its temporary directory (TLS
    certificate and key) removed, no traceback, and the exit status 128 + the signal."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("ICAFAST_LOOP", loop)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    # (8 MiB at 1 MiB/s each way: still streaming when the signal comes)
    proc = _Proc(["demo", "--size", "8M", "--rate", "1M", "--breaks", "2"])
    try:
        proc.wait_for("established", timeout=30)
        os.kill(proc.p.pid, sig)
        rc = proc.p.wait(20)
    finally:
        out = proc.stop()
    assert rc == 128 + sig, out
    assert "Traceback" not in out and "never retrieved" not in out, out
    assert f"RESULT: interrupted by {sig.name}" in out, out
    assert not list(tmp_path.glob("icafast-demo-*")), out


def test_demo_counts_what_each_side_replayed():
    """The summary's bytes replayed are both sides' (each side's log says what it re-sent on
    each resume), and a blackhole while the backend streams leaves the server something to
    replay. (Only the client's were counted: what the server re-sent of the download was
    missing from "bytes replayed".)"""
    import re

    # (2 MiB at 4 MiB/s: still streaming both ways at the blackhole, the second break)
    p = subprocess.run([PY, "-m", "icafast", "demo", "-v", "--size", "2M", "--rate", "4M",
                        "--breaks", "2", "--no-tls"], env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    server = sum(int(n) for n in re.findall(r"resumed from \S+, (\d+) bytes replayed", p.stderr))
    client = sum(int(n) for n in re.findall(r"resumed on link \d+, (\d+) bytes replayed",
                                            p.stderr))
    assert server > 0, p.stderr
    assert (f"resumes: 2; bytes replayed: {client} by the client, {server} by the server"
            in p.stdout), p.stdout + p.stderr


def test_demo_ends_its_session_before_shutting_down():
    """The session ends gracefully (both sides have the other's end of stream) before the demo
    tears down its server and proxy, and nothing is printed after the RESULT line. (Over TLS
    with no breaks the summary came a round trip before the session's end: the server then
    aborted the session at shutdown, and "client: link lost" followed the RESULT.)"""
    for _ in range(2):
        p = subprocess.run([PY, "-m", "icafast", "demo", "-v", "--size", "1M", "--rate", "0",
                            "--breaks", "0"], env=_env(), capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.splitlines()[-1].startswith("  RESULT: the session survived"), p.stdout
        assert "both directions finished" in p.stderr, p.stderr
        assert "server shutting down" not in p.stderr and "link lost" not in p.stderr, p.stderr
