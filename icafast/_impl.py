"""Decide, in one place, which implementation icafast uses.

``ICAFAST_PURE_PYTHON=1``, a missing or broken core extension, or missing extensions of the
engine and the relay (which the compiled core needs) select the pure-Python twin of the
byte-level core.
The session engine and the relay's per-message path (``COMPILED_MODULES``) are Python modules
that the build also compiles from the same source; with the pure core they are imported from
that source instead, so the switch means "no compiled code at all".
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from types import ModuleType

#: Modules that are Python source and, where built, also an extension compiled from it.
COMPILED_MODULES = ("icafast.protocol", "icafast.aio._relay")


def _want_pure() -> bool:
    v = os.environ.get("ICAFAST_PURE_PYTHON", "").strip().lower()
    return v not in ("", "0", "no", "false") or platform.python_implementation() != "CPython"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Import ``COMPILED_MODULES`` from their .py file even where the extension exists."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        base = fullname.rpartition(".")[2] + ".py"
        for d in path or ():
            f = os.path.join(d, base)
            if os.path.isfile(f):
                return importlib.util.spec_from_file_location(fullname, f)
        return None


def _engine_built() -> bool:
    """Whether the compiled engine and relay (``COMPILED_MODULES``) are built in this package.

    The compiled core runs only under them: the engine from source uses the pure core's
    attributes, which the compiled core keeps as C fields. Without them (a build that made
    only the core, or this package's source run beside an installed build of it) the whole
    of icafast runs from source, on the pure core."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in COMPILED_MODULES:
        base = os.path.join(here, *name.split(".")[1:])
        if not any(os.path.isfile(base + s) for s in importlib.machinery.EXTENSION_SUFFIXES):
            return False
    return True


#: Why the pure-Python twin runs instead of the compiled core (None: the compiled core runs).
WHY_PURE: str | None = None


def load_core() -> ModuleType:
    global WHY_PURE
    if _want_pure():
        impl = platform.python_implementation()
        WHY_PURE = "ICAFAST_PURE_PYTHON is set" if impl == "CPython" else f"{impl}: not CPython"
    elif not _engine_built():
        WHY_PURE = "the extensions of " + " and ".join(COMPILED_MODULES) + " are not built"
    else:
        try:
            from . import _core  # type: ignore[attr-defined]

            return _core
        except ImportError as exc:
            WHY_PURE = f"icafast._core cannot be imported: {exc}"
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())
    from . import _pure

    return _pure


def compiled_modules() -> dict[str, bool]:
    """For each of ``COMPILED_MODULES``: is it (or will it be) imported as an extension?"""
    out = {}
    for name in COMPILED_MODULES:
        mod = sys.modules.get(name)
        origin = getattr(mod, "__file__", None) if mod is not None else None
        if origin is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        out[name] = origin is not None and origin.endswith(
            tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return out


core = load_core()
