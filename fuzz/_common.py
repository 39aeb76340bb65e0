"""Shared by the atheris harnesses: import paths, determinism, decoding the fuzzer's input.

The scenarios themselves (and their invariants) are in ``tests/fuzz_scenarios.py``, shared with
the bounded hypothesis tests in ``tests/test_fuzz.py``; see docs/FUZZING.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # fuzz_scenarios.py, engine_harness.py
if importlib.util.find_spec("icafast") is None:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # the harnesses stay importable; running one says what is missing
    atheris = None

#: ICAFAST_FUZZ_VERBOSE=1: print each input's decoded scenario before running it (to turn a
#: crash file into a unit test).
VERBOSE = os.environ.get("ICAFAST_FUZZ_VERBOSE", "") not in ("", "0")

#: Modules whose Python code gets coverage feedback.
INSTRUMENT = ["icafast", "fuzz_scenarios", "engine_harness"]

U32 = 2**32 - 1
U64 = 2**64 - 1


def instrumented_imports() -> Any:
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=INSTRUMENT)


def run(test_one_input: Callable[[bytes], None], name: str) -> None:
    """``python fuzz/NAME.py [libFuzzer flags] [corpus dirs or crash files]``."""
    if atheris is None:
        sys.stderr.write(
            f"{name}: atheris is not installed, nothing was run. `pip install atheris` (wheels "
            "for CPython on Linux x86-64; elsewhere it needs clang with libFuzzer).\n")
        sys.exit(2)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def cores() -> list[Any]:
    """The pure-Python core, and the compiled one when it is built."""
    from icafast import _pure

    out: list[Any] = [_pure]
    try:
        from icafast import _core  # type: ignore[attr-defined]
    except ImportError:
        return out
    return [*out, _core]


class DeterministicSecrets:
    """Stands in for the ``secrets`` module in icafast.protocol, so that an input replays
    exactly (session ids, nonces and secrets included)."""

    def __init__(self) -> None:
        self._rng = random.Random(0)

    def reset(self) -> None:
        self._rng = random.Random(0)

    def token_bytes(self, n: int) -> bytes:
        return self._rng.randbytes(n)


def show(label: str, value: Any) -> None:
    if VERBOSE:
        print(f"{label}: {value!r}", flush=True)


@contextlib.contextmanager
def memory_bound(limit: int) -> Iterator[None]:
    """Fail (MemoryError is not a protocol error) if Python allocates more than ``limit`` bytes
    at any one time while the block runs."""
    if not tracemalloc.is_tracing():
        tracemalloc.start()  # once: starting and stopping it for every input leaks memory
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    yield
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak <= limit, f"{peak} bytes allocated (bound {limit})"


# -- reading values out of the fuzzer's bytes --------------------------------------------------


def pos(fdp: Any) -> int:
    return fdp.ConsumeIntInRange(0, 1 << 16)


def interesting(fdp: Any, values: list[int], lo: int, hi: int) -> int:
    """One of ``values`` or any integer in ``[lo, hi]``."""
    if fdp.ConsumeBool():
        return fdp.PickValueInList(values)
    return fdp.ConsumeIntInRange(lo, hi)


OFFSETS = [0, 1, 2**32, U64 - 1, U64]
LENGTHS = [0, 1, 27, 28, 56, 255, 1023, 1024, 65535, 262144, 262145, 2**31, U32 - 1, U32]


def consume_mutation(fdp: Any, kinds: tuple[str, ...]) -> tuple:
    kind = fdp.PickValueInList(list(kinds))
    if kind in ("flip", "set"):
        return (kind, pos(fdp), fdp.ConsumeIntInRange(0, 255))
    if kind in ("truncate", "drop_frame", "recrc"):
        return (kind, pos(fdp))
    if kind == "delete":
        return (kind, pos(fdp), fdp.ConsumeIntInRange(1, 80))
    if kind == "insert":
        return (kind, pos(fdp), fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 40)) or b"\0")
    if kind == "splice":
        return (kind, pos(fdp), fdp.ConsumeIntInRange(1, 300), pos(fdp))
    if kind == "length":
        return (kind, pos(fdp), interesting(fdp, LENGTHS, 0, U32))
    return (kind, pos(fdp), pos(fdp))  # dup_frame, swap_frames


def consume_mutations(fdp: Any, kinds: tuple[str, ...], most: int = 4) -> list[tuple]:
    return [consume_mutation(fdp, kinds) for _ in range(fdp.ConsumeIntInRange(0, most))]


def consume_cuts(fdp: Any, most: int = 12) -> list[int]:
    return fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, most), 0, 1 << 16)


def consume_frame_spec(fdp: Any, frame_types: list[int], max_payload: int = 300) -> tuple:
    t = fdp.PickValueInList(frame_types)
    flags = fdp.ConsumeIntInRange(0, 1) if t == 0x10 else 0
    seq = interesting(fdp, OFFSETS, 0, U64)
    ack = interesting(fdp, OFFSETS, 0, U64)
    return (t, flags, seq, ack, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, max_payload)))
