"""The one exception hierarchy shared by the compiled core, its pure-Python twin and the engine.

Both core implementations raise exactly these classes with exactly these messages, so an
``except`` clause (and a differential test) behaves the same whichever core is loaded.
"""

from __future__ import annotations

__all__ = [
    "IcafastError",
    "FrameError",
    "ProtocolError",
    "ReplayBufferError",
    "ReplayFullError",
    "ReplayRangeError",
    "FRAME_ERR_TYPE",
    "FRAME_ERR_RESERVED",
    "FRAME_ERR_FLAGS",
    "FRAME_ERR_LENGTH",
    "FRAME_ERR_CHECKSUM",
    "FRAME_ERR_TRUNCATED",
    "frame_error",
]


class IcafastError(Exception):
    """Base class of every error icafast raises on purpose."""


class FrameError(IcafastError, ValueError):
    """Malformed bytes on the wire: the connection that carried them must be closed.

    ``code`` is one of the ``FRAME_ERR_*`` constants, ``offset`` the stream offset (bytes fed
    to the decoder before the start of the offending frame).
    """

    def __init__(self, message: str, code: int = 0, offset: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.offset = offset

    def __reduce__(self):  # keep code/offset across pickling (multiprocessing, logging)
        return (type(self), (self.args[0], self.code, self.offset))


class ProtocolError(IcafastError):
    """The peer broke the session protocol (bad handshake, impossible offsets, ...)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class ReplayBufferError(IcafastError):
    """Misuse of a replay buffer."""


class ReplayFullError(ReplayBufferError, BufferError):
    """append() would exceed the replay limit; nothing was appended."""


class ReplayRangeError(ReplayBufferError, ValueError):
    """An offset (ack or replay start) below the buffer's start or above its end."""


# Frame decoder status codes (the C decoder returns the same numbers).
FRAME_ERR_TYPE = 1
FRAME_ERR_RESERVED = 2
FRAME_ERR_FLAGS = 3
FRAME_ERR_LENGTH = 4
FRAME_ERR_CHECKSUM = 5
FRAME_ERR_TRUNCATED = 6


def frame_error(code: int, offset: int, a: int = 0, b: int = 0) -> FrameError:
    """Build the FrameError for a decoder status code; ``a``/``b`` are code-specific details.

    Used by both cores so that messages are identical byte for byte.
    """
    if code == FRAME_ERR_TYPE:
        msg = f"unknown frame type 0x{a:02x}"
    elif code == FRAME_ERR_RESERVED:
        msg = f"reserved header field is 0x{a:04x}, must be 0"
    elif code == FRAME_ERR_FLAGS:
        msg = f"flags 0x{a:02x} not allowed for frame type 0x{b:02x}"
    elif code == FRAME_ERR_LENGTH:
        msg = f"payload length {a} exceeds the maximum of {b}"
    elif code == FRAME_ERR_CHECKSUM:
        msg = f"checksum mismatch: frame says 0x{a:08x}, computed 0x{b:08x}"
    elif code == FRAME_ERR_TRUNCATED:
        msg = f"stream ended inside a frame ({a} of {b} bytes received)"
    else:
        msg = f"frame decoder error {code}"
    return FrameError(f"{msg} (frame at stream offset {offset})", code, offset)
