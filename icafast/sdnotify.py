"""Readiness and shutdown told to a service manager (systemd's ``Type=notify``).

A service manager that starts a process with ``NOTIFY_SOCKET`` in its environment (an
``AF_UNIX`` datagram socket: a path, or an abstract name written with a leading ``@``) waits for
``READY=1`` on it before it counts the service as started, so units ordered after it
(``After=``) start only once its listeners take connections. ``STOPPING=1`` says the process is
shutting down. The protocol is one datagram of ``KEY=value`` lines (sd_notify(3)); this is its
sender, without libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("icafast")

__all__ = ["notify"]


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # (an abstract socket: a leading NUL byte instead of the @)
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # (vsock and other address kinds are not supported: nothing is sent)


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one message to the service manager
    named by ``NOTIFY_SOCKET``, if any. Whether it was sent: a failure is logged, never raised
    (the service runs on; the manager reports the missing readiness itself)."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value or not hasattr(socket, "AF_UNIX"):
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s: not a path or an abstract socket name; the service "
                    "manager is not told of readiness", value)
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message, address)
    except OSError as e:
        log.warning("could not tell the service manager (NOTIFY_SOCKET=%s): %s", value,
                    e.strerror or e)
        return False
    return True
