"""``icafast selfcheck``: compare the compiled core with its pure-Python twin on random input
and print a quick speed summary (a smoke check; benchmarks/ has the real measurements)."""

from __future__ import annotations

import os
import random
import time

from . import _pure
from .wire import FrameType


def _rate(fn, nbytes: int, seconds: float) -> float:
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * nbytes / dt


def selfcheck(seconds: float = 0.3) -> int:
    # (the package's ``_core`` attribute is whichever core runs, the pure twin included: the
    # loader says whether it is the compiled one)
    from . import _impl

    _core = None if _impl.WHY_PURE is not None else _impl.core
    if _core is None:
        print(f"compiled core: not in use ({_impl.WHY_PURE}); the pure-Python twin runs "
              "(nothing to check it against)")
    rng = random.Random(1)
    ok = True
    if _core is not None:
        print(f"compiled core: {_core.__file__} (crc32c: {_core.crc32c_backend()})")
        for _ in range(200):
            data = rng.randbytes(rng.randrange(0, 3000))
            if _core.crc32c(data) != _pure.crc32c(data):
                ok = False
            payload = rng.randbytes(rng.randrange(0, 500))
            seq = rng.getrandbits(64)
            f1 = _core.encode_frame(FrameType.DATA, 0, seq, 7, payload)
            if f1 != _pure.encode_frame(FrameType.DATA, 0, seq, 7, payload):
                ok = False
            d1 = _core.FrameDecoder().feed(f1)
            d2 = _pure.FrameDecoder().feed(f1)
            if [(f.type, f.seq, bytes(f.payload)) for f in d1] != \
                    [(f.type, f.seq, bytes(f.payload)) for f in d2]:
                ok = False
        print("differential check against the pure-Python twin:", "OK" if ok else "MISMATCH")
    from ._impl import compiled_modules

    for name, compiled in compiled_modules().items():
        print(f"{name}: {'compiled' if compiled else 'Python source'}")
    from .tlspipe import describe

    print(f"TLS records: {describe()}")
    core = _core or _pure
    for size in (1024, 16384, 65536):
        buf = os.urandom(size)
        crc = _rate(lambda buf=buf: core.crc32c(buf), size, seconds)
        frame = core.encode_frame(FrameType.DATA, 0, 0, 0, buf)

        def roundtrip(buf: bytes = buf, frame: bytes = frame) -> None:
            core.encode_header(FrameType.DATA, 0, 0, 0, buf)
            core.FrameDecoder().feed(frame)

        rt = _rate(roundtrip, size, seconds)
        print(f"  {size // 1024:>3} KiB: crc32c {crc / 1e9:6.2f} GB/s   "
              f"frame encode+decode {rt / 1e9:6.2f} GB/s")
    return 0 if ok else 1
