"""asyncio adapters: the relay server, the client and the library API."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from .client import RelayClient, open_session
from .server import Mapping, RelayServer, control_request, parse_hostport

__all__ = [
    "RelayServer",
    "RelayClient",
    "Mapping",
    "open_session",
    "control_request",
    "parse_hostport",
    "run",
    "loop_name",
]

T = TypeVar("T")


def _want_uvloop() -> bool:
    v = os.environ.get("ICAFAST_LOOP", "").lower()
    if v == "asyncio":
        return False
    return sys.platform != "win32"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when available (the default on Linux/macOS), else asyncio.

    ``ICAFAST_LOOP=asyncio`` forces the standard loop.
    """
    if _want_uvloop():
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
