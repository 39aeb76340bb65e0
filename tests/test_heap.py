"""The relay process's heap settings (icafast.heap.tune_malloc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from icafast.heap import MMAP_THRESHOLD, TRIM_THRESHOLD, _glibc, tune_malloc

PY = sys.executable


class FakeMallopt:
    def __init__(self, accept: bool = True) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accept = accept
        self.argtypes: object = None
        self.restype: object = None

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1 if self.accept else 0


class FakeLibc:
    def __init__(self, accept: bool = True) -> None:
        self.mallopt = FakeMallopt(accept)


def test_sets_the_mmap_threshold_then_the_trim_threshold():
    libc = FakeLibc()
    note = tune_malloc({}, libc)
    # M_MMAP_THRESHOLD (-3) first, then M_TRIM_THRESHOLD (-1)
    assert libc.mallopt.calls == [(-3, 32 << 20), (-1, 16 << 20)]
    assert (MMAP_THRESHOLD, TRIM_THRESHOLD) == (32 << 20, 16 << 20)
    assert note == "heap: glibc malloc thresholds fixed (mmap 32 MiB, trim 16 MiB)"


@pytest.mark.parametrize("env, why", [
    ({"ICAFAST_TUNE_MALLOC": "0"}, "ICAFAST_TUNE_MALLOC=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ set"),
    ({"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1"},
     "MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES set"),
])
def test_the_administrators_settings_win(env, why):
    libc = FakeLibc()
    note = tune_malloc(env, libc)
    assert libc.mallopt.calls == []
    assert note == f"heap: malloc left as it is ({why})"


def test_unrelated_tunables_do_not_stop_it():
    libc = FakeLibc()
    tune_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "ICAFAST_TUNE_MALLOC": "1"}, libc)
    assert len(libc.mallopt.calls) == 2


def test_a_refusal_is_reported_and_stops_there():
    libc = FakeLibc(accept=False)
    note = tune_malloc({}, libc)
    assert libc.mallopt.calls == [(-3, 32 << 20)]
    assert "refused" in note


# What the settings change, observed through glibc's own counters in a fresh process: a 12 MiB
# block comes from the heap instead of its own mapping, and freeing it keeps the memory.
_PROBE = r"""
import ctypes, json, os, sys
from icafast.heap import tune_malloc

class MallInfo(ctypes.Structure):  # struct mallinfo (int fields: enough for 12 MiB)
    _fields_ = [(n, ctypes.c_int) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                            "usmblks", "fsmblks", "uordblks", "fordblks",
                                            "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo.restype = MallInfo
note = tune_malloc()
block = bytearray(12 << 20)
held = libc.mallinfo()
del block
freed = libc.mallinfo()
print(json.dumps({"note": note, "mapped_while_held": held.hblkhd,
                  "heap_after_free": freed.arena}))
"""


def _probe(**env: str) -> dict[str, object]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "ICAFAST_TUNE"))}
    e.update(env)
    out = subprocess.run([PY, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                         env=e, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_and_stay_there():
    tuned = _probe()
    assert tuned["note"] == "heap: glibc malloc thresholds fixed (mmap 32 MiB, trim 16 MiB)"
    assert tuned["mapped_while_held"] < 1 << 20  # from the heap, not a mapping of its own
    assert tuned["heap_after_free"] >= 12 << 20  # kept for the next block
    plain = _probe(ICAFAST_TUNE_MALLOC="0")
    assert plain["note"] == "heap: malloc left as it is (ICAFAST_TUNE_MALLOC=0)"
    assert plain["mapped_while_held"] >= 12 << 20  # glibc's default: a mapping, unmapped on free
    assert plain["heap_after_free"] < 12 << 20
