"""asyncio adapters: the relay server, the client and the library API."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from .client import RelayClient, close_sessions, open_session
from .server import Mapping, RelayServer, control_request, parse_hostport

__all__ = [
    "RelayServer",
    "RelayClient",
    "Mapping",
    "open_session",
    "close_sessions",
    "control_request",
    "parse_hostport",
    "run",
    "loop_name",
    "loop_choice",
]

T = TypeVar("T")


def loop_choice() -> str:
    """``ICAFAST_LOOP``: ``auto`` (the default: uvloop where it is installed, else the
    standard loop), ``uvloop`` (uvloop, or an error where it cannot be imported) or
    ``asyncio`` (the standard loop). Any other value is a ``ValueError``, and ``uvloop``
    without uvloop a ``RuntimeError``: a setting mistyped or missing its package would
    otherwise run the other loop without a word."""
    v = os.environ.get("ICAFAST_LOOP", "").strip().lower() or "auto"
    if v not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"ICAFAST_LOOP={v!r}: expected auto, uvloop or asyncio")
    if v == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"ICAFAST_LOOP=uvloop: uvloop cannot be imported ({e})") from None
    return v


def _want_uvloop() -> bool:
    v = loop_choice()
    if v == "asyncio":
        return False
    return v == "uvloop" or sys.platform != "win32"


#: what the standard event loop reports for each accept() that fails for want of descriptors
#: (or memory)
ACCEPT_FAILED = "socket.accept() out of system resource"
#: ... which the loops that ``run`` makes say at most once in this many seconds
ACCEPT_FAILED_EVERY = 10.0


def quiet_accept_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Have ``loop`` log an accept() that failed for want of descriptors in one line, at most
    once every ``ACCEPT_FAILED_EVERY`` seconds; its other errors as before.

    The standard loop reports each such failure with a traceback, and tries again up to its
    listener's backlog of times (1,024 for icafast's) at once, each try scheduling another
    retry a second later: a server out of descriptors logged hundreds of tracebacks a second,
    then thousands once the retries piled up (680,000 lines in 15 s under a limit of 64).
    uvloop does not report it (libuv closes the connections waiting instead)."""
    last = [-ACCEPT_FAILED_EVERY]
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_FAILED:
            now = lp.time()
            if now - last[0] >= ACCEPT_FAILED_EVERY:
                last[0] = now
                logging.getLogger("icafast").error(
                    "%s: %s; new connections wait until descriptors are free (the event "
                    "loop tries again every second; said at most once every %g s)",
                    ACCEPT_FAILED, context.get("exception"), ACCEPT_FAILED_EVERY)
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _quietly(main: Coroutine[Any, Any, T]) -> T:
    quiet_accept_failures(asyncio.get_running_loop())
    return await main


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when available (the default on Linux/macOS), else asyncio.

    ``ICAFAST_LOOP=asyncio`` forces the standard loop (:func:`loop_choice`). Either way the
    loop logs an accept() that fails for want of descriptors in one line at most every
    ``ACCEPT_FAILED_EVERY`` seconds (``quiet_accept_failures``).
    """
    try:
        uv = _want_uvloop()
    except BaseException:
        main.close()  # (never to run: no "coroutine was never awaited" warning)
        raise
    main = _quietly(main)
    if uv:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            if not hasattr(asyncio, "Runner"):  # Python 3.10
                return uvloop.run(main)
            # (as asyncio.run does: on the way out, tasks still pending are cancelled,
            # asynchronous generators and the default executor shut down, the loop closed)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return type(loop).__module__.split(".")[0]
