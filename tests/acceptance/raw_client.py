"""A hand-made client for the acceptance tests, run as its own process: one new session to
``icafast serve`` at HOST:PORT (plain text), whose DATA frames ignore every acknowledgement
(a peer that sends beyond what the server announced it keeps, as another implementation
might). It announces a replay limit that would allow that, reads (and drops) whatever the
server sends, prints "sending" once the session is up and "blocked" once the server stops
taking its frames, and runs until it is stopped.

``raw_client.py HOST PORT``
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

from icafast.protocol import MAGIC, encode_frame
from icafast.wire import HEADER_SIZE, FrameType


def main(host: str, port: int) -> None:
    s = socket.create_connection((host, port), timeout=10)
    hello = struct.pack(">8sHHIQ32s", MAGIC, 1, 1, 256 * 1024, 1 << 40, os.urandom(32))
    s.sendall(encode_frame(FrameType.HELLO, 0, 0, 0, hello)
              + encode_frame(FrameType.NEW, 0, 0, 0, os.urandom(16)))
    f = s.makefile("rb")
    for want in (FrameType.HELLO, FrameType.ACCEPT):
        head = f.read(HEADER_SIZE)
        assert head[0] == want, head
        f.read(struct.unpack_from(">I", head, 4)[0])
    s.settimeout(None)
    threading.Thread(target=lambda: [None for _ in iter(lambda: f.read1(65536), b"")],
                     daemon=True).start()
    print("sending", flush=True)
    block = os.urandom(64 * 1024)
    s.setblocking(False)
    sent, said = 0, False
    while True:  # acks always 0: nothing of the server's is acknowledged
        frame = memoryview(encode_frame(FrameType.DATA, 0, sent, 0, block))
        while frame:
            try:
                frame = frame[s.send(frame):]
                last = time.monotonic()
            except BlockingIOError:
                if not said and time.monotonic() - last > 1.0:
                    print("blocked", flush=True)
                    said = True
                time.sleep(0.01)
        sent += len(block)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
