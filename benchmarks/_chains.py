"""Processes and relay chains for ``python -m benchmarks.relay``.

A *chain* is what sits between the load generator and the backend: nothing (``direct``), two
socat processes, two HAProxy processes, or ``icafast connect`` -> ``icafast serve`` (compiled or
pure-Python core), each over plain TCP or, for the encrypted chains (``ENCRYPTED``), with TLS
between the two hops. Every process is started here, remembered by its pid and stopped by that
pid.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


class Busy(Exception):
    """Another timed benchmark run holds the machine (see :func:`exclusive_run`)."""


def lock_path() -> Path:
    """The machine-wide lock of timed runs: ``ICAFAST_BENCH_LOCK``, else icafast-bench.lock in
    the temporary directory."""
    env = os.environ.get("ICAFAST_BENCH_LOCK")
    return Path(env) if env else Path(tempfile.gettempdir()) / "icafast-bench.lock"


def exclusive_run(wait: bool = True, say: Callable[[str], None] = print) -> IO[str] | None:
    """Take the lock of timed runs, so that two never overlap: each would load the CPUs whose
    time the other measures, and both would report the mix. Waits for a run in progress (or,
    with ``wait=False``, raises :class:`Busy`). Returns the open lock file: the lock is held
    until it is closed or the process ends. Where the lock file cannot be opened (another
    user's), the run goes on unguarded, and ``say`` says so."""
    path = lock_path()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        say(f"note: cannot open {path} ({e.strerror}): not guarded against a concurrent run")
        return None
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        if not wait:
            f.close()
            raise Busy(f"another timed benchmark run (pid {holder}) holds {path}") from None
        say(f"waiting for another timed benchmark run (pid {holder}) to end: two runs at once "
            "would disturb each other's figures")
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def at_least(minimum: float) -> Callable[[str], float]:
    """An argparse type for the benchmarks' counts and durations: a number (whole when
    ``minimum`` is an int) of at least ``minimum``. Less would measure nothing (no run, no
    round trip), divide by zero, or hang (iperf3 reads ``-t 0`` as no limit), and a run that
    measured nothing must not look like one that passed."""
    kind = int if isinstance(minimum, int) else float

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        if not value >= minimum:  # (not: also refuses nan)
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {text!r}")
        return value

    return parse


def _unwind(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def stop_on_signals() -> None:
    """Make SIGTERM (``kill``, a CI timeout) and SIGHUP (the terminal closed) unwind like
    Ctrl-C: ``finally`` blocks run, so that every process a benchmark started is stopped
    (:meth:`Procs.stop_all`) and its temporary directory removed, instead of the default
    action's exit on the spot that left them running."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _unwind)


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


def start_echo(procs: Procs) -> int:
    """Start the echo backend of the round-trip workloads; return its port once it listens."""
    port = free_port()
    echo = procs.start("echo", [PY, "-m", "benchmarks._workers", "echo-server",
                                "--port", str(port)])
    wait_listening(port, echo)
    return port


def checked_round_trips(procs: Procs, port: int, count: int, what: str = "chain",
                        new_connections: bool = False) -> None:
    """``count`` 64-byte round trips through ``port``, no warm-up (with ``new_connections``,
    each through a connection of its own); raises if a byte came back wrong."""
    rr = procs.start("rr", [PY, "-m", "benchmarks._workers", "rr-client", "--port", str(port),
                            "--count", str(count), "--warmup", "0", "--timeout", "120",
                            *(["--new-connections"] if new_connections else [])],
                     capture=True)
    stdout, _ = rr.communicate(timeout=600)
    procs.stop(rr)
    if not json.loads(stdout)["ok"]:
        raise RuntimeError(f"{what}: round trips delivered wrong bytes")


# -- tools ---------------------------------------------------------------------------------------
def git_commit(root: Path) -> str | None:
    """The short commit of the checkout at ``root`` (results name commits, not directories)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=str(root), timeout=10).stdout.strip() or None
    except OSError:
        return None


def unbuilt(root: Path) -> str | None:
    """Why the checkout at ``root`` would not run icafast compiled (None: it would). A
    checkout whose extensions are not built runs icafast from Python source, some thirty times
    the instructions per message: an A/B comparison against it would measure that."""
    code = ("import icafast, json; print(json.dumps([icafast.IMPLEMENTATION, "
            "getattr(icafast, 'compiled_modules', dict)()]))")
    env = {k: v for k, v in os.environ.items() if k != "ICAFAST_PURE_PYTHON"}
    env["PYTHONPATH"] = str(root)
    build = f"build it first: cd {root} && python setup.py build_ext --inplace"
    try:
        out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env,
                             cwd=str(root), timeout=120)
        impl, modules = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        tail = (locals().get("out") and out.stderr.strip().splitlines()[-1:]) or ["?"]
        return f"icafast from {root} does not import ({tail[0]})"
    source = ([] if impl == "cython" else ["icafast._core"]) + sorted(
        m for m, built in modules.items() if not built)
    if source:
        return f"{root} is not built ({', '.join(source)} would run from Python source): {build}"
    return None


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


