"""The source distribution holds what building and testing icafast from it need, and the
compiled modules of a build can go into a wheel for any Linux of its C library's age.

An sdist is built from MANIFEST.in, not from the repository: a file that the build or a test
reads and that no line of MANIFEST.in takes is missing only there (a packager who builds from
the sdist and runs its tests sees a failure that no run from the repository shows).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What the sdist must hold of the repository: the build's inputs, the package, its tests and
#: their inputs, the fuzz harnesses the tests run, the docs, and the benchmarks' code and text
#: (not their recorded results).
NEEDED_DIRS = ("csrc", "icafast", "tests", "docs", "fuzz")
NEEDED_FILES = ("LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (an sdist or an installed package)")
    return [p for p in out.decode().split("\0") if p]


def _sdist_files(tmp_path: Path) -> set[str]:
    """The sdist's file list as setuptools makes it from MANIFEST.in (egg_info's SOURCES.txt:
    the same list that ``sdist`` packs), without building anything."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py here")
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed")
    if int(setuptools.__version__.split(".")[0]) < 77:  # (pyproject.toml's build requirement)
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build requires")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=ROOT, capture_output=True, timeout=120, check=True)
    text = (tmp_path / "icafast.egg-info" / "SOURCES.txt").read_text()
    return {line.strip() for line in text.splitlines() if line.strip()}


def test_sdist_holds_what_the_build_and_the_tests_need(tmp_path):
    tracked = _tracked()
    sdist = _sdist_files(tmp_path)
    needed = [p for p in tracked if p in NEEDED_FILES or p.split("/")[0] in NEEDED_DIRS
              or p.startswith("benchmarks/") and p.endswith((".py", ".md"))]
    missing = sorted(set(needed) - sdist)
    assert not missing, f"in the repository but not in the sdist (MANIFEST.in): {missing}"


def test_sdist_holds_no_build_products(tmp_path):
    """Extensions and the C that Cython generates are made at build time (setup.py): packed,
    they would be stale or for another Python."""
    sdist = _sdist_files(tmp_path)
    suffixes = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd", ".pyc", ".o")
    generated = {"icafast/_core.c", "icafast/protocol.c", "icafast/aio/_relay.c",
                 "icafast/_tlsio.c"}
    bad = sorted(p for p in sdist if p.endswith(suffixes) or p in generated
                 or p.startswith(("build/", "dist/")) or "__pycache__" in p.split("/"))
    assert not bad, bad


#: What a compiled module may need on Linux: the C library, in one piece (glibc 2.34 and later)
#: or split in parts (older ones, as in the manylinux_2_28 images that release wheels are built
#: in). A wheel carries copies of anything else it links, and a wheel of icafast must not:
#: ``_tlsio`` drives TLS records with the functions of the OpenSSL that Python's ``_ssl`` module
#: loaded (found at run time with dlopen), and a second OpenSSL would not know its objects.
LINUX_LIBC = {"libc.so.6", "libdl.so.2", "libpthread.so.0", "libm.so.6"}
COMPILED = ("icafast._core", "icafast.protocol", "icafast.aio._relay", "icafast._tlsio")


def _needed(path: str) -> set[str]:
    """The shared libraries an ELF file names as needed (its DT_NEEDED entries)."""
    out = subprocess.run(["readelf", "--dynamic", "--wide", path], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return {line.split("[", 1)[1].split("]", 1)[0]
            for line in out.splitlines() if "(NEEDED)" in line}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects: Linux")
def test_compiled_modules_need_nothing_but_the_c_library():
    """A wheel is built for any Linux whose C library is as new as the build's: each compiled
    module may link the C library and nothing else (not OpenSSL, not libpython), so that the
    tool that makes a wheel portable (auditwheel) has nothing to copy into it."""
    import icafast

    if icafast.IMPLEMENTATION != "cython":
        pytest.skip("icafast runs from its Python source here (no compiled modules)")
    if shutil.which("readelf") is None:
        pytest.skip("no readelf (binutils) to read the modules' dynamic sections")
    found = {}
    for name in COMPILED:
        path = importlib.import_module(name).__file__
        assert path is not None and path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), (
            f"{name} is not compiled here: {path}")
        found[name] = _needed(path)
    extra = {name: sorted(libs - LINUX_LIBC) for name, libs in found.items() if libs - LINUX_LIBC}
    assert not extra, f"compiled modules that link more than the C library: {extra}"
    assert all(found.values()), found  # (readelf read them: each needs the C library at least)
