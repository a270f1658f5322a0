"""The sending half of a :class:`~trionet.Connection`: :class:`SendSide`.

This module owns how a handler's output leaves: the reply queue
(:meth:`~SendSide.write_line`, flushed before the next wait for input or by
:meth:`~SendSide.flush`), :meth:`~SendSide.send_all`'s fast path, files,
EOF, and the run budget that decides when a connection that only sends
must still yield. Like the receiving half it holds no socket code: bytes go
to the connection's :class:`~trionet._transport.Transport`.

It is a base class of :class:`~trionet.Connection` rather than an object
of its own because the two halves share state on every message (a wait
for input first flushes the queue; a receive resets the run budget's
clock), and one object with slots keeps that a field access, not a call.
"""

from __future__ import annotations

import os
import time
from typing import Final

import trio

from ._transport import SupportsFileno, Transport

__all__ = ["RUN_BUDGET", "SendSide"]

#: Seconds a connection may run without yielding to the scheduler: work on
#: lines it already holds, and sends the transport takes at once (see
#: ``Connection._yield_after_work`` and :meth:`SendSide.send_all`).
RUN_BUDGET: Final = 0.005


class SendSide:
    """Output methods of :class:`~trionet.Connection`, and the fields they own."""

    # (Slots, as the connection's: a server may hold many thousands.)
    __slots__ = ("_out", "_ran_since", "_send_interrupted", "_transport", "stream")

    def __init__(self, transport: Transport) -> None:
        # Everything the connection sends or receives goes through here.
        self._transport = transport
        #: The Trio stream underneath. Handlers should use the connection's
        #: own methods: bytes sent or read behind its back escape its accounting.
        self.stream = transport.stream
        # Lines queued by write_line, not sent yet.
        self._out = bytearray()
        # A send was cut short with part of it at the peer: no line may follow.
        self._send_interrupted = False
        # When the connection last waited or yielded (time.perf_counter()):
        # the start of its current run, for the run budget.
        self._ran_since = 0.0

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the client (counted by the transport, partial sends included)."""
        return self._transport.bytes_sent

    def write_line(self, line: str) -> None:
        """Queue ``line`` + LF; sent by :meth:`flush` or before the next input wait."""
        if "\n" in line:
            raise ValueError("a line may not contain LF")
        self._out += line.encode()
        self._out.append(0x0A)

    async def send_line(self, line: str) -> None:
        """Send ``line`` + LF now (after anything queued by :meth:`write_line`)."""
        self.write_line(line)
        await self._flush(checkpoint=True)

    async def flush(self) -> None:
        """Send everything queued by :meth:`write_line`."""
        await self._flush(checkpoint=True)

    async def _flush(self, checkpoint: bool) -> None:
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            try:
                await self._send(data, checkpoint)
            except BaseException:
                if not self._send_interrupted:
                    # Nothing of it left: keep it queued, in order, so a
                    # final flush (with the server's BYE) still delivers it.
                    self._out[:0] = data
                raise
        elif checkpoint:
            await trio.lowlevel.checkpoint()

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, checkpoint: bool = True
    ) -> None:
        """Send raw bytes (after anything queued by :meth:`write_line`).

        On a plain TCP socket a send the kernel takes at once neither checks
        for cancellation nor yields to the scheduler unless the connection
        has run for a few milliseconds since it last waited (the run
        budget): a reply right after a wait costs one system call, and a
        loop that only sends still yields, and can be cancelled, every few
        milliseconds. A writer loop that yields on its own between sends
        anyway may pass ``checkpoint=False`` to skip even that yield. On
        other streams this is the stream's own ``send_all`` (a checkpoint).
        """
        if self._out:
            await self._flush(checkpoint=False)
        tr = self._transport
        if tr.sending or tr.eof_sent or not data:  # (the slow way refuses those)
            await self._send(data, checkpoint)
            return
        # The fast path, inline. Right after a wait (the usual reply)
        # cancellation was just checked and the task just yielded: only a
        # connection that has run for the budget checks and yields again.
        ran_long = time.perf_counter() - self._ran_since > RUN_BUDGET
        if ran_long:
            await trio.lowlevel.checkpoint_if_cancelled()
        sent = tr.try_send(data)
        if sent < len(data):
            await self._send(data, checkpoint, sent)
        elif ran_long and checkpoint:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._ran_since = time.perf_counter()

    async def _send(
        self, data: bytes | bytearray | memoryview, checkpoint: bool = True, sent: int = -1
    ) -> None:
        """Send ``data``; ``sent`` >= 0: the caller's ``try_send`` already took that much."""
        # The transport's send guard, inlined: this runs once per reply.
        tr = self._transport
        if tr.sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        if tr.eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        tr.sending = True
        try:
            if sent < 0:
                await trio.lowlevel.checkpoint_if_cancelled()
                # The common case, a reply the transport takes whole, costs one call.
                sent = tr.try_send(data)
                if sent == len(data) and data:
                    if checkpoint and time.perf_counter() - self._ran_since > RUN_BUDGET:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        self._ran_since = time.perf_counter()
                    return
            try:
                await tr.send_rest(memoryview(data)[sent:] if sent else data)
            except BaseException:
                if sent or tr.partial:  # the peer holds part of it
                    self._send_interrupted = True
                raise
            self._ran_since = time.perf_counter()  # it waited for room, or the stream yielded
        finally:
            tr.sending = False

    async def send_file(self, file: SupportsFileno | int, offset: int = 0, count: int = -1) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` (``-1``: to its end).

        ``file`` is an open file (from :func:`trio.open_file`, or any object
        with ``fileno()``) or a descriptor; its position is not used or
        changed. On a plain TCP socket the kernel copies the bytes itself
        (``os.sendfile``, zero copy); on any other stream (TLS, memory) they
        are read in worker threads, 1 MiB at a time, and sent as usual.
        Queued lines go first. Returns the bytes sent; raises
        :exc:`EOFError` if the file ends early (it was truncated), after
        which nothing more can be framed on this connection (the server
        closes it without ``BYE``), exactly as after a send cut short.
        """
        fd = file if isinstance(file, int) else file.fileno()
        if count < 0:
            count = max(0, os.fstat(fd).st_size - offset)
        if self._out:
            await self._flush(checkpoint=False)
        with self._transport.send_guard():
            try:
                sent = await self._transport.send_file(fd, offset, count)
            except BaseException:
                # The peer may hold part of the file: no line can follow it.
                self._send_interrupted = True
                raise
        self._ran_since = time.perf_counter()
        return sent

    async def send_eof(self) -> None:
        """Flush queued lines, then half-close the sending side."""
        self._transport.half_closeable()  # before the flush
        await self.flush()
        await self._transport.send_eof()

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until sending might not block (see Trio's documentation)."""
        await self._transport.wait_send_all_might_not_block()
