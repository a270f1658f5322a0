"""A connection seen as a plain Trio stream: :class:`ConnectionStream`.

What :meth:`trionet.Connection.as_stream` returns, for code written against
:class:`trio.abc.HalfCloseableStream`. Every call goes through the
connection (line buffer first, byte counts, idle deadline), so raw and line
reads can be mixed safely. The connection is described by the methods it
offers (:class:`ByteConnection`), so this module imports nothing of trionet.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["ByteConnection", "ConnectionStream"]


class ByteConnection(Protocol):
    """The byte methods of a :class:`~trionet.Connection` that a stream needs."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
    async def wait_send_all_might_not_block(self) -> None: ...
    async def send_eof(self) -> None: ...
    async def aclose(self) -> None: ...


class ConnectionStream(trio.abc.HalfCloseableStream):
    """A :class:`~trionet.Connection` seen as a plain Trio stream (see ``Connection.as_stream``)."""

    def __init__(self, conn: ByteConnection) -> None:
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
