"""Directories that hold what only the server's user may change (its control socket, its key).

A directory that another user can write to, or that belongs to another user, lets them put
their own file in place of the server's: a control socket that answers ``icafast sessions`` as
they like, or a key and certificate of their choosing, which every client that pinned the
server's fingerprint then refuses.
"""

from __future__ import annotations

import errno
import os
import stat


def check_private_dir(d: str, what: str, holds: str, option: str,
                      sticky_ok: bool = True) -> None:
    """Raise ``PermissionError`` (EPERM) unless ``d`` and every directory above it belong to
    this user or root and are writable by their owner only, or are sticky (as /tmp is: no one
    may then remove or rename what another user made there). With ``sticky_ok`` false, ``d``
    itself may not be writable by others even if sticky (where a file another user puts there
    first would be taken for the server's). ``what`` names the directory, ``holds`` what it
    holds and ``option`` the setting that moves it, for the message."""
    if not hasattr(os, "geteuid"):  # pragma: no cover - (not a Unix system)
        return
    me = os.geteuid()
    link = os.lstat(d)  # (a symbolic link must be ours too, besides where it leads)
    checks = [(d, link)] if stat.S_ISLNK(link.st_mode) else []
    path = os.path.realpath(d)
    while True:
        checks.append((path, os.stat(path)))
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    real = os.path.realpath(d)
    for where, st in checks:
        if st.st_uid not in (me, 0):
            raise PermissionError(
                errno.EPERM, f"{what} {d}: {where} belongs to user {st.st_uid}, who could "
                f"replace {holds}: give {option} a path in a directory of your own")
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 and (
                not st.st_mode & stat.S_ISVTX or (not sticky_ok and where == real)):
            raise PermissionError(
                errno.EPERM, f"{what} {d}: {where} is writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}), who could replace {holds}: give {option} a "
                "path in a directory of your own")
