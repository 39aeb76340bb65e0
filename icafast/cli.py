"""Command line: ``icafast serve | connect | sessions | demo | selfcheck``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from . import IMPLEMENTATION, __version__, compiled_modules, crc32c_backend, logs
from .events import SessionClosed
from .heap import trim_now_and_then
from .protocol import Config
from .rlimits import (
    CLIENT_SESSIONS,
    beyond_any_process,
    handshakes_within,
    raise_nofile,
    soft_limit,
)
from .sdnotify import notify
from .tlspipe import describe as tls_records
from .tlspipe import uses_pipe

log = logging.getLogger("icafast")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def default_control_path() -> str:
    """A directory no other user can write to: root's /run (another user could make
    /tmp/icafast-0 first, and the server would refuse it), a user's runtime directory, else
    /tmp/icafast-UID (which the server checks is the user's own)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/icafast/control.sock"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "icafast", "control.sock")
    return os.path.join("/tmp", f"icafast-{os.getuid()}", "control.sock")


def parse_size(text: str | int) -> int:
    """'8388608', '8M', '8MiB', '512k' -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = int(float(t) * mult)
    except (ValueError, OverflowError):  # (OverflowError: "inf")
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must not be negative")
    return value


def _number(parse: Callable[[str], int], text: str, minimum: int, too_small: str) -> int:
    """``parse(text)``, at least ``minimum``, for argparse (``too_small`` says why not)."""
    try:
        value = parse(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{too_small}, not {text!r}")
    return value


def _count(text: str) -> int:
    """A limit: a whole number of at least 1."""
    return _number(int, text, 1, "must be at least 1")


def _seconds(text: str | float) -> float:
    try:
        v = float(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not v >= 0 or v == float("inf"):  # (also NaN)
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: must be a "
                                         "finite number, not negative")
    return v


_CONFIG_KEYS: dict[str, Callable[[Any], Any]] = {
    "keepalive_interval": _seconds,
    "dead_timeout": _seconds,
    "reliability_timeout": _seconds,
    "replay_limit": parse_size,
    "on_timeout": str,
    "hold": _seconds,
    "handshake_timeout": _seconds,
    "max_payload": parse_size,
    "frame_size": parse_size,
    "connect_retry": _seconds,
}
#: config-file names of settings whose command-line option is named otherwise
_CONFIG_ALIASES = {"max_frame_size": "max_payload"}

# What a config file's value may be (its TOML types) and how to say so. Numbers never take
# booleans: TOML's true is Python's True, an int, that would pass as 1 second.
_SECONDS = ((int, float, str), "a number of seconds")
_BYTES = ((int, str), 'a whole number of bytes, or a size in quotes such as "8M"')
_COUNT = ((int, str), "a whole number")
_TEXT = ((str,), "a string (in quotes)")
_FLAG = ((bool,), "true or false")
#: every key a config file may hold (for serve, connect or sessions: one file can serve all
#: three); anything else is a mistake worth an error rather than a silent default
_FILE_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    **{k: _SECONDS for k in ("keepalive_interval", "dead_timeout", "reliability_timeout",
                             "hold", "handshake_timeout", "connect_retry",
                             "tls_ticket_key_lifetime")},
    **{k: _BYTES for k in ("replay_limit", "max_payload", "frame_size")},
    **{k: _COUNT for k in ("max_sessions", "max_handshakes", "max_failed_resumes")},
    **{k: _FLAG for k in ("proxy_protocol", "no_tls", "tls_insecure")},
    **{k: _TEXT for k in ("on_timeout", "listen", "backend", "control", "server", "fallback",
                          "tls_cert", "tls_key", "tls_client_ca", "state_dir", "tls_ca",
                          "tls_fingerprint", "tls_server_name", "tls_client_cert",
                          "tls_client_key")},
    "mapping": ((list,), '[[mapping]] tables, each with listen = "HOST:PORT" and optionally '
                         'backend = "HOST:PORT"'),
}


def _toml(value: Any) -> str:
    """``value`` as a config file spells it (true, not Python's True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _add_common(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("session reliability (also settable in --config)")
    g.add_argument("--keepalive-interval", type=_seconds, metavar="SECONDS",
                   help="the server sends PING when nothing was received for this long, the "
                        "client only after (keepalive interval + dead timeout) / 2 (default "
                        "3, the client's 6.5 s with the default dead timeout; ICA's own "
                        "ICA-keepalive default is 60)")
    g.add_argument("--dead-timeout", type=_seconds, metavar="SECONDS",
                   help="declare the link broken when nothing was received for this long "
                        "(default 10)")
    g.add_argument("--reliability-timeout", type=_seconds, metavar="SECONDS",
                   help="how long a broken session may take to reconnect (default 180)")
    g.add_argument("--replay-limit", type=parse_size, metavar="BYTES",
                   help="the most unacknowledged bytes kept for replay per direction; reading "
                        "from the source pauses when full. Paths whose handshake round trip is "
                        "under 2 ms use a smaller send window (4M up to 1 ms) "
                        "(default 8M; suffixes k, M, G)")
    g.add_argument("--handshake-timeout", type=_seconds, metavar="SECONDS",
                   help="a connection must finish its handshake within this (default 10)")
    g.add_argument("--max-frame-size", type=parse_size, metavar="BYTES", dest="max_payload",
                   help="largest frame payload accepted from the peer (default 256k)")
    if server:
        g.add_argument("--on-timeout", choices=["reset", "disconnect"],
                       help="after the reliability timeout: 'reset' closes the backend "
                            "connection and forgets the session; 'disconnect' keeps it held "
                            "for --hold seconds more, resumable (default reset)")
        g.add_argument("--hold", type=_seconds, metavar="SECONDS",
                       help="with --on-timeout disconnect: how long a session is held "
                            "(default 3600)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with the same keys (keepalive_interval = 3, ...); "
                        "command-line options win")
    if server:
        p.add_argument("--control", metavar="PATH",
                       help="control socket for 'icafast sessions' (default "
                            f"{default_control_path()}); one per server")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="debug logging, which adds what is routine: every reconnect attempt "
                        "(connect), connections that close before sending a byte, such as "
                        "health checks (serve). The default level is INFO")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _engine_kind() -> str:
    """"compiled" when the session engine and relay path run as extensions, else "python"."""
    c = compiled_modules()
    return "compiled" if all(c.values()) else "python" if not any(c.values()) else str(c)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icafast",
        description="Session reliability for any TCP protocol: the application's byte stream "
                    "survives link breaks with no byte lost, duplicated or reordered.",
    )
    p.add_argument("--version", action="version",
                   version=f"icafast {__version__} (core: {IMPLEMENTATION}, engine: "
                           f"{_engine_kind()})")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the relay server (2598 -> backend 1494)",
                       description="Accept session-reliability links and relay each session "
                                   "to its backend. Repeat --listen/--backend (paired in "
                                   "order) for several mappings. SIGTERM or SIGINT stops "
                                   "it (every session closed); SIGHUP reads the TLS "
                                   "certificate, key and client CA again for new links "
                                   "(their paths from --config too), and every session "
                                   "goes on; SIGUSR2 runs the icafast "
                                   "installed now in the same process, and every session "
                                   "goes on.")
    s.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on (default 0.0.0.0:2598); repeatable")
    s.add_argument("--backend", action="append", metavar="HOST:PORT",
                   help="backend for the matching --listen (default 127.0.0.1:1494)")
    lim = s.add_argument_group("limits (hostile load)")
    lim.add_argument("--max-sessions", type=_count, metavar="N", help="refuse NEW beyond this "
                     "many sessions, unless another source holds more of them: then its "
                     "oldest disconnected one makes room (default 10000)")
    lim.add_argument("--max-handshakes", type=_count, metavar="N",
                     help="connections allowed in the handshake at once; more are closed at "
                          "once, unless another source holds more of them: then its oldest "
                          "makes room (default 1024)")
    lim.add_argument("--max-failed-resumes", type=_count, metavar="N",
                     help="failed RESUME attempts (wrong proof, unknown session) allowed per "
                          "source (IPv4 address, IPv6 /64) per minute; beyond, that source's "
                          "unproven ones are refused, proven ones still resume (default 20)")
    s.add_argument("--check", action="store_true",
                   help="check the configuration (files, addresses, limits, TLS certificate "
                        "and key) and exit: 0 when serve would start with it (SIGUSR2 asks "
                        "this of the new program first)")
    s.add_argument("--proxy-protocol", action="store_true",
                   help="expect a HAProxy PROXY protocol v1/v2 header on every connection (when "
                        "behind a load balancer), so sessions and logs show the real client")
    t = s.add_argument_group("TLS (on by default)")
    t.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM, may hold the "
                   "chain); default: a self-signed one created on first start in --state-dir")
    t.add_argument("--tls-key", metavar="FILE",
                   help="private key for --tls-cert (PEM, not encrypted)")
    t.add_argument("--tls-client-ca", metavar="FILE",
                   help="require client certificates signed by this CA (PEM)")
    t.add_argument("--state-dir", metavar="DIR",
                   help="where the self-signed certificate is kept (default: "
                        "/var/lib/icafast as root, else ~/.local/state/icafast)")
    t.add_argument("--tls-ticket-key-lifetime", type=_seconds, metavar="SECONDS",
                   help="make new TLS session ticket keys after this long, so that a key "
                        "that leaks opens no ticket sealed before the last renewal; a client "
                        "whose ticket is older then makes one full handshake (default 43200, "
                        "12 hours; 0: never, the keys live as long as the process)")
    t.add_argument("--no-tls", action="store_true",
                   help="plain text links (the client must use --no-tls too)")
    _add_common(s, server=True)

    c = sub.add_parser("connect", help="run the client: a local port whose connections "
                                       "become reliable sessions",
                       description="Listen locally; every application connection becomes one "
                                   "session to the server. SIGTERM or SIGINT stops it (every "
                                   "session closed); SIGUSR2 runs the icafast installed now in "
                                   "the same process, and every session goes on. With --stdio, "
                                   "one session instead, carried over standard input and "
                                   "output, as an ssh ProxyCommand: ssh -o "
                                   "ProxyCommand='icafast connect --stdio --server HOST:2598 "
                                   "--tls-fingerprint SHA256' user@host",
                       epilog="With --stdio, standard output carries the backend's stream and "
                              "nothing else (the log goes to standard error: only warnings and "
                              "errors, -v adds INFO, -vv DEBUG), and the exit "
                              "status is 0 after a graceful end (end of file both ways) or a "
                              "stop by SIGTERM, SIGINT or SIGHUP, 1 after an abortive one "
                              "(reset, reliability timeout, refused resume, standard output "
                              "closed by its reader), with one line on standard error saying "
                              "why, and 2 for a usage error.")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="HOST:PORT", required=False,
                       help="local address applications connect to (default 127.0.0.1:1494)")
    where.add_argument("--stdio", action="store_true",
                       help="no local port: make one session, reading what goes to the backend "
                            "from standard input and writing what comes back to standard "
                            "output (end of file on standard input half-closes toward the "
                            "backend); the command ends with the session. For ssh's "
                            "ProxyCommand, as 'ssh -W' or 'nc' are used")
    c.add_argument("--server", metavar="HOST:PORT", required=False,
                   help="the icafast server (port defaults to 2598)")
    c.add_argument("--fallback", metavar="HOST:PORT",
                   help="if the session-reliability handshake cannot be made, connect "
                        "straight here instead (e.g. the server's 1494); never used when the "
                        "server's certificate fails verification")
    c.add_argument("--check", action="store_true",
                   help="check the configuration (files, addresses, TLS files) and exit: 0 "
                        "when connect would start with it (SIGUSR2 asks this of the new "
                        "program first)")
    c.add_argument("--connect-retry", type=_seconds, metavar="SECONDS",
                   help="keep trying this long to set up a new session before resetting the "
                        "application connection (default 10; without effect with --fallback)")
    t = c.add_argument_group("TLS (on by default; one way of trusting the server is required)")
    t.add_argument("--tls-ca", metavar="FILE",
                   help="verify the server's certificate chain and name against this CA")
    t.add_argument("--tls-fingerprint", metavar="SHA256",
                   help="accept only the server certificate with this SHA-256 fingerprint "
                        "(as printed by 'icafast serve'); several, separated by commas, "
                        "while the server's certificate is replaced")
    t.add_argument("--tls-insecure", action="store_true",
                   help="encrypt but do not verify the server (open to active attackers)")
    t.add_argument("--tls-server-name", metavar="NAME",
                   help="name to check the certificate against (default: the --server host)")
    t.add_argument("--tls-client-cert", metavar="FILE", help="client certificate (PEM)")
    t.add_argument("--tls-client-key", metavar="FILE", help="key for --tls-client-cert (PEM, not "
                   "encrypted)")
    t.add_argument("--no-tls", action="store_true",
                   help="plain text links (the server must use --no-tls too)")
    _add_common(c, server=False)

    q = sub.add_parser("sessions", help="list or act on a running server's sessions",
                       description="Talk to a running server over its control socket.")
    q.add_argument("--json", action="store_true", help="print JSON")
    act = q.add_mutually_exclusive_group()
    act.add_argument("--reset", metavar="ID", help="close session ID (prefix allowed) and "
                                                   "its backend connection")
    act.add_argument("--disconnect", metavar="ID",
                     help="drop session ID's current link; it stays resumable")
    act.add_argument("--metrics", action="store_true",
                     help="print the server's counters and gauges in Prometheus' text format "
                          "(sessions by state, opened, resumed, ended, rejected, failed "
                          "handshakes, bytes each way), e.g. for node_exporter's textfile "
                          "collector")
    q.add_argument("--control", metavar="PATH",
                   help=f"server's control socket (default {default_control_path()})")
    q.add_argument("--config", metavar="FILE", help="read 'control' from this TOML file")

    d = sub.add_parser("demo", help="run backend, server, fault proxy and client on loopback "
                                    "and break the link while a stream flows",
                       description="A self-contained demonstration on 127.0.0.1.")
    d.add_argument("--size", type=_demo_size, default=32 * 1024 * 1024, metavar="BYTES",
                   help="bytes to stream each way (default 32M)")
    d.add_argument("--breaks", type=_demo_breaks, default=6, metavar="N",
                   help="link breaks to inflict, cycling reset / blackhole / half-open / "
                        "server hand-over / client hand-over (default 6)")
    d.add_argument("--rate", type=_demo_rate, default=16 * 1024 * 1024, metavar="BYTES",
                   help="stream rate per direction, bytes/s (default 16M; 0: unlimited)")
    d.add_argument("--no-tls", action="store_true", help="plain text links (default: TLS "
                   "with a throw-away self-signed certificate, pinned by the client)")
    d.add_argument("-v", "--verbose", action="count", default=0)
    d.add_argument("-q", "--quiet", action="store_true")

    sc = sub.add_parser("selfcheck", help="check the compiled core against the pure-Python "
                                          "twin and print a quick speed summary")
    sc.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    return p


