"""The plain-TCP fast transport, and the clients' TLS socket stream.

This is the only code in trionet that calls ``os.read``, ``os.write`` or
``os.sendfile`` on a socket (``tests/core/test_layers.py`` checks).

:class:`SocketTransport` is two things over one descriptor:

* the :class:`~trionet._transport.Transport` a :class:`~trionet.Connection`
  uses for plain TCP (:func:`make_transport` picks it), and
* a :class:`trio.abc.HalfCloseableStream` to put under the servers'
  :class:`trio.SSLStream` (see :func:`trionet._tls.transport_for`).

Why not Trio's :class:`trio.SocketStream`: its ``receive_some`` first tries
``recv`` and, when the client has sent nothing yet (the usual case for a
server that just replied), pays a failed system call before waiting; its
``send_all`` yields to the scheduler after every send the kernel took at
once. For small request/reply protocols those costs dominate. Here a
request is one readiness wait, one read, one write. The rules of Trio's own
streams are kept where they matter: cancellation is honoured at every wait,
data read or written is never lost to a cancellation, and resets surface as
:class:`trio.BrokenResourceError` (:func:`translate_os_error`). The
connection supplies the rest (checkpoints within its run budget).

Under :class:`trio.SSLStream`, which makes every call to its transport
holding a lock whose acquisition is already a checkpoint,
``checkpoints=False`` drops the transport's own: one scheduler pass less per
message. Its receives try the read first, as Trio does (under a busy TLS
connection the peer's next record has usually arrived by the time the lock
was taken; waiting first measured about 15% more server CPU per round trip).

:class:`SSLSocketStream` is the clients' TLS stream (the standard library's
:class:`ssl.SSLSocket`, Trio only for waits).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import trio

from ._transport import RECEIVE_SIZE, StreamTransport, Transport

__all__ = [
    "SSLSocketStream",
    "SocketTransport",
    "make_transport",
    "translate_os_error",
]

_T = TypeVar("_T")
_INF: Final = math.inf

#: Seconds :meth:`SocketTransport.send_file` may run without yielding.
_RUN_BUDGET: Final = 0.005
#: Most bytes asked of one ``sendfile`` call; the kernel sends what fits in
#: the socket buffer and we wait for room before the next call.
_SENDFILE_MAX: Final = 16 << 20
#: Read-ahead window asked of the kernel ahead of ``sendfile`` (see _prefetch).
_PREFETCH: Final = 32 << 20
# sendfile errors that come from the peer, not from the file.
_PEER_ERRNOS: Final = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EBADF}


def make_transport(stream: trio.abc.Stream) -> Transport:
    """The transport for ``stream``: the fast one for a plain TCP socket, else the stream itself."""
    if type(stream) is trio.SocketStream:
        return SocketTransport(stream)
    return StreamTransport(stream)


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


class SocketTransport(Transport, trio.abc.HalfCloseableStream):
    """A :class:`trio.SocketStream` whose bytes go straight to its descriptor.

    ``socket`` is exposed like ``SocketStream.socket`` (peer address,
    options); closing and half-closing are delegated to the wrapped
    ``stream``. ``checkpoints`` applies to the Trio stream methods only
    (``receive_some``, ``send_all``): ``False`` drops the checkpoint of calls
    that need not wait, for use under a stream that checkpoints around every
    transport call (:class:`trio.SSLStream`). Of the transport methods, those
    that complete at once (``try_*``) never checkpoint: the connection decides.
    """

    # Slots: one per connection, and a server may hold many thousands.
    __slots__ = ("_raw", "_receiving", "checkpoints", "eager", "socket")

    stream: trio.SocketStream

    def __init__(self, stream: trio.SocketStream, *, checkpoints: bool = True) -> None:
        Transport.__init__(self, stream)
        self.socket = stream.socket
        # The standard library's socket inside Trio's, asked for the number
        # on every call: its fileno() is one C call, where Trio's wrapper adds
        # a Python frame (three per request, a measurable share of a small
        # round trip). Trio keeps it as ``_sock``; were that to change, Trio's
        # own socket serves (the same answers, a little slower).
        self._raw = getattr(stream.socket, "_sock", stream.socket)
        self.checkpoints = checkpoints
        self.eager = False
        self._receiving = False

    def _fd(self) -> int:
        # Ask every time rather than caching the number: after a close, the
        # same number may already belong to another connection.
        fd = self._raw.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        return fd

    # -- the transport interface (what a Connection calls) ----------------------

    def try_receive(self, max_bytes: int) -> bytes | None:
        fd = self._raw.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:  # nothing yet, or a spurious wake-up
            self.eager = False
            return None
        except OSError as exc:
            raise translate_os_error(exc) from exc
        # A full buffer: more is probably queued, so read before waiting next time.
        self.eager = len(data) == max_bytes
        return data

    def wait_receive(self, max_bytes: int) -> Awaitable[None]:
        # Trio's own coroutine, not ours: no extra layer per message. (A
        # close during the wait wakes it with an error first, so the number
        # is still this socket's afterwards.)
        fd = self._raw.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        return trio.lowlevel.wait_readable(fd)  # noqa: ASYNC105 (awaited by the caller)

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        fd = self._raw.fileno()  # even an empty send on a closed connection is an error
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        if not data:
            return 0
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise translate_os_error(exc) from exc
        self.bytes_sent += sent
        return sent

    async def send_rest(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as whole:
            view = whole
            try:
                while view:
                    await self._wait_writable()
                    view = view[self.try_send(view) :]
            except BaseException:
                self.partial = len(view) < len(whole)  # the peer holds part of it
                raise
            finally:
                view.release()

    async def _wait_writable(self) -> None:
        # A client that stops reading stalls our sends: that is the client
        # doing nothing, so the stall counts as waiting on it (the server's
        # idle reaper reads send_stalled_since).
        self.send_stalled_since = trio.lowlevel.current_clock().current_time()
        try:
            await trio.lowlevel.wait_writable(self._fd())
        finally:
            self.send_stalled_since = _INF

    async def send_file(self, fd: int, offset: int, count: int) -> int:
        """Send a file's bytes with ``os.sendfile`` (zero copy), prefetched ahead."""
        pos, end = offset, offset + count
        prefetched = pos
        ran_since = time.perf_counter()
        while pos < end:
            if pos >= prefetched:
                prefetched = await _prefetch(fd, pos)
            want = min(_SENDFILE_MAX, end - pos, prefetched - pos)
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = os.sendfile(self._fd(), fd, pos, want)
            except BlockingIOError:
                sent = -1
            except OSError as exc:
                if exc.errno in _PEER_ERRNOS:
                    raise translate_os_error(exc) from exc
                raise  # the file's error (EIO...): let the service report it
            if sent == 0:
                raise EOFError(f"file ended after {pos - offset} of {count} bytes")
            if sent > 0:
                pos += sent
                self.bytes_sent += sent
            # Short (or no) send: the socket buffer is full, wait for room
            # (a yield). After a full send, yield within the run budget.
            if sent < want:
                await self._wait_writable()
                ran_since = time.perf_counter()
            elif time.perf_counter() - ran_since > _RUN_BUDGET:
                await trio.lowlevel.cancel_shielded_checkpoint()
                ran_since = time.perf_counter()
        await trio.lowlevel.checkpoint()
        return count

    # -- the Trio stream interface (under SSLStream) ----------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            if self.checkpoints:
                await trio.lowlevel.checkpoint_if_cancelled()
            data = self.try_receive(max_bytes)
            if data is not None:
                if self.checkpoints:
                    # Yield, but never lose the bytes just read to a cancellation.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while data is None:
                await trio.lowlevel.wait_readable(self._fd())
                data = self.try_receive(max_bytes)
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # (The send guard inline: under SSLStream this runs once per record.)
        if self.sending:
            raise trio.BusyResourceError("another task is already sending")
        self.sending = True
        try:
            if self.socket.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            self._fd()  # even an empty send on a closed stream is an error
            if self.checkpoints:
                await trio.lowlevel.checkpoint_if_cancelled()
            # The usual case, the kernel takes it all, costs one call.
            sent = self.try_send(data)
            if sent < len(data):
                await self.send_rest(memoryview(data)[sent:])
            elif self.checkpoints:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self.sending = False

    async def wait_send_all_might_not_block(self) -> None:
        with self.send_guard():
            await trio.lowlevel.wait_writable(self._fd())

    async def aclose(self) -> None:
        await self.stream.aclose()


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


