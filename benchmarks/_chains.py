"""Processes and relay chains for ``python -m benchmarks.relay``.

A *chain* is what sits between the load generator and the backend: nothing (``direct``), two
socat processes, two HAProxy processes, or ``icafast connect`` -> ``icafast serve`` (compiled or
pure-Python core). Every process is started here, remembered by its pid and stopped by that pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


class Procs:
    """Started processes, each stopped by its own pid (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path, pin: bool) -> None:
        self.tmp = tmp
        self.pin = pin
        self.live: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
        self._n = 0

    def prefix(self) -> list[str]:
        return ["taskset", "-c", "0"] if self.pin else []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              stdin: bool = False, capture: bool = False,
              root: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv``; stderr (and stdout unless ``capture``) go to a log file. Python
        processes import icafast from ``root`` (default: this checkout): it is also their working
        directory, because ``python -m`` puts the working directory first on ``sys.path``."""
        self._n += 1
        log = self.tmp / f"{self._n:03d}-{name}.log"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(root or ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        if env:
            full_env.update(env)
        with open(log, "wb") as err:
            p = subprocess.Popen([*self.prefix(), *argv], stdin=subprocess.PIPE if stdin else
                                 subprocess.DEVNULL, stdout=subprocess.PIPE if capture else err,
                                 stderr=err, env=full_env, cwd=str(root or ROOT))
        p.log_path = log  # type: ignore[attr-defined]
        self.live[p.pid] = (name, p)
        return p

    def stop(self, p: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
        if p is None or p.pid not in self.live:
            return
        del self.live[p.pid]
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout)
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()

    def stop_all(self) -> None:
        for _name, p in list(self.live.values()):
            self.stop(p)

    @staticmethod
    def tail(p: subprocess.Popen[bytes], n: int = 15) -> str:
        try:
            lines = Path(p.log_path).read_text(errors="replace").splitlines()  # type: ignore
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (or any address)? Read from /proc, so that the
    check does not itself open a connection (which forks socat and confuses iperf3)."""
    want = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(want):
                        return True
        except OSError:
            continue
    return False


def wait_listening(port: int, p: subprocess.Popen[bytes] | None = None,
                   timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"process exited ({p.returncode}) before listening on {port}:\n"
                               + Procs.tail(p))
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listening on {port} after {timeout}s")
        time.sleep(0.02)


def wait_ready(p: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait for a worker's 'ready' line."""
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(p.stdout.fileno(), True)
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                line = p.stdout.readline()
                if line.strip() == b"ready":
                    return
                if not line:
                    break
    raise RuntimeError("worker did not become ready:\n" + Procs.tail(p))


# -- tools ---------------------------------------------------------------------------------------
def which(tool: str) -> str | None:
    return shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}")
                                       if os.access(p, os.X_OK)), None)


