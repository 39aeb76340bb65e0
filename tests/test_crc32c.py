"""CRC32C: known vectors, agreement with google-crc32c, incremental use, every kind of buffer."""

from __future__ import annotations

import array
import ctypes
import json
import os
import platform
import subprocess
import sys
import threading

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# RFC 3720 (iSCSI), appendix B.4.
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (ISCSI_READ_PDU, 0xD9963A56),
]


@pytest.mark.parametrize("data,expected", VECTORS)
def test_known_vectors(core, data, expected):
    assert core.crc32c(data) == expected
    assert core.crc32c(bytearray(data)) == expected
    assert core.crc32c(memoryview(data)) == expected


def test_result_is_int_in_range(core):
    r = core.crc32c(b"abc")
    assert type(r) is int and 0 <= r <= 0xFFFFFFFF


def test_backend_and_implementation(core):
    backend = core.crc32c_backend()
    assert isinstance(backend, str) and backend
    assert core.IMPLEMENTATION in ("cython", "python")
    if core.IMPLEMENTATION == "python":
        assert backend == "python"


@settings(max_examples=150)
@given(data=st.binary(max_size=3000))
def test_matches_google_crc32c(core, data):
    assert core.crc32c(data) == google_crc32c.value(data)


@settings(max_examples=100)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=4))
def test_incremental_equals_one_shot(core, data, cuts):
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    crc = 0
    g = 0
    for a, b in zip(points, points[1:], strict=False):
        crc = core.crc32c(data[a:b], crc)
        g = google_crc32c.extend(g, data[a:b])
    assert crc == core.crc32c(data) == g


@settings(max_examples=50)
@given(data=st.binary(max_size=500), value=st.integers(0, 0xFFFFFFFF))
def test_continue_from_any_value(core, data, value):
    assert core.crc32c(data, value) == google_crc32c.extend(value, data)


def test_large_inputs(core):
    # Above and around the compiled core's GIL-release threshold (64 KiB); the pure twin is slow,
    # so it only checks one size.
    rnd = bytes((i * 2654435761 >> 13) & 0xFF for i in range(200_000))
    sizes = [65535, 65536, 65537, 200_000] if core.IMPLEMENTATION == "cython" else [65536]
    for n in sizes:
        assert core.crc32c(rnd[:n]) == google_crc32c.value(rnd[:n])
        assert core.crc32c(rnd[:n], 0x12345678) == google_crc32c.extend(0x12345678, rnd[:n])