@cache
def _serve_help() -> str:
    out = subprocess.run([PY, "-m", "icafast", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=str(ROOT))
    return out.stdout


@dataclass(frozen=True)
class TLSFiles:
    """The certificate and key of a run: one pair for every encrypted chain."""

    cert: Path
    key: Path
    #: certificate and key in one file (HAProxy's ``crt``)
    pem: Path
    #: SHA-256 of the certificate (DER), 64 hex digits: what ``icafast connect`` pins
    fingerprint: str
    how: str


#: what every encrypted chain of a run uses (README: "Encrypted path (TLS)")
TLS_KEY = "ECDSA P-256 (prime256v1), self-signed, SHA-256 signature, SAN 127.0.0.1 / localhost"
_TLS: dict[Path, TLSFiles] = {}


def _have_cryptography() -> bool:
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        return False
    return True


def tls_files(tmp: Path) -> TLSFiles:
    """THE certificate and key of the run whose files live in ``tmp``, created on first use (with
    the ``cryptography`` package, else ``openssl req``) and the same for every encrypted chain."""
    if tmp in _TLS:
        return _TLS[tmp]
    cert, key, pem = tmp / "tls-cert.pem", tmp / "tls-key.pem", tmp / "tls-cert-key.pem"
    if _have_cryptography():
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        pkey = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(pkey.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.SubjectAlternativeName([
                   x509.DNSName("localhost"),
                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
               .sign(pkey, hashes.SHA256()))
        key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
        how = "cryptography"
    else:
        subprocess.run([which("openssl") or "openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:P-256", "-sha256", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True, timeout=60)
        how = "openssl req"
    key.chmod(0o600)
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    import ssl

    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    _TLS[tmp] = TLSFiles(cert, key, pem, hashlib.sha256(der).hexdigest(), how)
    return _TLS[tmp]


def icafast_argv(role: str, listen: int, target: int, extra: Sequence[str] = (),
                 tls: TLSFiles | None = None) -> list[str]:
    """THE command line of an icafast process in every workload (one place for flags that all
    of them need).

    ``tls`` None: plain links, ``--no-tls`` passed to both ends when ``icafast serve --help``
    offers it. Otherwise TLS (icafast's default): the server gets the run's certificate and key
    (``--tls-cert/--tls-key``), the client pins that certificate (``--tls-fingerprint``).

    role "serve": listen on 127.0.0.1:listen, backend 127.0.0.1:target;
    role "connect": listen on 127.0.0.1:listen, server 127.0.0.1:target.
    """
    if tls is None:
        common = ["--no-tls"] if "--no-tls" in _serve_help() else []
    elif role == "serve":
        common = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    else:
        common = ["--tls-fingerprint", tls.fingerprint]
    if role == "serve":
        argv = [PY, "-m", "icafast", "serve", "--listen", f"127.0.0.1:{listen}",
                "--backend", f"127.0.0.1:{target}"]
    elif role == "connect":
        argv = [PY, "-m", "icafast", "connect", "--listen", f"127.0.0.1:{listen}",
                "--server", f"127.0.0.1:{target}"]
    else:
        raise ValueError(role)
    return [*argv, *common, *extra]


def tls_probe(port: int, tls: TLSFiles) -> str:
    """Handshake with the TLS listener on 127.0.0.1:port using icafast's own client settings
    (``icafast.tls.client_context``, the run's certificate pinned); return 'version cipher'.
    Only for ``icafast serve``: it opens nothing toward its backend before a session hello."""
    from icafast import tls as itls

    ctx = itls.client_context(fingerprint=tls.fingerprint).context
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            cipher = s.cipher()
            return f"{s.version()} {cipher[0] if cipher else '?'}"


def negotiated_from_logs(tmp: Path) -> dict[str, list[str]]:
    """What the TLS-terminating hop of socat-tls / haproxy-tls logged for each connection
    (socat ``-d -d``: 'SSL proto version used' + 'SSL connection using'; HAProxy: the
    log-format line 'tls <ssl_fc_protocol> <ssl_fc_cipher>'): chain -> distinct values."""
    seen: dict[str, set[str]] = {}
    for log in sorted(tmp.glob("*-server.log")):  # "<n>-<chain>-server.log"
        chain = log.name.partition("-")[2].removesuffix("-server.log")
        if chain not in ENCRYPTED or CHAINS[chain][0] not in ("socat-tls", "haproxy-tls"):
            continue
        text = log.read_text(errors="replace")
        found = [f"{m[1]} {m[2]}" for m in re.finditer(r"^tls (\S+) (\S+)$", text, re.M)]
        found += [f"{v} {c}" for v, c in zip(re.findall(r"SSL proto version used: (\S+)", text),
                                             re.findall(r"SSL connection using (\S+)", text),
                                             strict=False)]
        seen.setdefault(chain, set()).update(found)
    return {k: sorted(v) for k, v in seen.items()}


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
    # the encrypted path: TLS between the two hops, plain TCP toward the load and the backend
    "socat-tls": ("socat-tls", "socat two-hop over TLS, -b 131072 (the best plain socat's "
                  "buffer): TCP-LISTEN -> OPENSSL:, OPENSSL-LISTEN -> TCP:"),
    "socat-tls-nodelay": ("socat-tls", "socat-tls with the nodelay option (TCP_NODELAY) on all "
                          "four addresses: socat writes each decrypted TLS record on its own, "
                          "and without it Nagle + delayed ACK stall pipelined traffic"),
    "haproxy-tls": ("haproxy-tls", "HAProxy two-hop over TLS, mode tcp: bind -> server ssl "
                    "verify none, bind ssl crt -> backend (no splice: TLS is encrypted in user "
                    "space)"),
    "icafast-tls": ("icafast", "icafast connect -> icafast serve over TLS (icafast's default), "
                    "compiled core, uvloop, TLS run by the links (Python's ssl handshake, "
                    "records through the compiled pipe)"),
    "icafast-tls-loop": ("icafast", "icafast-tls with ICAFAST_TLS_IO=loop on both ends: "
                         "uvloop's TLS transport runs TLS (icafast's TLS before the pipe, and "
                         "its fallback)"),
    "icafast-tls-asyncio": ("icafast", "icafast-tls with ICAFAST_LOOP=asyncio and "
                            "ICAFAST_TLS_IO=loop on both ends: stdlib asyncio's loop and TLS "
                            "transport"),
    "icafast-tls-ref": ("icafast", "icafast-tls from the checkout given with --ref (A/B "
                        "comparison)"),
}
#: the checkout that the REF_TWINS chains run (set by ``--ref``)
REF_ROOT: list[Path] = []
#: plain peers: the ratios of plain chains are against the best of these
PEERS = ("socat", "socat-b65536", "socat-b131072", "haproxy")
#: the chains with TLS between the hops; their ratios are against the best of TLS_PEERS only
ENCRYPTED = frozenset({"socat-tls", "socat-tls-nodelay", "haproxy-tls", "icafast-tls",
                       "icafast-tls-loop", "icafast-tls-asyncio", "icafast-tls-ref"})
#: chain -> its A/B twin from the --ref checkout
REF_TWINS = {"icafast": "icafast-ref", "icafast-tls": "icafast-tls-ref"}
TLS_PEERS = ("socat-tls", "socat-tls-nodelay", "haproxy-tls")
#: socat's closing phase: once one direction has ended, socat closes both after ``-t`` seconds
#: (0.5 by default), whatever the other still carries. The bulk check's upload half-closes and
#: then waits for the backend's digest, which a busy machine can hold up for longer than 0.5 s:
#: socat then drops it (the client sees the end of the stream and no reply). A minute, as
#: HAProxy's chains wait an hour, so that every peer carries a half-closed stream to its end.
SOCAT_CLOSE = ("-t", "60")
#: the -b of socat-tls: the buffer of the best plain socat (socat-b131072)
SOCAT_TLS_BUFFER = 131072


def peers_of(chain: str) -> tuple[str, ...]:
    """The peer group ``chain`` is compared with: encrypted chains with encrypted peers only,
    plain chains with plain peers only."""
    return TLS_PEERS if chain in ENCRYPTED else PEERS


@cache
def _tool_text(argv: tuple[str, ...]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def missing(chain: str) -> str | None:
    """Why ``chain`` cannot run here (None: it can)."""
    kind = CHAINS[chain][0]
    if kind in ("socat", "socat-tls") and not which("socat"):
        return "socat not installed (apt-get install socat)"
    if kind in ("haproxy", "haproxy-tls") and not which("haproxy"):
        return "haproxy not installed (apt-get install haproxy)"
    if chain in ENCRYPTED and not (_have_cryptography() or which("openssl")):
        return "no way to create the run's certificate: neither the cryptography package " \
               "nor openssl is installed"
    if kind == "socat-tls" and "WITH_OPENSSL 1" not in _tool_text((which("socat") or "socat",
                                                                    "-V")):
        return "socat built without OPENSSL support (socat -V: no WITH_OPENSSL)"
    if kind == "haproxy-tls" and "+OPENSSL" not in _tool_text((which("haproxy") or "haproxy",
                                                                "-vv")):
        return "haproxy built without OpenSSL (haproxy -vv: no +OPENSSL): no ssl on bind/server"
    return None


def haproxy_cfg(listen: int, target: int, *, splice: bool = False, bind_extra: str = "",
                server_extra: str = "", log_tls: bool = False) -> str:
    """One HAProxy hop in ``mode tcp``: 127.0.0.1:listen -> 127.0.0.1:target.

    ``splice``: the plain peer (``option splice-request`` + ``splice-response``); the encrypted
    peer cannot splice (TLS records are encrypted and decrypted in user space). ``bind_extra`` /
    ``server_extra``: e.g. ``ssl crt PEM`` on the hop that terminates TLS, ``ssl verify none``
    on the hop that originates it. ``log_tls``: log the protocol and cipher of each connection
    (to standard output, i.e. the hop's log file)."""
    glob_log = "    log stdout format raw local0\n" if log_tls else ""
    dflt_log = "    log global\n" if log_tls else ""
    opts = "    option splice-request\n    option splice-response\n" if splice else ""
    fmt = '    log-format "tls %[ssl_fc_protocol] %[ssl_fc_cipher]"\n' if log_tls else ""
    bind = f" {bind_extra}" if bind_extra else ""
    server = f" {server_extra}" if server_extra else ""
    return (f"global\n    maxconn 4000\n{glob_log}"
            f"defaults\n    mode tcp\n{dflt_log}    timeout connect 5s\n"
            f"    timeout client 1h\n    timeout server 1h\n{opts}"
            f"frontend f\n    bind 127.0.0.1:{listen}{bind}\n{fmt}    default_backend b\n"
            f"backend b\n    server s1 127.0.0.1:{target}{server}\n")


@dataclass
class Chain:
    name: str
    backend_port: int
    procs: Procs
    listen_port: int = 0
    #: the port of the hop next to the backend (for encrypted chains: the TLS listener)
    mid_port: int = 0
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
            argv = [which("socat") or "socat", *SOCAT_CLOSE] + (["-b", b] if b else []) + [
                f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                f"TCP:127.0.0.1:{target}"]
            return self.procs.start(f"{self.name}-{hop}", argv)
        if kind == "socat-tls":
            tls = tls_files(self.procs.tmp)
            common = [*SOCAT_CLOSE, "-b", str(SOCAT_TLS_BUFFER)]
            nd = ",nodelay" if self.name.endswith("-nodelay") else ""
            if hop == "server":  # TLS in -> plain TCP to the backend; -d -d: logs TLS version
                argv = ["-d", "-d", f"OPENSSL-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,"
                        f"backlog=4096,cert={tls.cert},key={tls.key},verify=0{nd}",
                        f"TCP:127.0.0.1:{target}{nd}"]
            else:  # plain TCP in -> TLS to the server hop
                argv = [f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096{nd}",
                        f"OPENSSL:127.0.0.1:{target},verify=0{nd}"]
            return self.procs.start(f"{self.name}-{hop}", [which("socat") or "socat", *common,
                                                           *argv])
        if kind == "haproxy-tls":
            tls = tls_files(self.procs.tmp)
            cfg = self.procs.tmp / f"haproxy-tls-{listen}.cfg"
            if hop == "server":  # TLS in -> plain TCP to the backend
                text = haproxy_cfg(listen, target, bind_extra=f"ssl crt {tls.pem}", log_tls=True)
            else:  # plain TCP in -> TLS to the server hop
                text = haproxy_cfg(listen, target, server_extra="ssl verify none")
            cfg.write_text(text)
            return self.procs.start(f"{self.name}-{hop}", [which("haproxy") or "haproxy", "-db",
                                                           "-f", str(cfg)])
        if kind == "haproxy":
            cfg = self.procs.tmp / f"haproxy-{listen}.cfg"
            cfg.write_text(haproxy_cfg(listen, target, splice=True))
            return self.procs.start(f"haproxy-{hop}", [which("haproxy") or "haproxy", "-db",
                                                       "-f", str(cfg)])
        if kind == "forward":
            return self.procs.start(f"{self.name}-{hop}", [PY, "-m", "benchmarks._workers",
                                                          "forward", "--listen", str(listen),
                                                          "--target", str(target)])
        if kind == "icafast":
            env = {"ICAFAST_PURE_PYTHON": "1"} if self.name == "icafast-pure" else {}
            if self.name == "icafast-tls-asyncio":
                env["ICAFAST_LOOP"] = "asyncio"
            if self.name in ("icafast-tls-loop", "icafast-tls-asyncio"):
                env["ICAFAST_TLS_IO"] = "loop"
            link_tls = tls_files(self.procs.tmp) if self.name in ENCRYPTED else None
            if hop == "server":
                ctl = self.procs.tmp / f"ctl-{listen}.sock"
                argv = icafast_argv("serve", listen, target,
                                    ["--control", str(ctl), *self.serve_extra], tls=link_tls)
            else:
                argv = icafast_argv("connect", listen, target, self.connect_extra, tls=link_tls)
            root = REF_ROOT[0] if self.name in REF_TWINS.values() else None
            return self.procs.start(f"{self.name}-{hop}", argv, env=env, root=root)
        raise ValueError(kind)

    def start(self) -> Chain:
        if self.kind == "direct":
            self.listen_port = self.backend_port
            return self
        mid = self.mid_port = free_port()
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