class UsageError(Exception):
    """Bad settings or arguments: printed as one line, exit status 2."""


def load_toml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read the config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:  # (TOML is UTF-8: a Latin-1 "é" in a comment is not)
        line = e.object.count(b"\n", 0, e.start) + 1
        raise UsageError(f"config file {path} is not valid TOML: line {line} is not UTF-8 "
                         f"(byte 0x{e.object[e.start]:02x})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    cfg = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        k = _CONFIG_ALIASES.get(k, k)
        if k not in _FILE_TYPES:
            raise UsageError(f"config file {path}: unknown setting {key!r}")
        if k in cfg:
            raise UsageError(f"config file {path}: {key!r} given twice (under two names)")
        types, what = _FILE_TYPES[k]
        if type(value) not in types:  # (exact types: a bool is not an int here)
            raise UsageError(f"config file {path}: {key} = {_toml(value)}: must be {what}")
        cfg[k] = value
    for i, m in enumerate(cfg.get("mapping", []), 1):
        where = f"config file {path}: [[mapping]] number {i}"
        if type(m) is not dict:
            raise UsageError(f"{where} = {_toml(m)}: must be a table with listen = "
                             '"HOST:PORT" and optionally backend = "HOST:PORT"')
        if "listen" not in m:
            raise UsageError(f"{where} needs 'listen'")
        if set(m) - {"listen", "backend"}:
            raise UsageError(f"{where}: unknown setting "
                             f"{sorted(set(m) - {'listen', 'backend'})[0]!r}")
        for name, value in m.items():
            if type(value) is not str:
                raise UsageError(f"{where}: {name} = {_toml(value)}: must be {_TEXT[1]}")
    return cfg


def make_config(args: argparse.Namespace, file_cfg: dict[str, Any]) -> Config:
    kw: dict[str, Any] = {}
    names = {f.name for f in fields(Config)}
    for key, conv in _CONFIG_KEYS.items():
        if key not in names:
            continue
        if key in file_cfg:
            try:
                kw[key] = conv(file_cfg[key])
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise UsageError(f"config file: {key} = {file_cfg[key]!r}: {e}") from None
        v = getattr(args, key, None)
        if v is not None:
            kw[key] = v
    try:
        return Config(**kw)
    except ValueError as e:
        raise UsageError(f"invalid settings: {e}") from None


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    verbose = getattr(args, "verbose", 0)
    if getattr(args, "quiet", False):
        level = logging.WARNING
    elif getattr(args, "stdio", False):
        # connect --stdio: its standard error is, as ssh's ProxyCommand, the user's terminal,
        # where lines about link breaks would land in the middle of a full-screen program:
        # warnings and errors only, -v the usual INFO, -vv DEBUG
        level = (logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG
    elif verbose >= 1:  # (-v: INFO is the default already; -vv too)
        level = logging.DEBUG
    logs.setup(level)


#: signals on which ``serve`` and ``connect`` stop as they do on Ctrl-C. SIGHUP too: the
#: terminal that ran the command closed, or a ``kill -HUP``, would otherwise end the process at
#: once, without closing its sessions (a client's then stay held on the server, backend
#: connections open, until the reliability timeout). ``serve`` takes SIGHUP as a daemon does,
#: as the order to read its certificate again (a restart would end every session).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


def _on_stop_signals(loop: asyncio.AbstractEventLoop, on_signal: Any) -> None:
    """Have ``loop`` call ``on_signal(signum)`` on each of STOP_SIGNALS, where it can (not on
    Windows, where the loop has no signal handlers, nor outside the main thread)."""
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)


def _notify_reloading(signame: str, what: str = "reloading") -> None:
    """Tell a service manager that the process reloads (RELOADING=1; READY=1 follows)."""
    # (Python's monotonic clock is CLOCK_MONOTONIC, which systemd reads here)
    notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
           f"STATUS={what} ({signame})")


