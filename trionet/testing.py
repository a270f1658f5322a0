"""Test your services with no sockets: memory listeners and a scripted client.

Everything here runs the *real* runner (limits, idle timeout, shutdown,
crash isolation) over in-memory streams, so a test exercises exactly what
production runs, minus the kernel. Combined with pytest-trio's
``autojump_clock`` fixture (``MockClock(autojump_threshold=0)``), waits of
minutes take no real time: whenever every task is blocked, the clock jumps
to the next deadline. An idle timeout of 300 s is tested in milliseconds,
and :meth:`Client.expect_nothing` proves silence without sleeping.

Example::

    from trionet.testing import open_memory_server

    async def test_greeting(autojump_clock):
        async with open_memory_server(MyService()) as server:
            client = await server.connect()
            await client.send_line("hello")
            await client.expect("HELLO")
            await client.expect_nothing(for_seconds=60)

TLS works in memory too: give the service ``tls_cert``/``tls_key`` (or a
``tls_context``) and connect with ``server.connect(tls=client_ctx)``; both
ends then run a real :class:`trio.SSLStream` over the memory stream.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from ._connection import Connection, LineError
from ._metrics import Metrics
from ._server import Server
from ._service import Service

__all__ = ["Client", "MemoryListener", "MemoryServer", "open_memory_server"]

#: Default seconds a :class:`Client` waits for an expected line. On the
#: autojump clock a wait that cannot succeed fails at once instead of hanging.
DEFAULT_TIMEOUT = 10.0


@attrs.define(eq=False)
class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs.

    :meth:`connect` hands the server side to :meth:`accept` and returns the
    client side. ``lockstep=True`` uses :func:`trio.testing.lockstep_stream_pair`
    (no buffering at all, for back-pressure tests) instead of
    :func:`trio.testing.memory_stream_pair`.
    """

    lockstep: bool = False
    _send: trio.MemorySendChannel[trio.abc.Stream] = attrs.field(init=False, repr=False)
    _receive: trio.MemoryReceiveChannel[trio.abc.Stream] = attrs.field(init=False, repr=False)
    closed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    async def connect(self, peer: str | None = None) -> trio.abc.Stream:
        """Open a connection; returns the client's end.

        ``peer`` (``"10.0.0.7:5000"``) is the address the server sees, for
        tests of per-address limits; by default the server sees ``memory``,
        which no per-address limit counts.
        """
        if self.closed:
            raise trio.BrokenResourceError("listener is closed (connection refused)")
        pair = (
            trio.testing.lockstep_stream_pair if self.lockstep else trio.testing.memory_stream_pair
        )
        client, server = pair()
        if peer is not None:
            named: Any = server
            named.trionet_peer = peer  # read by trionet.format_peer
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        """Stop accepting; connections not yet accepted are closed (refused)."""
        self.closed = True
        while True:
            try:
                pending = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            await trio.aclose_forcefully(pending)
        await self._receive.aclose()
        await trio.lowlevel.checkpoint()


class Client:
    """A scripted client over any stream: send lines, expect replies.

    Every receive has a timeout (``timeout``, default 10 s) so a test that
    waits for a line that never comes fails with a clear message instead of
    hanging.
    """

    def __init__(self, stream: trio.abc.Stream, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.stream = stream
        self.timeout = timeout
        # The client side accepts any line length: tests inspect what the
        # server sends, they do not police it.
        self.conn = Connection(stream, max_line=1 << 30, conn_id=0)

    async def send_line(self, line: str) -> None:
        """Send ``line`` + LF."""
        await self.conn.send_line(line)

    async def send(self, data: bytes) -> None:
        """Send raw bytes."""
        await self.conn.send_all(data)

    async def send_eof(self) -> None:
        """Half-close: tell the server we will send nothing more."""
        await self.conn.send_eof()

    async def receive_line(self, timeout: float | None = None) -> str | None:
        """The next line from the server, or ``None`` if it closed."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            try:
                return await self.conn.receive_line()
            except LineError as exc:  # pragma: no cover - server sent bad UTF-8
                raise AssertionError(f"server sent an invalid line: {exc}") from exc

    async def expect(self, *lines: str) -> None:
        """Assert that the next lines received are exactly ``lines``."""
        for want in lines:
            try:
                got = await self.receive_line()
            except trio.TooSlowError:
                raise AssertionError(f"expected {want!r}, got nothing in {self.timeout}s") from None
            assert got == want, f"expected {want!r}, got {got!r}"

    async def expect_closed(self) -> None:
        """Assert that the server closes without sending another line."""
        got = await self.receive_line()
        assert got is None, f"expected the connection to close, got {got!r}"

    async def expect_nothing(self, for_seconds: float = 1.0) -> None:
        """Assert that nothing arrives (and the connection stays open) for a while."""
        with trio.move_on_after(for_seconds):
            data = await self.conn.receive_some()
            raise AssertionError(f"expected silence, received {data!r}")

    async def receive_exactly(self, n: int) -> bytes:
        """Receive exactly ``n`` raw bytes."""
        with trio.fail_after(self.timeout):
            return await self.conn.receive_exactly(n)

    async def receive_all(self) -> bytes:
        """Receive raw bytes until the server closes."""
        parts = []
        with trio.fail_after(self.timeout):
            while chunk := await self.conn.receive_some():
                parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close the client's end."""
        await self.conn.aclose()


@attrs.define(eq=False)
class MemoryServer:
    """A running :class:`~trionet.Server` whose listeners are in memory."""

    server: Server
    listeners: dict[str, MemoryListener]

    async def connect(
        self,
        name: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        peer: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> Client:
        """Connect a :class:`Client` to service ``name`` (optional with one service).

        ``peer`` is the address the server sees (see :meth:`MemoryListener.connect`).
        With ``tls`` (a client context), the client talks TLS, checking the
        server's certificate against ``server_hostname``.
        """
        stream = await self.open_stream(name, peer=peer, tls=tls, server_hostname=server_hostname)
        return Client(stream, timeout=timeout)

    async def open_stream(
        self,
        name: str | None = None,
        *,
        peer: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> trio.abc.Stream:
        """Connect and return the raw client stream (a :class:`trio.SSLStream` with ``tls``).

        The TLS handshake happens on the stream's first send or receive.
        """
        if name is None:
            if len(self.listeners) != 1:
                raise ValueError("several services are running: name one")
            (name,) = self.listeners
        stream = await self.listeners[name].connect(peer)
        if tls is None:
            return stream
        return trio.SSLStream(stream, tls, server_hostname=server_hostname)

    def shutdown(self) -> None:
        """Begin the graceful shutdown (as SIGTERM does)."""
        self.server.shutdown()


@asynccontextmanager
async def open_memory_server(
    *services: Service, grace: float = 5.0, lockstep: bool = False, metrics: Metrics | None = None
) -> AsyncIterator[MemoryServer]:
    """Run ``services`` on memory listeners inside the caller's task.

    On exit the server is shut down gracefully (if the test did not already)
    and every handler has finished. With ``metrics`` (a fresh
    :class:`trionet.Metrics`) the server counts into it, as with
    ``--metrics-port``: ``metrics.value("trionet_connections_total",
    service="echo", end="eof")``.
    """
    listeners = {s.name: MemoryListener(lockstep=lockstep) for s in services}
    given: dict[str, Sequence[trio.abc.Listener[Any]]] = {n: [ln] for n, ln in listeners.items()}
    server = Server(services, grace=grace, listeners=given, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield MemoryServer(server, listeners)
        finally:
            server.shutdown()
