"""Connection: PROTOCOL.md's shared line rules, raw bytes, the idle deadline.

Rules for deterministic network tests in this suite:

* in-memory streams (``trio.testing`` pairs, :mod:`trionet.testing`), never
  sockets, unless the test is *about* sockets;
* every wait runs on the ``autojump_clock`` fixture, so a 300 s timeout
  takes no real time and "nothing arrives for 60 s" is a real check;
* every receive has a timeout, so a broken server fails a test, never hangs it.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing
from conftest import PlainStream

from trionet import Connection, LineError, Service
from trionet._socket import SocketTransport, make_transport
from trionet._transport import StreamTransport, Transport
from trionet.testing import open_memory_server


def pair(**kwargs: object) -> tuple[trio.abc.Stream, Connection]:
    client, server = trio.testing.memory_stream_pair()
    return client, Connection(server, **kwargs)  # type: ignore[arg-type]


async def test_receive_line_rules_and_error_hook() -> None:
    replies: list[str] = []

    async def hook(conn: Connection, event: object) -> None:
        replies.append(event.reply)  # type: ignore[attr-defined]

    client, conn = pair(max_line=5, on_line_error=hook)
    await client.send_all(b"one\r\n123456\n\xc3\x28\nabcde\r\nlast")
    await client.send_eof()
    got = [line async for line in conn]
    assert got == ["one", "abcde", "last"]
    assert replies == ["ERR line-too-long 5", "ERR bad-encoding"]
    assert conn.eof_received


async def test_without_hook_errors_raise() -> None:
    client, conn = pair(max_line=3)
    await client.send_all(b"toolong\nok\n")
    with pytest.raises(LineError, match="line-too-long 3"):
        await conn.receive_line()
    assert await conn.receive_line() == "ok"


async def test_mixing_lines_and_raw_bytes() -> None:
    client, conn = pair()
    await client.send_all(b"SIZE 10\n0123456789NEXT\n")
    assert await conn.receive_line() == "SIZE 10"
    assert await conn.receive_exactly(10) == b"0123456789"
    assert await conn.receive_line() == "NEXT"
    await client.send_all(b"xy")
    assert await conn.receive_some() == b"xy"
    await client.send_eof()
    with pytest.raises(trio.BrokenResourceError, match="after 0 of 4"):
        await conn.receive_exactly(4)


async def test_write_line_is_coalesced_and_flushed_before_waiting() -> None:
    client, conn = pair()
    await client.send_all(b"a\nb\n")
    sent: list[bytes] = []
    real_send_all = conn.stream.send_all

    async def spy(data: bytes | bytearray | memoryview) -> None:
        sent.append(bytes(data))
        await real_send_all(data)

    conn.stream.send_all = spy  # type: ignore[method-assign]

    async def serve() -> None:
        async for line in conn:
            conn.write_line(line.upper())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        assert await client.receive_some() == b"A\nB\n"
        await client.send_eof()
    # Two pipelined requests, one write: replies are flushed only when the
    # connection is about to wait for more input.
    assert sent == [b"A\nB\n"]
    assert conn.bytes_out == 4
    assert conn.bytes_in == 4


async def test_send_line_refuses_embedded_newline() -> None:
    _client, conn = pair()
    with pytest.raises(ValueError):
        await conn.send_line("two\nlines")


async def test_send_eof_on_a_stream_that_cannot_half_close_refuses_before_sending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """TypeError, and the queued line stays queued: nothing half-sent, the
    connection usable (a later flush sends it)."""
    client, server = trio.testing.memory_stream_pair()
    conn = Connection(PlainStream(server))
    conn.write_line("queued")
    with pytest.raises(TypeError, match="PlainStream cannot half-close"):
        await conn.send_eof()
    got = b""
    with trio.move_on_after(1) as waited:
        got = await client.receive_some()
    assert waited.cancelled_caught, f"send_eof sent {got!r} before refusing"
    await conn.flush()
    assert await client.receive_some() == b"queued\n"


async def test_as_stream_is_a_half_closeable_trio_stream() -> None:
    async def make() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        a, b = trio.testing.memory_stream_pair()
        return Connection(a).as_stream(), Connection(b).as_stream()

    async def make_clogged() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        a, b = trio.testing.lockstep_stream_pair()
        return Connection(a).as_stream(), Connection(b).as_stream()

    await trio.testing.check_half_closeable_stream(make, make_clogged)


async def test_socket_fast_path_is_a_half_closeable_trio_stream() -> None:
    """The os.read/os.write path for plain sockets passes Trio's own stream checks."""

    async def make() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        a, b = trio.socket.socketpair()
        ca, cb = Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))
        assert isinstance(ca._transport, SocketTransport)  # the fast path is under test
        return ca.as_stream(), cb.as_stream()

    await trio.testing.check_half_closeable_stream(make, None)


