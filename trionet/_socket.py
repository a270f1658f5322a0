"""Lean streams on a TCP socket's descriptor, for TLS.

:class:`SocketTransport` goes under the servers' :class:`trio.SSLStream`;
:class:`SSLSocketStream` is the clients' TLS stream (see its docstring).

:class:`trio.SSLStream` makes every call to its transport while holding a
Trio lock, and acquiring that lock is already a full checkpoint (a check
for cancellation and a pass through the scheduler). Under it,
:class:`trio.SocketStream` adds a second pass through the scheduler after
every send. :class:`SocketTransport` with ``checkpoints=False`` (what
:func:`trionet._tls.transport_for` uses) calls ``os.read``/``os.write`` on
the descriptor and asks Trio only to wait when the kernel would block: one
scheduler pass less per message, which for small request/reply traffic
inside TLS is a large share of the cost (scripts/bench/tls.py).

Receives try the read first, as Trio does: under a busy TLS connection the
peer's next message has usually arrived by the time the lock was taken,
and waiting for readiness first (an epoll registration per message)
measured about 15% more server CPU per round trip.

The stream rules hold: data read or written is never lost to a
cancellation, concurrent sends are refused, resets surface as
:class:`trio.BrokenResourceError`, and with the default ``checkpoints=True``
every call is a checkpoint on its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from typing import Final, TypeVar

import trio

from ._connection import translate_os_error

__all__ = ["SSLSocketStream", "SocketTransport"]

_T = TypeVar("_T")

#: Bytes asked of the kernel per receive when the caller gives no size.
#: TLS records are at most 16 KiB + overhead; a larger read takes several at once.
RECEIVE_SIZE: Final = 65536


class SocketTransport(trio.abc.HalfCloseableStream):
    """A :class:`trio.SocketStream` whose receives and sends go to its descriptor.

    ``socket`` is exposed like ``SocketStream.socket`` (peer address, options);
    closing and half-closing are delegated to the wrapped stream.
    ``checkpoints=False`` drops the checkpoint of calls that need not wait:
    only for use under a stream that checkpoints around every transport
    call (:class:`trio.SSLStream`).
    """

    def __init__(self, stream: trio.SocketStream, *, checkpoints: bool = True) -> None:
        self.stream = stream
        self.socket = stream.socket
        self.checkpoints = checkpoints
        self._sending = False
        self._receiving = False

    def _fd(self) -> int:
        # Ask every time: after a close the number may belong to another socket.
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        return fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            return await self._receive(max_bytes)
        finally:
            self._receiving = False

    async def _receive(self, max_bytes: int) -> bytes:
        if self.checkpoints:
            await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                data = os.read(self._fd(), max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd())
                waited = True
                continue
            except OSError as exc:
                raise translate_os_error(exc) from exc
            break
        if self.checkpoints and not waited:
            # Yield, but never lose the bytes just read to a cancellation.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            await self._send(data)
        finally:
            self._sending = False

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        fd = self._fd()  # even an empty send on a closed stream is an error
        if self.checkpoints:
            await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            # The usual case, the kernel takes it all, costs one call.
            try:
                sent = os.write(fd, view) if view else 0
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise translate_os_error(exc) from exc
            if sent == len(view):
                if self.checkpoints:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            rest = view[sent:]
            try:
                while rest:
                    await trio.lowlevel.wait_writable(self._fd())
                    try:
                        sent = os.write(self._fd(), rest)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise translate_os_error(exc) from exc
                    rest = rest[sent:]
            finally:
                rest.release()

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            await trio.lowlevel.wait_writable(self._fd())
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


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
