"""The open-files limit of a relay process.

Every session holds two sockets in each relay: its link and its backend connection on the
server, its link and the application's connection on the client. Most systems start a process
with a soft limit of 1,024 open files (systemd's default for services, and most shells'), so a
server left at that limit refuses sessions with "Too many open files" from about the 500th on,
far below its default ``--max-sessions`` of 10,000.

:func:`raise_nofile` raises the soft limit to what the process needs, as far as the hard limit
allows (an unprivileged process may do that), and says in one line what it did, or how many
sessions the limit leaves room for when even the hard limit is too low. ``icafast serve`` and
``icafast connect`` call it at start-up; a program that embeds icafast decides its own limits
(the library never changes them).

Running out costs more than the sessions refused. A new session whose backend connection
cannot be opened is rejected with "Too many open files". When not even ``accept()`` gets a
descriptor, uvloop (libuv) accepts and at once closes every connection waiting, the links of
sessions coming back among them, and the standard loop stops accepting for a second at a time
(reporting each failed ``accept()``, hundreds to thousands a second, in the Pythons before
CPython issue gh-151615 was fixed: the loops ``icafast.aio.run`` makes log that in one line
at most every 10 s). Either way the server takes connections again once descriptors are
free (``tests/test_rlimits.py``), but until then a session whose link broke cannot come back.
So where the hard limit is too low, ``icafast serve`` also lowers its ``--max-sessions`` to
the room there is (and its ``--max-handshakes`` to half of it at most,
:func:`handshakes_within`): new sessions beyond it are refused as busy (REJECT 5, with a
reason the client reports), connections beyond the handshakes are closed at once, and what
the sessions it holds need stays free.
"""

from __future__ import annotations

from typing import Any

#: descriptors a relay process needs besides its sessions: listeners, the control socket, the
#: event loop's own, log files, the TLS library's, and connections being accepted or closed
SPARE = 256

#: the most descriptors a process can ever have open: a descriptor is a C ``int`` (Linux's
#: ``fs.nr_open``, which bounds every limit, cannot be set higher either). Settings that need
#: more can never be met, whatever the limits: ``icafast serve`` refuses them, where it lowers
#: settings that the current hard limit alone has no room for
FD_MAX = 2**31 - 1

#: the sessions ``icafast connect`` makes room for (it has no session limit of its own): as many
#: as a server allows by default
CLIENT_SESSIONS = 10_000


def fds_needed(sessions: int, handshakes: int = 0) -> int:
    """Descriptors for ``sessions`` sessions (two each) and ``handshakes`` connections in the
    handshake at once, plus :data:`SPARE`."""
    return 2 * sessions + handshakes + SPARE


def beyond_any_process(sessions: int, handshakes: int = 0) -> str | None:
    """Why ``sessions`` sessions and ``handshakes`` handshakes can never fit in one process
    (they need more than :data:`FD_MAX` descriptors), else None."""
    wanted = fds_needed(sessions, handshakes)
    if wanted <= FD_MAX:
        return None
    return (f"need {wanted} open files (two per session, one per handshake, {SPARE} spare), "
            f"more than any process can have ({FD_MAX})")


def sessions_within(limit: int, handshakes: int = 0) -> int:
    """How many sessions fit in ``limit`` descriptors (the inverse of :func:`fds_needed`)."""
    return max(0, (limit - handshakes - SPARE) // 2)


def handshakes_within(limit: int, handshakes: int) -> int:
    """How many of ``handshakes`` connections in the handshake a limit of ``limit`` descriptors
    leaves room for: at most half of what it has beyond :data:`SPARE` (at least one), so that
    the other half holds sessions. A server at a hard limit of 1,024 with the default 1,024
    handshakes otherwise had room for no session at all (and was lowered to one), and its
    handshakes alone could take every descriptor."""
    return max(1, min(handshakes, (limit - SPARE) // 2))


def raise_nofile(sessions: int, handshakes: int = 0,
                 resource_mod: Any | None = None) -> tuple[int, str]:
    """Raise the soft limit on open files to what ``sessions`` sessions need.

    Returns ``(room, line)``: how many sessions the limit now has room for (``sessions`` when
    it covers them all, fewer when even the hard limit is too low), and what was done, for the
    log (a warning when ``room < sessions``). Never lowers a limit. ``resource_mod`` is for
    tests (default: the ``resource`` module, which only Unix has).
    """
    r = _resource(resource_mod)
    if r is None:  # pragma: no cover - Windows: no such limit
        return sessions, "open files: no limit to raise on this platform"
    wanted = fds_needed(sessions, handshakes)
    soft, hard = r.getrlimit(r.RLIMIT_NOFILE)
    infinite = r.RLIM_INFINITY
    if _enough(r, soft, wanted):
        return sessions, (f"open files: limit {_show(soft, infinite)}, enough for {sessions} "
                          "sessions")
    target = wanted if hard == infinite else min(wanted, hard)
    if target > soft:
        try:
            r.setrlimit(r.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            target = soft
            why = f" (raising it failed: {e})"
        else:
            why = ""
        if target >= wanted:
            return sessions, f"open files: limit raised from {soft} to {target}{why}"
    else:
        why = ""
    room = sessions_within(target, handshakes_within(target, handshakes) if handshakes else 0)
    verb = f"raised from {soft} to {target}" if target > soft else f"{target}"
    return room, (f"open files: limit {verb}{why}, the hard limit {_show(hard, infinite)}: "
                  f"room for {room} sessions, not {sessions}; raise the hard limit to "
                  f"{wanted} (systemd: LimitNOFILE=; a shell: ulimit -n)")


def soft_limit(resource_mod: Any | None = None) -> int | None:
    """The soft limit on open files (None: no limit, or no such limit on this platform)."""
    r = _resource(resource_mod)
    if r is None:  # pragma: no cover - Windows: no such limit
        return None
    soft = r.getrlimit(r.RLIMIT_NOFILE)[0]
    return None if soft == r.RLIM_INFINITY else int(soft)


def _resource(resource_mod: Any | None) -> Any | None:
    """``resource_mod`` (a test's stand-in), else the ``resource`` module, else None (Windows)."""
    if resource_mod is not None:
        return resource_mod
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: no such limit
        return None
    return resource


def _enough(r: Any, soft: int, wanted: int) -> bool:
    """Whether a soft limit of ``soft`` (of ``resource`` module ``r``) allows ``wanted``."""
    return soft == r.RLIM_INFINITY or soft >= wanted


def _show(n: int, infinite: int) -> str:
    return "unlimited" if n == infinite else str(n)


def shortfall(sessions: int, handshakes: int = 0, resource_mod: Any | None = None) -> str | None:
    """What is wrong, if the soft limit on open files has no room for ``sessions`` sessions
    and ``handshakes`` handshakes (for a server's start-up log), else None. Changes nothing."""
    r = _resource(resource_mod)
    if r is None:  # pragma: no cover - Windows: no such limit
        return None
    soft = r.getrlimit(r.RLIMIT_NOFILE)[0]
    wanted = fds_needed(sessions, handshakes)
    if _enough(r, soft, wanted):
        return None
    return (f"open files: this process may open {soft}, room for "
            f"{sessions_within(soft, handshakes)} sessions, not max_sessions {sessions}: "
            f"beyond that, sessions fail with 'Too many open files'; "
            f"raise the limit to {wanted} (icafast.rlimits.raise_nofile) or lower max_sessions")
