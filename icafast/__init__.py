"""icafast: session reliability for any TCP stream.

The byte-level core (CRC32C, frame codec, replay buffer) comes from the compiled extension
``icafast._core`` when available, else from its pure-Python twin ``icafast._pure``;
``IMPLEMENTATION`` says which ("cython" or "python"). The session engine and the relay's
per-message path are Python modules that the build also compiles; ``compiled_modules()`` says
which of them run compiled. ``ICAFAST_PURE_PYTHON=1`` runs everything from Python source.
"""

from __future__ import annotations

from ._impl import compiled_modules
from ._impl import core as _core
from .errors import (
    FrameError,
    IcafastError,
    ProtocolError,
    ReplayBufferError,
    ReplayFullError,
    ReplayRangeError,
)
from .wire import DEFAULT_MAX_PAYLOAD, FLAG_FIN, HEADER_SIZE, FrameType

__version__ = "0.1.0"

IMPLEMENTATION: str = _core.IMPLEMENTATION
crc32c = _core.crc32c
crc32c_backend = _core.crc32c_backend
Frame = _core.Frame
FrameDecoder = _core.FrameDecoder
encode_header = _core.encode_header
encode_frame = _core.encode_frame
ReplayBuffer = _core.ReplayBuffer

__all__ = [
    "IMPLEMENTATION",
    "compiled_modules",
    "crc32c",
    "crc32c_backend",
    "Frame",
    "FrameDecoder",
    "encode_header",
    "encode_frame",
    "ReplayBuffer",
    "FrameType",
    "FLAG_FIN",
    "HEADER_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "IcafastError",
    "FrameError",
    "ProtocolError",
    "ReplayBufferError",
    "ReplayFullError",
    "ReplayRangeError",
    "__version__",
]
