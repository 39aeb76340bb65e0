"""A minimal RESP client for the Redis acceptance test, run as a separate process (in the client
namespace): SET a large value, then GET it back, both paced, printing progress lines so that
the test can break the link at known points of each transfer.

    python resp_big.py PORT SIZE RATE SEED

prints "SET <bytes sent>" and "GET <bytes received>" about every MiB, then
"SHA <sha256 of the value sent> <sha256 of the value read back>".
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import time

STEP = 1 << 20


def main() -> int:
    port, size, rate, seed = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                              int(sys.argv[4]))
    value_sha = hashlib.sha256()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")

    sock.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % size)
    rng = random.Random(seed)
    sent = 0
    mark = STEP
    while sent < size:
        chunk = rng.randbytes(min(256 * 1024, size - sent))
        sock.sendall(chunk)
        value_sha.update(chunk)
        sent += len(chunk)
        if sent >= mark or sent == size:
            print(f"SET {sent}", flush=True)
            mark += STEP
        time.sleep(len(chunk) / rate)
    sock.sendall(b"\r\n")
    reply = f.readline()
    if reply != b"+OK\r\n":
        print(f"SET failed: {reply!r}", flush=True)
        return 1

    sock.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n")
    head = f.readline()
    if head != b"$%d\r\n" % size:
        print(f"GET failed: {head[:100]!r}", flush=True)
        return 1
    got_sha = hashlib.sha256()
    got = 0
    mark = STEP
    while got < size:
        chunk = f.read1(min(256 * 1024, size - got))
        if not chunk:
            print(f"GET: connection closed after {got} bytes", flush=True)
            return 1
        got_sha.update(chunk)
        got += len(chunk)
        if got >= mark or got == size:
            print(f"GET {got}", flush=True)
            mark += STEP
        time.sleep(len(chunk) / rate)
    if f.read(2) != b"\r\n":
        print("GET: bad terminator", flush=True)
        return 1
    print(f"SHA {value_sha.hexdigest()} {got_sha.hexdigest()}", flush=True)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
