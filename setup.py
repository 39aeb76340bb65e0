"""Build script for the compiled core ``icafast._core`` (metadata lives in pyproject.toml).

The extension is Cython (icafast/_core.pyx) plus plain C (csrc/*.c). The generated
icafast/_core.c is not kept in the repository or the sdist: Cython is a build requirement, and
the .pyx is translated at build time.
"""

from __future__ import annotations

import os
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
    )
]


class build_ext(_build_ext):
    """Cythonize at build time and pick optimisation flags for the compiler in use.

    Cythonizing in run() (not finalize_options) keeps the sdist free of the generated _core.c:
    sdist asks a finalized build_ext for its sources and must get the .pyx.

    No -march=native: wheels must run on any CPU of their platform (crc32c.c picks hardware
    instructions at run time).
    """

    def run(self) -> None:
        from Cython.Build import cythonize

        # Translate each .pyx and point the (already finalized) extension at the .c.
        for ext in self.extensions:
            (done,) = cythonize([ext], compiler_directives={"language_level": "3"})
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
