#!/usr/bin/env python3
"""atheris harness: the sans-IO session engine (ServerHandshake, ClientSession, ServerSession).

    python fuzz/fuzz_engine.py -atheris_runs=100000
    python fuzz/fuzz_engine.py -max_len=2048 -jobs=4 -workers=4 corpus/engine/   # long run
    python fuzz/fuzz_engine.py crash-<sha1>                                      # reproduce

The first bytes of an input choose a scenario of ``tests/fuzz_scenarios.py`` and the core the
engine runs on; the rest are its parameters:

0. ServerHandshake fed raw bytes, cut anywhere;
1. ServerHandshake fed a valid client handshake (HELLO + NEW/RESUME + extra frames), mutated;
2. ServerHandshake fed well-checksummed frames with fuzzed fields (HELLO magic, versions, limits);
3. an established client or server session fed what its peer sent (data, acks, keepalives, FIN),
   corrupted in transit, then healed by reconnecting;
4. a client fed the server's HELLO or ACCEPT (+ replay), corrupted, on a first link or a resume;
5. an established session fed well-checksummed nonsense (any type, seq/ack near its real
   offsets, any payload) and timer ticks.

Invariants (docs/FUZZING.md): receive_data/handle_timer never raise; the server handshake ends in
a request or HandshakeFailed (+ REJECT, but for a timeout), and writes at most a HELLO and a
REJECT; a dropped link is reported; no corrupt byte is ever delivered, and a healed session
delivers every byte exactly once; memory stays bounded. Any other exception or failed
assertion is a crash.
"""

from __future__ import annotations

import sys

import _common
from _common import (
    U32,
    U64,
    consume_cuts,
    consume_frame_spec,
    consume_mutations,
    interesting,
    memory_bound,
    show,
)

with _common.instrumented_imports():
    import fuzz_scenarios as fs

    from icafast.protocol import MAGIC, ServerHandshake
    from icafast.wire import FrameType

    CORES = _common.cores()
    ENGINES = fs.engines()  # (the engine from source, for the pure core, is instrumented too)

SECRETS = _common.DeterministicSecrets()
for _engine in ENGINES:
    _engine.secrets = SECRETS  # inputs replay exactly

FRAME_TYPES = [int(t) for t in FrameType]
NO_RECRC = tuple(k for k in fs.MUTATION_KINDS if k != "recrc")


def consume_handshake_frame(fdp) -> bytes:
    """A well-checksummed frame a confused or hostile client might send during the handshake."""
    t = int(FrameType.HELLO) if fdp.ConsumeBool() else fdp.PickValueInList(FRAME_TYPES)
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        fields = fs.HELLO.pack(
            fdp.PickValueInList([MAGIC, b"ICAFAST\x01", b"\0" * 8]),
            interesting(fdp, [0, 1, 2, 0xFFFF], 0, 0xFFFF),
            interesting(fdp, [0, 1, 2, 0xFFFF], 0, 0xFFFF),
            interesting(fdp, [0, 1, 1023, 1024, 262144, U32], 0, U32),
            interesting(fdp, [0, 1023, 1024, 8 << 20, U64], 0, U64),
            b"n" * 32,
        )
        payload = fields[: fdp.PickValueInList([56, 55, 48, 0])] + fdp.ConsumeBytes(
            fdp.ConsumeIntInRange(0, 64))
    elif kind == 1:
        payload = fs.RESUME.pack(fdp.ConsumeBytes(16).ljust(16, b"\0"), b"p" * 32)
    elif kind == 2:
        payload = b""
    else:
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    flags = fdp.ConsumeIntInRange(0, 1) if t == FrameType.DATA else 0
    return fs.raw_frame(t, flags, interesting(fdp, [0, 77, U64], 0, U64),
                        interesting(fdp, [0, 77, U64], 0, U64), payload)


def consume_peer_ops(fdp) -> list[tuple]:
    ops = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        kind = fdp.PickValueInList(list(fs.PEER_OP_KINDS))
        arg = fdp.ConsumeIntInRange(0, 700) if kind == "tick" else fdp.ConsumeIntInRange(1, 500)
        ops.append((kind, 0 if kind == "fin" else arg))
    return ops


def consume_nonsense_ops(fdp) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind <= 3:  # mostly frames
            ops.append((
                "frame",
                FrameType(fdp.PickValueInList(FRAME_TYPES)),
                fdp.ConsumeBool(),
                (fdp.PickValueInList(list(fs.ANCHORS)), fdp.ConsumeIntInRange(-3, 3)),
                (fdp.PickValueInList(list(fs.ANCHORS)), fdp.ConsumeIntInRange(-3, 3)),
                fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120)),
            ))
        elif kind == 4:
            ops.append(("tick", fdp.ConsumeIntInRange(0, 4000)))
        else:
            ops.append(("send", fdp.ConsumeIntInRange(1, 300)))
    return ops


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name libFuzzer harnesses use)
    fdp = _common.atheris.FuzzedDataProvider(data)
    SECRETS.reset()
    mode = fdp.ConsumeIntInRange(0, 5)
    core = CORES[fdp.ConsumeIntInRange(0, len(CORES) - 1)]
    show("core", core.IMPLEMENTATION)
    with memory_bound(16 * 1024 * 1024), fs.engine_on(core):
        if mode <= 2:
            if mode == 0:
                cuts = consume_cuts(fdp)
                stream = fdp.ConsumeBytes(fdp.remaining_bytes())
            elif mode == 1:
                second = fdp.PickValueInList(["new", "resume", "none"])
                tail = [fs.raw_frame(*consume_frame_spec(fdp, FRAME_TYPES, 60))
                        for _ in range(fdp.ConsumeIntInRange(0, 2))]
                ops = consume_mutations(fdp, fs.MUTATION_KINDS, 3)
                cuts = consume_cuts(fdp)
                show("client_handshake_stream, mutate", (second, tail, ops))
                stream = fs.mutate(fs.client_handshake_stream(second, tail), ops)
            else:
                n = fdp.ConsumeIntInRange(1, 4)
                stream = b"".join(consume_handshake_frame(fdp) for _ in range(n))
                cuts = consume_cuts(fdp)
            show("check_server_handshake(ServerHandshake(CFG, 0.0), split(stream, cuts))",
                 (stream, cuts))
            fs.check_server_handshake(ServerHandshake(fs.CFG, 0.0), fs.split(stream, cuts))
        elif mode == 3:
            args = (fdp.ConsumeBool(), consume_peer_ops(fdp), consume_mutations(fdp, NO_RECRC),
                    consume_cuts(fdp), fdp.ConsumeIntInRange(0, 2**16))
            show("scenario_corrupted_stream", args)
            fs.scenario_corrupted_stream(*args)
        elif mode == 4:
            args = (fdp.ConsumeBool(), fdp.ConsumeBool(), consume_mutations(fdp, NO_RECRC, 3),
                    consume_cuts(fdp), fdp.ConsumeIntInRange(0, 2**16))
            show("scenario_client_handshake", args)
            fs.scenario_client_handshake(*args)
        else:
            args = (fdp.ConsumeBool(), consume_nonsense_ops(fdp), fdp.ConsumeIntInRange(0, 2**16))
            show("scenario_nonsense", args)
            fs.scenario_nonsense(*args)


def main() -> None:
    _common.run(TestOneInput, "fuzz_engine")


if __name__ == "__main__":
    main()
    sys.exit(0)
