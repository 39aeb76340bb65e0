"""Wire constants of the icafast frame format (see docs/PROTOCOL.md, section 2).

Shared by both core implementations and the session engine; ``csrc/frame.h`` repeats the
numbers and a test checks they agree.
"""

from __future__ import annotations

import enum

__all__ = [
    "HEADER_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "MAX_PAYLOAD_LIMIT",
    "REPLAY_LIMIT_MAX",
    "MAX_OFFSET",
    "FrameType",
    "FLAG_FIN",
    "ALLOWED_FLAGS",
]

#: Fixed header: type u8, flags u8, reserved u16, length u32, seq u64, ack u64, crc32c u32.
HEADER_SIZE = 28
#: Default largest payload a decoder accepts (bytes).
DEFAULT_MAX_PAYLOAD = 256 * 1024
#: The length field is 32 bits wide.
MAX_PAYLOAD_LIMIT = 0xFFFFFFFF
#: the largest replay limit a replay buffer takes (just under 1 TiB)
REPLAY_LIMIT_MAX = MAX_PAYLOAD_LIMIT * 256
#: Sequence numbers are absolute 64-bit byte offsets and never wrap.
MAX_OFFSET = 0xFFFFFFFFFFFFFFFF


class FrameType(enum.IntEnum):
    HELLO = 0x01
    NEW = 0x02
    RESUME = 0x03
    ACCEPT = 0x04
    REJECT = 0x05
    DATA = 0x10
    ACK = 0x11
    PING = 0x12
    PONG = 0x13
    CLOSE = 0x14


#: DATA only: the sender's stream ends after this frame's payload (half-close).
FLAG_FIN = 0x01

#: Flag bits each frame type may carry; any other bit is a FrameError.
ALLOWED_FLAGS: dict[int, int] = {int(t): 0 for t in FrameType}
ALLOWED_FLAGS[FrameType.DATA] = FLAG_FIN
