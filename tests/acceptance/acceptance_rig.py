"""Machinery of the acceptance tests: real peers (OpenSSH, Redis, iperf3) through
``icafast connect`` -> ``icafast serve``, both run as separate processes, while the link
between them is broken.

Where to break the link, best first:

- ``netns``: two network namespaces made for each test and joined by a veth pair. The backend
  and ``icafast serve`` run in the server namespace (the backend on that namespace's
  127.0.0.1), ``icafast connect`` and the application in the client namespace. Faults are real
  kernel ones: ``ss -K`` (both ends' sockets aborted, the server gets a RST), ``iptables -j
  DROP`` on the server's veth (silent blackhole), ``ip link set down`` (outage). Addresses
  exist only inside those namespaces.
- ``proxy``: everything on 127.0.0.1, the link through ``icafast.faults.FaultProxy`` running
  in a thread of the test process (reset, blackhole, refuse/blackhole new connections).

``netns`` is used when this machine allows it (root, ``ip netns``, veth, iptables and
``ss -K`` in a namespace); ``ICAFAST_ACCEPTANCE_NET=proxy`` (or ``netns``) forces one.

The peers come from Debian packages (``.ci/run`` installs them). A missing one skips its tests
with a reason that says so; nothing is skipped silently.

Every icafast command line is built by ``icafast_serve_cmd`` / ``icafast_connect_cmd`` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import icafast

PY = sys.executable
REPO = str(Path(icafast.__file__).resolve().parent.parent)

# Short timeouts so that a silent blackhole is found within about a second.
FAST = ["--keepalive-interval", "0.2", "--dead-timeout", "1", "--reliability-timeout", "60",
        "--handshake-timeout", "2"]

# A blackhole or an outage must outlast the dead timeout (1 s), or TCP simply retransmits.
BLACKHOLE_S = 1.8
OUTAGE_S = 1.5

APT_HINT = ("the Debian packages that .ci/run installs: apt-get install -y "
            "--no-install-recommends openssh-server openssh-client redis-server redis-tools "
            "iperf3 socat iproute2 iptables")

PEERS = {  # program -> Debian package
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "redis-benchmark": "redis-tools",
    "iperf3": "iperf3",
}

skipped_reasons: list[str] = []


# -- icafast command lines: the ONE place they are built -----------------------------------

@functools.lru_cache(maxsize=1)
def tls_flags() -> tuple[str, ...]:
    """``--no-tls`` when this icafast has it (TLS on by default), else nothing."""
    out = subprocess.run([PY, "-m", "icafast", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env=child_env())
    return ("--no-tls",) if "--no-tls" in out.stdout else ()


def icafast_serve_cmd(listen: str, backend: str, control: str) -> list[str]:
    return [PY, "-m", "icafast", "serve", "--listen", listen, "--backend", backend,
            "--control", control, *FAST, *tls_flags()]


def icafast_connect_cmd(listen: str, server: str) -> list[str]:
    return [PY, "-m", "icafast", "connect", "--listen", listen, "--server", server, *FAST,
            *tls_flags()]


def icafast_connect_stdio_cmd(server: str) -> list[str]:
    """One session over standard input and output (as an ssh ProxyCommand)."""
    return [PY, "-m", "icafast", "connect", "--stdio", "--server", server, *FAST, *tls_flags()]


def child_env() -> dict[str, str]:
    """The environment for every process: the same icafast as this test process imports."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("ICAFAST_PURE_PYTHON", None)
    return env


# -- peers --------------------------------------------------------------------------------

