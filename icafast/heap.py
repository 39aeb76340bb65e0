"""Heap settings for a relay process (glibc's malloc).

A relay moving TLS traffic allocates large, short-lived buffers: the event loop's TLS transport
decrypts every record into a new 256 KiB ``bytes`` that it then shrinks to the record's size,
and hands each burst of encrypted output on as one ``bytes`` as large as the burst. glibc
sizes its heap thresholds from what it has seen (``M_MMAP_THRESHOLD`` rises to the size of the
largest mapped block freed so far, and ``M_TRIM_THRESHOLD`` follows at twice that), so with
blocks of this shape the top of the heap keeps being handed back to the kernel and taken
again: in a fresh relay process, up to 150,000 page faults per GB relayed and up to twice the
decrypting relay's CPU (benchmarks/HISTORY.md, "glibc's heap thresholds fixed").

:func:`tune_malloc` fixes the mmap threshold where glibc's own adaptation tops out on 64-bit
systems (32 MiB), so that blocks up to that size come from the heap, and the trim threshold
at 16 MiB, so that that much free memory at the heap's top is kept for the next ones (twice
the default replay limit: the largest transient block a session makes is a replay of its
whole window after a resume).
``icafast serve``, ``icafast connect`` and ``icafast demo`` call it at start-up; a program
that embeds icafast may call it too (it changes the whole process's allocator, so the library
never calls it on its own). It does nothing:

- when ``ICAFAST_TUNE_MALLOC=0`` is set in the environment;
- when the administrator already chose thresholds (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``);
- where the C library is not glibc (musl, macOS, Windows).

Free memory inside the heap, below its top, stays with the process: after a burst of bulk
sessions (each replay buffer a few MiB from the heap) ends, the process keeps its peak size
(577 MiB with no session left, after 100 sessions of 16 MiB each way; 29 MiB once trimmed).
:func:`trim_now_and_then` gives it back every ``TRIM_EVERY`` seconds (glibc's
``malloc_trim``), under the same conditions; the command line runs it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from typing import Any

#: blocks up to this size come from the heap (glibc's largest adaptive value on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept for later (twice the default replay limit)
TRIM_THRESHOLD = 16 << 20
#: seconds between two trims of the free memory inside the heap (:func:`trim_now_and_then`):
#: what a busy relay frees and takes again meanwhile costs it a page fault per page once a
#: period at most
TRIM_EVERY = 30.0

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_ADMIN_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc() -> Any | None:
    """The process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no dynamic C library (e.g. Windows)
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def _left_alone(environ: dict[str, str] | None) -> str | None:
    """Why the heap is to be left as it is (the environment says so), or None."""
    env = os.environ if environ is None else environ
    if env.get("ICAFAST_TUNE_MALLOC", "1").strip() == "0":
        return "ICAFAST_TUNE_MALLOC=0"
    chosen = [v for v in _ADMIN_VARS if v in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"{', '.join(chosen)} set"
    return None


def trim(libc: Any | None = None) -> bool:
    """Give the heap's free memory back to the kernel (glibc's ``malloc_trim(0)``, which also
    releases free pages below the heap's top); whether any was. False where the C library is
    not glibc. ``libc`` is for tests."""
    if libc is None:
        libc = _glibc()
        if libc is None or not hasattr(libc, "malloc_trim"):
            return False
    malloc_trim = libc.malloc_trim
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


async def trim_now_and_then(every: float = TRIM_EVERY, environ: dict[str, str] | None = None,
                            libc: Any | None = None) -> None:
    """:func:`trim` every ``every`` seconds, until cancelled; returns at once where
    :func:`tune_malloc` would leave the heap alone (an administrator's settings, another C
    library). ``environ`` and ``libc`` are for tests."""
    if _left_alone(environ) is not None:
        return
    if libc is None:
        libc = _glibc()
        if libc is None or not hasattr(libc, "malloc_trim"):
            return
    while True:
        await asyncio.sleep(every)
        trim(libc)


def tune_malloc(environ: dict[str, str] | None = None, libc: Any | None = None) -> str:
    """Fix glibc's heap thresholds for a relay process; return what was done, for the log.

    ``environ`` and ``libc`` are for tests (default: ``os.environ`` and the process's C
    library). The returned text starts with "heap:" and says either the settings applied or
    why none were.
    """
    why = _left_alone(environ)
    if why is not None:
        return f"heap: malloc left as it is ({why})"
    if libc is None:
        libc = _glibc()
        if libc is None:
            return "heap: malloc left as it is (the C library is not glibc)"
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first, and nothing more if it is refused: a trim threshold set alone
    # would still stop glibc adapting the mmap threshold (128 KiB by default), and every
    # 256 KiB record buffer would then be mapped and unmapped.
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "heap: malloc left as it is (glibc refused an mmap threshold of 32 MiB)"
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):  # pragma: no cover - glibc accepts any
        return "heap: mmap threshold 32 MiB; glibc refused a trim threshold of 16 MiB"
    return "heap: glibc malloc thresholds fixed (mmap 32 MiB, trim 16 MiB)"