async def test_socket_fast_path_lines_and_bulk() -> None:
    a, b = trio.socket.socketpair()
    client, conn = trio.SocketStream(a), Connection(trio.SocketStream(b))
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one read
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await client.send_all(b"SIZE\r\n" + payload + b"END\n")

        nursery.start_soon(send)
        assert await conn.receive_line() == "SIZE"
        assert await conn.receive_exactly(len(payload)) == payload
        assert await conn.receive_line() == "END"
    await conn.send_line("bye")
    assert await client.receive_some() == b"bye\n"
    await client.aclose()
    assert await conn.receive_line() is None
    assert conn.bytes_in == len(payload) + 10
    await conn.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await conn.send_all(b"x")


async def test_peer_names() -> None:
    _client, conn = pair()
    assert conn.peer == "memory"
    assert "memory" in repr(conn.log.process("x", {})[0])


@attrs.define(kw_only=True, eq=False)
class Upper(Service):
    name: ClassVar[str] = "upper"

    async def handle(self, conn: Connection) -> None:
        async for line in conn:
            conn.write_line(line.upper())


async def test_idle_timeout_is_reset_by_every_byte(autojump_clock: trio.testing.MockClock) -> None:
    # (The line timeout, which would end this trickled line, is off here.)
    async with open_memory_server(Upper(idle_timeout=300, line_timeout=0)) as server:
        client = await server.connect()
        start = trio.current_time()
        for _ in range(3):
            await client.expect_nothing(for_seconds=299)
            await client.send(b"x")  # one byte, no LF: still resets the clock
        await client.send(b"\n")
        await client.expect("XXX")
        await client.expect_nothing(for_seconds=299)
        await client.expect("BYE idle-timeout")
        await client.expect_closed()
        assert 4 * 299 < trio.current_time() - start < 4 * 299 + 2


async def test_idle_timeout_zero_turns_it_off(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(Upper(idle_timeout=0)) as server:
        client = await server.connect()
        await client.expect_nothing(for_seconds=10 * 24 * 3600)
        await client.send_line("still here")
        await client.expect("STILL HERE")


async def test_busy_suspends_the_idle_deadline(autojump_clock: trio.testing.MockClock) -> None:
    @attrs.define(kw_only=True, eq=False)
    class Slow(Service):
        name: ClassVar[str] = "slow"

        async def handle(self, conn: Connection) -> None:
            async for line in conn:
                with conn.busy():
                    await trio.sleep(1000)  # long work for the client
                await conn.send_line(f"done {line}")

    async with open_memory_server(Slow(idle_timeout=300)) as server:
        client = await server.connect()
        await client.send_line("job")
        assert await client.receive_line(timeout=1100) == "done job"
        # The idle clock restarts when the connection waits again.
        await client.expect_nothing(for_seconds=280)
        assert await client.receive_line(timeout=30) == "BYE idle-timeout"
        assert trio.current_time() == pytest.approx(1300, abs=1)


# -- regressions found in review: each scenario below once went wrong -----------------


def test_socket_errors_become_trio_stream_errors() -> None:
    import errno

    from trionet._socket import translate_os_error

    for code in (errno.ECONNRESET, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH):
        assert isinstance(translate_os_error(OSError(code, "x")), trio.BrokenResourceError)
    assert isinstance(translate_os_error(OSError(errno.EBADF, "x")), trio.ClosedResourceError)


async def test_replies_to_the_last_lines_before_eof_are_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Upper()) as server:
        client = await server.connect()
        await client.send(b"one\ntwo")  # the last line has no LF
        await client.send_eof()
        await client.expect("ONE", "TWO")
        await client.expect_closed()


