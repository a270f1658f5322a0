"""Where a WebSocket client's frames and messages begin and end, from raw bytes (sans-I/O).

trio-websocket hands the chat a message only once it is whole, so a client
sending a frame header and then one payload byte per second would look idle
to the connection until the idle timeout, while each byte keeps it from
being idle. The line timeout must hold for a WebSocket message as for a TCP
line: from its first byte to its last. :class:`FrameWatch` follows the
frame headers of the client's byte stream (RFC 6455, section 5.2) to tell
when the message (or control frame) now arriving began; it validates
nothing, that stays wsproto's job.

It also builds the one frame the server sends itself: the close frame for a
client that broke the protocol (:func:`close_frame`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

__all__ = ["FrameWatch", "close_frame"]

_CONTINUATION: Final = 0x0
_TEXT: Final = 0x1
_BINARY: Final = 0x2


class FrameWatch:
    """Follows a client's frames; :attr:`since` is when the unfinished one began.

    Feed it every byte the client sends after the HTTP handshake, with the
    time they arrived. ``on_change`` (optional) is called with the new
    :attr:`since` whenever it changes.
    """

    def __init__(self, on_change: Callable[[float], None] | None = None) -> None:
        self.on_change = on_change
        self._head = bytearray()  # the header of the frame being read
        self._payload_left = 0  # payload bytes of that frame still to come
        self._in_payload = False
        self._final = True  # the frame being read ends its message
        self._data = False  # ... and is a data frame (not a control frame)
        self._message_since = math.inf  # a data message begun, not finished
        self._frame_since = math.inf  # a frame begun, not finished
        self.since = math.inf

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Account for ``data``, received at ``now``."""
        view = memoryview(data)
        while view:
            if self._in_payload:
                take = min(self._payload_left, len(view))
                self._payload_left -= take
                view = view[take:]
                if not self._payload_left:
                    self._end_frame()
                continue
            if not self._head:
                self._frame_since = now
                opcode = view[0] & 0x0F
                if opcode in (_TEXT, _BINARY):
                    self._message_since = now
                self._data = opcode in (_CONTINUATION, _TEXT, _BINARY)
                self._final = bool(view[0] & 0x80)
            need = self._header_size()
            take = min(need - len(self._head), len(view))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) == self._header_size():
                self._payload_left = self._payload_size()
                self._in_payload = True
                if not self._payload_left:
                    self._end_frame()
        self._update()

    def _header_size(self) -> int:
        if len(self._head) < 2:
            return 2
        size = 2 + {126: 2, 127: 8}.get(self._head[1] & 0x7F, 0)
        return size + (4 if self._head[1] & 0x80 else 0)

    def _payload_size(self) -> int:
        short = self._head[1] & 0x7F
        if short == 126:
            return int.from_bytes(self._head[2:4], "big")
        if short == 127:
            return int.from_bytes(self._head[2:10], "big")
        return short

    def _end_frame(self) -> None:
        self._head.clear()
        self._in_payload = False
        self._frame_since = math.inf
        if self._data and self._final:
            self._message_since = math.inf

    def _update(self) -> None:
        since = min(self._message_since, self._frame_since)
        if since != self.since:
            self.since = since
            if self.on_change is not None:
                self.on_change(since)


def close_frame(code: int, reason: str = "") -> bytes:
    """A server's (unmasked) close frame with ``code`` and a short ``reason``."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes([0x88, len(payload)]) + payload
