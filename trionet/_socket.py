"""A lean stream over a TCP socket's descriptor, to put under layered streams (TLS).

Why: :class:`trio.SocketStream` tries a ``recv`` before every wait (which
fails when a request/reply peer has sent nothing yet: a wasted system call
per message) and yields to the scheduler after every ``send`` the kernel
took at once. Under :class:`trio.SSLStream` those costs come on top of the
stream's own: each of its transport calls is made holding a Trio lock whose
acquisition already yields. :class:`SocketTransport` does one readiness
wait and one ``os.read`` per receive, and one ``os.write`` per send, asking
Trio only to wait when the kernel would block (the same fast path
:class:`~trionet.Connection` takes for plain sockets).

It still keeps Trio's stream rules: every call is a checkpoint (it checks
for cancellation and yields at least once), data read or written is never
lost to a cancellation, concurrent sends are refused, and resets surface as
:class:`trio.BrokenResourceError`.
"""

from __future__ import annotations

import os
from typing import Final

import trio

from ._connection import translate_os_error

__all__ = ["SocketTransport"]

#: Bytes asked of the kernel per receive when the caller gives no size.
#: TLS records are at most 16 KiB + overhead; a larger read takes several at once.
RECEIVE_SIZE: Final = 65536


class SocketTransport(trio.abc.HalfCloseableStream):
    """A :class:`trio.SocketStream` whose receives and sends go to its descriptor.

    ``socket`` is exposed like ``SocketStream.socket`` (peer address, options);
    closing and half-closing are delegated to the wrapped stream.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        # After a read that filled the buffer more data is probably queued:
        # read again at once instead of waiting for readiness first.
        self._expect_data = False
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
        if self._expect_data:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(self._fd(), max_bytes)
            except BlockingIOError:
                pass  # not after all: wait below
            except OSError as exc:
                raise translate_os_error(exc) from exc
            else:
                self._expect_data = len(data) == max_bytes
                # Yield, but never lose the bytes just read to a cancellation.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(self._fd())
            try:
                data = os.read(self._fd(), max_bytes)
            except BlockingIOError:  # a spurious wake-up
                continue
            except OSError as exc:
                raise translate_os_error(exc) from exc
            self._expect_data = len(data) == max_bytes
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