def need(*programs: str) -> dict[str, str]:
    """Paths of the given peer programs; skips the test LOUDLY if one is missing."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    found: dict[str, str] = {}
    for prog in programs:
        path = shutil.which(prog, path=search)
        if path is None:
            msg = (f"ACCEPTANCE TEST NOT RUN: peer program {prog!r} (Debian package "
                   f"{PEERS.get(prog, '?')}) is not installed; the apt step of .ci/run failed "
                   f"or was not run. Install {APT_HINT}")
            skipped_reasons.append(msg)
            pytest.skip(msg)
        found[prog] = path
    return found


# -- processes ----------------------------------------------------------------------------

class Proc:
    """One process a test started; stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log: Path | None, **popen: Any) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._logf = None
        if log is not None:
            self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
            popen.setdefault("stdout", self._logf)
            popen.setdefault("stderr", subprocess.STDOUT)
        popen.setdefault("stdin", subprocess.DEVNULL)
        self.p = subprocess.Popen(argv, env=child_env(), **popen)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_bytes().decode("utf-8", "replace")

    def count(self, needle: str) -> int:
        return self.text().count(needle)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.count(needle) >= count:
                return
            if not self.alive():
                break
            time.sleep(0.05)
        if self.count(needle) >= count:
            return
        raise AssertionError(f"{self.name}: {needle!r} x{count} not seen within {timeout}s "
                             f"(exit {self.p.poll()}); log:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr, self._logf):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def run_bounded(argv: list[str], timeout: float = 30.0, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


# -- the two ways of breaking the link ----------------------------------------------------

_NS_RE = re.compile(r"^icafacc-(\d+)-\d+-(srv|cli)$")
_counter = iter(range(1, 1_000_000))


def wait_until(pred: Any, timeout: float) -> bool:
    """Whether ``pred()`` turned true within ``timeout`` seconds (polled every 20 ms)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_namespaces() -> None:
    """Delete namespaces left by an earlier run of these tests that was killed outright."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class NetnsNet:
    """Server namespace <-veth-> client namespace; kernel faults."""

    mode = "netns"

    def __init__(self) -> None:
        n = next(_counter)
        tag = f"{os.getpid()}-{n}"
        self.srv_ns = f"icafacc-{tag}-srv"
        self.cli_ns = f"icafacc-{tag}-cli"
        short = f"{os.getpid() % 100000}x{n % 1000}"
        self.srv_if = f"ica{short}s"
        self.cli_if = f"ica{short}c"
        self.server_ip = f"10.213.{n % 250}.1"
        self.client_ip = f"10.213.{n % 250}.2"
        self._ports = iter(range(20000, 30000))
        self._rules: list[tuple[str, list[str]]] = []  # (side, iptables rule)
        self._made: list[str] = []
        try:
            self._sh("ip", "netns", "add", self.srv_ns)
            self._made.append(self.srv_ns)
            self._sh("ip", "netns", "add", self.cli_ns)
            self._made.append(self.cli_ns)
            # the veth pair is created with each end already inside its namespace
            self._sh("ip", "link", "add", self.srv_if, "netns", self.srv_ns, "type", "veth",
                     "peer", "name", self.cli_if, "netns", self.cli_ns)
            self._sh("ip", "-n", self.srv_ns, "addr", "add", f"{self.server_ip}/30", "dev",
                     self.srv_if)
            self._sh("ip", "-n", self.cli_ns, "addr", "add", f"{self.client_ip}/30", "dev",
                     self.cli_if)
            for ns, dev in ((self.srv_ns, self.srv_if), (self.cli_ns, self.cli_if)):
                self._sh("ip", "-n", ns, "link", "set", "lo", "up")
                self._sh("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _sh(*argv: str) -> str:
        return run_bounded(list(argv)).stdout

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.srv_ns if side == "server" else self.cli_ns]

    def port(self) -> int:
        return next(self._ports)  # fresh namespaces: nothing else listens there

    def server_listen(self, port: int) -> str:
        return f"{self.server_ip}:{port}"

    def link_target(self, port: int) -> str:
        return f"{self.server_ip}:{port}"

    def listening(self, side: str, port: int) -> bool:
        out = subprocess.run([*self.prefix(side), "ss", "-Hltn", f"sport = :{port}"],
                             capture_output=True, text=True, timeout=30)
        return bool(out.stdout.strip())

    # faults
    def reset(self, server_port: int) -> int:
        """Abort the client's link sockets (``ss -K``): the server gets a RST."""
        out = subprocess.run([*self.prefix("client"), "ss", "-HtnK", "dst", self.server_ip,
                              "dport", "=", f":{server_port}"],
                             capture_output=True, text=True, timeout=30)
        return sum(1 for line in out.stdout.splitlines() if line.strip())

    def blackhole(self, seconds: float) -> None:
        """Drop everything on the server's veth, both ways, silently."""
        with self.blackholed():
            time.sleep(seconds)

    @contextlib.contextmanager
    def blackholed(self, side: str = "server") -> Iterator[None]:
        """Everything on ``side``'s veth dropped, both ways, silently, until the end of the
        ``with`` block. (What a side's own OUTPUT rule drops fails to leave it: TCP keeps it
        as not sent. So the other side's segments go out and wait for acknowledgements, as
        when ``side`` vanished, only where the rules are at ``side``.)"""
        dev = self.srv_if if side == "server" else self.cli_if
        rules = [["INPUT", "-i", dev, "-j", "DROP"], ["OUTPUT", "-o", dev, "-j", "DROP"]]
        try:
            for r in rules:
                self._sh(*self.prefix(side), "iptables", "-w", "5", "-I", *r)
                self._rules.append((side, r))
            yield
        finally:
            self._unblock()

    def _unblock(self) -> None:
        while self._rules:
            side, r = self._rules.pop()
            subprocess.run([*self.prefix(side), "iptables", "-w", "5", "-D", *r],
                           capture_output=True, timeout=30)

    def outage(self, seconds: float) -> None:
        """The client's interface goes down, then up again."""
        try:
            self._sh("ip", "-n", self.cli_ns, "link", "set", self.cli_if, "down")
            time.sleep(seconds)
        finally:
            subprocess.run(["ip", "-n", self.cli_ns, "link", "set", self.cli_if, "up"],
                           capture_output=True, timeout=30)

    def close(self) -> None:
        if self._made:
            self._unblock()
        for ns in reversed(self._made):  # deleting a namespace deletes its veth end too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()


class ProxyNet:
    """Everything on 127.0.0.1; the link goes through FaultProxy in a thread of this process."""

    mode = "proxy"
    server_ip = "127.0.0.1"

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.proxy: Any = None

    def prefix(self, side: str) -> list[str]:
        return []

    def port(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def server_listen(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def link_target(self, port: int) -> str:
        """Start the proxy in front of the server's port; the client connects to the proxy."""
        from icafast.faults import FaultProxy

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy",
                                       daemon=True)
        self.thread.start()
        self.proxy = self._call(FaultProxy("127.0.0.1", port).start())
        return f"127.0.0.1:{self.proxy.port}"

    def _call(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def _do(self, fn: Any) -> Any:
        async def call() -> Any:
            return fn()

        return self._call(call())

    def listening(self, side: str, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def reset(self, server_port: int) -> int:
        return int(self._do(self.proxy.reset))

    def blackhole(self, seconds: float) -> None:
        def start() -> None:
            self.proxy.blackhole()
            self.proxy.blackhole_new = True

        self._do(start)
        try:
            time.sleep(seconds)
        finally:
            self._do(lambda: setattr(self.proxy, "blackhole_new", False))

    def outage(self, seconds: float) -> None:
        def start() -> None:  # live links fall silent, new connections fail at once
            self.proxy.blackhole()
            self.proxy.refuse_new = True

        self._do(start)
        try:
            time.sleep(seconds)
        finally:
            self._do(lambda: setattr(self.proxy, "refuse_new", False))

    def close(self) -> None:
        if self.loop is None:
            return
        try:
            if self.proxy is not None:
                self._call(self.proxy.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self.thread is not None
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()
            self.loop = None


@functools.lru_cache(maxsize=1)
def net_mode() -> tuple[str, str]:
    """('netns' | 'proxy', why)."""
    forced = os.environ.get("ICAFAST_ACCEPTANCE_NET", "").strip().lower()
    if forced == "proxy":
        return "proxy", "ICAFAST_ACCEPTANCE_NET=proxy"
    if os.geteuid() != 0:
        why = "not root: network namespaces need root"
    elif not all(shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                 for t in ("ip", "ss", "iptables")):
        why = "ip, ss or iptables missing (Debian packages iproute2, iptables)"
    else:
        try:
            _sweep_stale_namespaces()
            probe = NetnsNet()
            try:
                run_bounded([*probe.prefix("server"), "iptables", "-w", "5", "-S"])
                run_bounded([*probe.prefix("client"), "ss", "-Htn"])
            finally:
                probe.close()
            return "netns", "network namespaces with a veth pair"
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            why = f"network namespaces unusable here: {str(detail).strip()[:200]}"
    if forced == "netns":
        pytest.fail(f"ICAFAST_ACCEPTANCE_NET=netns but {why}")
    return "proxy", why


# -- the rig: peers + icafast serve + icafast connect + faults, all cleaned up ----------------

class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        mode, self.why = net_mode()
        self.net: NetnsNet | ProxyNet = NetnsNet() if mode == "netns" else ProxyNet()
        self.procs: list[Proc] = []
        self.server: Proc | None = None
        self.client: Proc | None = None
        self.server_port = 0
        self.faults: list[tuple[str, float, int]] = []  # (kind, time, links killed)
        # a short directory for the control socket (AF_UNIX paths are limited to 107 bytes)
        self._ctl_dir = tempfile.mkdtemp(prefix="icafacc-")

    @property
    def mode(self) -> str:
        return self.net.mode

    def port(self) -> int:
        return self.net.port()

    def spawn(self, side: str, name: str, argv: list[str], log: bool = True,
              **popen: Any) -> Proc:
        p = Proc(name, [*self.net.prefix(side), *argv],
                 self.tmp / f"{name}.log" if log else None, **popen)
        self.procs.append(p)
        return p

    def wait_listening(self, side: str, port: int, proc: Proc, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.net.listening(side, port):
                return
            if not proc.alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{proc.name} is not listening on port {port} (exit "
                             f"{proc.p.poll()}); log:\n{proc.tail()}")

    def start_server(self, backend_port: int, *extra: str) -> str:
        """icafast serve (server side) -> backend, with ``extra`` options. Returns the
        address the client side reaches it at."""
        self.server_port = self.port()
        control = os.path.join(self._ctl_dir, "control.sock")
        self.server = self.spawn("server", "icafast-serve", [*icafast_serve_cmd(
            self.net.server_listen(self.server_port), f"127.0.0.1:{backend_port}", control),
            *extra])
        self.server.wait_for("listening on")
        return self.net.link_target(self.server_port)

    def start_relay(self, backend_port: int, *server_extra: str) -> int:
        """icafast serve (server side, with ``server_extra`` options) -> backend; icafast
        connect (client side). Returns the client's local port, on the client side's
        127.0.0.1."""
        target = self.start_server(backend_port, *server_extra)
        local = self.port()
        self.client = self.spawn("client", "icafast-connect",
                                 icafast_connect_cmd(f"127.0.0.1:{local}", target))
        self.client.wait_for("listening on")
        return local

    # -- faults ----------------------------------------------------------------------------
    def resumes(self) -> int:
        assert self.server is not None
        return self.server.count("resumed from")

    def new_sessions(self) -> int:
        assert self.server is not None
        return self.server.count(": new from")

    def fault(self, kind: str) -> int:
        """Break the link once: 'reset', 'blackhole' or 'outage', or 'upgrade' the server
        (or 'upgrade-client' the client) in place (SIGUSR2: it resets the links itself).
        Returns the number of links a reset killed (otherwise -1)."""
        t = time.monotonic()
        killed = -1
        if kind == "reset":
            killed = self.net.reset(self.server_port)
        elif kind == "blackhole":
            self.net.blackhole(BLACKHOLE_S)
        elif kind == "outage":
            self.net.outage(OUTAGE_S)
        elif kind in ("upgrade", "upgrade-client"):  # icafast serve (connect) runs itself
            proc = self.server if kind == "upgrade" else self.client  # anew, in place, with
            assert proc is not None  # the sessions
            upgrades = proc.count("took over")
            os.kill(proc.pid, signal.SIGUSR2)
            proc.wait_for("took over", upgrades + 1)
        else:
            raise ValueError(kind)
        self.faults.append((kind, t, killed))
        return killed

    def fault_and_recover(self, kind: str, sessions: int, alive: Any = None,
                          timeout: float = 20.0) -> int:
        """``fault(kind)``, then wait (bounded) until ``sessions`` more resumes are logged, so
        that the next break hits established links again; stops waiting early when ``alive()``
        turns false (the application finished). Returns what ``fault`` returned."""
        before = self.resumes()
        killed = self.fault(kind)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.resumes() < before + sessions:
            if alive is not None and not alive():
                break
            time.sleep(0.02)
        return killed

    def replayed(self) -> tuple[int, int]:
        """Bytes replayed after resumes so far: (client -> server, server -> client)."""
        assert self.server is not None and self.client is not None
        up = sum(int(n) for n in re.findall(r"resumed on link \d+, (\d+) bytes replayed",
                                              self.client.text()))
        down = sum(int(n) for n in re.findall(r"resumed from \S+, (\d+) bytes replayed",
                                                self.server.text()))
        return up, down

    def wait_resumes(self, count: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.resumes() < count:
            time.sleep(0.02)
        assert self.resumes() >= count, (
            f"expected >= {count} resumes, server log has {self.resumes()}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for p in self.procs:
            if p.log is not None:
                parts.append(f"----- {p.name} (exit {p.p.poll()}) -----\n{p.tail(30)}")
        return "\n".join(parts)

    def check_icafast_logs(self) -> None:
        for p in (self.server, self.client):
            if p is not None:
                assert "Traceback" not in p.text(), f"{p.name} raised:\n{p.text()[-4000:]}"

    def close(self) -> None:
        try:
            for p in reversed(self.procs):  # applications first, then relay, then backends
                p.stop()
        finally:
            try:
                self.net.close()
            finally:
                shutil.rmtree(self._ctl_dir, ignore_errors=True)