def test_threads_agree(core):
    if core.IMPLEMENTATION != "cython":
        pytest.skip("exercises the compiled core's GIL release")
    bufs = [bytes([i]) * 300_000 + bytes(range(256)) for i in range(4)]
    want = [google_crc32c.value(b) for b in bufs]
    got: list[list[int]] = [[] for _ in bufs]

    def work(i: int) -> None:
        for _ in range(5):
            got[i].append(core.crc32c(bufs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bufs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [[w] * 5 for w in want]


# -- buffer types --------------------------------------------------------------------------------

RAW = bytes(range(256)) * 3


def _buffers():
    yield "bytes", RAW, RAW
    yield "bytearray", bytearray(RAW), RAW
    yield "memoryview", memoryview(RAW), RAW
    yield "memoryview slice", memoryview(RAW)[7:300], RAW[7:300]
    yield "strided memoryview", memoryview(RAW)[::3], RAW[::3]
    a = array.array("I", range(100))
    yield "array('I')", a, a.tobytes()
    d = array.array("d", [1.5, -2.25, 3e300])
    yield "array('d')", d, d.tobytes()
    yield "2-D memoryview", memoryview(RAW).cast("B", (24, 32)), RAW
    yield "signed-char view", memoryview(RAW).cast("b"), RAW
    c = (ctypes.c_uint16 * 10)(*range(10))
    yield "ctypes array", c, bytes(c)
    yield "empty bytes", b"", b""
    yield "empty memoryview", memoryview(b""), b""


@pytest.mark.parametrize("name,obj,raw", list(_buffers()), ids=[b[0] for b in _buffers()])
def test_buffer_types(core, name, obj, raw):
    assert core.crc32c(obj) == google_crc32c.value(raw)


@pytest.mark.parametrize(
    "bad,exc,msg",
    [
        ("abc", TypeError, "expected a bytes-like object, not str"),
        (None, TypeError, "memoryview: a bytes-like object is required, not 'NoneType'"),
        (12, TypeError, "memoryview: a bytes-like object is required, not 'int'"),
        ([1, 2], TypeError, "memoryview: a bytes-like object is required, not 'list'"),
    ],
)
def test_rejects_non_buffers(core, bad, exc, msg):
    with pytest.raises(exc) as info:
        core.crc32c(bad)
    assert str(info.value) == msg


def test_rejects_fortran_order(core):
    fortran = memoryview(bytes(12)).cast("B", (3, 4))
    # A Fortran-ordered view cannot be made from bytes; emulate with a non-contiguous 2-D view.
    with pytest.raises(TypeError):
        core.crc32c(memoryview(bytes(24)).cast("B", (4, 6))[::2])
    assert core.crc32c(fortran) == google_crc32c.value(bytes(12))


@pytest.mark.parametrize("value", [-1, 0x1_0000_0000, 2**64, -(2**70)])
def test_value_out_of_range(core, value):
    with pytest.raises(ValueError, match=r"^crc value must be in 0\.\.0xFFFFFFFF$"):
        core.crc32c(b"x", value)


def test_value_not_int(core):
    with pytest.raises(TypeError):
        core.crc32c(b"x", 1.5)
    with pytest.raises(TypeError):
        core.crc32c(b"x", None)
    assert core.crc32c(b"x", True) == google_crc32c.extend(1, b"x")


# -- the x86-64 hardware paths against each other ------------------------------------------------

#: CRCs of slices of a fixed pseudo-random buffer, at lengths around the compiled core's internal
#: block sizes (the folding path's threshold, 512, and its 256-byte step; the 3-way path's
#: 3 x 8 KiB blocks; a few large buffers) and six alignments, each continued from its own value.
#: A code string, so that a child process with other settings computes exactly the same.
EDGE_CRCS = """
lengths = sorted({*range(0, 80), *range(240, 300), *range(500, 530), *range(760, 780),
                  *range(1020, 1040), 4095, 4096, 4097, 24575, 24576, 24577, 65536, 65552,
                  200_003})
data = bytes((i * 2654435761 >> 11) & 0xFF for i in range(200_003 + 64))
crcs = [crc32c(data[off:off + n], (n * 0x9E3779B1) & 0xFFFFFFFF)
        for n in lengths for off in (0, 1, 7, 8, 33, 63)]
"""


def _edge_crcs(crc32c) -> list[int]:  # type: ignore[no-untyped-def]
    scope = {"crc32c": crc32c}
    exec(EDGE_CRCS, scope)
    return scope["crcs"]  # type: ignore[no-any-return]


def test_edge_lengths_and_alignments(ccore):
    assert _edge_crcs(ccore.crc32c) == _edge_crcs(lambda b, c: google_crc32c.extend(c, b))


def test_sse42_path_matches_the_chosen_one(ccore):
    """ICAFAST_CRC32C_NO_VPCLMUL=1 keeps x86-64 on the 3-way crc32 path: on a CPU with AVX-512
    and VPCLMULQDQ this compares the folding path (this process) with it (a child process);
    elsewhere it checks that the setting changes nothing."""
    child = ("import json\nfrom icafast._core import crc32c, crc32c_backend\n" + EDGE_CRCS +
             "print(json.dumps([crc32c_backend(), crcs]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICAFAST_CRC32C_")}
    env["ICAFAST_CRC32C_NO_VPCLMUL"] = "1"
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    backend, crcs = json.loads(out.stdout)
    assert backend != "avx512-vpclmulqdq"
    if ccore.crc32c_backend() != "avx512-vpclmulqdq":
        assert backend == ccore.crc32c_backend()
    assert crcs == _edge_crcs(ccore.crc32c)


def _compiler() -> list[str] | None:
    import shlex
    import shutil
    import sysconfig

    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return cc if cc and shutil.which(cc[0]) else None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
@pytest.mark.parametrize("no_vpclmul", ["", "1"])
def test_vector_upper_state_clean_after_the_call(tmp_path, no_vpclmul):
    """The AVX-512 path must clear the upper halves of the vector registers before it returns
    (VZEROUPPER): left in use, they slowed every later SSE instruction of the process on Intel
    CPUs, about 160 ns per call at 512 bytes in a Python loop. XINUSE (XGETBV with ECX = 1)
    shows them; csrc/crc32c.c is built here as setup.py builds it, with tests/avx_state_probe.c."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "probe")
    subprocess.run([*cc, "-O3", "-I", os.path.join(root, "csrc"), "-o", exe,
                    os.path.join(root, "tests", "avx_state_probe.c"),
                    os.path.join(root, "csrc", "crc32c.c")], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICAFAST_CRC32C_")}
    if no_vpclmul:
        env["ICAFAST_CRC32C_NO_VPCLMUL"] = no_vpclmul
    out = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode == 77:
        pytest.skip("this CPU does not report XINUSE")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0].startswith("backend ")
    upper = 1 << 2 | 1 << 6  # the upper halves of YMM0-15 and of ZMM0-15
    calls = [line.split() for line in lines[1:] if line]
    assert len(calls) == 14
    for length, before, after in calls:
        if int(before, 16) & upper == 0:
            assert int(after, 16) & upper == 0, f"{lines[0]}: {length} bytes left {after}"
