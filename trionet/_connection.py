"""One client connection: what a handler talks to.

A :class:`Connection` wraps any :class:`trio.abc.Stream` (a TCP socket, a
TLS stream, an in-memory stream) and is the whole surface a service handler
uses. It has the methods of a :class:`trio.abc.HalfCloseableStream`, and
:meth:`Connection.as_stream` gives a real one for code written against
plain Trio streams, but it is not one itself: ``async for`` over a Trio
stream yields byte chunks, while ``async for`` over a connection yields
lines. On top of the stream it offers what every service needs, with
PROTOCOL.md's shared rules applied in one place:

* ``await conn.receive_line()`` / ``async for line in conn`` (CR dropped,
  over-long and non-UTF-8 lines answered with ``ERR`` and skipped, ``QUIT``
  answered with ``BYE``),
* ``receive_exactly(n)`` and ``receive_some()`` for raw bytes, which first
  hand out whatever the line framer already holds, so a protocol can mix
  lines and binary payloads,
* ``send_line()`` (one write now) and ``write_line()`` + ``flush()`` (queue
  replies; the queue is flushed automatically before the connection waits
  for more input, so a pipelining client gets its replies in one segment),
* ``send_all()`` for raw bytes and ``send_file()`` for a file's bytes
  (zero-copy ``os.sendfile`` on a plain TCP socket),
* the peer address, a logger tagged with the connection id, byte counts,
  and :attr:`end_reason` for the access log.

Everything that touches the socket itself lives in this module (the
*socket fast path*, below), so every service, and every user's service,
gets it by writing its handler once against :class:`Connection`.

The server's machinery (the cancel scope it runs the handler in, idle and
line deadlines, shutdown requests) is kept in private attributes that only
:mod:`trionet._server` uses.
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
from typing import Any, Final, Protocol, TypeVar

import trio

from ._framing import DEFAULT_MAX_LINE, BadEncoding, LineBuffer, LineTooLong

__all__ = [
    "RECEIVE_SIZE",
    "Connection",
    "ConnectionStream",
    "LineError",
    "SupportsFileno",
    "format_peer",
]

#: Bytes asked of the transport per receive. Large chunks keep the number of
#: system calls down for bulk transfers; the buffer is allocated by the
#: kernel read only when data arrives, so idle connections do not pay for it.
RECEIVE_SIZE: Final = 65536

#: Seconds a connection may run without yielding to the scheduler: work on
#: lines it already holds, and sends the kernel takes at once (see
#: ``_maybe_yield``).
_RUN_BUDGET: Final = 0.005

#: Bytes read per chunk when a file cannot be sent with ``os.sendfile``
#: (TLS, memory streams); 64 KiB was measured 5x slower.
FILE_CHUNK: Final = 1 << 20
#: Most bytes asked of one ``sendfile`` call; the kernel sends what fits in
#: the socket buffer and we wait for room before the next call.
_SENDFILE_MAX: Final = 16 << 20
#: Read-ahead window asked of the kernel ahead of ``sendfile`` (see _prefetch).
_PREFETCH: Final = 32 << 20
# sendfile errors that come from the peer, not from the file.
_PEER_ERRNOS: Final = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT}

_ids = itertools.count(1)
_INF: Final = math.inf
_T = TypeVar("_T")

LineErrorHook = Callable[["Connection", LineTooLong | BadEncoding], Awaitable[None]]
QuitHook = Callable[["Connection", str], Awaitable[None]]


class SupportsFileno(Protocol):
    """A file object: anything with ``fileno()`` (``trio.open_file`` results included)."""

    def fileno(self) -> int: ...


class LineError(ValueError):
    """Raised by :meth:`Connection.receive_line` when no error hook is set."""

    def __init__(self, event: LineTooLong | BadEncoding) -> None:
        super().__init__(event.reply)
        self.event = event


def format_peer(stream: trio.abc.Stream) -> str:
    """Describe the remote end of ``stream`` as ``host:port`` (or a kind name)."""
    seen: Any = stream
    for _ in range(8):  # unwrap TLS and similar wrappers
        named = getattr(seen, "trionet_peer", None)
        if named is not None:  # set by trionet.testing for memory streams
            return str(named)
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
      quit_command: a line whose first word is this (any case) ends the
        input: :meth:`receive_line` answers it through ``on_quit`` and
        returns ``None`` from then on, and :attr:`end_reason` becomes
        ``"quit"``. ``None`` (the default for a bare connection) turns it off.
      on_quit: awaited with the rest of the quit line (the reason, maybe
        empty); the default queues ``BYE``.
      service: name used in log lines.
      logger: parent logger for :attr:`log`.
      conn_id: the id shown in logs (default: the next process-wide number).
    """

    # Slots: a server may hold many thousands of idle connections, and a
    # per-instance __dict__ would be a large share of each one's memory.
    __slots__ = (
        "_busy",
        "_eof_sent",
        "_expect_data",
        "_expired",
        "_input_closed",
        "_line_since",
        "_lines",
        "_log",
        "_logger",
        "_on_line_error",
        "_on_quit",
        "_out",
        "_peer",
        "_quit_first",
        "_quit_word",
        "_ran_since",
        "_scope",
        "_send_busy",
        "_send_interrupted",
        "_send_since",
        "_shutdown_requested",
        "_sock",
        "_wait_since",
        "_waiting",
        "bytes_in",
        "bytes_out",
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
        quit_command: str | None = None,
        on_quit: QuitHook | None = None,
        service: str = "",
        logger: logging.Logger | None = None,
        conn_id: int | None = None,
    ) -> None:
        #: The transport. Handlers should use the connection's own methods:
        #: bytes sent or read behind its back escape its accounting.
        self.stream = stream
        #: A number unique in this process, for logs (``conn_id`` overrides).
        self.id = next(_ids) if conn_id is None else conn_id
        #: The service's name, for logs.
        self.service = service
        #: The longest line accepted, in bytes.
        self.max_line = max_line
        #: Bytes received from and sent to the client.
        self.bytes_in = 0
        self.bytes_out = 0
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
        self._log: _ConnectionLog | None = None
        self._peer: str | None = None
        self._lines = LineBuffer(max_line)
        self._out = bytearray()
        # The scope the server runs the handler in (deadlines, shutdown).
        self._scope = trio.CancelScope()
        self._expired: str | None = None
        self._waiting = False
        self._wait_since = math.inf
        self._send_since = math.inf
        self._line_since = math.inf
        self._busy = 0
        self._shutdown_requested = False
        self._send_busy = False
        self._send_interrupted = False
        self._eof_sent = False  # set by send_eof: sends then go the slow way, which refuses
        # The socket fast path (below): for a plain TCP socket we call
        # os.read/os.write on its descriptor and only ask Trio to wait when
        # the kernel would block. Any other stream (TLS, memory) goes
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
    #
    # A connection records when it started waiting on its client: for input
    # (``_wait_since``), for room to send (``_send_since``), and when the
    # line it is waiting to complete began (``_line_since``); infinity
    # otherwise. The server's reaper, one task per service, cancels the
    # connection's scope once a wait has lasted the idle timeout or a line
    # the line timeout; the handler unwinds and the runner says BYE. This
    # costs a few float stores per wait (a cancel scope per wait cost a
    # fifth of echo's round-trip rate) and no memory per idle connection.
    #
    # Consequences: time spent working for the client never counts as idle;
    # a send that makes no progress (the client stopped reading) counts as
    # waiting on it; a request that arrives in the very instant the deadline
    # or a shutdown hits may go unanswered, but the client still gets its
    # BYE (nothing was half-sent).

    def _idle_since(self) -> float:
        # Input and send waits are tracked apart (a reader and a writer task
        # may do both at once); the older one counts.
        return min(self._wait_since, self._send_since)

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
        # coroutine calls costs measurably per request).
        sock = self._sock
        if self._out:
            # Replies queued with write_line leave now, in one write, just
            # before we wait for the client (no yield of their own: the wait
            # below is one). On a socket the queue goes straight to the
            # kernel, without a copy, in the common case that it fits.
            partial = False
            if sock is not None and not self._send_busy and not self._eof_sent:
                partial = self._write_queued(sock)
            if self._out:
                # The peer may hold half a line until the rest is sent: if
                # that is cut short, no BYE may follow.
                self._send_interrupted |= partial
                await self._flush(checkpoint=False)
                if partial:
                    self._send_interrupted = False
        # Begin a wait on the client (see "the server's side" above).
        if self._shutdown_requested:
            self._scope.cancel()
        if not self._busy:
            # (The run's clock, asked directly: trio.current_time() first
            # looks the run up, which costs more than the clock itself.)
            self._wait_since = trio.lowlevel.current_clock().current_time()
        self._waiting = True
        try:
            if sock is None:
                data: bytes | bytearray = await self.stream.receive_some(max_bytes)
            elif self._expect_data:
                data = await self._receive_fd_eager(sock, max_bytes)
            else:
                fd = sock.fileno()
                if fd < 0:
                    raise trio.ClosedResourceError("the connection was closed")
                while True:
                    # (A close during the wait wakes it with an error first,
                    # so the number is still this socket's afterwards.)
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        data = os.read(fd, max_bytes)
                        break
                    except BlockingIOError:  # a spurious wake-up
                        continue
                    except OSError as exc:
                        raise translate_os_error(exc) from exc
                self._expect_data = len(data) == max_bytes
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
                if time.perf_counter() - self._ran_since > _RUN_BUDGET:
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

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive raw bytes; bytes already read past the last line come first."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._line_since = _INF  # raw bytes are not a line
        lines = self._lines
        # (The framer's fields are read directly: this runs once per chunk.)
        if lines._buf:  # bytes read past the last line
            await trio.lowlevel.checkpoint()
            return lines.take_bytes(max_bytes)
        if lines._eof or self._input_closed:
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

    # -- sending ------------------------------------------------------------------

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
        other streams this is the stream's own ``send_all``.
        """
        if self._out:
            await self._flush(checkpoint=False)
        sock = self._sock
        if sock is None or self._send_busy or self._eof_sent or not data:
            await self._send(data, checkpoint)
            return
        # The socket fast path, inline. Right after a wait (the usual reply)
        # cancellation was just checked and the task just yielded: only a
        # connection that has run for the budget checks and yields again.
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        ran_long = time.perf_counter() - self._ran_since > _RUN_BUDGET
        if ran_long:
            await trio.lowlevel.checkpoint_if_cancelled()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise translate_os_error(exc) from exc
        self.bytes_out += sent
        if sent < len(data):
            self._send_busy = True
            try:
                await self._send_rest(sock, data, sent)
            finally:
                self._send_busy = False
        elif ran_long and checkpoint:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._ran_since = time.perf_counter()

    async def _send(self, data: bytes | bytearray | memoryview, checkpoint: bool = True) -> None:
        # The send guard, inlined: this runs once per reply. Two tasks
        # sending at once would interleave bytes mid-line.
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
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._send_busy = True
        sent = 0
        try:
            if self._sock is not None:
                sent = await self._sendfile(self._sock, fd, offset, count)
            else:
                sent = await self._send_file_chunks(fd, offset, count)
        except BaseException:
            # The peer may hold part of the file: no line can follow it.
            self._send_interrupted = True
            raise
        finally:
            self._send_busy = False
        return sent

    async def _send_file_chunks(self, fd: int, offset: int, count: int) -> int:
        pos, end = offset, offset + count
        while pos < end:
            data = await trio.to_thread.run_sync(os.pread, fd, min(FILE_CHUNK, end - pos), pos)
            if not data:
                raise EOFError(f"file ended after {pos - offset} of {count} bytes")
            await self._send_stream(data)
            pos += len(data)
        await trio.lowlevel.checkpoint()
        return count

    async def send_eof(self) -> None:
        """Flush queued lines, then half-close the sending side."""
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            raise TypeError(f"{type(self.stream).__name__} cannot half-close")
        await self.flush()
        with self._send_guard():
            await self.stream.send_eof()
            self._eof_sent = True

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until sending might not block (see Trio's documentation)."""
        with self._send_guard():
            await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the transport (queued but unflushed lines are dropped)."""
        self._out.clear()
        await self.stream.aclose()

    @contextmanager
    def _send_guard(self) -> Iterator[None]:
        # Trio's streams detect concurrent sends for send_all, but not every
        # stream does for send_eof, so the connection enforces it itself.
        if self._send_busy:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._send_busy = True
        try:
            yield
        finally:
            self._send_busy = False

    def as_stream(self) -> ConnectionStream:
        """This connection as a :class:`trio.abc.HalfCloseableStream`.

        Bytes go through the connection (line buffer first, byte counts,
        idle deadline), so raw and line reads can be mixed safely.
        """
        return ConnectionStream(self)

    # -- the transport for streams other than a plain TCP socket ---------------

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

    # -- the socket fast path ---------------------------------------------------
    #
    # Why: Trio's SocketStream.receive_some first tries recv and, when the
    # client has sent nothing yet (the usual case for a server that just
    # replied), pays a failed system call before waiting; its send_all
    # yields to the scheduler after every send the kernel took at once. For
    # small request/reply protocols those costs dominate. Here a request is
    # one readiness wait, one read, one write. The rules of Trio's own
    # methods are kept where they matter: a connection never runs more than
    # _RUN_BUDGET without yielding (so a client streaming data cannot starve
    # others), cancellation is honoured at every wait and before every
    # send, data read or written is never lost to a cancellation (we yield
    # with cancel_shielded_checkpoint after a successful call), and resets
    # surface as trio.BrokenResourceError.

    async def _receive_fd_eager(self, sock: trio.socket.SocketType, max_bytes: int) -> bytes:
        # The last read filled the buffer: more is probably queued, so read
        # before waiting (and still yield, shielded: the data is ours).
        await trio.lowlevel.checkpoint_if_cancelled()
        data = _nonblocking(os.read, _live_fd(sock), max_bytes)
        if data is not None:
            self._expect_data = len(data) == max_bytes
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        fd = _live_fd(sock)
        while True:
            await trio.lowlevel.wait_readable(fd)
            data = _nonblocking(os.read, fd, max_bytes)
            if data is not None:  # (None: a spurious wake-up)
                self._expect_data = len(data) == max_bytes
                return data

    def _write_queued(self, sock: trio.socket.SocketType) -> bool:
        """Write what write_line queued, as far as the kernel takes it now.

        Returns True if only part of it left.
        """
        out = self._out
        sent = _nonblocking(os.write, _live_fd(sock), out)
        if sent is None:
            return False
        self.bytes_out += sent
        del out[:sent]
        return bool(sent and out)

    async def _send_fd(
        self, sock: trio.socket.SocketType, data: bytes | bytearray | memoryview, checkpoint: bool
    ) -> None:
        if sock.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        fd = _live_fd(sock)  # even an empty send on a closed connection is an error
        await trio.lowlevel.checkpoint_if_cancelled()
        # The common case, a reply the kernel takes whole, costs one call.
        sent = (_nonblocking(os.write, fd, data) or 0) if data else 0
        self.bytes_out += sent
        if sent < len(data):
            await self._send_rest(sock, data, sent)
        elif checkpoint and time.perf_counter() - self._ran_since > _RUN_BUDGET:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._ran_since = time.perf_counter()

    async def _send_rest(
        self, sock: trio.socket.SocketType, data: bytes | bytearray | memoryview, sent: int
    ) -> None:
        """Send ``data[sent:]``, waiting for room whenever the kernel has none."""
        with memoryview(data) as whole:
            view = whole[sent:]
            try:
                while view:
                    await self._wait_writable(sock)
                    sent = _nonblocking(os.write, _live_fd(sock), view) or 0
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
        self._ran_since = time.perf_counter()

    async def _sendfile(
        self, sock: trio.socket.SocketType, fd: int, offset: int, count: int
    ) -> int:
        pos, end = offset, offset + count
        prefetched = pos
        while pos < end:
            if pos >= prefetched:
                prefetched = await _prefetch(fd, pos)
            want = min(_SENDFILE_MAX, end - pos, prefetched - pos)
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = os.sendfile(_live_fd(sock), fd, pos, want)
            except BlockingIOError:
                await self._wait_writable(sock)
                continue
            except OSError as exc:
                if exc.errno in _PEER_ERRNOS or exc.errno == errno.EBADF:
                    raise translate_os_error(exc) from exc
                raise  # the file's error (EIO...): let the service report it
            if sent == 0:
                raise EOFError(f"file ended after {pos - offset} of {count} bytes")
            pos += sent
            self.bytes_out += sent
            # A short send means the socket buffer is full: wait for room (a
            # yield). After a full send, yield within the run budget.
            if sent < want:
                await self._wait_writable(sock)
            elif time.perf_counter() - self._ran_since > _RUN_BUDGET:
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._ran_since = time.perf_counter()
        await trio.lowlevel.checkpoint()
        return count


async def _prefetch(fd: int, pos: int) -> int:
    """Ask the kernel to read ahead ``_PREFETCH`` bytes from ``pos``; return the window end.

    ``sendfile`` reads the file inside the system call, on the event loop's
    thread: on a cold page cache it would block there on the disk. The
    read-ahead hint, issued from a worker thread, starts that disk I/O
    early so ``sendfile`` mostly finds the pages in memory.
    """
    if hasattr(os, "posix_fadvise"):
        await trio.to_thread.run_sync(os.posix_fadvise, fd, pos, _PREFETCH, os.POSIX_FADV_WILLNEED)
    return pos + _PREFETCH


def _nonblocking(call: Callable[..., _T], *args: Any) -> _T | None:
    """``call(*args)`` on a non-blocking descriptor: ``None`` if it would block.

    Every other error means the connection is unusable and is raised as
    Trio's streams raise it (see :func:`translate_os_error`).
    """
    try:
        return call(*args)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise translate_os_error(exc) from exc


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
        # A Trio stream's send_all is always a checkpoint (cancellation
        # checked before sending, a yield after); the connection's skips both
        # while it runs within its budget (see Connection.send_all).
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.connection.send_all(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.connection.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.connection.send_eof()

    async def aclose(self) -> None:
        await self.connection.aclose()
