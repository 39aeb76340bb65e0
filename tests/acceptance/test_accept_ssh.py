"""OpenSSH through icafast: sshd is the backend, ssh the application, and the link between
``icafast connect`` and ``icafast serve`` is reset, blackholed and taken down under them."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from acceptance_rig import Rig, icafast_connect_stdio_cmd, need, run_bounded

pytestmark = pytest.mark.acceptance

PAD = "the-quick-brown-fox-jumps-over-the-lazy-dog-0123456789"


def start_sshd(rig: Rig, proxy_command: str | None = None) -> tuple[int, list[str]]:
    """sshd on the server side's 127.0.0.1 with fresh keys; returns (port, ssh argv prefix).
    Through icafast connect --listen, or, with ``proxy_command``, a format string of the
    ProxyCommand given the server's address (``{server}``): no local port (0)."""
    progs = need("sshd", "ssh", "ssh-keygen")
    d: Path = rig.tmp / "ssh"
    d.mkdir()
    run_bounded([progs["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")])
    run_bounded([progs["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(d / "userkey")])
    (d / "authorized_keys").write_bytes((d / "userkey.pub").read_bytes())
    with contextlib.suppress(OSError):  # privilege separation directory (as root)
        os.makedirs("/run/sshd", exist_ok=True)
    port = rig.port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'hostkey'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile none\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
        "ClientAliveInterval 0\nMaxStartups 10:30:60\n")
    sshd = rig.spawn("server", "sshd", [progs["sshd"], "-D", "-e", "-f", str(d / "sshd_config")])
    rig.wait_listening("server", port, sshd)
    proxy: list[str] = []
    if proxy_command is None:
        local = rig.start_relay(port)
    else:
        local = 0
        proxy = ["-o", "ProxyCommand=" + proxy_command.format(server=rig.start_server(port))]
    ssh = [progs["ssh"], "-F", "/dev/null", "-T", *proxy, "-p", str(local or port),
           "-i", str(d / "userkey"),
           "-l", getpass.getuser(), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "127.0.0.1"]
    return local, ssh


class Collector(threading.Thread):
    """Reads a pipe to its end, hashing and (optionally) keeping what it reads; bounded rate."""

    def __init__(self, pipe, keep: bool, rate: float = 0.0, chunk: int = 65536) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.keep = keep
        self.rate = rate
        self.chunk = chunk
        self.data = bytearray()
        self.count = 0
        self.sha = hashlib.sha256()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                b = self.pipe.read1(self.chunk) if hasattr(self.pipe, "read1") else \
                    self.pipe.read(self.chunk)
                if not b:
                    return
                self.count += len(b)
                self.sha.update(b)
                if self.keep:
                    self.data += b
                if self.rate:
                    time.sleep(len(b) / self.rate)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _both_directions_move(out: Collector, err: Collector, before_out: int, before_in: int,
                          why: Any) -> None:
    """After a break, both directions move again within 20 s (``why()``: the failure's text):
    ``out`` beyond ``before_out`` bytes, and ``err`` (what came back of the input) beyond
    ``before_in``."""
    end = time.monotonic() + 20
    while time.monotonic() < end and not (out.count > before_out and err.count > before_in):
        time.sleep(0.02)
    assert out.count > before_out and err.count > before_in, why()


def test_ssh_interactive_session_survives_link_kills(rig: Rig) -> None:
    """Paced output and paced echoed input through 12 breaks (6 RST, 4 blackholes, 2 outages):
    ssh exits 0 and both streams are byte-identical."""
    _local, ssh = start_sshd(rig)
    # stdout: numbered lines for as long as stdin is open, then END <count>.
    # stderr: exactly the bytes of stdin (cat), so every input byte is checked.
    remote = ("exec 3<&0; cat <&3 >&2 & c=$!; i=0; "
              "while kill -0 $c 2>/dev/null; do "
              f"printf 'out %06d {PAD}\\n' $i; i=$((i+1)); sleep 0.02; done; "
              "wait $c; printf 'END %d\\n' $i")
    p = rig.spawn("client", "ssh", [*ssh, remote], log=False, stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Collector(p.p.stdout, keep=True)
    err = Collector(p.p.stderr, keep=True)
    out.start()
    err.start()

    stop = threading.Event()
    sent = bytearray()
    rng = random.Random(1494)

    def writer() -> None:
        assert p.p.stdin is not None
        try:
            for _ in range(20_000):  # bounded: at most ~400 s at 50 writes/s
                if stop.is_set():
                    break
                data = rng.randbytes(rng.randint(1, 1500))
                p.p.stdin.write(data)
                p.p.stdin.flush()
                sent.extend(data)
                time.sleep(0.02)
        except OSError:
            pass  # ssh is gone: the test reports it
        finally:
            with contextlib.suppress(OSError):
                p.p.stdin.close()

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        # the session is up once the first output line arrives
        end = time.monotonic() + 30
        while out.count == 0 and time.monotonic() < end and p.alive():
            time.sleep(0.05)
        assert out.count > 0, f"no output from ssh: {bytes(err.data)!r}\n{rig.logs()}"
        assert rig.new_sessions() == 1
        schedule = ["reset", "blackhole", "reset", "outage", "reset", "blackhole", "reset",
                    "blackhole", "reset", "outage", "reset", "blackhole"]
        for i, kind in enumerate(schedule):
            before_out, before_in = out.count, len(sent)
            killed = rig.fault(kind)
            if kind == "reset":
                assert killed >= 1, f"fault {i}: no link to reset\n{rig.logs()}"
            rig.wait_resumes(i + 1)
            _both_directions_move(
                out, err, before_out, before_in,
                lambda i=i, kind=kind: f"stream stalled after fault {i} ({kind})\n{rig.logs()}")
            time.sleep(0.2)
    finally:
        stop.set()
        w.join(30)
    rc = p.p.wait(60)
    out.join(30)
    err.join(30)
    assert out.error is None and err.error is None

    text = bytes(out.data).decode()
    m = re.search(r"END (\d+)\n\Z", text)
    assert rc == 0, f"ssh exit {rc}; stderr tail {bytes(err.data)[-300:]!r}\n{rig.logs()}"
    assert m, f"no END line; stdout tail {text[-300:]!r}"
    n = int(m.group(1))
    expected = "".join(f"out {i:06d} {PAD}\n" for i in range(n)) + f"END {n}\n"
    assert n > 100
    assert text == expected, "remote output lost, duplicated or reordered"
    assert bytes(err.data) == bytes(sent), (
        f"echoed input differs: sent {len(sent)} bytes, got {len(err.data)}")
    assert rig.new_sessions() == 1, "a break made a new session instead of resuming"
    assert rig.resumes() >= len(schedule)
    up, down = rig.replayed()
    assert up > 0 and down > 0, f"no data in flight at a break: replayed {up}/{down}"
    rig.check_icafast_logs()


SIZE = 20_000_000
RATE = 4_000_000  # bytes/s each way, paced by the senders, so that the breaks land mid-transfer

PACER = """\
import sys, time
rate = float(sys.argv[2])
out = sys.stdout.buffer
with open(sys.argv[1], "rb") as f:
    while True:
        b = f.read(65536)
        if not b:
            break
        out.write(b)
        out.flush()
        time.sleep(len(b) / rate)
"""


def test_ssh_20mb_each_way_sha256_through_link_kills(rig: Rig) -> None:
    """20 MB up and 20 MB down at the same time in one ssh session, each paced by its sender,
    broken 5 times on the way (RST, blackhole, RST, outage, RST); the SHA-256 of what each side
    sent equals what the other side received, and data in flight was replayed both ways."""
    _both_ways_through(rig, ["reset", "blackhole", "reset", "outage", "reset"])


def test_ssh_20mb_each_way_sha256_through_upgrades_in_place(rig: Rig) -> None:
    """The same transfer while ``icafast serve`` is upgraded in place three times (SIGUSR2:
    it runs itself anew in the same process and hands itself the session, sshd's connection
    included), with a link reset between: both hashes match, one session to the end."""
    # (no replay required: a hand-over first lets sshd take what waits for it, and a paced
    # stream has little in flight then)
    _both_ways_through(rig, ["upgrade", "reset", "upgrade", "upgrade"], replay=False)
    assert rig.server is not None and rig.server.count("took over 1 sessions") == 3


def test_ssh_20mb_each_way_sha256_through_client_upgrades_in_place(rig: Rig) -> None:
    """The same transfer while ``icafast connect`` is upgraded in place three times (SIGUSR2:
    it hands itself the session, ssh's connection included, and resumes it), with a server
    upgrade and a link reset between: both hashes match, one session to the end."""
    _both_ways_through(rig, ["upgrade-client", "reset", "upgrade-client", "upgrade",
                             "upgrade-client"], replay=False)
    assert rig.client is not None and rig.client.count("took over 1 sessions") == 3


def _both_ways_through(rig: Rig, kinds: list[str], replay: bool = True) -> None:
    _local, ssh = start_sshd(rig)
    d = rig.tmp / "xfer"
    d.mkdir()
    down = d / "down"
    pacer = d / "pace.py"
    pacer.write_text(PACER)
    # Remote: DOWN <sha of the file it sends> on stderr, then the file on stdout at RATE, while
    # UP <sha of stdin> is computed concurrently, also to stderr.
    remote = (f"head -c {SIZE} /dev/urandom > {down} && "
              f"printf 'DOWN %s\\n' $(sha256sum < {down} | cut -c1-64) >&2; "
              "exec 3<&0; (printf 'UP %s\\n' $(sha256sum <&3 | cut -c1-64) >&2) & "
              f"{sys.executable} {pacer} {down} {RATE}; wait")
    p = rig.spawn("client", "ssh", [*ssh, remote], log=False, stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Collector(p.p.stdout, keep=False)
    err = Collector(p.p.stderr, keep=True)
    out.start()
    err.start()
    up_sha = hashlib.sha256()
    up_sent = [0]

    def writer() -> None:
        assert p.p.stdin is not None
        rng = random.Random(2598)
        chunk = 64 * 1024
        try:
            while up_sent[0] < SIZE:  # bounded by SIZE
                data = rng.randbytes(min(chunk, SIZE - up_sent[0]))
                p.p.stdin.write(data)
                p.p.stdin.flush()
                up_sha.update(data)
                up_sent[0] += len(data)
                time.sleep(len(data) / RATE)
        except OSError:
            pass  # ssh is gone: the test reports it
        finally:
            with contextlib.suppress(OSError):
                p.p.stdin.close()

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    mid_both = 0
    try:
        end = time.monotonic() + 30
        while out.count < 1_000_000 and time.monotonic() < end and p.alive():
            time.sleep(0.02)
        assert out.count >= 1_000_000, f"download did not start\n{rig.logs()}"
        for i, kind in enumerate(kinds):
            if 0 < up_sent[0] < SIZE and 0 < out.count < SIZE:
                mid_both += 1
            killed = rig.fault(kind)
            if kind == "reset":
                assert killed >= 1
            rig.wait_resumes(i + 1)
            time.sleep(0.3)
    finally:
        w.join(120)
    rc = p.p.wait(120)
    out.join(30)
    err.join(30)
    msgs = bytes(err.data).decode(errors="replace")
    assert rc == 0, f"ssh exit {rc}: {msgs}\n{rig.logs()}"
    assert out.error is None and err.error is None
    hashes = dict(line.split() for line in msgs.splitlines() if line.startswith(("UP", "DOWN")))
    assert up_sent[0] == SIZE and out.count == SIZE, (up_sent[0], out.count)
    assert hashes.get("UP") == up_sha.hexdigest(), "upload corrupted"
    assert hashes.get("DOWN") == out.sha.hexdigest(), "download corrupted"
    assert mid_both >= 3, f"only {mid_both} breaks landed while both directions were flowing"
    up, down_replayed = rig.replayed()
    assert not replay or (up > 0 and down_replayed > 0), \
        f"no data in flight at a break: replayed {up}/{down_replayed}"
    assert rig.new_sessions() == 1
    rig.check_icafast_logs()


def test_ssh_proxycommand_stdio_survives_link_resets(rig: Rig) -> None:
    """ssh with ``ProxyCommand=icafast connect --stdio ...`` (no local port): paced output and
    echoed input through three ``ss -K`` resets of the link (kernel resets in the network
    namespaces, else through the loopback fault proxy); both streams are byte-identical, ssh
    exits 0, and the ProxyCommand then ends the session on the server (ssh stops it with
    SIGHUP) without a traceback."""
    log = rig.tmp / "icafast-stdio.log"
    pidfile = rig.tmp / "icafast-stdio.pid"
    # (its log to a file of its own: ssh gives its ProxyCommand its own standard error, which
    # here carries the echoed input)
    # (ssh runs "exec COMMAND" in a shell: the pid is written by a shell of its own)
    inner = (f"echo $$ > {shlex.quote(str(pidfile))}; exec "
             f"{shlex.join(icafast_connect_stdio_cmd('SERVER'))} -v "
             f"2>>{shlex.quote(str(log))}")
    proxy = "sh -c " + shlex.quote(inner).replace("SERVER", "{server}")
    _port, ssh = start_sshd(rig, proxy_command=proxy)
    remote = ("exec 3<&0; cat <&3 >&2 & c=$!; i=0; "
              "while kill -0 $c 2>/dev/null; do "
              f"printf 'out %06d {PAD}\\n' $i; i=$((i+1)); sleep 0.02; done; "
              "wait $c; printf 'END %d\\n' $i")
    p = rig.spawn("client", "ssh", [*ssh, remote], log=False, stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Collector(p.p.stdout, keep=True)
    err = Collector(p.p.stderr, keep=True)
    out.start()
    err.start()
    sent = bytearray()
    stop = threading.Event()
    rng = random.Random(22)

    def writer() -> None:
        assert p.p.stdin is not None
        try:
            for _ in range(20_000):  # bounded
                if stop.is_set():
                    break
                data = rng.randbytes(rng.randint(1, 3000))
                p.p.stdin.write(data)
                p.p.stdin.flush()
                sent.extend(data)
                time.sleep(0.01)
        except OSError:
            pass  # ssh is gone: the test reports it
        finally:
            with contextlib.suppress(OSError):
                p.p.stdin.close()

    def stdio_log() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        end = time.monotonic() + 30
        while out.count == 0 and time.monotonic() < end and p.alive():
            time.sleep(0.05)
        assert out.count > 0, f"no output from ssh: {bytes(err.data)!r}\n{stdio_log()}"
        for i in range(3):
            before_out, before_in = out.count, len(sent)
            assert rig.fault("reset") >= 1, f"reset {i}: no link to reset\n{rig.logs()}"
            rig.wait_resumes(i + 1)
            _both_directions_move(
                out, err, before_out, before_in,
                lambda i=i: f"stream stalled after reset {i}\n{rig.logs()}\n{stdio_log()}")
            time.sleep(0.3)
    finally:
        stop.set()
        w.join(30)
        rc = p.p.wait(60)
        out.join(30)
        err.join(30)
        # the ProxyCommand ends once ssh is gone (by SIGHUP from ssh): wait, then make sure
        end = time.monotonic() + 10
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        pid = int(text) if text.isdigit() else 0
        while pid and time.monotonic() < end and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        lingering = bool(pid) and os.path.exists(f"/proc/{pid}")
        if lingering:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = bytes(out.data).decode()
    m = re.search(r"END (\d+)\n\Z", text)
    assert rc == 0, f"ssh exit {rc}; stderr tail {bytes(err.data)[-300:]!r}\n{stdio_log()}"
    assert m, f"no END line; stdout tail {text[-300:]!r}"
    n = int(m.group(1))
    assert text == "".join(f"out {i:06d} {PAD}\n" for i in range(n)) + f"END {n}\n"
    assert bytes(err.data) == bytes(sent), "echoed input lost, duplicated or reordered"
    assert not lingering, f"the ProxyCommand did not end after ssh\n{stdio_log()}"
    stdio = stdio_log()
    assert stdio.count("resumed on link") >= 3 and "Traceback" not in stdio, stdio
    assert rig.new_sessions() == 1
    # the session ended on the server too, not left DISCONNECTED until the timeout
    assert rig.server is not None
    rig.server.wait_for("closed (", timeout=10)
    rig.check_icafast_logs()


def test_ssh_proxycommand_stdio_ends_each_session_as_ssh_does(rig: Rig) -> None:
    """ssh through ``ProxyCommand=icafast connect --stdio ...``, run to its end several times:
    as it exits, ssh closes the ProxyCommand's input and sends it SIGHUP at once; its last
    message (the disconnect) still reaches sshd, and each session ends gracefully on the
    server. Then a server that refuses: ssh's user sees the ProxyCommand's line saying why."""
    # (--connect-retry: the refused ssh at the end gives up within a second)
    proxy = shlex.join([*icafast_connect_stdio_cmd("SERVER"), "--connect-retry", "1"])
    _port, ssh = start_sshd(rig, proxy_command=proxy.replace("SERVER", "{server}"))
    ssh = [*rig.net.prefix("client"), *ssh]
    sshd = next(p for p in rig.procs if p.name == "sshd")
    runs = 5
    for i in range(runs):
        r = run_bounded([*ssh, f"echo run {i}"], check=False)
        assert r.returncode == 0 and r.stdout == f"run {i}\n", (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert rig.server is not None
    rig.server.wait_for("closed (", count=runs, timeout=10)
    sshd.wait_for("Received disconnect", count=runs, timeout=10)
    assert rig.server.count("closed (both directions finished)") == runs, rig.server.text()
    # the server goes away: the next ssh gets the reason on its standard error
    rig.server.stop()
    r = run_bounded([*ssh, "true"], check=False, timeout=60)
    assert r.returncode == 255, (r.returncode, r.stderr)
    assert "icafast connect: session ended abortively: could not connect" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    rig.check_icafast_logs()