class SSLSocketStream(trio.abc.Stream):
    """TLS over a TCP socket, done by the standard library's :class:`ssl.SSLSocket`.

    The clients' TLS stream. OpenSSL reads and writes the descriptor
    itself, and :meth:`receive_some` decrypts every record already
    received in one call; Trio is asked only to wait. :class:`trio.SSLStream`
    returns one TLS record (at most 16 KiB) per call, each a pass through
    its locks and Trio's scheduler: for a download that per-record cost, not
    the cryptography, set the pace (scripts/bench/tls.py).

    Use :meth:`open` to make one (it does the handshake). Like
    :class:`trio.SSLStream` with ``https_compatible=False``, an end of
    stream without TLS's close_notify is an error
    (:class:`trio.BrokenResourceError`), so a cut connection is never
    mistaken for a complete one. TLS cannot half-close: no ``send_eof``.
    """

    #: The most bytes one :meth:`receive_some` returns (its buffer's size).
    MAX_RECEIVE: Final = 1 << 20

    def __init__(self, sock: ssl.SSLSocket) -> None:
        #: The :class:`ssl.SSLSocket` (peer address, cipher, certificate).
        self.socket = sock
        self._buffer = bytearray()
        self._sending = False
        self._receiving = False
        self._closed = False

    @classmethod
    async def open(
        cls, stream: trio.SocketStream, ctx: ssl.SSLContext, server_hostname: str
    ) -> SSLSocketStream:
        """Take over ``stream``'s connection and do the client handshake.

        The certificate is checked against ``ctx`` and ``server_hostname``;
        failures raise the :mod:`ssl` module's errors (e.g.
        :class:`ssl.SSLCertVerificationError`). ``stream`` is closed either way.
        """
        # A stdlib socket on a duplicate of the descriptor: the SSLSocket then
        # owns its own descriptor and Trio's stream can be closed at once.
        raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        await stream.aclose()
        try:
            raw.setblocking(False)
            sock = ctx.wrap_socket(
                raw,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
            )
        except BaseException:
            raw.close()
            raise
        self = cls(sock)
        try:
            await self._call(sock.do_handshake)
        except BaseException:
            await trio.aclose_forcefully(self)
            raise
        return self

    async def _call(self, fn: Callable[[], _T]) -> _T:
        """Call a non-blocking SSLSocket method until it completes."""
        while True:
            try:
                return fn()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._check_open()
        self._receiving = True
        try:
            return await self._receive(min(max_bytes or RECEIVE_SIZE, self.MAX_RECEIVE))
        finally:
            self._receiving = False

    async def _receive(self, size: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)
        got = 0
        waited = False
        try:
            # Take every record OpenSSL can decrypt now, not just one.
            while got < size:
                try:
                    n = self.socket.recv_into(view[got:size])
                except ssl.SSLWantReadError:
                    if got:
                        break
                    await trio.lowlevel.wait_readable(self.socket)
                    waited = True
                    continue
                except ssl.SSLWantWriteError:  # a post-handshake message to answer
                    if got:
                        break
                    await trio.lowlevel.wait_writable(self.socket)
                    waited = True
                    continue
                except (ssl.SSLError, OSError) as exc:
                    if got:
                        break  # hand out what came first; the error comes again
                    raise _broken(exc) from exc
                if not n:  # close_notify: the end
                    break
                got += n
            data = bytes(view[:got])
        finally:
            view.release()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._check_open()
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
            with memoryview(data) as whole:
                view = whole
                try:
                    while view:
                        try:
                            sent = self.socket.send(view)
                        except ssl.SSLWantWriteError:
                            await trio.lowlevel.wait_writable(self.socket)
                            yielded = True
                            continue
                        except ssl.SSLWantReadError:
                            await trio.lowlevel.wait_readable(self.socket)
                            yielded = True
                            continue
                        except (ssl.SSLError, OSError) as exc:
                            raise _broken(exc) from exc
                        view = view[sent:]
                finally:
                    view.release()
            if not yielded:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's) and close."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        # Send our close_notify; the peer's answer is not awaited, and a peer
        # that is already gone is not an error worth raising from a close.
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self.socket.unwrap()
        # Tasks waiting on the descriptor get ClosedResourceError.
        with contextlib.suppress(OSError, ValueError):
            trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        await trio.lowlevel.checkpoint()


def _broken(exc: BaseException) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"TLS connection broken: {exc}")
