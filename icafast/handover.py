"""The state one ``icafast serve`` or ``icafast connect`` process hands the next (an upgrade
that keeps the sessions).

``RelayServer.hand_over()`` (``RelayClient.hand_over()``) packs it and
``RelayServer.start(handover=...)`` (``RelayClient.start(handover=...)``) unpacks it; the
sockets themselves (listeners, and backend or application connections) travel beside it as
file descriptors (inherited across ``exec``, or sent with SCM_RIGHTS). Nothing here touches a
socket.

The format is icafast's own and is read only by the icafast that follows the one that wrote
it, on the same host:

- ``MAGIC`` (16 bytes), then the length of the document (8 bytes, big-endian), then the
  document (UTF-8 JSON), then the bytes area;
- the document holds ``version``, ``listeners``, ``sessions`` and server counters (a
  client's: ``role`` = ``"client"``, and no counters); each byte string a session holds (its
  unacknowledged stream, bytes read from its backend or application not yet queued) is a pair
  ``[offset, length]`` into the bytes area; each session's endpoint connection (``backend``,
  ``app``) is an index into the descriptors.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"icafast-handover"
VERSION = 1
_LEN = struct.Struct(">Q")


class HandoverError(ValueError):
    """The bytes are not a hand-over this icafast can take."""


class Packer:
    """Builds the bytes area while the document is put together: ``add(views)`` appends byte
    strings and returns their place, ``pack(doc)`` gives the whole."""

    def __init__(self) -> None:
        self._parts: list[Any] = []
        self._size = 0

    def add(self, views: Any) -> list[int]:
        start = self._size
        for v in views:
            n = memoryview(v).nbytes
            if n:
                self._parts.append(v)
                self._size += n
        return [start, self._size - start]

    def pack(self, doc: dict[str, Any]) -> bytes:
        text = json.dumps({**doc, "version": VERSION}, separators=(",", ":")).encode()
        return b"".join([MAGIC, _LEN.pack(len(text)), text, *self._parts])


def unpack(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """The document and the bytes area (``area(place)`` slices it)."""
    head = len(MAGIC) + _LEN.size
    if len(data) < head or not data.startswith(MAGIC):
        raise HandoverError("not an icafast hand-over")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    if head + n > len(data):
        raise HandoverError("hand-over cut short")
    try:
        doc = json.loads(bytes(data[head:head + n]))
    except ValueError as e:
        raise HandoverError(f"hand-over document unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise HandoverError(f"hand-over of another version ({doc.get('version')!r}; "
                            f"this icafast takes {VERSION})" if isinstance(doc, dict)
                            else "hand-over document is not an object")
    return doc, memoryview(data)[head + n:]


def area(blob: memoryview, place: list[int]) -> memoryview:
    start, n = place
    if start < 0 or n < 0 or start + n > len(blob):
        raise HandoverError("hand-over: a byte string lies outside its area")
    return blob[start:start + n]
