"""One client connection: line framing, raw bytes, accounting, idle deadline.

A :class:`Connection` wraps any :class:`trio.abc.Stream` (a TCP socket, a
TLS stream, an in-memory stream). It has the methods of a
:class:`trio.abc.HalfCloseableStream`, and :meth:`Connection.as_stream`
gives a real one for code written against plain Trio streams, but it is
not one itself: ``async for`` over a Trio stream yields byte chunks, while
``async for`` over a connection yields lines. On top of the stream it
offers what every line service needs, with PROTOCOL.md's shared rules
applied in one place:

* ``await conn.receive_line()`` / ``async for line in conn`` (CR dropped,
  over-long and non-UTF-8 lines answered with ``ERR`` and skipped),
* ``receive_exactly(n)`` and ``receive_some()`` for raw bytes, which first
  hand out whatever the line framer already holds, so a protocol can mix
  lines and binary payloads,
* ``send_line()`` (one write now) and ``write_line()`` + ``flush()`` (queue
  replies; the queue is flushed automatically before the connection waits
  for more input, so a pipelining client gets its replies in one segment),
* the peer address, a logger tagged with the connection id, and byte counts.

The idle deadline lives here too, in cooperation with the server: a
connection records when it began waiting on its client (for input, or for
room to send), and the server's reaper ends connections whose wait has
lasted the idle timeout. Time spent doing work for the client never counts.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import trio

from ._framing import DEFAULT_MAX_LINE, BadEncoding, LineBuffer, LineTooLong

__all__ = ["RECEIVE_SIZE", "Connection", "ConnectionStream", "LineError", "format_peer"]

#: Bytes asked of the transport per receive. Large chunks keep the number of
#: system calls down for bulk transfers; the buffer is allocated by the
#: kernel read only when data arrives, so idle connections do not pay for it.
RECEIVE_SIZE: Final = 65536

#: Seconds of work a connection may do on lines it already holds before it
#: yields to the scheduler (see receive_line).
_RUN_BUDGET: Final = 0.005

_ids = itertools.count(1)

LineErrorHook = Callable[["Connection", LineTooLong | BadEncoding], Awaitable[None]]


class LineError(ValueError):
    """Raised by :meth:`Connection.receive_line` when no error hook is set."""

    def __init__(self, event: LineTooLong | BadEncoding) -> None:
        super().__init__(event.reply)
        self.event = event


def format_peer(stream: trio.abc.Stream) -> str:
    """Describe the remote end of ``stream`` as ``host:port`` (or a kind name)."""
    seen: Any = stream
    for _ in range(8):  # unwrap TLS and similar wrappers
        sock = getattr(seen, "socket", None)
        if sock is not None:
            try:
                addr = sock.getpeername()
            except OSError:
                return "disconnected"
            if isinstance(addr, tuple):
                host = addr[0]
                return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
            return str(addr) or "unix"
        inner = getattr(seen, "transport_stream", None)
        if inner is None:
            break
        seen = inner
    return "memory"


class _ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['tag']} {msg}" if self.extra else msg, kwargs


class Connection:
    """A client connection wrapping ``stream``.

    Args:
      stream: the transport.
      max_line: the longest line accepted, in bytes, terminator excluded.
      on_line_error: awaited with each :class:`LineTooLong` /
        :class:`BadEncoding` event; ``None`` makes :meth:`receive_line`
        raise :class:`LineError` instead (what a client usually wants).
      service: name used in log lines.
      logger: parent logger for :attr:`log`.
      conn_id: the id shown in logs (default: the next process-wide number).
    """

    # Slots: a server may hold many thousands of idle connections, and a
    # per-instance __dict__ would be a large share of each one's memory.
    __slots__ = (
        "_busy",
        "_expect_data",
        "_lines",
        "_log",
        "_logger",
        "_on_line_error",
        "_out",
        "_peer",
        "_ran_since",
        "_send_busy",
        "_send_interrupted",
        "_send_since",
        "_shutdown_requested",
        "_sock",
        "_wait_since",
        "_waiting",
        "bytes_in",
        "bytes_out",
        "cancel_scope",
        "end_reason",
        "eof_received",
        "id",
        "max_line",
        "service",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        on_line_error: LineErrorHook | None = None,
        service: str = "",
        logger: logging.Logger | None = None,
        conn_id: int | None = None,
    ) -> None:
        self.stream = stream
        #: A number unique in this process, for logs (``conn_id`` overrides).
        self.id = next(_ids) if conn_id is None else conn_id
        self.service = service
        self.max_line = max_line
        self.bytes_in = 0
        self.bytes_out = 0
        #: Why the connection ended, when the handler knows (e.g. ``"quit"``).
        self.end_reason: str | None = None
        #: True once the peer has sent EOF.
        self.eof_received = False
        self._on_line_error = on_line_error
        self._logger = logger
        self._log: _ConnectionLog | None = None
        self._peer: str | None = None
        self._lines = LineBuffer(max_line)
        self._out = bytearray()
        # The scope the server runs the handler in (idle timeout, shutdown).
        self.cancel_scope = trio.CancelScope()
        self._waiting = False
        self._wait_since = math.inf
        self._send_since = math.inf
        self._busy = 0
        self._shutdown_requested = False
        self._send_busy = False
        self._send_interrupted = False
        # The fast path (see _receive_fd/_send_fd): for a plain TCP socket we
        # call os.read/os.write on its descriptor and only ask Trio to wait
        # when the kernel would block. Any other stream (TLS, memory) goes
        # through its own receive_some/send_all.
        self._sock: trio.socket.SocketType | None = (
            stream.socket if type(stream) is trio.SocketStream else None
        )
        self._expect_data = False
        self._ran_since = 0.0

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
            base = self._logger or logging.getLogger(
                f"trionet.{self.service}" if self.service else "trionet"
            )
            tag = f"[{self.service or 'conn'} #{self.id} {self.peer}]"
            self._log = _ConnectionLog(base, {"tag": tag})
        return self._log

    @property
    def shutting_down(self) -> bool:
        """True once the server has begun a graceful shutdown."""
        return self._shutdown_requested

    # -- waiting for input: idle deadline and shutdown ------------------------
    #
    # A connection records when it started waiting on its client
    # (``wait_since``; infinity while it works). The server's idle reaper,
    # one task per service, cancels the connection's scope once a wait has
    # lasted the idle timeout; the handler unwinds and the runner says BYE.
    # This costs two float stores per wait (a cancel scope per wait cost a
    # fifth of echo's round-trip rate) and no memory per idle connection.
    #
    # Consequences: time spent working for the client never counts as idle;
    # a send that makes no progress (the client stopped reading) counts as
    # waiting on the client; a request that arrives in the very instant
    # the deadline or a shutdown hits may go unanswered, but the client
    # still gets its BYE (nothing was half-sent).

    @property
    def wait_since(self) -> float:
        """When the current wait on the client began (``inf`` while working).

        Waiting for input and waiting for room to send are tracked apart
        (a reader and a writer task may do both at once); this is the older.
        """
        return min(self._wait_since, self._send_since)

    def expire(self) -> None:
        """End the connection for idleness (called by the server's reaper)."""
        self.cancel_scope.cancel()

    def _begin_wait(self) -> None:
        if self._shutdown_requested:
            # Shutdown was requested while this connection was busy; now that
            # its work is done and it would wait for the client, stop here.
            self.cancel_scope.cancel()
        if not self._busy:
            self._wait_since = trio.current_time()
        self._waiting = True

    def _end_wait(self) -> None:
        self._waiting = False
        self._wait_since = math.inf

    def request_shutdown(self) -> None:
        """Ask the connection to end once it next waits for input.

        Called by the server on graceful shutdown: a connection that is idle
        (waiting for its client) is cancelled at once; one that is busy
        finishes its current piece of work first.
        """
        self._shutdown_requested = True
        if self._waiting:
            self.cancel_scope.cancel()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Waits inside this block never count as idle.

        For long work that involves waiting on the client without its
        sending anything, e.g. streaming a large file to a slow reader.
        """
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    async def wait_readable(self, fd: int) -> None:
        """Wait for ``fd`` to become readable, as an input wait.

        For fast paths that read a socket's descriptor directly: the idle
        deadline and graceful shutdown apply exactly as in :meth:`receive_some`.
        """
        await self.flush()
        self._begin_wait()
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            self._end_wait()

    async def _receive(self, max_bytes: int) -> bytes | bytearray:
        if self._out:
            # Replies queued with write_line leave now, in one write, just
            # before we wait for the client (no separate yield needed: the
            # wait below is one).
            await self._flush(checkpoint=False)
        self._begin_wait()
        try:
            if self._sock is not None:
                data: bytes | bytearray = await self._receive_fd(self._sock, max_bytes)
            else:
                data = await self.stream.receive_some(max_bytes)
        finally:
            self._end_wait()
        if data:
            self.bytes_in += len(data)
        else:
            self.eof_received = True
        return data

    # -- the socket fast path ---------------------------------------------------
    #
    # Why: Trio's SocketStream.receive_some first tries recv and, when the
    # client has sent nothing yet (the usual case for a server that just
    # replied), pays a failed system call before waiting; its send_all
    # yields to the scheduler after every send the kernel took at once. For
    # small request/reply protocols those costs dominate. Here a request is
    # one readiness wait, one read, one write. The rules of Trio's own
    # methods are kept: every receive yields at least once (so a client
    # streaming data cannot starve others), cancellation is honoured at
    # every wait, data read or written is never lost to a cancellation
    # (we yield with cancel_shielded_checkpoint after a successful call),
    # and resets surface as trio.BrokenResourceError.

    async def _receive_fd(self, sock: trio.socket.SocketType, max_bytes: int) -> bytes:
        if self._expect_data:
            # The last read filled the buffer: more is probably queued.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(_live_fd(sock), max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise translate_os_error(exc) from exc
            else:
                self._expect_data = len(data) == max_bytes
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(_live_fd(sock))
            try:
                data = os.read(_live_fd(sock), max_bytes)
            except BlockingIOError:  # a spurious wake-up
                continue
            except OSError as exc:
                raise translate_os_error(exc) from exc
            self._expect_data = len(data) == max_bytes
            return data

    async def _send_fd(
        self, sock: trio.socket.SocketType, data: bytes | bytearray | memoryview, checkpoint: bool
    ) -> None:
        if sock.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        fd = _live_fd(sock)  # even an empty send on a closed connection is an error
        if checkpoint:
            # (Without it, the caller is about to wait, which is a
            # cancellation point of its own.)
            await trio.lowlevel.checkpoint_if_cancelled()
        # The common case, a reply the kernel takes whole, costs one call.
        try:
            sent = os.write(fd, data) if data else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise translate_os_error(exc) from exc
        self.bytes_out += sent
        if sent < len(data):
            await self._send_rest(sock, data, sent)
        elif checkpoint:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_rest(
        self, sock: trio.socket.SocketType, data: bytes | bytearray | memoryview, sent: int
    ) -> None:
        """Send ``data[sent:]``, waiting for room whenever the kernel has none."""
        with memoryview(data) as whole:
            view = whole[sent:]
            try:
                while view:
                    await self._wait_writable(sock)
                    try:
                        sent = os.write(_live_fd(sock), view)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise translate_os_error(exc) from exc
                    self.bytes_out += sent
                    view = view[sent:]
            except BaseException:
                if len(view) < len(whole):  # the peer holds part of it
                    self._send_interrupted = True
                raise
            finally:
                view.release()

    async def _wait_writable(self, sock: trio.socket.SocketType) -> None:
        # A client that stops reading stalls our sends: that is the client
        # doing nothing, so the stall counts as waiting on it (idle reaper).
        if not self._busy:
            self._send_since = trio.current_time()
        try:
            await trio.lowlevel.wait_writable(_live_fd(sock))
        finally:
            self._send_since = math.inf

    async def _send_stream(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._busy:
            self._send_since = trio.current_time()
        try:
            await self.stream.send_all(data)
        except BaseException:
            # The stream cannot say how much it sent: assume part of it.
            self._send_interrupted = True
            raise
        finally:
            self._send_since = math.inf
        self.bytes_out += len(data)

    async def _send(self, data: bytes | bytearray | memoryview, checkpoint: bool = True) -> None:
        # The send guard, inlined: this runs once per reply.
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._send_busy = True
        try:
            if self._sock is not None:
                await self._send_fd(self._sock, data, checkpoint)
            else:
                await self._send_stream(data)
        finally:
            self._send_busy = False

    # -- lines ----------------------------------------------------------------

    async def receive_line(self) -> str | None:
        """Return the next line (without terminator), or ``None`` at EOF.

        Framing errors are handed to the ``on_line_error`` hook (by default
        in a server: reply ``ERR line-too-long N`` / ``ERR bad-encoding``)
        and reading carries on with the next line. A final line not ended
        by LF before EOF is still returned.
        """
        lines = self._lines
        while True:
            if time.perf_counter() - self._ran_since > _RUN_BUDGET:
                # Lines already buffered are returned without waiting. A
                # client pipelining thousands of costly requests in one
                # segment must not keep every other connection from running,
                # so once this connection has run for a while without
                # waiting, yield (before taking the line: a cancellation
                # here loses nothing). A budget in time rather than in lines
                # keeps cheap bursts together (chat's writer then sends a
                # whole burst in one write) and still bounds costly ones.
                # Replies already computed leave first.
                await self._flush(checkpoint=False)
                await trio.lowlevel.checkpoint()
                self._ran_since = time.perf_counter()
            event = lines.next_event()
            if event is None:
                if lines.at_eof:
                    # Replies to the last lines must not wait for a read
                    # that will never come.
                    await self._flush(checkpoint=True)
                    return None
                data = await self._receive(RECEIVE_SIZE)
                self._ran_since = time.perf_counter()
                if data:
                    lines.feed(data)
                else:
                    lines.feed_eof()
                continue
            if isinstance(event, str):
                return event
            if self._on_line_error is None:
                raise LineError(event)
            await self._on_line_error(self, event)

    # The connection is its own line iterator. (Not an async generator:
    # those cost more per item, and one left suspended at the end of a
    # handler would need finalizing.)
    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> str:
        line = await self.receive_line()
        if line is None:
            raise StopAsyncIteration
        return line

    def write_line(self, line: str) -> None:
        """Queue ``line`` + LF; sent by :meth:`flush` or before the next input wait."""
        if "\n" in line:
            raise ValueError("a line may not contain LF")
        self._out += line.encode()
        self._out.append(0x0A)

    async def send_line(self, line: str) -> None:
        """Send ``line`` + LF now (after anything queued by :meth:`write_line`)."""
        self.write_line(line)
        await self.flush()

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

    @contextmanager
    def _send_guard(self) -> Iterator[None]:
        # Two tasks sending at once would interleave bytes mid-line. Trio's
        # streams detect this for send_all, but not every stream does for
        # send_eof, so the connection enforces it for all its send methods.
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._send_busy = True
        try:
            yield
        finally:
            self._send_busy = False

    @property
    def send_interrupted(self) -> bool:
        """True if a send was cut short (cancelled or failed) part way.

        The peer may then hold half a line or half a payload, so nothing
        more can be framed on this connection: the server closes it without
        its usual ``BYE`` line.
        """
        return self._send_interrupted

    @contextmanager
    def payload(self) -> Iterator[None]:
        """Mark raw bytes sent behind the connection's back (``os.sendfile``).

        If the block is left by an exception (cancellation included), the
        connection counts as :attr:`send_interrupted`.
        """
        try:
            yield
        except BaseException:
            self._send_interrupted = True
            raise

    # -- raw bytes: the trio.abc.HalfCloseableStream interface ----------------

    def as_stream(self) -> ConnectionStream:
        """This connection as a :class:`trio.abc.HalfCloseableStream`.

        Bytes go through the connection (line buffer first, byte counts,
        idle deadline), so raw and line reads can be mixed safely.
        """
        return ConnectionStream(self)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive raw bytes; bytes already read past the last line come first."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if len(self._lines):
            await trio.lowlevel.checkpoint()
            return self._lines.take_bytes(max_bytes)
        if self._lines.at_eof:
            await trio.lowlevel.checkpoint()
            return b""
        return await self._receive(max_bytes or RECEIVE_SIZE)

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

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, checkpoint: bool = True
    ) -> None:
        """Send raw bytes (after anything queued by :meth:`write_line`).

        Like every Trio send, this yields to the scheduler even when the
        kernel took all the data at once. A loop that yields on its own
        between sends anyway (a writer task waiting on its queue) may pass
        ``checkpoint=False`` to skip that extra round trip; cancellation is
        still checked before anything is sent.
        """
        if self._out:
            await self._flush(checkpoint=False)
        await self._send(data, checkpoint)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until sending might not block (see Trio's documentation)."""
        with self._send_guard():
            await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Flush queued lines, then half-close the sending side."""
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            raise TypeError(f"{type(self.stream).__name__} cannot half-close")
        await self.flush()
        with self._send_guard():
            await self.stream.send_eof()

    async def aclose(self) -> None:
        """Close the transport (queued but unflushed lines are dropped)."""
        self._out.clear()
        await self.stream.aclose()


def translate_os_error(exc: OSError) -> BaseException:
    """Map an error from a raw socket call to what Trio's streams raise.

    A closed descriptor becomes :class:`trio.ClosedResourceError`; every
    other error (reset, broken pipe, host unreachable, ...) means the
    connection is unusable and becomes :class:`trio.BrokenResourceError`,
    as in Trio's ``SocketStream``. The runner logs those as ``end=reset``,
    not as a crash, and one connection's failure never reaches the server.
    """
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the connection was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc.strerror or exc}")


def _live_fd(sock: trio.socket.SocketType) -> int:
    # Ask the socket every time rather than caching the number: after a
    # close, the same number may already belong to another connection.
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the connection was closed")
    return fd


class ConnectionStream(trio.abc.HalfCloseableStream):
    """A :class:`Connection` seen as a plain Trio stream (see :meth:`Connection.as_stream`)."""

    def __init__(self, conn: Connection) -> None:
        self.connection = conn

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.connection.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.connection.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.connection.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.connection.send_eof()

    async def aclose(self) -> None:
        await self.connection.aclose()
