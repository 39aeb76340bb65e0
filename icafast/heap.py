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
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

#: blocks up to this size come from the heap (glibc's largest adaptive value on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept for later (twice the default replay limit)
TRIM_THRESHOLD = 16 << 20

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


def tune_malloc(environ: dict[str, str] | None = None, libc: Any | None = None) -> str:
    """Fix glibc's heap thresholds for a relay process; return what was done, for the log.

    ``environ`` and ``libc`` are for tests (default: ``os.environ`` and the process's C
    library). The returned text starts with "heap:" and says either the settings applied or
    why none were.
    """
    env = os.environ if environ is None else environ
    if env.get("ICAFAST_TUNE_MALLOC", "1").strip() == "0":
        return "heap: malloc left as it is (ICAFAST_TUNE_MALLOC=0)"
    chosen = [v for v in _ADMIN_VARS if v in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"heap: malloc left as it is ({', '.join(chosen)} set)"
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
