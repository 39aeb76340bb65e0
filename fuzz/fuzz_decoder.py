#!/usr/bin/env python3
"""atheris harness: the frame decoder, compiled core and pure-Python twin side by side.

    python fuzz/fuzz_decoder.py -atheris_runs=100000
    python fuzz/fuzz_decoder.py -max_len=4096 -jobs=4 -workers=4 corpus/decoder/   # long run
    python fuzz/fuzz_decoder.py crash-<sha1>                                        # reproduce

Each input is either raw bytes or well-formed frames (any type, flags, seq, ack, payload) that
are then mutated (bit flips, truncations, splices, length-field edits, re-checksummed frames),
cut at arbitrary points and fed to a FrameDecoder of each core. Invariants (docs/FUZZING.md): only
FrameError escapes; a failed decoder stays failed; the decoder agrees with an independent
reference decoder (so the two cores agree with each other); it holds less than HEADER_SIZE +
max_payload bytes, and allocates in proportion to what it is fed, not to what a length field
claims. Any other exception or failed assertion is a crash.
"""

from __future__ import annotations

import sys

import _common
from _common import U32, consume_cuts, consume_frame_spec, consume_mutations, memory_bound, show

with _common.instrumented_imports():
    import fuzz_scenarios as fs

    from icafast.wire import DEFAULT_MAX_PAYLOAD, FrameType

    CORES = _common.cores()
MAX_PAYLOADS = [0, 1, 48, 300, 1024, DEFAULT_MAX_PAYLOAD, U32]
FRAME_TYPES = [int(t) for t in FrameType]


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name libFuzzer harnesses use)
    fdp = _common.atheris.FuzzedDataProvider(data)
    max_payload = fdp.PickValueInList(MAX_PAYLOADS)
    cuts = consume_cuts(fdp)
    if fdp.ConsumeBool():
        stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        specs = [consume_frame_spec(fdp, FRAME_TYPES) for _ in range(fdp.ConsumeIntInRange(0, 6))]
        ops = consume_mutations(fdp, fs.MUTATION_KINDS)
        show("raw_frame(*spec) for spec in specs, then mutate(stream, ops)", (specs, ops))
        stream = fs.mutate(b"".join(fs.raw_frame(*s) for s in specs), ops)
    show("check_decoder(core, stream, cuts, max_payload)", (stream, cuts, max_payload))
    for core in CORES:
        # a payload spanning feeds may take up to 64 KiB before it grows with what arrives
        with memory_bound(256 * 1024 + 4 * len(stream)):
            fs.check_decoder(core, stream, cuts, max_payload)


def main() -> None:
    _common.run(TestOneInput, "fuzz_decoder")


if __name__ == "__main__":
    main()
    sys.exit(0)
