"""HAProxy PROXY protocol, versions 1 (text) and 2 (binary), receiving side only; sans-IO.

When icafast sits behind a load balancer, every connection starts with a PROXY header naming the
real client. ``ProxyHeaderParser.feed`` consumes it and hands back the bytes that follow.
Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct

from .errors import ProtocolError

__all__ = ["ProxyHeaderParser", "V2_SIGNATURE"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the longest v1 line, CRLF included
_V2_MAX_BODY = 4096  # addresses + TLVs we are willing to buffer


class ProxyHeaderParser:
    """Feed bytes until ``done``; then ``source`` is ("ip", port) or None (LOCAL/UNKNOWN: use
    the connection's own address) and ``feed`` has returned the bytes after the header."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False
        self.version = 0
        self.source: tuple[str, int] | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Consume ``data``; returns the bytes after the header (empty until it is complete).
        Raises ProtocolError on anything that is not a valid PROXY header."""
        if self.done:
            return bytes(data)
        self._buf += data
        b = self._buf
        n = min(len(b), len(V2_SIGNATURE))
        if b[:n] == V2_SIGNATURE[:n]:
            return self._v2()
        if b[: min(len(b), 6)] == b"PROXY "[: min(len(b), 6)]:
            return self._v1()
        raise ProtocolError("connection does not start with a PROXY protocol header")

    def _v1(self) -> bytes:
        b = self._buf
        # (the line ends at its first LF, within the 107 bytes; a bare LF is not a line end the
        # spec allows, and waiting for a CRLF after it would only report it as too long)
        end = b.find(b"\n", 0, _V1_MAX)
        if end < 0:
            if len(b) >= _V1_MAX:
                raise ProtocolError("PROXY v1 header longer than 107 bytes")
            return b""
        if b[end - 1] != 0x0D:  # (end >= 6: the buffer starts with "PROXY ")
            raise ProtocolError("PROXY v1 header line ends in a bare LF: it must end in CRLF")
        line = bytes(b[: end - 1]).decode("ascii", "replace")
        rest = bytes(b[end + 1 :])
        parts = line.split(" ")
        if len(parts) >= 2 and parts[1] == "UNKNOWN":
            self.source = None
        elif len(parts) == 6 and parts[1] in ("TCP4", "TCP6"):
            try:
                ip = ipaddress.ip_address(parts[2])
                port = int(parts[4])
                ipaddress.ip_address(parts[3])
                int(parts[5])
            except ValueError:
                raise ProtocolError(f"bad PROXY v1 header {line!r}") from None
            if (ip.version == 4) != (parts[1] == "TCP4") or not 0 <= port <= 65535:
                raise ProtocolError(f"bad PROXY v1 header {line!r}")
            self.source = (str(ip), port)
        else:
            raise ProtocolError(f"bad PROXY v1 header {line!r}")
        self._finish(1)
        return rest

    def _v2(self) -> bytes:
        b = self._buf
        if len(b) < 16:
            return b""
        ver_cmd, fam, length = struct.unpack_from(">BBH", b, 12)
        if ver_cmd >> 4 != 2 or (ver_cmd & 0xF) not in (0, 1):
            raise ProtocolError(f"bad PROXY v2 version/command 0x{ver_cmd:02x}")
        family, proto = fam >> 4, fam & 0xF
        # (the spec defines families 0-3 and transports 0-2 and has receivers reject other
        # values; LOCAL ignores the byte)
        if ver_cmd & 0xF == 1 and (family > 3 or proto > 2):
            what = "address family" if family > 3 else "transport protocol"
            raise ProtocolError(f"PROXY v2 header with an unknown {what} (byte 0x{fam:02x})")
        if length > _V2_MAX_BODY:
            raise ProtocolError(f"PROXY v2 header too long ({length} bytes)")
        if len(b) < 16 + length:
            return b""
        body = bytes(b[16 : 16 + length])
        rest = bytes(b[16 + length :])
        self.source = None
        if ver_cmd & 0xF == 1:  # PROXY (LOCAL: health checks etc. keep the real address)
            if proto in (1, 2) and family == 1:  # INET
                if length < 12:
                    raise ProtocolError("PROXY v2 IPv4 address block too short")
                src = ipaddress.IPv4Address(body[0:4])
                (port,) = struct.unpack_from(">H", body, 8)
                self.source = (str(src), port)
            elif proto in (1, 2) and family == 2:  # INET6
                if length < 36:
                    raise ProtocolError("PROXY v2 IPv6 address block too short")
                src6 = ipaddress.IPv6Address(body[0:16])
                (port,) = struct.unpack_from(">H", body, 32)
                self.source = (str(src6), port)
            # UNSPEC / UNIX: no usable address; keep the connection's own
        self._finish(2)
        return rest

    def _finish(self, version: int) -> None:
        self.done = True
        self.version = version
        self._buf = bytearray()
