"""What sending from a replay ring without the copy would save: ``send`` against ``vmsplice`` +
``splice``, over loopback TCP.

``python -m benchmarks.experiments.splice_send [--pin] [--repeats N]`` sends 2 GiB over a
loopback TCP connection from a 4 MiB ring (the size of a busy session's send window) walked
end to end in 256 KiB pieces, to a child process that receives it with ``recv_into`` in 256 KiB
reads and drops it. Two ways to send:

- ``send``: ``send()`` of each piece; the kernel copies it into socket buffers (what the relay
  does today, through the event loop's ``writev``).
- ``vmsplice``: ``vmsplice()`` maps the piece's pages into a 1 MiB pipe without copying them,
  then ``splice()`` moves them from the pipe to the socket: the pages themselves are queued.
  A relay may do this from its replay ring because it overwrites ring space only once the peer
  has acknowledged it, that is, read it. (``MSG_ZEROCOPY`` is no alternative on loopback: the
  kernel copies such data anyway when it is looped to a local socket.)

It prints throughput and each side's CPU time per GB (the receiver's measured in the child).
Linux only; ``vmsplice`` is called through ctypes.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

TOTAL = 2 << 30
PIECE = 256 * 1024
RING = 4 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

RECEIVER = """
import resource, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = bytearray(262144)
n = 0
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(int(sys.argv[2]) // 4096 + 10):  # bounded: at least one byte per read
    k = s.recv_into(b)
    if not k:
        break
    n += k
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(n, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
"""


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _vmsplice() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    f = ctypes.CDLL(None, use_errno=True).vmsplice
    f.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_uint]
    f.restype = ctypes.c_ssize_t
    return f


def run(mode: str) -> dict[str, float]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(TOTAL)],
                                stdout=subprocess.PIPE, text=True)
    try:
        conn, _ = ls.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ring = bytearray(os.urandom(4096) * (RING // 4096))  # touched, as a used ring is
        view = memoryview(ring)
        base = ctypes.addressof(ctypes.c_char.from_buffer(ring))
        vmsplice = _vmsplice()
        rfd, wfd = os.pipe()
        fcntl.fcntl(wfd, F_SETPIPE_SZ, PIPE_SIZE)
        sent = pos = 0
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for _ in range(TOTAL // 4096 + 10):  # bounded: at least one page per round
            if sent >= TOTAL:
                break
            if mode == "send":
                n = conn.send(view[pos:pos + PIECE])
            else:
                n = vmsplice(wfd, ctypes.byref(_Iovec(base + pos, PIECE)), 1, 0)
                if n < 0:
                    raise OSError(ctypes.get_errno(), "vmsplice")
                left = n
                while left:
                    left -= os.splice(rfd, conn.fileno(), left)
            sent += n
            pos = (pos + n) % RING
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        conn.close()
        os.close(rfd)
        os.close(wfd)
        out, _ = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)
        ls.close()
    got, ruser, rsys = out.split()
    assert int(got) == sent, (got, sent)
    gb = sent / 1e9
    return {"GB/s": gb / (t1 - t0),
            "sender_user": (r1.ru_utime - r0.ru_utime) / gb,
            "sender_sys": (r1.ru_stime - r0.ru_stime) / gb,
            "receiver_user": float(ruser) / gb, "receiver_sys": float(rsys) / gb}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.splice_send")
    p.add_argument("--pin", action="store_true", help="sender and receiver on CPU 0")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.pin:
        os.sched_setaffinity(0, {0})  # (the receiver inherits it)
    runs: dict[str, list[dict[str, float]]] = {"send": [], "vmsplice": []}
    for i in range(a.repeats):
        for mode in runs:  # interleaved, so that a change in the host's load hits both
            r = run(mode)
            runs[mode].append(r)
            print(f"run {i + 1} {mode:8s} {r['GB/s']:5.2f} GB/s  CPU ms per GB: sender user "
                  f"{r['sender_user'] * 1000:4.0f} system {r['sender_sys'] * 1000:4.0f}, "
                  f"receiver user {r['receiver_user'] * 1000:4.0f} "
                  f"system {r['receiver_sys'] * 1000:4.0f}", flush=True)
    print("medians:")
    for mode, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        snd = 1000 * (med["sender_user"] + med["sender_sys"])
        rcv = 1000 * (med["receiver_user"] + med["receiver_sys"])
        print(f"  {mode:8s} {med['GB/s']:5.2f} GB/s  CPU ms per GB: sender {snd:4.0f}, "
              f"receiver {rcv:4.0f}, both {snd + rcv:4.0f}")


if __name__ == "__main__":
    main()
