"""A checked byte stream for the acceptance tests, run as its own process.

``stream_check.py echo PORT``: on 127.0.0.1:PORT, echo every connection back; prints
"connection N" for each one accepted (a session that survives must stay connection 1).
``stream_check.py echo PORT FILE``: the same, but each connection is not read until FILE
exists (at most 120 s): a backend whose sink is behind; prints "reading" then.

``stream_check.py check PORT NBYTES RATE``: connect to 127.0.0.1:PORT, send NBYTES of a
seeded pseudo-random stream at RATE bytes/s while reading the echo back, and compare every
byte read with the stream at that offset: a byte lost, duplicated or reordered in either
direction is a mismatch. Prints "progress N" as the echo comes back, then "OK N" or
"MISMATCH at N" / "ERROR ..." and exits 0 only on OK.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

BLOCK = 65536


def stream(offset: int, n: int) -> bytes:
    """Bytes ``offset .. offset + n`` of the stream: SHAKE-128 of each block's number."""
    out = bytearray()
    while n:
        k, o = divmod(offset, BLOCK)
        take = min(n, BLOCK - o)
        out += hashlib.shake_128(b"icafast-%d" % k).digest(BLOCK)[o:o + take]
        offset += take
        n -= take
    return bytes(out)


def echo(port: int, hold: str | None = None) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(8)
    print("listening", flush=True)
    n = 0

    def pump(c: socket.socket) -> None:
        if hold is not None:
            end = time.monotonic() + 120
            while not os.path.exists(hold) and time.monotonic() < end:
                time.sleep(0.02)
            print("reading", flush=True)
        with c:
            while data := c.recv(262144):
                c.sendall(data)

    while True:
        c, _ = ls.accept()
        n += 1
        print(f"connection {n}", flush=True)
        threading.Thread(target=pump, args=(c,), daemon=True).start()


def check(port: int, nbytes: int, rate: float) -> int:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(None)
    failed: list[str] = []

    def send() -> None:
        t0, off = time.monotonic(), 0
        try:
            while off < nbytes:
                n = min(16384, nbytes - off)
                s.sendall(stream(off, n))
                off += n
                ahead = off / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError as e:
            failed.append(f"ERROR sending at {off}: {e!r}")

    threading.Thread(target=send, daemon=True).start()
    off, shown = 0, 0
    while off < nbytes:
        try:
            data = s.recv(262144)
        except OSError as e:
            print(f"ERROR reading at {off}: {e!r}", flush=True)
            return 1
        if not data:
            print(f"ERROR end of stream at {off}", flush=True)
            return 1
        want = stream(off, len(data))
        if data != want or off + len(data) > nbytes:  # (more than was sent: duplicated)
            i = next((i for i in range(len(data)) if data[i] != want[i]), nbytes - off)
            print(f"MISMATCH at {off + i}", flush=True)
            return 1
        off += len(data)
        if off - shown >= 1 << 20:
            print(f"progress {off}", flush=True)
            shown = off
    if failed:
        print(failed[0], flush=True)
        return 1
    print(f"OK {off}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        sys.exit(check(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