async def _run_until_signal(start: Any, stop: Any, addresses: Any = None,
                            reload: Any = None, daily: Any = None, upgrade: Any = None) -> None:
    """``start()``, tell a service manager that the process is ready (with the addresses it
    then listens on, ``addresses()``, as the status line ``systemctl status`` shows), then on
    a stop signal ``stop()``. With ``reload``, SIGHUP calls ``reload()`` instead of stopping
    (told to the service manager as RELOADING=1, then READY=1 again). With ``daily``,
    ``daily()`` is called once a day (the certificate's dates looked at again). With
    ``upgrade``, SIGUSR2 awaits ``upgrade()`` (once at a time, and only once started);
    without, SIGUSR2 is logged and ignored (its default action would end the process)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    caught: list[int] = []
    status = "STATUS=running"
    ready = False  # (READY=1 said: a reload before then must not say it early)
    upgrading: list[asyncio.Task[None]] = []

    def on_upgrade() -> None:
        if upgrade is None:  # (its default action would end the process, and no session)
            log.warning("SIGUSR2: ignored (no upgrade in place here)")
            return
        if not ready or any(not t.done() for t in upgrading):
            log.info("SIGUSR2: %s", "an upgrade runs already" if ready else
                     "not started yet: send it again once it is ready")
            return
        upgrading[:] = [loop.create_task(upgrade_then_ready())]

    async def upgrade_then_ready() -> None:
        # (an upgrade that said RELOADING=1 and came back, not upgraded: ready again, as
        # before; an upgrade that went ahead is another program now)
        if await upgrade():
            notify("READY=1", status)

    if hasattr(signal, "SIGUSR2"):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR2, on_upgrade)

    def on_signal(signum: int) -> None:
        if reload is not None and signum == getattr(signal, "SIGHUP", None):
            if ready:
                _notify_reloading("SIGHUP")
            try:
                reload()
            finally:
                if ready:
                    notify("READY=1", status)
            return
        caught.append(signum)
        done.set()

    _on_stop_signals(loop, on_signal)
    await start()
    # (a service manager waiting for readiness, systemd's Type=notify: the listeners take
    # connections from now on)
    from .aio.server import format_hostport

    listening = ", ".join(format_hostport(*a[:2]) for a in addresses()) if addresses else ""
    if listening:
        status = f"STATUS=listening on {listening}"
    notify("READY=1", status)
    ready = True
    # (the heap's free memory goes back to the kernel now and then: icafast.heap)
    background = [loop.create_task(trim_now_and_then())]
    if daily is not None:
        background.append(loop.create_task(_every_day(daily)))
    try:
        await done.wait()
    finally:
        for task in background + upgrading:
            task.cancel()
    name = signal.Signals(caught[0]).name
    log.info("shutting down (%s)", name)
    notify("STOPPING=1", f"STATUS=shutting down ({name})")
    await stop()


#: what ``serve`` reads again on SIGHUP, from its configuration file too (the rest of the file
#: is read at start only: an upgrade in place, SIGUSR2, starts with all of it)
RELOADED_SETTINGS = ("tls_cert", "tls_key", "tls_client_ca")


def cmd_serve(args: argparse.Namespace) -> int:
    from .aio import Mapping, RelayServer, run
    from .aio.server import format_hostport

    file_cfg = load_toml(args.config)
    config = make_config(args, file_cfg)
    if config.on_timeout != "disconnect" and (args.hold is not None or "hold" in file_cfg):
        log.warning("--hold %g has no effect: sessions are held only with --on-timeout "
                    "disconnect (after the reliability timeout they are reset)", config.hold)
    listens = args.listen or []
    backends = args.backend or []
    mappings: list[Mapping] = []
    if file_cfg.get("mapping"):
        # (either alone was dropped without a word: --backend ignored for the file's
        # mappings, or --listen put in their place with the default backend)
        if bool(listens) != bool(backends):
            raise UsageError("the config file's [[mapping]] tables pair each listener with "
                             "its backend: to replace them on the command line, give both "
                             "--listen and --backend")
        if "listen" in file_cfg or "backend" in file_cfg:
            raise UsageError("the config file has both [[mapping]] tables and a listen or "
                             "backend key, which they would override: keep one of them")
    for m in file_cfg.get("mapping", []) if not listens else []:
        lh, lp = _address(m["listen"], "0.0.0.0", 2598)
        bh, bp = _address(m.get("backend", "127.0.0.1:1494"), "127.0.0.1", 1494, connect=True)
        mappings.append(Mapping(lh, lp, bh, bp))
    if not mappings:
        if not listens:
            listens = [str(file_cfg.get("listen", "0.0.0.0:2598"))]
        if not backends:
            backends = [str(file_cfg.get("backend", "127.0.0.1:1494"))]
        if len(backends) == 1 and len(listens) > 1:
            backends = backends * len(listens)
        if len(backends) != len(listens):
            raise UsageError("give one --backend per --listen (paired in order)")
        for lt, bt in zip(listens, backends, strict=True):
            lh, lp = _address(lt, "0.0.0.0", 2598)
            bh, bp = _address(bt, "127.0.0.1", 1494, connect=True)
            mappings.append(Mapping(lh, lp, bh, bp))
    control = args.control or file_cfg.get("control") or default_control_path()
    max_sessions = _limit(args, file_cfg, "max_sessions", 10_000)
    max_handshakes = _limit(args, file_cfg, "max_handshakes", 1024)
    impossible = beyond_any_process(max_sessions, max_handshakes)
    if impossible:
        # (lowered to the room there was, with a warning, as a setting merely above the
        # hard limit is: a typing error, or 10**26, ran a server of a few thousand sessions)
        raise UsageError(f"--max-sessions {max_sessions} with --max-handshakes "
                         f"{max_handshakes}: {impossible}")
    try:
        ssl_ctx, cert_file = _server_tls(args, file_cfg)
    except (OSError, ValueError) as e:
        print(f"icafast serve: TLS: {_tls_problem(e, '--tls-cert', '--tls-key')}",
              file=sys.stderr)
        return 1
    room, line = raise_nofile(max_sessions, max_handshakes)
    if room < max_sessions:
        # (refused as busy beyond the room there is, rather than running out of descriptors,
        # which also closes connections waiting to be accepted: icafast.rlimits)
        max_sessions = max(room, 1)
        line += f"; --max-sessions lowered to {max_sessions}"
        limit = soft_limit()
        if limit is not None and handshakes_within(limit, max_handshakes) < max_handshakes:
            max_handshakes = handshakes_within(limit, max_handshakes)
            line += f", --max-handshakes to {max_handshakes}"
        log.warning("%s", line)
    else:
        log.info("%s", line)
    server = RelayServer(
        mappings, config, control_path=control, max_sessions=max_sessions, ssl=ssl_ctx,
        max_handshakes=max_handshakes,
        max_failed_resumes=_limit(args, file_cfg, "max_failed_resumes", 20),
        proxy_protocol=bool(_opt(args, file_cfg, "proxy_protocol")),
        ticket_key_lifetime=_ticket_key_lifetime(args, file_cfg),
    )
    if args.check:
        print(f"icafast {__version__} serve: the configuration is valid ("
              + ", ".join(f"{format_hostport(m.listen_host or '*', m.listen_port)} -> "
                          f"{m.backend}" for m in mappings)
              + (", TLS" if ssl_ctx is not None else ", plain text") + ")")
        return 0
    log.info("icafast %s serve (core %s, crc32c %s, engine %s); control socket %s", __version__,
             IMPLEMENTATION, crc32c_backend(), _engine_kind(), control)
    if ssl_ctx is not None:
        log.info("TLS records: %s", tls_records())
    for m in mappings:
        if ssl_ctx is None and not _loopback(m.listen_host):
            log.warning("listening on %s WITHOUT TLS: session data and the first session "
                        "secret cross the network in plain text",
                        format_hostport(m.listen_host or "*", m.listen_port))

    def reload_tls() -> None:
        """SIGHUP: the certificate, its key and the client CA, read again (a renewed
        certificate), from the paths the configuration file gives now where there is one;
        new links are secured with them, and every session goes on. Files that do not load
        leave the links with what was loaded before. Other settings changed in the file are
        named: an upgrade in place or a restart applies them."""
        nonlocal cert_file, file_cfg
        tls_cfg = file_cfg
        if args.config:
            try:
                now = load_toml(args.config)
            except UsageError as e:
                log.error("SIGHUP: %s; nothing reloaded", e)
                return
            tls_cfg = {k: v for k, v in file_cfg.items() if k not in RELOADED_SETTINGS}
            tls_cfg.update((k, v) for k, v in now.items() if k in RELOADED_SETTINGS)
            unapplied = sorted(k for k in set(now) | set(file_cfg)
                               if k not in RELOADED_SETTINGS and now.get(k) != file_cfg.get(k))
            if unapplied:
                log.warning("SIGHUP: %s changed in %s: a reload reads only the TLS files "
                            "(%s); an upgrade in place (SIGUSR2) or a restart applies the rest",
                            ", ".join(unapplied), args.config, ", ".join(RELOADED_SETTINGS))
        if ssl_ctx is None:
            log.info("SIGHUP: nothing to reload (plain-text links, --no-tls)")
            return
        log.info("SIGHUP: reading the TLS certificate, key and client CA again")
        try:
            ctx, cert = _server_tls(args, tls_cfg)
        except (OSError, ValueError) as e:
            given = _opt(args, tls_cfg, "tls_cert"), _opt(args, tls_cfg, "tls_key")
            log.error("TLS: %s; new links keep the certificate loaded before",
                      _tls_problem(e, f"--tls-cert {given[0]}", f"--tls-key {given[1]}"))
            return
        server.set_ssl(ctx)
        cert_file, file_cfg = cert, tls_cfg
        log.info("TLS: reloaded; new links are secured with it, and every session goes on")

    async def main() -> None:
        from .aio import loop_name

        log.info("event loop: %s", loop_name())
        handover = _inherited_handover()
        await _run_until_signal(lambda: server.start(handover=handover), server.close,
                                lambda: server.addresses, reload_tls,
                                (lambda: _say_dates(cert_file, server=True)) if ssl_ctx else None,
                                lambda: _upgrade_in_place(server, "server"))

    try:
        run(main())
    except (OSError, ValueError) as e:
        print(f"icafast serve: {_error_text(e)}", file=sys.stderr)
        return 1
    return 0


#: how ``serve`` tells the program it execs (SIGUSR2) where the hand-over is: descriptors,
#: the first a file holding ``RelayServer.hand_over``'s bytes, the rest its sockets
HANDOVER_ENV = "ICAFAST_HANDOVER"


async def _upgrade_in_place(relay: Any, what: str) -> bool:
    """SIGUSR2: run the icafast now installed in this process, with every session. The
    program must take this process's arguments first (``serve ... --check``, ``connect ...
    --check``: the program starts, and the configuration, which may have changed, is
    valid); then the server or client hands its sessions over (``RelayServer.hand_over``,
    ``RelayClient.hand_over``) and this process execs the program, with the same arguments
    and the same process id (a service manager sees a reload), passing the sessions, the
    listening sockets and the backend (or application) connections on. The sessions resume
    at once. Should the exec fail, this process's server or client takes the sessions back.
    Returns whether it said RELOADING=1 and goes on, not upgraded (the caller says READY=1
    again); it returns nothing once the exec is done."""
    import subprocess
    import tempfile

    argv = [sys.executable, "-m", "icafast", *sys.argv[1:]]
    rc, out, err = 1, b"", b"no output"
    try:
        probe = await asyncio.create_subprocess_exec(
            *argv, "--check", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items()
                                         if k != "NOTIFY_SOCKET"})
        try:
            out, err = await asyncio.wait_for(probe.communicate(), 60)
            rc = probe.returncode or 0
        except asyncio.TimeoutError:
            probe.kill()
            await probe.wait()
            err = b"its --check did not end within 60 s"
    except OSError as e:
        err = str(e).encode()
    if rc != 0 or not out.strip():
        last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        log.error("SIGUSR2: the icafast installed now does not start with this %s's "
                  "arguments and configuration (%s): not upgraded, every session goes on "
                  "with icafast %s", what, last, __version__)
        return False
    log.info("SIGUSR2: upgrading in this process (pid %d) from icafast %s: %s; the sessions "
             "are handed over", os.getpid(), __version__, out.decode().strip())
    _notify_reloading("SIGUSR2", "upgrading")
    try:
        data, fds = await relay.hand_over()
    except OSError as e:  # (EMFILE: before anything changed)
        log.error("SIGUSR2: not upgraded: %s", _error_text(e))
        return True
    # (the sessions' secrets: in memory only where the system has memfd_create, else in an
    # unlinked file of this user's)
    memfd = getattr(os, "memfd_create", None)
    try:
        with (open(memfd("icafast-handover"), "w+b") if memfd is not None
              else tempfile.TemporaryFile()) as f:
            f.write(data)
            f.flush()
            f.seek(0)
            keep = [f.fileno(), *fds]
            for fd in keep:
                os.set_inheritable(fd, True)
            env = {**os.environ, HANDOVER_ENV: ",".join(map(str, keep))}
            for h in logging.getLogger().handlers + log.handlers:
                h.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, argv, env)
    except OSError as e:  # (the sessions come back to this process's server)
        log.error("SIGUSR2: could not run %s (%s): the sessions stay with icafast %s",
                  sys.executable, e, __version__)
    for fd in fds:
        os.set_inheritable(fd, False)
    await relay.start(handover=(data, fds))
    return True


def _inherited_handover() -> tuple[bytes, list[int]] | None:
    """The hand-over the process before this program left it (``_upgrade_in_place``), if
    any: its bytes and descriptors, which are no longer passed on to children."""
    spec = os.environ.pop(HANDOVER_ENV, "")
    if not spec:
        return None
    try:
        first, *fds = (int(x) for x in spec.split(","))
        with os.fdopen(first, "rb") as f:
            data = f.read()
    except (ValueError, OSError) as e:
        log.error("%s=%s: no hand-over to take there (%s): starting without sessions",
                  HANDOVER_ENV, spec, e)
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    return data, fds


def _error_text(e: Exception) -> str:
    """An error as one line for an administrator: an OSError's message without the
    "[Errno 98]" that str() puts before it."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e)


