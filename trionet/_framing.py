"""Sans-I/O line framing: bytes in, lines and framing errors out.

This module does no I/O and knows nothing about Trio. :class:`LineBuffer`
is fed whatever chunks the network delivers and hands back, one at a time,
the events PROTOCOL.md defines for line services:

* a decoded line (``str``, without its terminator),
* :class:`LineTooLong` for a line over the limit (the rest of that line, up
  to the next LF, is then discarded without being stored),
* :class:`BadEncoding` for a complete line that is not valid UTF-8.

Why it is written the way it is:

* The buffer is a ``bytearray`` and consumed lines are removed with
  ``del buf[:n]``. CPython implements deletion from the front of a
  bytearray by moving its start pointer, so consuming a line costs O(1)
  amortised, where ``buf = buf[n:]`` on ``bytes`` would copy the whole
  remainder every time.
* The search for LF resumes where the previous search stopped
  (``_scanned``). A client that trickles a long line one byte at a time
  would otherwise make us rescan the whole partial line on every byte:
  O(n²) work for n bytes, the classic slowloris amplifier (trio#796).
  Together these make framing linear in the input, however it is chunked.
* Memory is bounded: once an unterminated line passes the limit we drop
  what we hold and enter *discard mode*, which throws incoming bytes away
  until an LF shows up. So one line never costs more than the limit plus
  one received chunk, however long the client keeps sending.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["DEFAULT_MAX_LINE", "BadEncoding", "LineBuffer", "LineEvent", "LineTooLong"]

DEFAULT_MAX_LINE: Final = 4096

_LF: Final = 0x0A
_CR: Final = 0x0D


@attrs.frozen
class LineTooLong:
    """A line exceeded ``limit`` bytes (terminator not counted)."""

    limit: int

    @property
    def reply(self) -> str:
        """The error line PROTOCOL.md prescribes for this event."""
        return f"ERR line-too-long {self.limit}"


@attrs.frozen
class BadEncoding:
    """A complete line was not valid UTF-8; ``raw`` holds its bytes."""

    raw: bytes = attrs.field(repr=False)

    @property
    def reply(self) -> str:
        """The error line PROTOCOL.md prescribes for this event."""
        return "ERR bad-encoding"


LineEvent = str | LineTooLong | BadEncoding


class LineBuffer:
    """Incremental LF framer with a per-line limit.

    Feed bytes with :meth:`feed`, then call :meth:`next_event` until it
    returns ``None`` (more input needed). After :meth:`feed_eof`, a final
    unterminated line is delivered as if it had ended with LF, so nothing
    a client sent before closing is silently lost.

    ``max_line`` counts the bytes of the line itself: a trailing CR that
    precedes the LF is part of the terminator, not of the line.
    """

    __slots__ = ("_buf", "_discarding", "_eof", "_scanned", "max_line")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be >= 1")
        self.max_line = max_line
        self._buf = bytearray()
        # Bytes at the front of _buf already known to hold no LF.
        self._scanned = 0
        # True while skipping the tail of an over-long line.
        self._discarding = False
        self._eof = False

    def __len__(self) -> int:
        """Number of bytes currently buffered (never much above the limit)."""
        return len(self._buf)

    def __bool__(self) -> bool:
        """True if any bytes are buffered."""
        return bool(self._buf)

    @property
    def partial(self) -> bool:
        """True while a line has begun but not ended (its tail may be being discarded)."""
        return bool(self._buf) or self._discarding

    @property
    def at_eof(self) -> bool:
        """True once :meth:`feed_eof` was called and every event was taken."""
        return self._eof and not self._buf

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer."""
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if self._discarding:
            # Do not even store the tail of an over-long line: find its end
            # directly in the incoming chunk and keep only what follows it.
            if isinstance(data, memoryview):
                data = data.tobytes()
            i = data.find(b"\n")
            if i < 0:
                return
            self._discarding = False
            data = data[i + 1 :]
        self._buf += data

    def feed_eof(self) -> None:
        """Record that the peer will send nothing more."""
        self._eof = True
        if self._discarding:
            self._discarding = False

    def take_bytes(self, max_bytes: int | None = None) -> bytes:
        """Remove and return up to ``max_bytes`` raw buffered bytes.

        Lets a protocol switch from lines to raw bytes mid-stream (for
        instance a binary payload announced by a line) without losing what
        was already received past the last line.
        """
        n = len(self._buf) if max_bytes is None else min(max_bytes, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._scanned = max(0, self._scanned - n)
        return out

    def next_event(self) -> LineEvent | None:
        """Return the next line or framing error, or ``None`` if none is complete."""
        buf = self._buf
        i = buf.find(b"\n", self._scanned)
        if i < 0:
            self._scanned = len(buf)
            n = len(buf)
            if self._eof:
                if not n:
                    return None
                i = n  # the final, unterminated line
            elif n > self.max_line + 1 or (n == self.max_line + 1 and buf[-1] != _CR):
                # Over the limit with no LF in sight (a CR just past the limit
                # may still turn out to be half of a CRLF, so it may wait).
                buf.clear()
                self._scanned = 0
                self._discarding = True
                return LineTooLong(self.max_line)
            else:
                return None
        end = i
        if end > 0 and buf[end - 1] == _CR:
            end -= 1
        self._scanned = 0
        if end > self.max_line:
            del buf[: i + 1]
            return LineTooLong(self.max_line)
        raw = bytes(buf[:end])
        del buf[: i + 1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return BadEncoding(raw)
