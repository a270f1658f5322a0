"""One client connection, what a handler talks to: :class:`Connection`.

This module owns the handler's view of a connection and its receiving
half: lines under PROTOCOL.md's shared rules (CR dropped, over-long and
non-UTF-8 lines answered and skipped, the quit command), raw bytes, limits,
accounting (byte counts, :attr:`Connection.end_reason`), and the waits the
server's deadlines watch. The sending half (the reply queue, ``send_all``,
files, the run budget) is :class:`~trionet._connection_send.SendSide`, a
base class. Neither holds socket code: bytes move through one
:class:`~trionet._transport.Transport`. The tour, and why it is shaped this
way, is in docs/framework.md ("Connection", "Transports").
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Final

import trio

from ._connection_send import RUN_BUDGET, SendSide
from ._connection_stream import ConnectionStream
from ._framing import DEFAULT_MAX_LINE, BadEncoding, LineBuffer, LineTooLong
from ._logs import connection_log
from ._socket import make_transport
from ._transport import RECEIVE_SIZE, SupportsFileno, Transport, format_peer

__all__ = [
    "Connection",
    "ConnectionStream",
    "LineError",
    "SupportsFileno",
]

_ids = itertools.count(1)
_INF: Final = math.inf

LineErrorHook = Callable[["Connection", LineTooLong | BadEncoding], Awaitable[None]]
QuitHook = Callable[["Connection", str], Awaitable[None]]


class LineError(ValueError):
    """Raised by :meth:`Connection.receive_line` when no error hook is set."""

    def __init__(self, event: LineTooLong | BadEncoding) -> None:
        super().__init__(event.reply)
        self.event = event


class Connection(SendSide):
    """A client connection wrapping ``stream``.

    Args:
      stream: the Trio stream to serve, or a
        :class:`~trionet._transport.Transport` already made for it (a
        listener that read something first, e.g. a PROXY protocol header).
      pre_read: bytes already read from the peer, handed out before any
        new ones (they count in :attr:`bytes_in`).
      max_line: the longest line accepted, in bytes, terminator excluded.
      on_line_error: awaited with each :class:`LineTooLong` /
        :class:`BadEncoding` event; ``None`` makes :meth:`receive_line`
        raise :class:`LineError` instead (what a client usually wants).
      quit_command: a line whose first word is this (any case) ends the
        input: :meth:`receive_line` answers it through ``on_quit`` and
        returns ``None`` from then on, and :attr:`end_reason` becomes
        ``"quit"``. ``None`` (the default for a bare connection) turns it off.
      on_quit: awaited with the rest of the quit line (the reason, maybe
        empty); the default queues ``BYE``.
      service: name used in log lines.
      logger: parent logger for :attr:`log`.
      conn_id: the id shown in logs (default: the next process-wide number).
      peer: the client's address as logs show it (default: asked of the
        socket; a PROXY protocol header knows better).
    """

    # Slots: a server may hold many thousands of idle connections, and a
    # per-instance __dict__ would be a large share of each one's memory.
    __slots__ = (
        "_busy",
        "_expired",
        "_input_closed",
        "_line_since",
        "_lines",
        "_log",
        "_logger",
        "_on_line_error",
        "_on_quit",
        "_peer",
        "_quit_first",
        "_quit_word",
        "_scope",
        "_shutdown_requested",
        "_wait_since",
        "_waiting",
        "bytes_in",
        "end_reason",
        "eof_received",
        "id",
        "max_line",
        "service",
    )

    def __init__(
        self,
        stream: trio.abc.Stream | Transport,
        *,
        pre_read: bytes = b"",
        max_line: int = DEFAULT_MAX_LINE,
        on_line_error: LineErrorHook | None = None,
        quit_command: str | None = None,
        on_quit: QuitHook | None = None,
        service: str = "",
        logger: logging.Logger | None = None,
        conn_id: int | None = None,
        peer: str | None = None,
    ) -> None:
        SendSide.__init__(self, stream if isinstance(stream, Transport) else make_transport(stream))
        #: A number unique in this process, for logs (``conn_id`` overrides).
        self.id = next(_ids) if conn_id is None else conn_id
        #: The service's name, for logs.
        self.service = service
        #: The longest line accepted, in bytes.
        self.max_line = max_line
        #: Bytes received from the client (:attr:`bytes_out`: sent to it).
        self.bytes_in = len(pre_read)
        #: Why the connection ended, for the access log's ``end=`` field. A
        #: handler may set it (``"slow-consumer"``, ``"truncated"``...); the
        #: server fills in the rest (see docs/framework.md, "End reasons").
        self.end_reason: str | None = None
        #: True once the peer has sent EOF.
        self.eof_received = False
        self._on_line_error = on_line_error
        self._on_quit = on_quit
        self._quit_word = quit_command.lower() if quit_command else None
        # Characters a quit line may start with: a cheap first test per line.
        self._quit_first = (
            frozenset({" ", "\t", quit_command[0].lower(), quit_command[0].upper()})
            if quit_command
            else frozenset()
        )
        self._input_closed = False
        self._logger = logger
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self._peer = peer
        self._lines = LineBuffer(max_line)
        if pre_read:
            self._lines.feed(pre_read)
        # The scope the server runs the handler in (deadlines, shutdown).
        self._scope = trio.CancelScope()
        self._expired: str | None = None
        self._waiting = False
        self._wait_since = math.inf
        self._line_since = math.inf
        self._busy = 0
        self._shutdown_requested = False

    # -- identity and logging ------------------------------------------------

    @property
    def peer(self) -> str:
        """The remote address as ``host:port`` (``"memory"`` for memory streams)."""
        if self._peer is None:
            self._peer = format_peer(self.stream)
        return self._peer

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines start with ``[service #id peer]``."""
        if self._log is None:
            self._log = connection_log(self.service, self.id, self.peer, self._logger)
        return self._log

    @property
    def shutting_down(self) -> bool:
        """True once the server has begun a graceful shutdown."""
        return self._shutdown_requested

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Waits inside this block never count as idle.

        For long work that involves waiting on the client without its
        sending anything. (Sending to a slow reader needs no such block: a
        send that makes progress never counts; one stalled for the whole
        idle timeout ends the connection.)
        """
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    # -- the server's side: deadlines and shutdown ------------------------------
    # (What the waits record and how the reaper reads them: Server._reap.)

    def _idle_since(self) -> float:
        # Input and send waits are tracked apart (a reader and a writer task
        # may do both at once); the older one counts. The transport knows
        # when a send began waiting for room (progress restarts the clock).
        if self._busy:
            return self._wait_since
        return min(self._wait_since, self._transport.send_stalled_since)

    def _expire(self, reason: str) -> None:
        if self._expired is None:
            self._expired = reason
        self._scope.cancel()

    def line_started(self, since: float) -> None:
        """The line now arriving began at ``since`` (``math.inf``: none is).

        For streams that frame their input below the connection (a WebSocket
        hands over a message only once whole): they say when a message began,
        so the line timeout holds for it as for a TCP line.
        """
        self._line_since = since

    def _request_shutdown(self) -> None:
        # Idle (waiting for its client): cancelled at once. Busy: it
        # finishes its current piece of work and stops at its next wait.
        self._shutdown_requested = True
        if self._waiting:
            self._scope.cancel()

    # -- receiving ----------------------------------------------------------------

    async def _receive(self, max_bytes: int) -> bytes | bytearray:
        # The hot path of every service: written out inline (each layer of
        # coroutine calls costs measurably per request), the transport's
        # waits awaited right here (see trionet._transport).
        tr = self._transport
        out = self._out
        if out:
            # Replies queued with write_line leave now, in one write, just
            # before we wait for the client (no yield of their own: the wait
            # below is one). On a socket the queue goes straight to the
            # kernel, without a copy, in the common case that it fits.
            partial = False
            if not tr.sending and not tr.eof_sent:
                sent = tr.try_send(out)
                if sent:
                    del out[:sent]
                    partial = bool(out)
            if out:
                # The peer may hold half a line until the rest is sent: if
                # that is cut short, no BYE may follow.
                self._send_interrupted |= partial
                await self._flush(checkpoint=False)
                if partial:
                    self._send_interrupted = False
        # Begin a wait on the client (what the server's reaper reads: Server._reap).
        if self._shutdown_requested:
            self._scope.cancel()
        if not self._busy:
            # (The run's clock, asked directly: trio.current_time() first
            # looks the run up, which costs more than the clock itself.)
            self._wait_since = trio.lowlevel.current_clock().current_time()
        self._waiting = True
        try:
            data: bytes | bytearray | None = None
            if tr.eager:
                # The last read filled the buffer: more is probably queued,
                # so read before waiting (and still yield, shielded: the
                # data is ours).
                await trio.lowlevel.checkpoint_if_cancelled()
                data = tr.try_receive(max_bytes)
                if data is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
            while data is None:
                data = await tr.wait_receive(max_bytes)
                if data is None:  # readable now (or a spurious wake-up)
                    data = tr.try_receive(max_bytes)
        finally:
            self._waiting = False
            self._wait_since = _INF
        self._ran_since = time.perf_counter()
        if data:
            self.bytes_in += len(data)
        else:
            self.eof_received = True
        return data

    async def receive_line(self) -> str | None:
        """Return the next line (without terminator), or ``None`` at EOF or after ``QUIT``.

        Framing errors are handed to the ``on_line_error`` hook (by default
        in a server: reply ``ERR line-too-long N`` / ``ERR bad-encoding``)
        and reading carries on with the next line. A final line not ended
        by LF before EOF is still returned. The quit command, when set, is
        answered through ``on_quit`` and ends the input. ``async for line in
        conn`` is the same, one coroutine layer cheaper.
        """
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    # The connection is its own line iterator. (Not an async generator:
    # those cost more per item, and one left suspended at the end of a
    # handler would need finalizing.) The line logic lives here rather than
    # in receive_line so that `async for` pays one coroutine layer less.
    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> str:
        lines = self._lines
        while True:
            event = lines.next_event()
            if type(event) is str:
                self._line_since = _INF
                if event[:1] in self._quit_first and self._is_quit(event):
                    await self._quit(event)
                    raise StopAsyncIteration
                if time.perf_counter() - self._ran_since > RUN_BUDGET:
                    await self._yield_after_work()
                return event
            if event is None:
                if self._input_closed:
                    raise StopAsyncIteration
                if lines.at_eof:
                    # Replies to the last lines must not wait for a read
                    # that will never come.
                    await self._flush(checkpoint=True)
                    raise StopAsyncIteration
                if self._line_since == _INF and lines.partial:
                    # A line has begun: it must end within the line timeout,
                    # however slowly its bytes trickle in (each byte would
                    # restart the idle clock).
                    self._line_since = trio.current_time()
                data = await self._receive(RECEIVE_SIZE)
                if data:
                    lines.feed(data)
                else:
                    lines.feed_eof()
                continue
            assert not isinstance(event, str)
            if self._on_line_error is None:
                raise LineError(event)
            await self._on_line_error(self, event)

    async def _yield_after_work(self) -> None:
        # Lines already buffered are returned without waiting. A client
        # pipelining thousands of costly requests in one segment must not
        # keep every other connection from running, so once this connection
        # has run for a while without waiting, it yields. A budget in time
        # rather than in lines keeps cheap bursts together (chat's writer
        # then sends a whole burst in one write) and still bounds costly
        # ones. Replies already computed leave first. The line is already
        # taken, so the yield is shielded: a cancellation waits for the
        # next operation instead of losing the line.
        await self._flush(checkpoint=False)
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._ran_since = time.perf_counter()

    def _is_quit(self, line: str) -> bool:
        word = line.strip().partition(" ")[0]
        return word.isascii() and word.lower() == self._quit_word

    async def _quit(self, line: str) -> None:
        self._input_closed = True
        self.end_reason = "quit"
        reason = line.strip().partition(" ")[2].strip()
        if self._on_quit is not None:
            await self._on_quit(self, reason)
        else:
            self.write_line("BYE")
            await self._flush(checkpoint=True)

    def receive_some(self, max_bytes: int | None = None) -> Coroutine[Any, Any, bytes | bytearray]:
        """Receive raw bytes; bytes already read past the last line come first.

        Awaited like an async method; it is a plain one that hands back the
        coroutine doing the work, so that a handler streaming chunks (echo)
        awaits the receive itself, one coroutine layer less per chunk.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._line_since = _INF  # raw bytes are not a line
        lines = self._lines
        # (The framer's fields are read directly: this runs once per chunk.)
        if lines._buf or lines._eof or self._input_closed:
            return self._receive_held(max_bytes)
        return self._receive(max_bytes or RECEIVE_SIZE)

    async def _receive_held(self, max_bytes: int | None) -> bytes | bytearray:
        # Bytes read past the last line, or the end of the input: no wait.
        await trio.lowlevel.checkpoint()
        if self._lines._buf:
            return self._lines.take_bytes(max_bytes)
        return b""

    async def receive_exactly(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes; :exc:`trio.BrokenResourceError` on early EOF."""
        parts: list[bytes | bytearray] = []
        got = 0
        while got < n:
            chunk = await self.receive_some(min(n - got, 1 << 20))
            if not chunk:
                raise trio.BrokenResourceError(f"connection closed after {got} of {n} bytes")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close the transport (queued but unflushed lines are dropped)."""
        self._out.clear()
        await self._transport.aclose()

    def as_stream(self) -> ConnectionStream:
        """This connection as a :class:`trio.abc.HalfCloseableStream`.

        Bytes go through the connection (line buffer first, byte counts,
        idle deadline), so raw and line reads can be mixed safely.
        """
        return ConnectionStream(self)
