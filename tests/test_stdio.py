"""``icafast connect --stdio``: one session over standard input and output (an ssh
ProxyCommand), run as separate processes on loopback (each stopped by its pid)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_helpers import free_port, stop_process

from icafast.faults import FaultProxy

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors and signals")

PY = sys.executable
FAST = ["--keepalive-interval", "0.5", "--dead-timeout", "2"]


def _stream(seed: int, size: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    rnd = random.Random(seed)
    left = size
    while left:
        n = min(chunk, left)
        yield rnd.randbytes(n)
        left -= n


def _digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for b in _stream(seed, size):
        h.update(b)
    return h.hexdigest()


class _LoopThread:
    """An event loop in a thread, for the fault proxy."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.t.start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Any) -> Any:
        async def call() -> Any:
            return fn()
        return self.call(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(10)
        self.loop.close()


class _Backend:
    """A backend that takes one connection and runs ``serve(conn)`` on it in a thread."""

    def __init__(self, serve: Any) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.serve = serve
        self.conn: socket.socket | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            self.srv.settimeout(60)
            conn, _ = self.srv.accept()
            self.conn = conn
            with conn:
                self.serve(conn)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.done.set()

    def close(self) -> None:
        self.srv.close()
        self.t.join(10)


class _Checked:
    """Backend side of a checked stream: sends ``size`` seeded bytes and half-closes, hashes
    everything it receives until end of file."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed, self.size = seed, size
        self.received = hashlib.sha256()
        self.count = 0

    def __call__(self, conn: socket.socket) -> None:
        def send() -> None:
            for b in _stream(self.seed, self.size):
                conn.sendall(b)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            b = conn.recv(256 * 1024)
            if not b:
                break
            self.count += len(b)
            self.received.update(b)
        sender.join(60)


class _Server:
    """``icafast serve`` with TLS (its self-signed certificate, pinned by the client)."""

    def __init__(self, tmp: Path, backend_port: int, *extra: str) -> None:
        self.port = free_port()
        self.lines: list[str] = []
        self.p = subprocess.Popen(
            [PY, "-m", "icafast", "serve", "--listen", f"127.0.0.1:{self.port}", "--backend",
             f"127.0.0.1:{backend_port}", "--control", str(tmp / "control.sock"),
             "--state-dir", str(tmp / "state"), *FAST, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        self.wait_for("listening on")
        m = re.search(r"--tls-fingerprint ([0-9a-f]{64})", self.text())
        self.fingerprint = m.group(1) if m else ""

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not seen:\n{self.text()}")

    def stop(self) -> str:
        stop_process(self.p, close_pipes=False)
        self.t.join(5)
        stop_process(self.p)
        return self.text()

    def tls(self) -> list[str]:
        return ["--tls-fingerprint", self.fingerprint]


def _connect(port: int, *extra: str, **popen: Any) -> subprocess.Popen[bytes]:
    kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                          "stderr": subprocess.PIPE}
    kw.update(popen)
    return subprocess.Popen([PY, "-m", "icafast", "connect", "--stdio", "--server",
                             f"127.0.0.1:{port}", *FAST, *extra], **kw)


class _Drain(threading.Thread):
    """Reads a pipe to its end (hashing and counting, or keeping what it reads)."""

    def __init__(self, pipe: Any, keep: bool = False, on_count: Any = None) -> None:
        super().__init__(daemon=True)
        self.pipe, self.keep, self.on_count = pipe, keep, on_count
        self.sha = hashlib.sha256()
        self.count = 0
        self.data = bytearray()
        self.start()

    def run(self) -> None:
        while True:
            b = self.pipe.read1(256 * 1024)
            if not b:
                return
            self.count += len(b)
            self.sha.update(b)
            if self.keep:
                self.data += b
            if self.on_count is not None:
                self.on_count(self.count)


def _feed(pipe: Any, seed: int, size: int, close: bool = True) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(BrokenPipeError):
            for b in _stream(seed, size):
                pipe.write(b)
            if close:
                pipe.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _finish(p: subprocess.Popen[bytes], err: _Drain, timeout: float = 60.0) -> tuple[int, str]:
    try:
        rc = p.wait(timeout)
    finally:
        stop_process(p, close_pipes=False)
        err.join(5)
        stop_process(p)
    return rc, err.data.decode(errors="replace")


def test_stdio_carries_a_checked_stream_both_ways_across_link_breaks(tmp_path):
    """16 MiB each way, seeded, through TLS and a fault proxy that resets the link twice while
    the stream flows: what the backend sent reaches standard output unchanged, what standard
    input gave reaches the backend unchanged, and end of file on standard input (with the
    backend's own end) ends the session gracefully: exit status 0."""
    size = 16 * 1024 * 1024
    checked = _Checked(seed=7, size=size)
    backend = _Backend(checked)
    server = _Server(tmp_path, backend.port)
    lt = _LoopThread()
    proxy = lt.call(FaultProxy("127.0.0.1", server.port).start())
    resets: list[int] = []

    def maybe_break(count: int) -> None:  # (at 3 MiB and 9 MiB received)
        if len(resets) < 2 and count >= (3 + 6 * len(resets)) * 1024 * 1024:
            resets.append(lt.run(proxy.reset))

    p = _connect(proxy.port, *server.tls(), "-v")
    try:
        err = _Drain(p.stderr, keep=True)
        out = _Drain(p.stdout, on_count=maybe_break)
        feeder = _feed(p.stdin, seed=8, size=size)
        rc, log = _finish(p, err, timeout=120)
        out.join(10)
        feeder.join(10)
        backend.done.wait(30)
    finally:
        stop_process(p)
        lt.call(proxy.close())
        lt.close()
        slog = server.stop()
        backend.close()
    assert backend.error is None, backend.error
    assert rc == 0, log
    assert resets == [1, 1], resets
    assert out.count == size and out.sha.hexdigest() == _digest(7, size)
    assert checked.count == size and checked.received.hexdigest() == _digest(8, size)
    assert log.count("resumed on link") == 2, log
    assert "Traceback" not in log + slog, log + slog
    assert "closed (peer closed: both directions finished)" in log, log
    assert "closed (both directions finished)" in slog, slog


def test_stdio_output_is_the_stream_only_and_end_of_file_half_closes(tmp_path):
    """Standard output has the backend's bytes and nothing else (the log, -v included, goes to
    standard error); end of file on standard input reaches the backend as end of file while
    the backend goes on writing, and the backend's end of file ends standard output."""
    def serve(conn: socket.socket) -> None:
        got = bytearray()
        while b := conn.recv(65536):
            got += b
        conn.sendall(b"you said: " + bytes(got))  # after the client's end of file
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(10) == b""

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls", "-vv")
    try:
        err = _Drain(p.stderr, keep=True)
        out = _Drain(p.stdout, keep=True)
        p.stdin.write(b"hello\n")
        p.stdin.close()
        rc, log = _finish(p, err)
        out.join(10)
    finally:
        stop_process(p)
        server.stop()
        backend.close()
    assert backend.error is None, backend.error
    assert rc == 0, log
    assert bytes(out.data) == b"you said: hello\n", (out.data, log)
    assert "new session active" in log and "DEBUG" in log, log


def test_stdio_takes_its_settings_from_a_config_file(tmp_path):
    """--config works with --stdio as with --listen; the file's listen key (there for other
    uses of the file) is not used."""
    def echo(conn: socket.socket) -> None:
        while b := conn.recv(65536):
            conn.sendall(b)
        conn.shutdown(socket.SHUT_WR)

    backend = _Backend(echo)
    server = _Server(tmp_path, backend.port, "--no-tls")
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'server = "127.0.0.1:{server.port}"\nno_tls = true\n'
                   'listen = "127.0.0.1:1"\ndead_timeout = 5\n')
    try:
        r = subprocess.run([PY, "-m", "icafast", "connect", "--stdio", "-q", "--config",
                            str(cfg)], input=b"configured\n", capture_output=True, timeout=30)
    finally:
        server.stop()
        backend.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"configured\n" and r.stderr == b""


def test_stdio_over_files_and_a_socket(tmp_path):
    """Standard input and output may be regular files, or one socket (as inetd or socat
    give): its end of file toward the application is a half-close."""
    def echo(conn: socket.socket) -> None:
        while b := conn.recv(65536):
            conn.sendall(b)
        conn.shutdown(socket.SHUT_WR)

    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    (tmp_path / "in").write_bytes(data)
    backend = _Backend(echo)
    server = _Server(tmp_path, backend.port, "--no-tls")
    try:
        with open(tmp_path / "in", "rb") as fin, open(tmp_path / "out", "wb") as fout:
            r = subprocess.run([PY, "-m", "icafast", "connect", "--stdio", "--no-tls", "-q",
                                "--server", f"127.0.0.1:{server.port}"], stdin=fin,
                               stdout=fout, stderr=subprocess.PIPE, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stderr == b""  # (-q: nothing to say)
        assert (tmp_path / "out").read_bytes() == data
        backend.done.wait(10)
        backend.close()
        backend = _Backend(echo)
        server.stop()
        server = _Server(tmp_path, backend.port, "--no-tls")
        mine, theirs = socket.socketpair()
        with mine, theirs:
            p = subprocess.Popen([PY, "-m", "icafast", "connect", "--stdio", "--no-tls",
                                  "--server", f"127.0.0.1:{server.port}"], stdin=theirs,
                                 stdout=theirs, stderr=subprocess.PIPE)
            theirs.close()
            try:
                err = _Drain(p.stderr, keep=True)
                mine.sendall(data)
                mine.shutdown(socket.SHUT_WR)
                got = bytearray()
                mine.settimeout(30)
                while b := mine.recv(65536):
                    got += b
                rc, log = _finish(p, err)
            finally:
                stop_process(p)
        assert rc == 0, log
        assert bytes(got) == data
    finally:
        server.stop()
        backend.close()


def test_stdio_descriptors_left_non_blocking(tmp_path):
    """Pipes that another process sharing them made non-blocking (O_NONBLOCK belongs to the
    open file, not to the descriptor): reads and writes wait for them instead of failing with
    EAGAIN."""
    def echo(conn: socket.socket) -> None:
        while b := conn.recv(65536):
            conn.sendall(b)
        conn.shutdown(socket.SHUT_WR)

    backend = _Backend(echo)
    server = _Server(tmp_path, backend.port, "--no-tls")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.set_blocking(in_r, False)
    os.set_blocking(out_w, False)
    data = random.Random(5).randbytes(4 * 1024 * 1024)
    p = subprocess.Popen([PY, "-m", "icafast", "connect", "--stdio", "--no-tls", "-q",
                          "--server", f"127.0.0.1:{server.port}"], stdin=in_r, stdout=out_w,
                         stderr=subprocess.PIPE)
    os.close(in_r)
    os.close(out_w)
    try:
        err = _Drain(p.stderr, keep=True)

        def feed() -> None:
            with open(in_w, "wb") as f:
                time.sleep(0.3)  # (nothing to read at first: EAGAIN)
                for i in range(0, len(data), 65536):
                    f.write(data[i:i + 65536])
                    f.flush()

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        got = bytearray()
        with open(out_r, "rb") as f:
            time.sleep(1.0)  # (the pipe fills: EAGAIN on writes)
            while b := f.read(65536):
                got += b
        t.join(10)
        rc, log = _finish(p, err)
    finally:
        stop_process(p)
        server.stop()
        backend.close()
    assert rc == 0, log
    assert bytes(got) == data


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["default", "-q"])
def test_stdio_backend_reset_exits_1_with_one_line(tmp_path, quiet):
    """Standard error is the terminal of ssh's user: without -q too, only warnings and errors
    reach it (not the INFO lines of the start and of each link), here the one line."""
    def serve(conn: socket.socket) -> None:
        conn.sendall(b"bye\n")
        time.sleep(0.5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls", *quiet)
    try:
        err = _Drain(p.stderr, keep=True)
        out = _Drain(p.stdout, keep=True)
        rc, log = _finish(p, err)  # (standard input stays open)
        out.join(10)
    finally:
        stop_process(p)
        server.stop()
        backend.close()
    assert rc == 1, log
    assert bytes(out.data) == b"bye\n"
    # (the one line, and nothing else)
    assert log.startswith("icafast connect: session ended abortively: ") and \
        log.count("\n") == 1 and "backend connection reset" in log, log


def test_stdio_reliability_timeout_and_server_shutdown_exit_1(tmp_path):
    """A link that stays down past the server's reliability timeout, and a server that shuts
    down, end the session abortively: exit status 1 and one line saying so (-q)."""
    def serve(conn: socket.socket) -> None:
        conn.sendall(b"hi\n")
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls", "--reliability-timeout", "1")
    lt = _LoopThread()
    proxy = lt.call(FaultProxy("127.0.0.1", server.port).start())
    p = _connect(proxy.port, "--no-tls", "-q")
    try:
        err = _Drain(p.stderr, keep=True)
        assert p.stdout.read(3) == b"hi\n"
        def cut() -> None:
            proxy.refuse_new = True
            proxy.reset()
        lt.run(cut)
        rc, log = _finish(p, err, timeout=30)
    finally:
        stop_process(p)
        lt.call(proxy.close())
        lt.close()
        server.stop()
        backend.close()
    assert rc == 1 and log.count("\n") == 1, log
    assert log.startswith("icafast connect: session ended abortively: ") and "timeout" in log, log

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls", "-q")
    try:
        err = _Drain(p.stderr, keep=True)
        assert p.stdout.read(3) == b"hi\n"
        server.stop()
        rc, log = _finish(p, err, timeout=30)
    finally:
        stop_process(p)
        server.stop()
        backend.close()
    assert rc == 1 and log.count("\n") == 1, log
    assert log.startswith("icafast connect: session ended abortively: ") and \
        "server shutting down" in log, log


def test_stdio_unreachable_server_exits_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # (refuses: bound, not listening)
        p = _connect(s.getsockname()[1], "--no-tls", "-q", "--connect-retry", "0.5")
        err = _Drain(p.stderr, keep=True)
        rc, log = _finish(p, err, timeout=30)
    assert rc == 1 and "Traceback" not in log, log
    assert log.startswith("icafast connect: session ended abortively: ") and \
        log.count("\n") == 1, log


def test_stdio_output_closed_by_its_reader_ends_the_session(tmp_path):
    """The reader of standard output goes away (ssh exits): EPIPE ends the session abortively,
    the server closes the backend connection, and the exit is status 1 without a traceback."""
    backend_closed = threading.Event()

    def serve(conn: socket.socket) -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(chunk)
        backend_closed.set()

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls")
    try:
        err = _Drain(p.stderr, keep=True)
        assert p.stdout.read(100000)
        p.stdout.close()
        rc, log = _finish(p, err, timeout=30)
        assert backend_closed.wait(10), server.text()
    finally:
        stop_process(p)
        server.stop()
        backend.close()
    assert rc == 1, log
    assert "Traceback" not in log, log
    assert log.splitlines()[-1] == ("icafast connect: session ended abortively: cannot write "
                                    "to standard output: Broken pipe"), log


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_stdio_stops_on_a_signal_closing_the_session_on_the_server(tmp_path, sig):
    """As ssh ends its ProxyCommand (SIGHUP), or a user does: the session is closed on the
    server too (its backend connection at once), and the exit status is 0. SIGUSR2 before it
    (an upgrade of every icafast on the host) is logged and ignored: its default action
    would end the process and the session."""
    backend_eof = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"ready\n")
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        backend_eof.set()

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls", "-v")
    try:
        err = _Drain(p.stderr, keep=True)
        assert p.stdout.read(6) == b"ready\n"
        if hasattr(signal, "SIGUSR2"):
            os.kill(p.pid, signal.SIGUSR2)
        os.kill(p.pid, getattr(signal, sig))
        rc, log = _finish(p, err, timeout=20)
        assert backend_eof.wait(5), server.text()
    finally:
        stop_process(p)
        slog = server.stop()
        backend.close()
    assert rc == 0, log
    assert f"shutting down ({sig})" in log and "Traceback" not in log, log
    assert "closed (peer closed: client shutting down)" in slog, slog
    assert not hasattr(signal, "SIGUSR2") or "SIGUSR2: ignored (icafast connect --stdio" in log


def test_stdio_sighup_after_end_of_input_lets_the_last_input_through(tmp_path):
    """As ssh exits: it closes its ProxyCommand's standard input, then sends SIGHUP at once.
    What it wrote last (its disconnect message) reaches the backend, and the session ends
    gracefully when the backend answers the end of its input by closing, as sshd does; the
    session used to be closed abortively at once, what was still on its way to the server
    lost (sshd logged a reset instead of the disconnect)."""
    size = 1024 * 1024
    got = hashlib.sha256()
    count = 0
    signalled = threading.Event()

    def serve(conn: socket.socket) -> None:
        # sends nothing; not reading at first (the input is still on its way at SIGHUP), then
        # everything until end of file (or a reset), and closes, as sshd after a disconnect
        nonlocal count
        signalled.wait(20)
        time.sleep(0.4)  # (the old way, the session had been closed by then)
        with contextlib.suppress(OSError):
            while b := conn.recv(256 * 1024):
                count += len(b)
                got.update(b)

    backend = _Backend(serve)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls", "-v")
    try:
        err = _Drain(p.stderr, keep=True)
        out = _Drain(p.stdout)
        assert p.stdin is not None
        for b in _stream(8, size):
            p.stdin.write(b)
        p.stdin.close()  # (the last bytes are still on their way: in the pipe, the relay)
        os.kill(p.pid, signal.SIGHUP)
        signalled.set()
        rc, log = _finish(p, err, timeout=20)
        out.join(5)
        assert backend.done.wait(10), server.text()
    finally:
        stop_process(p)
        slog = server.stop()
        backend.close()
    assert rc == 0 and "Traceback" not in log, log
    assert count == size and got.hexdigest() == _digest(8, size), \
        f"the backend got {count} of {size} bytes\n{log}\n{slog}"
    assert "closed (both directions finished)" in slog, slog


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc")
def test_stdio_slow_output_is_back_pressure_not_memory(tmp_path):
    """A reader of standard output that does not keep up stops the backend's stream (the
    session stops acknowledging) rather than growing the client's memory; then all of it
    arrives."""
    size = 160 * 1024 * 1024
    checked = _Checked(seed=11, size=size)
    backend = _Backend(checked)
    server = _Server(tmp_path, backend.port, "--no-tls")
    p = _connect(server.port, "--no-tls", "-q")
    try:
        err = _Drain(p.stderr, keep=True)
        assert p.stdout.read(1)
        start = _rss(p.pid)
        peak = 0
        for _ in range(30):  # 3 s of not reading
            time.sleep(0.1)
            peak = max(peak, _rss(p.pid))
        p.stdin.close()
        rest = _Drain(p.stdout)
        rc, log = _finish(p, err, timeout=60)
        rest.join(10)
    finally:
        stop_process(p)
        server.stop()
        backend.close()
    assert rc == 0, log
    assert rest.count + 1 == size
    # (the replay limit, 8 MiB, and the buffers between: far below the 160 MiB offered)
    assert peak - start < 48 * 1024 * 1024, (start, peak)


@pytest.mark.parametrize("args, message", [
    (["--listen", "127.0.0.1:0"], "not allowed with argument"),
])
def test_stdio_usage_errors(args, message):
    r = subprocess.run([PY, "-m", "icafast", "connect", "--stdio", "--server", "127.0.0.1:1",
                        "--no-tls", *args], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_stdio_without_standard_output_is_a_usage_error():
    """Standard output closed when the command starts: its number may be another file's by
    the time the session would write to it. One line, exit status 2."""
    r = subprocess.run([PY, "-m", "icafast", "connect", "--stdio", "--server", "127.0.0.1:1",
                        "--no-tls", "-q"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=30, preexec_fn=lambda: os.close(1))
    assert r.returncode == 2, r.stderr
    assert r.stderr == "icafast connect: --stdio: standard output is not open\n"


def test_stdio_fallback_ends_when_both_streams_have(tmp_path):
    """Without a server, --fallback relays straight to the fallback address; once both streams
    have ended (end of file each way) the command exits 0 (the plain connection, half-closed
    both ways, used to keep it running for good)."""
    def echo(conn: socket.socket) -> None:
        while b := conn.recv(65536):
            conn.sendall(b)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            conn.recv(1)

    backend = _Backend(echo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # (refuses: bound, not listening)
        try:
            r = subprocess.run([PY, "-m", "icafast", "connect", "--stdio", "--no-tls", "-q",
                                "--server", f"127.0.0.1:{s.getsockname()[1]}", "--fallback",
                                f"127.0.0.1:{backend.port}"], input=b"plain\n",
                               capture_output=True, timeout=30)
        finally:
            backend.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"plain\n"
    assert b"WITHOUT session reliability" in r.stderr


def test_stdio_is_in_the_help():
    out = subprocess.run([PY, "-m", "icafast", "connect", "--help"], capture_output=True,
                         text=True, timeout=30, check=True, env={**os.environ,
                                                                 "COLUMNS": "1000"}).stdout
    assert "--stdio" in out and "ProxyCommand" in out


def test_stdio_session_as_a_library_leaves_no_thread_or_descriptor(tmp_path):
    """StdioSession run many times in one process, each ended by close() (or by the backend's
    reset) while its standard input stays open (a producer that keeps writing or just holds
    it): the thread copying standard input ends with the session, and with it the descriptor
    and the socket pair; it used to wait in its read until the producer wrote or closed."""
    from relay_helpers import FAST, Backend, Setup, open_fd_count, run_async

    from icafast.aio._relay import abort_with_rst
    from icafast.aio.stdio import StdioSession

    async def scenario() -> None:
        async with Setup(Backend("echo")) as s:
            server = ("127.0.0.1", s.server_port)
            threads, fds = threading.active_count(), open_fd_count()
            held = []
            for i in range(12):
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                held += [in_w, out_r]
                session = StdioSession(server, FAST, stdin_fd=in_r, stdout_fd=out_w)
                await session.start()
                os.set_blocking(out_r, False)
                os.write(in_w, b"ping")  # echoed: the session is up, both ways
                echo = b""
                for _ in range(500):  # bounded: 5 s
                    with contextlib.suppress(BlockingIOError):
                        echo += os.read(out_r, 4)
                    if echo == b"ping":
                        break
                    await asyncio.sleep(0.01)
                assert echo == b"ping"
                if i % 2:
                    await session.close()
                else:  # the backend resets: an abortive end
                    for w in s.backend.writers:
                        abort_with_rst(w.transport)
                    assert await asyncio.wait_for(session.wait(), 5) == 1
            end = time.monotonic() + 5
            while time.monotonic() < end and (threading.active_count() > threads
                                              or open_fd_count() > fds + len(held)):
                await asyncio.sleep(0.05)
            left = [t.name for t in threading.enumerate() if t.name.startswith("icafast std")]
            assert not left, f"copying threads left: {left}"
            assert open_fd_count() == fds + len(held), "descriptors left open"
            for fd in held:
                os.close(fd)

    run_async("asyncio", scenario(), timeout=30)


def test_stdio_session_on_one_socket_for_both_directions(tmp_path):
    """One descriptor given as both standard input and output (a connected socket, as a
    program serving connections hands each to a session): end of file on the input used to
    close the descriptor under the thread still writing the backend's answer to it (EBADF, an
    abortive end; or the write went to whatever file next took the number)."""
    from relay_helpers import FAST, Backend, Setup, run_async

    from icafast.aio.stdio import StdioSession

    async def scenario() -> None:
        async with Setup(Backend("echo")) as s:
            for _ in range(3):
                ours, theirs = socket.socketpair()
                fd = ours.detach()  # the session's from start() on
                session = StdioSession(("127.0.0.1", s.server_port), FAST, stdin_fd=fd,
                                       stdout_fd=fd)
                await session.start()
                theirs.setblocking(False)
                data = os.urandom(300_000)
                await asyncio.get_running_loop().sock_sendall(theirs, data)
                theirs.shutdown(socket.SHUT_WR)  # end of file on the session's input at once
                got = bytearray()
                while True:  # the echo, then end of file (the run is bounded)
                    b = await asyncio.get_running_loop().sock_recv(theirs, 65536)
                    if not b:
                        break
                    got += b
                theirs.close()
                assert await asyncio.wait_for(session.wait(), 5) == 0, session.error
                assert bytes(got) == data

    run_async("asyncio", scenario(), timeout=30)


#: where the scripts below run (their ``import icafast``: this checkout's)
_ROOT = str(Path(__file__).resolve().parent.parent)

_RACE = r"""
import os, signal, subprocess, sys, time
from icafast.cli import _ignore_quietly

races = []  # (the race reports that reach the hook of the process: counted, then written)


def count(u, write=sys.unraisablehook):
    if "ignored due to race condition" in str(u.exc_value):
        races.append(u)
    write(u)


sys.unraisablehook = count


def handler(signum, frame):
    pass


if sys.argv[1] == "quiet":
    _ignore_quietly([signal.SIGHUP])  # (its hook stays for the rest of the process)
signal.signal(signal.SIGHUP, handler)
# SIGHUP after SIGHUP from three other processes (a shell's kill in a loop each), while the
# handler here gives way to SIG_IGN and comes back, over and over, for 3 s
hammers = [subprocess.Popen(["sh", "-c", "while kill -HUP %d 2>/dev/null; do :; done"
                             % os.getpid()]) for _ in range(3)]
end, n = time.monotonic() + 3, 0
while time.monotonic() < end and n < 5_000_000:  # (bounded in count and time)
    signal.signal(signal.SIGHUP, handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    n += 1
for h in hammers:
    h.kill()  # (by its pid)
    h.wait(5)
signal.signal(signal.SIGHUP, handler)  # (a last check: a report still pending comes out)


class Other:
    def __del__(self):  # (an exception no one can catch: reported as unraisable)
        raise ValueError("other report")


Other()
print(n, len(races))
"""


_REPORTS = r"""
import signal, sys
from icafast.cli import _ignore_quietly

seen = []
sys.unraisablehook = seen.append
class Other:
    def __del__(self):
        raise ValueError("other report")
Other()  # (an unraisable exception, to learn the type of what the hook is given)
Args = type(seen[0])
sys.unraisablehook = sys.__unraisablehook__
_ignore_quietly([signal.SIGHUP, signal.SIGTERM])
assert signal.getsignal(signal.SIGHUP) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
for exc in (OSError("Signal %d ignored due to race condition" % signal.SIGHUP),
            OSError("Signal %d ignored due to race condition" % signal.SIGTERM),
            OSError("Signal %d ignored due to race condition" % signal.SIGINT),
            ValueError("Signal %d ignored due to race condition" % signal.SIGHUP),
            OSError("something else")):
    sys.unraisablehook(Args((type(exc), exc, None, "reported", None)))
    print("--", file=sys.stderr)
"""


def test_only_the_race_report_of_a_signal_ignored_is_left_out():
    """``_ignore_quietly`` sets SIG_IGN and leaves out CPython's report of a signal that came
    as its handler gave way, for those signals only: a report of another signal, or any
    other unraisable exception, still reaches standard error."""
    p = subprocess.run([sys.executable, "-c", _REPORTS], capture_output=True, text=True,
                       timeout=60, cwd=_ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    parts = p.stderr.split("--\n")
    assert len(parts) == 6, p.stderr
    assert parts[0] == parts[1] == "", p.stderr  # (SIGHUP's and SIGTERM's: left out)
    assert f"Signal {int(signal.SIGINT)} ignored due to race condition" in parts[2]
    assert "ValueError" in parts[3] and "something else" in parts[4]


def test_a_stop_signal_that_comes_as_its_handler_gives_way_is_ignored_quietly():
    """``connect --stdio`` ignores the stop signals once its session is over. A SIGHUP caught
    just as its handler gives way to SIG_IGN made CPython write "Signal 1 ignored due to race
    condition" with a traceback to standard error (seen once in a CI run, in the test below):
    ssh's user would see it. Reproduced with SIGHUP sent over and over while the handler
    gives way to SIG_IGN and comes back, for 3 s: the reports come; once ``_ignore_quietly``
    has run, none does, and any other unraisable exception is still reported."""
    out = {}
    for mode in ("raw", "quiet"):
        p = subprocess.run([sys.executable, "-c", _RACE, mode], capture_output=True,
                           text=True, timeout=60, cwd=_ROOT)
        assert p.returncode == 0, p.stderr[-2000:]
        n, races = map(int, p.stdout.split())
        assert n > 1000 and "other report" in p.stderr, p.stderr[-2000:]  # (still reported)
        assert p.stderr.count("ignored due to race condition") == races, p.stderr[-2000:]
        out[mode] = races
    assert out["quiet"] == 0, out
    if out["raw"] == 0:  # (three or four a run here; none in two CI runs of one day)
        pytest.skip("the race did not show here in 3 s: the quiet run had none either, but "
                    "there was nothing to compare it with")


@pytest.mark.parametrize("case", ["unreachable", "backend reset"])
def test_stdio_says_why_even_when_ssh_sends_sighup_at_end_of_output(tmp_path, case):
    """As ssh does: at end of file on the ProxyCommand's output (the session ended
    abortively), it exits, closing the ProxyCommand's input and sending it SIGHUP at once.
    The one line saying why, and exit status 1, must survive that SIGHUP: the signal used to
    arrive before the line was written (the process was killed by it, the loop's handler gone,
    or it stopped with status 0 as on any signal), and ssh's user saw only ssh's
    "Connection closed by remote host"."""
    results = []
    for _ in range(12):  # (a race each time: several rounds)
        with contextlib.ExitStack() as stack:
            if case == "unreachable":
                s = stack.enter_context(socket.socket())
                s.bind(("127.0.0.1", 0))  # (refuses: bound, not listening)
                port = s.getsockname()[1]
            else:
                def serve(conn: socket.socket) -> None:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

                backend = _Backend(serve)
                stack.callback(backend.close)
                server = _Server(tmp_path, backend.port, "--no-tls")
                stack.callback(server.stop)
                port = server.port
            p = _connect(port, "--no-tls", "--connect-retry", "0.3")
            stack.callback(stop_process, p)
            err = _Drain(p.stderr, keep=True)
            assert p.stdout is not None and p.stdin is not None
            while p.stdout.read1(65536):  # (bounded: the session ends within seconds)
                pass
            p.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGHUP)
            results.append(_finish(p, err, timeout=20))
    for rc, log in results:
        assert rc == 1 and "Traceback" not in log, (rc, log)
        assert log.startswith("icafast connect: session ended abortively: ") and \
            log.count("\n") == 1, log
