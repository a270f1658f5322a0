"""What a :class:`~trionet.Connection` stands on: the transport interface.

A connection is lines, limits and accounting; how its bytes reach the
peer is its *transport*'s business. This module owns the interface every
transport offers (:class:`Transport`), the adapter that makes any
:class:`trio.abc.Stream` a transport (:class:`StreamTransport`: memory
streams, :class:`trio.SSLStream`, a WebSocket wrapped as a stream), the
peer's name (:func:`format_peer`), what a file to send may be
(:class:`SupportsFileno`) and the sizes both share. The plain-TCP
fast transport lives in :mod:`trionet._socket`; TLS is an
:class:`trio.SSLStream` (over that fast transport) seen through a
:class:`StreamTransport`.

The interface is shaped by the connection's hot path, not by symmetry: a
request is one wait, one read and one write, and every extra coroutine
layer per message costs measurably (docs/benchmarks.md). So the calls
that may complete at once are plain methods (:meth:`Transport.try_receive`,
:meth:`Transport.try_send`), and the waits are awaitables handed straight
back from Trio (:meth:`Transport.wait_receive` returns Trio's own
coroutine, never one of ours), so the connection awaits them inline.

A transport imports nothing from the connection or the server layers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Final, Protocol

import trio

__all__ = [
    "FILE_CHUNK",
    "RECEIVE_SIZE",
    "StreamTransport",
    "SupportsFileno",
    "Transport",
    "format_peer",
    "peer_host",
]

#: Bytes asked of the transport per receive. Large chunks keep the number of
#: system calls down for bulk transfers; the buffer is allocated by the
#: kernel read only when data arrives, so idle connections do not pay for it.
RECEIVE_SIZE: Final = 65536

#: Bytes read per chunk when a file cannot be sent with ``os.sendfile``
#: (TLS, memory streams); 64 KiB was measured 5x slower.
FILE_CHUNK: Final = 1 << 20

_INF: Final = math.inf


class SupportsFileno(Protocol):
    """A file object: anything with ``fileno()`` (``trio.open_file`` results included)."""

    def fileno(self) -> int: ...


class Transport:
    """The interface a :class:`~trionet.Connection` calls; every transport offers it.

    Receiving, in the connection's words (``tr`` the transport)::

        data = tr.try_receive(n) if tr.eager else None   # (with a checkpoint)
        while data is None:
            data = await tr.wait_receive(n)   # bytes, or None: readable now
            if data is None:
                data = tr.try_receive(n)

    Sending::

        sent = tr.try_send(data)              # what left at once (maybe 0)
        if sent < len(data):
            await tr.send_rest(view[sent:])   # waits for room

    One task sends at a time: two at once would interleave bytes mid-line.
    The caller of ``try_send``, ``send_rest`` and ``send_file`` sets
    :attr:`sending` around them (the connection does it inline on its hot
    path); ``send_eof`` and ``wait_send_all_might_not_block`` guard
    themselves (:meth:`send_guard`), as a Trio stream's do.

    Attributes every transport keeps up to date:

    * :attr:`stream`: the Trio stream underneath (closing, type checks).
    * :attr:`eager`: a read is likely to find data without waiting (the
      last one filled its buffer); the connection then tries before it waits.
    * :attr:`bytes_sent`: bytes handed to the peer so far.
    * :attr:`partial`: after a send that raised, whether the peer may hold
      part of it (then no line may follow: the server sends no ``BYE``).
    * :attr:`send_stalled_since`: when the current wait for room to send
      began (``inf`` when none): the server's idle reaper reads it, so a
      client that stops reading is idle, while one reading slowly is not.
    * :attr:`sending`: a send is under way (another raises
      :exc:`trio.BusyResourceError`).
    * :attr:`eof_sent`: :meth:`send_eof` has run; the caller then refuses
      to send (:exc:`trio.ClosedResourceError`).

    Subclasses: :class:`StreamTransport` (any Trio stream) and
    :class:`trionet._socket.SocketTransport` (a plain TCP socket's
    descriptor). A new kind of connection (a socket from systemd, one
    behind the PROXY protocol) needs no new transport: it hands the
    connection a transport of the kind that fits, and any bytes already
    read from it (``Connection(transport, pre_read=...)``).
    """

    # The accounting and the send guard are the base's: the same for every transport.
    __slots__ = ("bytes_sent", "eof_sent", "partial", "send_stalled_since", "sending", "stream")

    #: The Trio stream this transport carries.
    stream: trio.abc.Stream
    eager: bool
    bytes_sent: int
    partial: bool
    send_stalled_since: float
    sending: bool
    eof_sent: bool

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.bytes_sent = 0
        self.partial = False
        self.send_stalled_since = _INF
        self.sending = False
        self.eof_sent = False

    def try_receive(self, max_bytes: int) -> bytes | None:
        """Bytes available now (``b""`` at EOF), or ``None`` if receiving would wait."""
        raise NotImplementedError

    def wait_receive(self, max_bytes: int) -> Awaitable[bytes | bytearray | None]:
        """Wait for input: the bytes themselves, or ``None`` once :meth:`try_receive` may have some.

        Not a coroutine function: it returns the awaitable of the layer
        below (Trio's wait, or the stream's ``receive_some``), so awaiting it
        adds no coroutine layer of ours.
        """
        raise NotImplementedError

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what can leave without waiting; return how many bytes did (maybe 0)."""
        raise NotImplementedError

    async def send_rest(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for room (called when :meth:`try_send` fell short)."""
        raise NotImplementedError

    async def receive(self, max_bytes: int = RECEIVE_SIZE) -> bytes | bytearray:
        """Wait for and return the next bytes (``b""`` at EOF).

        For code before a connection exists (a listener reading a PROXY
        protocol header); a :class:`~trionet.Connection` inlines this.
        """
        while (data := await self.wait_receive(max_bytes)) is None:
            if (data := self.try_receive(max_bytes)) is not None:
                break
        return data

    async def send_file(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of the file ``fd`` from ``offset``; return ``count``.

        Raises :exc:`EOFError` if the file ends early. The default reads the
        file in worker threads, :data:`FILE_CHUNK` at a time; the socket
        transport lets the kernel copy it (``os.sendfile``).
        """
        pos, end = offset, offset + count
        while pos < end:
            data = await trio.to_thread.run_sync(os.pread, fd, min(FILE_CHUNK, end - pos), pos)
            if not data:
                raise EOFError(f"file ended after {pos - offset} of {count} bytes")
            await self.send_rest(data)
            pos += len(data)
        await trio.lowlevel.checkpoint()
        return count

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until sending might not block (see Trio's streams)."""
        with self.send_guard():
            await self.stream.wait_send_all_might_not_block()

    def half_closeable(self) -> trio.abc.HalfCloseableStream:
        """The stream, if it can half-close; :exc:`TypeError` if not (so a
        caller can check before it flushes)."""
        stream = self.stream
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            raise TypeError(f"{type(stream).__name__} cannot half-close")
        return stream

    async def send_eof(self) -> None:
        """Half-close the sending side; :exc:`TypeError` if the stream cannot."""
        stream = self.half_closeable()
        with self.send_guard():
            await stream.send_eof()
            self.eof_sent = True

    @contextmanager
    def send_guard(self) -> Iterator[None]:
        """Mark a send under way; :exc:`trio.BusyResourceError` if one already is.

        Trio's streams detect concurrent sends for ``send_all``, but not
        every stream does for ``send_eof``, so the transport enforces it.
        """
        if self.sending:
            raise trio.BusyResourceError("another task is already sending")
        self.sending = True
        try:
            yield
        finally:
            self.sending = False

    async def aclose(self) -> None:
        """Close the stream underneath."""
        await self.stream.aclose()


class StreamTransport(Transport):
    """Any :class:`trio.abc.Stream` as a transport: every call is the stream's own.

    Nothing can leave or arrive without awaiting the stream, so
    :meth:`try_send` takes nothing, :meth:`try_receive` has nothing and
    :meth:`wait_receive` is the stream's ``receive_some`` itself. A stream
    cannot say how much of a failed send left: the peer may hold part of it.
    """

    __slots__ = ()

    eager: ClassVar[bool] = False  # type: ignore[misc]

    def try_receive(self, max_bytes: int) -> bytes | None:
        return None

    def wait_receive(self, max_bytes: int) -> Awaitable[bytes | bytearray]:
        # (Looked up on every call: a test may replace the stream's method.)
        return self.stream.receive_some(max_bytes)

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        return 0

    async def send_rest(self, data: bytes | bytearray | memoryview) -> None:
        # The whole send counts as one wait on the peer: a stream hides
        # whether it is making progress underneath.
        self.send_stalled_since = trio.lowlevel.current_clock().current_time()
        try:
            await self.stream.send_all(data)
        except BaseException:
            self.partial = True
            raise
        finally:
            self.send_stalled_since = _INF
        self.bytes_sent += len(data)


def peer_host(peer: str) -> str | None:
    """The IP part of a peer as :func:`format_peer` shows it (``None`` for memory, unix)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else None


def format_peer(stream: trio.abc.Stream | Transport) -> str:
    """Describe the remote end of ``stream`` as ``host:port`` (or a kind name)."""
    seen: Any = stream
    for _ in range(8):  # unwrap transports, TLS and similar wrappers
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
        inner = getattr(seen, "transport_stream", None) or getattr(seen, "stream", None)
        if inner is None:
            break
        seen = inner
    return "memory"
