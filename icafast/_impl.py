"""Decide, in one place, which core implementation icafast uses.

``ICAFAST_PURE_PYTHON=1`` (or a missing/broken extension) selects the pure-Python twin.
"""

from __future__ import annotations

import os
import platform
from types import ModuleType


def _want_pure() -> bool:
    v = os.environ.get("ICAFAST_PURE_PYTHON", "").strip().lower()
    return v not in ("", "0", "no", "false") or platform.python_implementation() != "CPython"


def load_core() -> ModuleType:
    if not _want_pure():
        try:
            from . import _core  # type: ignore[attr-defined]

            return _core
        except ImportError:
            pass
    from . import _pure

    return _pure


core = load_core()
