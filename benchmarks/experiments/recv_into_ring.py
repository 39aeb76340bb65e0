"""How fast the kernel copies received bytes into a large ring, by page size.

``python -m benchmarks.experiments.recv_into_ring [--pin] [--repeats N]`` sends 2 GiB over a
loopback TCP connection from a child process and receives it with ``recv_into`` in 256 KiB
reads: into one fixed 256 KiB buffer (what an event loop's read buffer is), into an 8 MiB ring
walked end to end (a replay ring at its default limit) with ordinary 4 KiB pages, and into the
same ring with transparent huge pages asked for (``madvise(MADV_HUGEPAGE)``, as the compiled
core does for replay storage of 2 MiB or more). It prints the receiver's CPU time per GB.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import socket
import subprocess
import sys
import time

TOTAL = 2 << 30
READ = 256 * 1024
RING = 8 << 20

SENDER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = bytes(262144)
n = 0
while n < int(sys.argv[2]):
    n += s.send(b)
s.close()
"""


def buffer_for(mode: str) -> memoryview:
    if mode == "fixed-256k":
        return memoryview(bytearray(READ))
    if mode == "ring-4k-pages":
        return memoryview(bytearray(RING))
    m = mmap.mmap(-1, RING)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    v = memoryview(m)
    v[:] = bytes(RING)  # touched once, as bytearray() touches its storage
    return v


def run(mode: str) -> tuple[float, float, float]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(TOTAL)])
    try:
        conn, _ = ls.accept()
        buf = buffer_for(mode)
        size = len(buf)
        pos = got = 0
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for _ in range(TOTAL // 4096 + 10):  # bounded: at least one byte per read
            n = conn.recv_into(buf[pos:pos + min(READ, size - pos)])
            if not n:
                break
            got += n
            pos = (pos + n) % size
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        conn.close()
    finally:
        sender.wait(60)
        ls.close()
    gb = got / 1e9
    return gb / (t1 - t0), (r1.ru_utime - r0.ru_utime) / gb, (r1.ru_stime - r0.ru_stime) / gb


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.recv_into_ring")
    p.add_argument("--pin", action="store_true", help="sender and receiver on CPU 0")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.pin:
        os.sched_setaffinity(0, {0})  # (the sender inherits it)
    for i in range(a.repeats):
        for mode in ("fixed-256k", "ring-4k-pages", "ring-huge-pages"):
            gbps, user, sys_ = run(mode)
            print(f"run {i + 1} {mode:16s} {gbps:5.2f} GB/s  receiver CPU per GB: "
                  f"user {user * 1000:4.0f} ms, system {sys_ * 1000:4.0f} ms")


if __name__ == "__main__":
    main()