def _loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this machine only."""
    return host in ("::1", "localhost") or host.startswith("127.")


def _limit(args: argparse.Namespace, file_cfg: dict[str, Any], name: str, default: int) -> int:
    return int(_setting(args, file_cfg, name, default, lambda v: _count(str(v))))


def _setting(args: argparse.Namespace, file_cfg: dict[str, Any], name: str, default: Any,
             parse: Callable[[Any], Any]) -> Any:
    """A setting outside Config: the command line's (already parsed), else the config
    file's through ``parse`` (its error said in one line), else ``default``."""
    v = getattr(args, name, None)
    if v is not None:
        return v
    if name not in file_cfg:
        return default
    try:
        return parse(file_cfg[name])
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"config file: {name} = {file_cfg[name]!r}: {e}") from None


def _address(text: Any, default_host: str, default_port: int,
             connect: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` given to a command; ``connect``: an address to connect to, where port 0
    (any free port, for a listener) means nothing."""
    from .aio import parse_hostport

    try:
        host, port = parse_hostport(str(text), default_host, default_port)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if connect and port == 0:
        raise UsageError(f"invalid address {str(text)!r}: port 0 cannot be connected to")
    return host, port


def _ticket_key_lifetime(args: argparse.Namespace, file_cfg: dict[str, Any]) -> float:
    from .tls import TICKET_KEY_LIFETIME

    return float(_setting(args, file_cfg, "tls_ticket_key_lifetime", TICKET_KEY_LIFETIME,
                          _seconds))


def _opt(args: argparse.Namespace, file_cfg: dict[str, Any], name: str) -> Any:
    v = getattr(args, name, None)
    if v in (None, False):
        v = file_cfg.get(name, v)
    return v


def _readable(args: argparse.Namespace, file_cfg: dict[str, Any], *names: str) -> None:
    """The TLS files given must be readable: say which one is not (OpenSSL's errors do not)."""
    for name in names:
        path = _opt(args, file_cfg, name)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"--{name.replace('_', '-')} {path}: {e.strerror or e}") from None


class _SelfSignedError(ValueError):
    """The server's own self-signed certificate (not --tls-cert/--tls-key) does not load."""


def _tls_problem(e: Exception, cert_opt: str, key_opt: str) -> str:
    """OpenSSL's "PEM lib" error, raised when a certificate and key do not load as a pair, says
    nothing about which file is wrong: name the options instead."""
    if isinstance(e, _SelfSignedError):
        return str(e)
    if "PEM lib" in str(e):
        return (f"{cert_opt} and {key_opt} do not load as a certificate and its private key "
                f"(PEM, the key unencrypted): {e}")
    if "KEY_VALUES_MISMATCH" in str(e):
        return f"{key_opt} is not the private key of the certificate in {cert_opt}: {e}"
    return _error_text(e)


def _no_tls_alone(args: argparse.Namespace, file_cfg: dict[str, Any], *names: str) -> None:
    """--no-tls with an option that secures the links (a certificate, a client CA, a pinned
    fingerprint) is refused: the option was dropped without a word, and the links ran in plain
    text, unchecked, where the administrator had asked for a check."""
    given = [f"--{n.replace('_', '-')}" for n in names if _opt(args, file_cfg, n)]
    if given:
        raise ValueError(f"--no-tls (plain-text links) leaves no use for {', '.join(given)}: "
                         "give one or the other")


def _server_tls(args: argparse.Namespace, file_cfg: dict[str, Any]) -> tuple[Any, str | None]:
    """The server's TLS context (None: --no-tls) and the file of its certificate."""
    from . import tls

    if _opt(args, file_cfg, "no_tls"):
        _no_tls_alone(args, file_cfg, "tls_cert", "tls_key", "tls_client_ca")
        return None, None
    cert, key = _opt(args, file_cfg, "tls_cert"), _opt(args, file_cfg, "tls_key")
    if bool(cert) != bool(key):
        raise ValueError("give both --tls-cert and --tls-key")
    _readable(args, file_cfg, "tls_cert", "tls_key", "tls_client_ca")
    client_ca = _opt(args, file_cfg, "tls_client_ca")
    if not cert:
        state = _opt(args, file_cfg, "state_dir") or tls.default_state_dir()
        try:
            cert, key, created = tls.ensure_self_signed(state)
        except OSError as e:
            raise OSError(e.errno, f"cannot keep the self-signed certificate in {state} "
                                   f"(--state-dir): {e.strerror or e}"
                                   + (f" ({e.filename})" if e.filename else "")) from None
        what = "created a self-signed" if created else "using the self-signed"
        log.info("TLS: %s certificate %s", what, cert)

        def damaged(e: Exception) -> Exception:
            # (named as what they are: not "--tls-cert and --tls-key", which were not given)
            reason = getattr(e, "reason", None) or e
            return _SelfSignedError(f"the self-signed certificate {cert} and its key {key} do "
                                    f"not load ({reason}): restore them, or remove both to "
                                    "create a new certificate (a new fingerprint for the "
                                    "clients)")

        try:
            fp = tls.fingerprint_of_pem(cert)
        except (OSError, ValueError) as e:
            raise damaged(e) from None
        ctx = tls.server_context(cert, key, client_ca, pair_error=damaged)
        # (a self-signed key that others may read was said by tls.ensure_self_signed, which
        # makes it private again or says why it could not)
    else:
        fp = tls.fingerprint_of_pem(cert)
        ctx = tls.server_context(cert, key, client_ca)
        if tls.key_readable_by_everyone(key):
            log.warning("TLS: the private key %s can be read by every user of this machine "
                        "(chmod o-r %s)", key, key)
    log.warning("TLS certificate SHA-256 fingerprint: %s  (clients: --tls-fingerprint %s)",
                tls.pretty_fingerprint(fp), fp)
    _say_dates(cert, server=True)
    return ctx, cert


#: how often a running ``serve`` or ``connect`` looks at its certificate's dates again
DATES_CHECKED_EVERY = 24 * 3600.0


def _say_dates(cert: str | None, server: bool) -> None:
    """Log what is wrong with the dates of this end's own certificate, in ``cert``: expired,
    not valid yet, or expiring soon (and then how a renewed one is taken)."""
    from . import tls

    if not cert:
        return
    if server:
        who = "clients that verify it (--tls-ca)"
        renew = ("renew it, then send icafast serve SIGHUP (systemctl reload icafast): the "
                 "sessions go on")
    else:
        who = "servers (--tls-client-ca)"
        renew = "renew it: new links load the renewed one, with no restart"
    try:
        problem = tls.validity_problem(cert, who=who, renew=renew)
    except (OSError, ValueError):  # (what cryptography cannot read: OpenSSL loads or refuses)
        problem = None
    if problem:
        log.warning("TLS: %s", problem)


async def _every_day(call: Callable[[], None]) -> None:
    """``call()`` every DATES_CHECKED_EVERY: :func:`_say_dates` of the certificate in use (a
    server that runs for months sees its certificate's end come)."""
    while True:
        await asyncio.sleep(DATES_CHECKED_EVERY)
        call()


def _client_tls(args: argparse.Namespace, file_cfg: dict[str, Any]) -> Any:
    from . import tls

    if _opt(args, file_cfg, "no_tls"):
        _no_tls_alone(args, file_cfg, "tls_ca", "tls_fingerprint", "tls_client_cert",
                      "tls_client_key")
        return None
    if _opt(args, file_cfg, "tls_client_key") and not _opt(args, file_cfg, "tls_client_cert"):
        raise ValueError("--tls-client-key needs --tls-client-cert")
    _readable(args, file_cfg, "tls_ca", "tls_client_cert", "tls_client_key")
    _say_dates(_opt(args, file_cfg, "tls_client_cert"), server=False)
    return tls.client_context(
        ca=_opt(args, file_cfg, "tls_ca"),
        fingerprint=_opt(args, file_cfg, "tls_fingerprint"),
        insecure=bool(_opt(args, file_cfg, "tls_insecure")),
        cert=_opt(args, file_cfg, "tls_client_cert"),
        key=_opt(args, file_cfg, "tls_client_key"),
        server_hostname=_opt(args, file_cfg, "tls_server_name"),
    )


def cmd_connect(args: argparse.Namespace) -> int:
    from .aio import RelayClient, run

    file_cfg = load_toml(args.config)
    config = make_config(args, file_cfg)
    stdio = bool(getattr(args, "stdio", False))
    # (with --stdio a config file's listen, there for other uses of the file, means nothing)
    listen = ("", 0) if stdio else _address(args.listen or file_cfg.get("listen",
                                                                        "127.0.0.1:1494"),
                                            "127.0.0.1", 1494)
    server_text = args.server or file_cfg.get("server")
    if not server_text:
        raise UsageError("--server HOST:PORT is required")
    server = _address(server_text, "127.0.0.1", 2598, connect=True)
    fb_text = args.fallback or file_cfg.get("fallback")
    fallback = _address(fb_text, "127.0.0.1", 1494, connect=True) if fb_text else None

    policy_logged: set[bytes] = set()  # sessions whose server timeouts were logged

    def on_status(e: Any, engine: Any) -> None:
        sid = engine.session_id
        if isinstance(e, SessionClosed):
            policy_logged.discard(sid)
            return
        pol = getattr(engine, "server_policy", None)
        mine = config.policy
        if pol is not None and pol != mine and sid not in policy_logged:
            policy_logged.add(sid)
            diff = _policy_difference(pol, mine)
            if diff:
                log.info("session %s: using the server's timeouts: %s", sid.hex(), diff)

    try:
        tls_cfg = _client_tls(args, file_cfg)
    except (OSError, ValueError) as e:
        print(f"icafast connect: TLS: {_tls_problem(e, '--tls-client-cert', '--tls-client-key')}",
              file=sys.stderr)
        return 1
    if tls_cfg is not None and tls_cfg.fingerprint is None and tls_cfg.context.verify_mode == 0:
        log.warning("TLS without verifying the server (--tls-insecure): an active attacker can "
                    "read and change the session")
    if args.check:
        from .aio.server import format_hostport

        print(f"icafast {__version__} connect: the configuration is valid ("
              + ("--stdio" if stdio else format_hostport(listen[0] or "*", listen[1]))
              + f" -> server {format_hostport(*server)}"
              + (", TLS" if tls_cfg is not None else ", plain text") + ")")
        return 0
    if stdio:
        return _connect_stdio(server, config, fallback, on_status, tls_cfg)
    if not _loopback(listen[0]):
        from .aio.server import format_hostport

        log.warning("listening on %s, not on loopback: whoever can connect to it gets a session "
                    "to the server's backend, with no check of who they are (docs/SECURITY.md)",
                    format_hostport(listen[0] or "*", listen[1]))
    # (no session limit of its own: room for as many as a server's default, where allowed)
    log.info("%s", raise_nofile(CLIENT_SESSIONS)[1])
    client = RelayClient(listen, server, config, fallback=fallback, on_status=on_status,
                         tls=tls_cfg)
    try:
        client_cert = _opt(args, file_cfg, "tls_client_cert") if tls_cfg is not None else None
        async def main() -> None:
            handover = _inherited_handover()
            await _run_until_signal(lambda: client.start(handover=handover), client.close,
                                    lambda: client.addresses,
                                    daily=(lambda: _say_dates(client_cert, server=False))
                                    if client_cert else None,
                                    upgrade=lambda: _upgrade_in_place(client, "client"))

        run(main())
    except OSError as e:
        print(f"icafast connect: {_error_text(e)}", file=sys.stderr)
        return 1
    return 0


def _take_stdio() -> tuple[int, int]:
    """Standard input and output for the session's stream: descriptors of its own on them,
    and /dev/null on 0 and standard error on 1 in their place, so that nothing else in the
    process (a stray print, a library's warning) can read from the stream or write into it."""
    # (one closed when the process started is None in sys; its number may be another file's
    # by now, which the stream must not go to)
    for std, what in ((sys.__stdin__, "standard input"), (sys.__stdout__, "standard output")):
        if std is None:
            raise UsageError(f"--stdio: {what} is not open")
    fds = []
    for fd, what in ((0, "standard input"), (1, "standard output")):
        try:
            fds.append(os.dup(fd))
        except OSError as e:
            for taken in fds:
                os.close(taken)
            raise UsageError(f"--stdio: {what} is not open ({_error_text(e)})") from None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, 0)
        try:
            os.dup2(2, 1)
        except OSError:  # (no standard error either)
            os.dup2(devnull, 1)
    finally:
        os.close(devnull)
    return fds[0], fds[1]


def _connect_stdio(server: tuple[str, int], config: Config, fallback: tuple[str, int] | None,
                   on_status: Callable[[Any, Any], None], tls_cfg: Any) -> int:
    """``icafast connect --stdio``: one session over standard input and output."""
    from .aio import run
    from .aio.stdio import StdioSession

    # (one session, two sockets and the descriptors: no room to make for more)
    in_fd, out_fd = _take_stdio()
    session = StdioSession(server, config, stdin_fd=in_fd, stdout_fd=out_fd, fallback=fallback,
                           on_status=on_status, tls=tls_cfg)
    # From the session's end on, the stop signals stay ignored until the process exits, which
    # it is about to do with the session's status (see _run_stdio). Their handlers were put
    # back here once, before the line below was written: a SIGHUP from ssh that came after
    # that killed the process, and the exit status was the signal's, not 1.
    try:
        status = run(_run_stdio(session))
    except OSError as e:
        print(f"icafast connect: {_error_text(e)}", file=sys.stderr)
        return 1
    if status:
        print(f"icafast connect: session ended abortively: {session.error}", file=sys.stderr)
    return status


#: connect --stdio stopped by a signal after its standard input ended: how long the session
#: may take to end by itself before it is closed
STDIO_STOP_GRACE = 1.0


async def _run_stdio(session: Any) -> int:
    """Run the session until it is over (its exit status) or a signal stops it (0, as
    ``icafast connect`` stops on one). Once it is over, the stop signals are ignored until
    the process exits: ssh exits at the end of its ProxyCommand's output,
    which an abortive end brings at once, and sends it SIGHUP, which must neither kill the
    process before or after its line nor pass for a stop (status 0, no line)."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    caught: list[int] = []

    def on_signal(signum: int) -> None:
        caught.append(signum)
        stopped.set()

    def handler(signum: int, _frame: Any) -> None:  # (in the main thread, between bytecodes)
        loop.call_soon_threadsafe(on_signal, signum)

    # Python-level handlers, not the loop's (add_signal_handler): removing one of those puts
    # the default action back before anything else can be set, and a SIGHUP that came in
    # that moment killed the process (about one ssh-like end in forty on a slow host). Here
    # each handler gives way to SIG_IGN in one step.
    handled = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # (not the main thread: no signals)
            signal.signal(sig, handler)
            handled.append(sig)
    if hasattr(signal, "SIGUSR2"):  # (its default action would end the process and session)
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGUSR2, lambda _s, _f: loop.call_soon_threadsafe(
                log.warning, "SIGUSR2: ignored (icafast connect --stdio does not upgrade in "
                "place: its session ends with its program, and the next one starts with the "
                "icafast installed then)"))
            handled.append(signal.SIGUSR2)
    try:
        return await _stdio_until_over(session, stopped, caught)
    finally:
        _ignore_quietly(handled)


#: CPython's reports of a signal that came as its handler gave way to SIG_IGN, left out (see
#: _ignore_quietly)
_QUIET_REPORTS: set[str] = set()


def _ignore_quietly(signals: list[int]) -> None:
    """SIG_IGN for ``signals``, from now until the process exits, without the report CPython
    makes of one that came as its handler gave way. A signal caught just before its action
    became SIG_IGN waits for its Python handler, and when the interpreter then finds SIG_IGN
    in that handler's place, it writes "Signal N ignored due to race condition" with a
    traceback to standard error (an unraisable exception), which ssh shows its user. That
    signal was to be ignored, and is; only that report is left out."""
    if not _QUIET_REPORTS:
        before = sys.unraisablehook

        def hook(u: Any) -> None:
            if not (isinstance(u.exc_value, OSError) and str(u.exc_value) in _QUIET_REPORTS):
                before(u)

        sys.unraisablehook = hook
    _QUIET_REPORTS.update(f"Signal {int(sig)} ignored due to race condition"
                          for sig in signals)
    for sig in signals:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)


async def _stdio_until_over(session: Any, stopped: asyncio.Event, caught: list[int]) -> int:
    loop = asyncio.get_running_loop()
    await session.start()
    trimmer = loop.create_task(trim_now_and_then())
    over = loop.create_task(session.wait())
    signalled = loop.create_task(stopped.wait())
    try:
        await asyncio.wait({over, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        trimmer.cancel()
        signalled.cancel()
    if over.done():
        return over.result()
    runner = session.runner
    if runner is not None and runner.closed_future.done():
        # the session had ended by itself (an abortive end ends standard output at once, and
        # ssh answers that by exiting, with SIGHUP to its ProxyCommand): its status stands
        return await over
    log.info("shutting down (%s)", signal.Signals(caught[0]).name)
    if session.input_at_end():
        # ssh, as it exits, closes its ProxyCommand's standard input and sends SIGHUP at
        # once: what it wrote last (its disconnect message) may not have gone out yet. The
        # input has ended, so the session may end gracefully on its own (the backend answers
        # the end of its input by closing, as sshd does): a moment for it, and for that last
        # input to reach the backend, before closing the session as for any stop.
        await asyncio.wait({over}, timeout=STDIO_STOP_GRACE)
        if over.done():
            return over.result()
    over.cancel()
    await session.close()
    return 0


def _policy_difference(server: Any, local: Any) -> str:
    """What of the server's timeouts differs from the local settings, as the options are
    named: "--dead-timeout 10 (here 1), --keepalive-interval 3 (here 0.5)" (rather than two
    Python reprs of a Policy)."""
    parts = []
    for f in fields(server):
        if f.name == "hold" and server.on_timeout != "disconnect":
            continue  # (a server that resets its sessions at the timeout holds none)
        theirs, mine = getattr(server, f.name), getattr(local, f.name)
        if theirs != mine:
            parts.append(f"--{f.name.replace('_', '-')} {theirs:g} (here {mine:g})"
                         if isinstance(theirs, float) else
                         f"--{f.name.replace('_', '-')} {theirs} (here {mine})")
    return ", ".join(parts)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _fmt_secs(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


#: Prometheus names of the server's counters (RelayServer.metrics), with their help lines
_COUNTER_HELP = {
    "sessions_opened": "Sessions opened (NEW accepted and the backend connected).",
    "resumes": "Links on which a session resumed.",
    "handshakes_failed": "Connections whose handshake failed (not icafast, malformed, too "
                         "slow): closed, after a REJECT where one could be sent.",
    "tls_handshakes_failed": "Connections whose TLS handshake failed (each logged with "
                             "its reason).",
    "sessions_evicted": "Disconnected sessions ended to make room at the session limit for "
                        "another source (one that held more sessions).",
    "handovers_taken": "Hand-overs this server took from the one before (an upgrade in "
                       "place, SIGUSR2).",
    "tls_ticket_key_renewals": "TLS session ticket keys made new "
                               "(--tls-ticket-key-lifetime).",
}


def prometheus_text(m: dict[str, Any]) -> str:
    """``RelayServer.metrics()`` in Prometheus' text exposition format (version 0.0.4)."""
    from .aio.server import CLOSE_NAMES, REJECT_NAMES

    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]) -> None:
        out.append(f"# HELP icafast_{name} {help_}")
        out.append(f"# TYPE icafast_{name} {kind}")
        out.extend(f"icafast_{name}{labels} {value}" for labels, value in samples)

    metric("start_time_seconds", "gauge", "When the server started (Unix time).",
           [("", m["started"])])
    metric("sessions", "gauge", "Sessions by state (DISCONNECTED: waiting for a resume).",
           [(f'{{state="{k}"}}', v) for k, v in sorted(m["sessions"].items())])
    metric("sessions_held", "gauge", "Sessions held DISCONNECTED past the reliability "
           "timeout (--on-timeout disconnect).", [("", m["held"])])
    metric("handshakes", "gauge", "Connections in their handshake.", [("", m["handshakes"])])
    metric("unacked_bytes", "gauge", "Stream bytes sent to clients and not yet acknowledged "
           "(kept for replay).", [("", m["unacked_bytes"])])
    metric("stream_bytes_total", "counter", "Stream bytes carried: received from clients, "
           "and sent to clients and acknowledged by them.",
           [('{direction="from_clients"}', m["bytes_from_clients"]),
            ('{direction="to_clients"}', m["bytes_to_clients"])])
    counters = m["counters"]
    for key, help_ in _COUNTER_HELP.items():
        metric(f"{key}_total", "counter", help_, [("", counters.get(key, 0))])
    groups = (("ended_", "sessions_ended_total", "reason", "Sessions ended, by reason.",
               CLOSE_NAMES.values()),
              ("rejected_", "rejected_total", "reason",
               "NEW and RESUME requests refused (REJECT), by reason.",
               REJECT_NAMES.values()),
              ("turned_away_", "turned_away_total", "why", "Connections closed at once: every "
               "handshake slot taken (full), or the oldest of a source that held more "
               "(evicted).", ("full", "evicted")))
    for prefix, name, label, help_, names in groups:
        seen = [k[len(prefix):] for k in counters if k.startswith(prefix)]
        every = list(names) + sorted(set(seen) - set(names))
        metric(name, "counter", help_,
               [(f'{{{label}="{n}"}}', counters.get(prefix + n, 0)) for n in every])
    return "\n".join(out) + "\n"


def cmd_sessions(args: argparse.Namespace) -> int:
    from .aio.server import control_request

    file_cfg = load_toml(args.config)
    path = args.control or file_cfg.get("control") or default_control_path()
    if args.reset is not None:
        req = {"cmd": "reset", "id": args.reset}
    elif args.disconnect is not None:
        req = {"cmd": "disconnect", "id": args.disconnect}
    elif args.metrics:
        req = {"cmd": "metrics"}
    else:
        req = {"cmd": "list"}
    if "id" in req and not req["id"].strip():
        raise UsageError(f"--{req['cmd']} needs a session ID (or the start of one)")
    try:
        reply = control_request(path, req)
    except OSError as e:
        print(f"icafast sessions: cannot reach the server at {path}: {e}", file=sys.stderr)
        return 2
    except ValueError:  # (not JSON: not an icafast control socket)
        print(f"icafast sessions: {path} did not answer as an icafast server's control socket",
              file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"icafast sessions: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    if req["cmd"] == "metrics":
        sys.stdout.write(prometheus_text(reply["metrics"]))
        return 0
    if req["cmd"] != "list":
        note = ""
        if reply.get("had_link") is False:  # (nothing to drop: said, not left to guess)
            note = " (it had no link: DISCONNECTED already, nothing done)"
        print(f"{req['cmd']}: {reply.get('reset') or reply.get('disconnected')}{note}")
        return 0
    rows = reply["sessions"]
    head = ["ID", "STATE", "CLIENT", "BACKEND", "AGE", "IDLE", "IN", "OUT", "UNACKED", "BUFFER",
            "RTT", "RECONN"]
    table = [head]
    for r in rows:
        state = r["state"] + (" (held)" if r.get("held") else "")
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f}ms"
        table.append([r["id"], state, r.get("client", ""), r["backend"], _fmt_secs(r["age"]),
                      _fmt_secs(r["idle"]), _fmt_bytes(r["bytes_in"]),
                      _fmt_bytes(r["bytes_out"]), _fmt_bytes(r["unacked"]),
                      _fmt_bytes(r.get("replay_capacity", 0)), rtt,
                      str(r["reconnects"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(rows)} session(s)")
    return 0


def _demo_size(text: str) -> int:
    return _number(parse_size, text, 1, "the size must be at least 1 byte")


def _demo_rate(text: str) -> int:
    """0 (unlimited) or at least 1 byte/s: a fraction of a byte would round down to 0, and a
    crawl asked for would run unlimited."""
    value = parse_size(text)
    number = text.strip().lower().removesuffix("ib").removesuffix("b")
    if value == 0 and float(number[:-1] if number[-1:] in ("k", "m", "g") else number):
        raise argparse.ArgumentTypeError(f"the rate must be 0 (unlimited) or at least 1 byte "
                                         f"per second, not {text!r}")
    return value


def _demo_breaks(text: str) -> int:
    return _number(int, text, 0, "the number of breaks must not be negative")


def cmd_demo(args: argparse.Namespace) -> int:
    from .aio import run
    from .demo import demo

    return run(demo(size=args.size, breaks=args.breaks, rate=args.rate,
                    verbose=args.verbose, quiet=args.quiet, use_tls=not args.no_tls))


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import selfcheck

    return selfcheck(args.seconds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd in ("serve", "connect"):
        setup_logging(args)
    elif args.cmd == "demo":
        logging.basicConfig(level=logging.DEBUG if args.verbose >= 2 else
                            logging.INFO if args.verbose else logging.WARNING,
                            format="  log: %(message)s", stream=sys.stderr)
        logs.lean_records()
    if args.cmd in ("serve", "connect", "demo"):
        from .heap import tune_malloc

        log.info("%s", tune_malloc())
    handler = {"serve": cmd_serve, "connect": cmd_connect, "sessions": cmd_sessions,
               "demo": cmd_demo, "selfcheck": cmd_selfcheck}[args.cmd]
    try:
        if args.cmd != "sessions":  # (ICAFAST_TLS_IO or ICAFAST_LOOP with a value it does
            try:  # not take, or one that cannot run here: one line, not a traceback)
                uses_pipe()
                from .aio import loop_choice

                loop_choice()
            except (ValueError, RuntimeError) as e:
                raise UsageError(str(e)) from None
        return handler(args)
    except UsageError as e:
        print(f"icafast {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (what reads the output stopped early: no traceback for that)
        logs.drop_stdout()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
