"""The source distribution holds what building and testing icafast from it need.

An sdist is built from MANIFEST.in, not from the repository: a file that the build or a test
reads and that no line of MANIFEST.in takes is missing only there (a packager who builds from
the sdist and runs its tests sees a failure that no run from the repository shows).
"""

from __future__ import annotations

import importlib.machinery
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
