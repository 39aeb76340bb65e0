"""Build script for the compiled extensions (metadata lives in pyproject.toml).

``icafast._core`` is Cython (icafast/_core.pyx) plus plain C (csrc/*.c); ``icafast.protocol``
and ``icafast.aio._relay`` are their .py modules compiled by Cython with the declarations of the
.pxd beside them; ``icafast._tlsio`` (icafast/_tlsio.pyx) drives OpenSSL for TLS links. The
generated .c files are not kept in the repository or the sdist: Cython is a build requirement,
and the sources are translated at build time.
"""

from __future__ import annotations

import os
import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

# Library sources only (csrc/ may also hold standalone C test programs with a main()).
CSOURCES = [os.path.join("csrc", name) for name in ("crc32c.c", "frame.c")]

ext_modules = [
    Extension(
        "icafast._core",
        sources=[os.path.join("icafast", "_core.pyx"), *CSOURCES],
        include_dirs=["csrc"],
        depends=sorted(glob(os.path.join("csrc", "*.h"))),
    ),
    # The session engine and the asyncio relay's per-message path, compiled from their own
    # Python source (types from the .pxd beside each): the same code runs uncompiled under
    # ICAFAST_PURE_PYTHON=1 or where no extension is present.
    # (both cimport the core's types from icafast/_core.pxd, which names csrc/frame.h)
    Extension("icafast.protocol", sources=[os.path.join("icafast", "protocol.py")],
              include_dirs=["csrc"],
              depends=[os.path.join("icafast", n) for n in ("protocol.pxd", "_core.pxd")]),
    Extension("icafast.aio._relay", sources=[os.path.join("icafast", "aio", "_relay.py")],
              include_dirs=["csrc"],
              depends=[os.path.join("icafast", "aio", "_relay.pxd"),
                       *(os.path.join("icafast", n) for n in ("protocol.pxd", "_core.pxd"))]),
]
if sys.platform != "win32":
    # TLS records read and written with OpenSSL's own calls, found at run time (dlopen) in the
    # OpenSSL of Python's _ssl module: no OpenSSL headers or libraries at build time. (Not on
    # Windows, which has no dlopen: TLS there runs in the event loop's transport.)
    ext_modules.append(
        Extension("icafast._tlsio", sources=[os.path.join("icafast", "_tlsio.pyx")],
                  libraries=["dl"] if sys.platform.startswith("linux") else []))

#: Annotations in the .py sources are for type checkers; the C types come from the .pxd files.
DIRECTIVES = {"language_level": "3", "annotation_typing": False, "binding": True}


class build_ext(_build_ext):
    """Cythonize at build time and pick optimisation flags for the compiler in use.

    Cythonizing in run() (not finalize_options) keeps the sdist free of the generated _core.c:
    sdist asks a finalized build_ext for its sources and must get the .pyx.

    No -march=native: wheels must run on any CPU of their platform (crc32c.c picks hardware
    instructions at run time).
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:  # (pip passes no -j) the extensions compile side by side
            self.parallel = True  # (one compiler per CPU: 46 s down to 27 s on two)

    def run(self) -> None:
        from Cython.Build import cythonize

        # Translate each .pyx and point the (already finalized) extension at the .c.
        for ext in self.extensions:
            (done,) = cythonize([ext], compiler_directives=DIRECTIVES)
            ext.sources = done.sources
        super().run()

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2"]
        else:
            flags = ["-O3"]
        for ext in self.extensions:
            ext.extra_compile_args = flags + list(ext.extra_compile_args or [])
        super().build_extensions()


setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
