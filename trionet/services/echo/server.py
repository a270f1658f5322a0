"""echo: RFC 862 over TCP (port 7001).

Every byte received is sent back unchanged and in order; when the client
half-closes, whatever is pending is sent and the server closes. Idle
timeout and shutdown close silently: a ``BYE`` line would corrupt the echo.

Two paths, one behaviour:

* the generic path works on any :class:`trio.abc.Stream` (TLS, memory);
* the fast path, taken for a plain :class:`trio.SocketStream`, calls
  ``os.read``/``os.write`` on the socket's descriptor and only asks Trio to
  wait when the kernel says it would block. Trio's ``SocketStream`` pays a
  scheduler round trip per ``send`` even when the kernel accepted the data
  at once; for echo that doubles the scheduling work per message. The fast
  path still yields to the scheduler at least once per chunk, honours
  cancellation (idle timeout, shutdown) at every wait and at every yield,
  and reports peer resets as :class:`trio.BrokenResourceError` like Trio.
"""

from __future__ import annotations

import os
from typing import ClassVar

import attrs
import trio

from ..._connection import Connection, translate_os_error
from ..._service import Service

__all__ = ["EchoService"]

#: Bytes read per system call; large so bulk streams take few calls.
CHUNK = 65536
#: Read size once a client is streaming (see ``_echo_fd``).
STREAM_CHUNK = 256 * 1024


@attrs.define(kw_only=True, eq=False)
class EchoService(Service):
    """Sends every byte back (RFC 862)."""

    name: ClassVar[str] = "echo"
    default_port: ClassVar[int] = 7001
    line_based: ClassVar[bool] = False
    summary: ClassVar[str] = "every byte sent back unchanged (RFC 862)"

    #: Take the descriptor fast path for plain TCP sockets.
    fast_path: bool = True

    async def handle(self, conn: Connection) -> None:
        stream = conn.stream
        if self.fast_path and type(stream) is trio.SocketStream:
            await _echo_fd(conn, stream.socket.fileno())
        else:
            await _echo_stream(conn)


async def _echo_stream(conn: Connection) -> None:
    """The generic path: any stream."""
    while not conn.shutting_down and (data := await conn.receive_some(CHUNK)):
        await conn.send_all(data)


async def _echo_fd(conn: Connection, fd: int) -> None:
    """The fast path on a socket descriptor (non-blocking, as Trio sets it)."""
    # After a short read the peer has most likely sent everything it had,
    # so we wait for readability before trying again (saving a read that
    # would fail with EAGAIN); after a full read more data is probably
    # queued, so we read optimistically.
    #
    # Buffers: small exchanges use os.read (a fresh bytes object the size of
    # the data; nothing is held between messages, so an idle connection
    # costs no buffer). Once a read fills CHUNK the client is streaming, and
    # we switch to one reusable STREAM_CHUNK buffer filled with os.readv:
    # fewer, larger system calls and no allocation per chunk. A short read
    # drops the buffer again.
    expect_data = False
    buf: bytearray | None = None
    while True:
        if conn.shutting_down:
            # A client that streams without pause never reaches the wait
            # below, where shutdown is noticed: check once per chunk.
            return
        yielded = False
        if not expect_data:
            await conn.wait_readable(fd)
            yielded = True
        try:
            if buf is None:
                data: bytes | memoryview = os.read(fd, CHUNK)
                size = CHUNK
            else:
                data = memoryview(buf)[: os.readv(fd, [buf])]
                size = STREAM_CHUNK
        except BlockingIOError:
            expect_data = False
            continue
        except OSError as exc:
            raise translate_os_error(exc) from exc
        n = len(data)
        if not n:
            conn.eof_received = True
            return
        conn.bytes_in += n
        expect_data = n == size
        view = memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                yielded = True
                continue
            except OSError as exc:
                raise translate_os_error(exc) from exc
            conn.bytes_out += sent
            view = view[sent:]
        del view, data
        if expect_data and buf is None:
            buf = bytearray(STREAM_CHUNK)
        elif not expect_data:
            buf = None
        if not yielded:
            # Never run two chunks without letting other tasks (and
            # cancellation) in.
            await trio.lowlevel.checkpoint()