@attrs.define(kw_only=True, eq=False)
class Slow(Service):
    name: ClassVar[str] = "slow"
    work: float = 0.0

    async def handle(self, conn: Connection) -> None:
        async for line in conn:
            await trio.sleep(self.work)
            conn.write_line(f"did {line}")


async def test_work_is_not_idleness(autojump_clock: trio.testing.MockClock) -> None:
    """Requests that take longer than the idle timeout are answered, pipelined or not."""
    async with open_memory_server(Slow(work=400, idle_timeout=300)) as server:
        client = await server.connect(timeout=5000)
        await client.send(b"a\nb\nc\n")
        await client.expect("did a", "did b", "did c")
        started = trio.current_time()
        await client.expect("BYE idle-timeout")
        assert trio.current_time() - started == pytest.approx(300, abs=1)


async def test_shutdown_racing_a_request_never_breaks_the_framing() -> None:
    """Shutdown in the same instant as a request: answered, or not at all, but the
    connection is never left mid-line, so the server's BYE can always follow."""
    import socket

    outcomes = set()
    for _ in range(40):
        a, b = socket.socketpair()
        conn = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
        got: list[str] = []

        async def handler(conn: Connection = conn, got: list[str] = got) -> None:
            with conn._scope:
                line = await conn.receive_line()
                got.append(f"read {line}")
                await conn.send_line(f"reply {line}")
                got.append("replied")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler)
            while not conn._waiting:
                await trio.lowlevel.checkpoint()
            b.send(b"req\n")
            await trio.lowlevel.checkpoint()
            conn._request_shutdown()
        assert got in ([], ["read req"], ["read req", "replied"]), got
        assert not conn._send_interrupted
        outcomes.add(len(got))
        b.close()
        await conn.aclose()


async def test_work_outliving_the_grace_still_gets_its_bye() -> None:
    """A reply cancelled before any byte left is not a broken payload: it is still
    delivered, then the BYE."""
    import time

    @attrs.define(kw_only=True, eq=False)
    class Blocking(Service):
        name: ClassVar[str] = "blocking"

        async def handle(self, conn: Connection) -> None:
            async for line in conn:
                await trio.to_thread.run_sync(time.sleep, 0.3)  # e.g. walking a big tree
                await conn.send_line(f"did {line}")

    async with open_memory_server(Blocking(), grace=0.05) as server:
        client = await server.connect()
        await client.send_line("x")
        await trio.sleep(0.02)
        server.shutdown()
        await client.expect("did x", "BYE shutdown")
        await client.expect_closed()


# -- the transport seam: a connection over a transport something already read from ----


async def _proxy_style_handoff(client: trio.abc.Stream, transport: Transport) -> None:
    """A listener reads a header line through the transport, then hands the connection
    the transport, what it read past the header, and the peer the header named."""
    await client.send_all(b"HELLO 192.0.2.7:4242\nfirst line\nsecond")
    got = b""
    while b"\n" not in got:
        got += await transport.receive()
    header, _, rest = got.partition(b"\n")
    conn = Connection(transport, pre_read=rest, peer=header.split()[1].decode())
    assert conn.peer == "192.0.2.7:4242"
    assert conn.bytes_in == len(rest)
    assert await conn.receive_line() == "first line"
    await client.send_all(b" half\nthird\n")
    assert await conn.receive_line() == "second half"
    assert await conn.receive_line() == "third"
    await conn.send_line("OK")
    assert await client.receive_some(10) == b"OK\n"
    assert conn.bytes_in == len(b"first line\nsecond half\nthird\n")
    assert conn.bytes_out == 3
    await conn.aclose()
    await client.aclose()


async def test_connection_over_a_socket_transport_with_pre_read_bytes() -> None:
    a, b = trio.socket.socketpair()
    transport = make_transport(trio.SocketStream(b))
    assert isinstance(transport, SocketTransport)
    await _proxy_style_handoff(trio.SocketStream(a), transport)


async def test_connection_over_a_stream_transport_with_pre_read_bytes() -> None:
    a, b = trio.testing.memory_stream_pair()
    transport = make_transport(b)
    assert isinstance(transport, StreamTransport)
    await _proxy_style_handoff(a, transport)
