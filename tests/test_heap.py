"""The relay process's heap settings (icafast.heap.tune_malloc)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys

import pytest

from icafast.heap import (
    MMAP_THRESHOLD,
    TRIM_EVERY,
    TRIM_THRESHOLD,
    _glibc,
    trim_now_and_then,
    tune_malloc,
)

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


class FakeMallocTrim:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.argtypes: object = None
        self.restype: object = None

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


class FakeTrimLibc:
    def __init__(self) -> None:
        self.malloc_trim = FakeMallocTrim()
        self.calls = self.malloc_trim.calls


def test_the_heap_is_trimmed_now_and_then_unless_left_alone():
    """A relay process gives the heap's free memory back every TRIM_EVERY seconds (it kept
    its peak size for good after a burst of bulk sessions), except where the heap is to be
    left as it is."""
    async def main(env: dict[str, str]) -> list[int]:
        libc = FakeTrimLibc()
        task = asyncio.create_task(trim_now_and_then(0.01, env, libc))
        await asyncio.sleep(0.2)
        done = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert done == bool(env), (done, libc.calls)  # (returns at once when left alone)
        return libc.calls

    calls = asyncio.run(main({}))
    assert len(calls) >= 3 and set(calls) == {0}
    assert asyncio.run(main({"ICAFAST_TUNE_MALLOC": "0"})) == []
    assert asyncio.run(main({"MALLOC_TRIM_THRESHOLD_": "1"})) == []
    assert TRIM_EVERY == 30.0


_HOLES = """
import json
from icafast.heap import trim, tune_malloc

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

tune_malloc()
base = rss()
big, pins = [], []
for _ in range(64):  # 4 MiB blocks from the heap, each with a small block above it
    big.append(bytearray(4 << 20))
    pins.append(bytearray(1024))  # (over 512 bytes: malloc's, not Python's small-object arenas)
held = rss()
big.clear()
freed = rss()
trimmed = trim()
print(json.dumps({"base": base, "held": held, "freed": freed, "after_trim": rss(),
                  "trimmed": trimmed}))
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")
def test_trim_gives_back_the_free_memory_below_the_heap_top():
    """What a burst of sessions freed below memory still in use stays in the process (its
    resident size does not go down) until trimmed."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "ICAFAST_TUNE"))}
    out = subprocess.run([PY, "-c", _HOLES], capture_output=True, text=True, timeout=60,
                         env=e, check=True).stdout
    m = json.loads(out)
    assert m["held"] - m["base"] >= 200 << 20, m
    assert m["freed"] - m["base"] >= 200 << 20, m  # freed, yet resident
    assert m["trimmed"] and m["after_trim"] - m["base"] < 32 << 20, m