def tool_version(argv: list[str]) -> str:
    """The first line of ``argv``'s output that names a version (else the first line)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip().splitlines()
    return next((t.strip() for t in text if "version" in t.lower()), text[0] if text else "")


@lru_cache(maxsize=None)
def _serve_help() -> str:
    out = subprocess.run([PY, "-m", "icafast", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=str(ROOT))
    return out.stdout


def icafast_argv(role: str, listen: int, target: int, extra: Sequence[str] = ()) -> list[str]:
    """THE command line of an icafast process in every workload (one place for flags that all
    of them need: ``--no-tls`` is passed to both ends when ``icafast serve --help`` offers it).

    role "serve": listen on 127.0.0.1:listen, backend 127.0.0.1:target;
    role "connect": listen on 127.0.0.1:listen, server 127.0.0.1:target.
    """
    common = ["--no-tls"] if "--no-tls" in _serve_help() else []
    if role == "serve":
        argv = [PY, "-m", "icafast", "serve", "--listen", f"127.0.0.1:{listen}",
                "--backend", f"127.0.0.1:{target}"]
    elif role == "connect":
        argv = [PY, "-m", "icafast", "connect", "--listen", f"127.0.0.1:{listen}",
                "--server", f"127.0.0.1:{target}"]
    else:
        raise ValueError(role)
    return [*argv, *common, *extra]


# -- chains --------------------------------------------------------------------------------------
#: name -> (kind, description). Peers are the two-hop socat / HAProxy chains.
CHAINS: dict[str, tuple[str, str]] = {
    "direct": ("direct", "no relay"),
    "socat": ("socat", "socat two-hop, default buffer (8 KiB)"),
    "socat-b65536": ("socat", "socat two-hop, -b 65536"),
    "socat-b131072": ("socat", "socat two-hop, -b 131072"),
    "haproxy": ("haproxy", "HAProxy two-hop, mode tcp, splice-request + splice-response"),
    "icafast": ("icafast", "icafast connect -> icafast serve, compiled core"),
    "icafast-pure": ("icafast", "icafast connect -> icafast serve, ICAFAST_PURE_PYTHON=1"),
    "uvloop-min": ("forward", "minimal uvloop forwarder, two-hop (no framing, CRC or replay): "
                   "the floor for a relay on Python + uvloop; a reference, not a peer"),
    "icafast-ref": ("icafast", "icafast from the checkout given with --ref (A/B comparison)"),
}
#: the checkout that "icafast-ref" runs (set by ``--ref``)
REF_ROOT: list[Path] = []
PEERS = ("socat", "socat-b65536", "socat-b131072", "haproxy")


def missing(chain: str) -> str | None:
    """Why ``chain`` cannot run here (None: it can)."""
    kind = CHAINS[chain][0]
    if kind == "socat" and not which("socat"):
        return "socat not installed (apt-get install socat)"
    if kind == "haproxy" and not which("haproxy"):
        return "haproxy not installed (apt-get install haproxy)"
    return None


_HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    option splice-request
    option splice-response
frontend f
    bind 127.0.0.1:{listen}
    default_backend b
backend b
    server s1 127.0.0.1:{target}
"""


@dataclass
class Chain:
    name: str
    backend_port: int
    procs: Procs
    listen_port: int = 0
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    serve_extra: Sequence[str] = ()
    connect_extra: Sequence[str] = ()

    @property
    def kind(self) -> str:
        return CHAINS[self.name][0]

    def _hop(self, listen: int, target: int, hop: str) -> subprocess.Popen[bytes]:
        kind = self.kind
        if kind == "socat":
            b = self.name.partition("-b")[2]
            argv = [which("socat") or "socat"] + (["-b", b] if b else []) + [
                f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                f"TCP:127.0.0.1:{target}"]
            return self.procs.start(f"{self.name}-{hop}", argv)
        if kind == "haproxy":
            cfg = self.procs.tmp / f"haproxy-{listen}.cfg"
            cfg.write_text(_HAPROXY_CFG.format(listen=listen, target=target))
            return self.procs.start(f"haproxy-{hop}", [which("haproxy") or "haproxy", "-db",
                                                       "-f", str(cfg)])
        if kind == "forward":
            return self.procs.start(f"{self.name}-{hop}", [PY, "-m", "benchmarks._workers",
                                                          "forward", "--listen", str(listen),
                                                          "--target", str(target)])
        if kind == "icafast":
            env = {"ICAFAST_PURE_PYTHON": "1"} if self.name == "icafast-pure" else {}
            if hop == "server":
                ctl = self.procs.tmp / f"ctl-{listen}.sock"
                argv = icafast_argv("serve", listen, target,
                                    ["--control", str(ctl), *self.serve_extra])
            else:
                argv = icafast_argv("connect", listen, target, self.connect_extra)
            root = REF_ROOT[0] if self.name == "icafast-ref" else None
            return self.procs.start(f"{self.name}-{hop}", argv, env=env, root=root)
        raise ValueError(kind)

    def start(self) -> Chain:
        if self.kind == "direct":
            self.listen_port = self.backend_port
            return self
        mid = free_port()
        self.listen_port = free_port()
        # the hop next to the backend first ("server"), then the one the client talks to
        p = self._hop(mid, self.backend_port, "server")
        self.started.append(p)
        wait_listening(mid, p)
        p = self._hop(self.listen_port, mid, "client")
        self.started.append(p)
        wait_listening(self.listen_port, p)
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.started]

    def stop(self) -> None:
        for p in reversed(self.started):
            self.procs.stop(p)
        self.started.clear()
