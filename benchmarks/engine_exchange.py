"""The session engine's own cost per message, without sockets.

``python -m benchmarks.engine_exchange [--sizes 64/64 16900/80]``.

A client and a server engine (the test suite's in-memory harness, tests/engine_harness.py) carry
request/reply exchanges the way the relay drives them: the source writes into the replay buffer
through ``send_view``/``commit_view``, ``data_to_send`` frames it, the peer's ``receive_data``
parses and checks it, the events are drained and the timer is read, as ``Runner.pump`` does.
Reported: microseconds per exchange (one request and one reply), the median of ``--repeats``
runs, and which modules ran compiled. Sizes: 64/64 bytes is the round-trip benchmark's
message; 16900/80 is one ``redis-benchmark -P 16 -d 1024`` SET batch and its replies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from engine_harness import Harness  # noqa: E402

import icafast  # noqa: E402
from icafast import events as ev  # noqa: E402
from icafast.protocol import Config  # noqa: E402

from ._chains import at_least  # noqa: E402


def run(request: int, reply: int, count: int) -> float:
    """Seconds per exchange over ``count`` exchanges (after 2,000 of warm-up)."""
    h = Harness(Config())
    h.open_link()
    h.pump()
    c, s = h.client, h.server
    req, rep = b"q" * request, b"r" * reply
    now = h.now

    def send(eng, data: bytes) -> bytes:
        v = eng.send_view(len(data))
        v[: len(data)] = data
        eng.commit_view(len(data))
        out = b"".join(eng.data_to_send(True))
        eng.get_timer()
        return out

    def receive(eng, wire: bytes) -> int:
        eng.receive_data(wire, now)
        n = 0
        # as the relay's pump drains them: received bytes as bare chunks (older engines, run
        # for a comparison, only have next_event)
        raw = getattr(eng, "_next_raw", None)
        while (e := raw() if raw is not None else eng.next_event()) is not None:
            n += len(e.data) if isinstance(e, ev.Event) else len(e)
        eng.data_to_send(True)
        eng.get_timer()
        return n

    def exchange() -> None:
        if receive(s, send(c, req)) != request or receive(c, send(s, rep)) != reply:
            raise AssertionError("bytes lost")

    for _ in range(2000):
        exchange()
    t = time.perf_counter()
    for _ in range(count):
        exchange()
    return (time.perf_counter() - t) / count


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_exchange", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["64/64", "16900/80"],
                   help="request/reply sizes in bytes (default: 64/64 16900/80)")
    p.add_argument("--count", type=at_least(1), default=50_000, help="exchanges per run")
    p.add_argument("--repeats", type=at_least(1), default=5)
    a = p.parse_args()
    print(f"compiled: {icafast.compiled_modules()}")
    for sizes in a.sizes:
        request, reply = (int(x) for x in sizes.split("/"))
        runs = [run(request, reply, a.count) * 1e6 for _ in range(a.repeats)]
        print(f"{request:>6} / {reply:<6} bytes: {statistics.median(runs):.2f} us per exchange "
              f"(min {min(runs):.2f}, max {max(runs):.2f}, {a.repeats} runs)")


if __name__ == "__main__":
    main()
