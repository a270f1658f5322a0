"""The runner, entirely in memory: limits, shutdown, crash isolation, logs.

Rules: the whole :class:`trionet.Server` runs on memory listeners (no
sockets); waits run on the ``autojump_clock``; every receive is bounded by
the scripted client's timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing
from conftest import Opened

import trionet
from trionet import Connection, Server, Service
from trionet.services.echo.server import EchoService
from trionet.testing import MemoryListener, open_memory_server


@attrs.define(kw_only=True, eq=False)
class Work(Service):
    """A line service whose requests take ``work`` seconds of (fake) time."""

    name: ClassVar[str] = "work"
    work: float = 0.0

    async def handle(self, conn: Connection) -> None:
        async for line in conn:
            if line == "crash":
                raise RuntimeError("handler bug")
            if line == "quit":
                await conn.send_line("BYE")
                conn.end_reason = "quit"
                return
            await trio.sleep(self.work)
            await conn.send_line(f"did {line}")


async def test_max_connections_turns_new_clients_away(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Work(max_connections=2)) as server:
        a = await server.connect()
        b = await server.connect()
        c = await server.connect()
        await c.expect("BYE busy")
        await c.expect_closed()
        # The established clients are untouched.
        for client in (a, b):
            await client.send_line("x")
            await client.expect("did x")
        await a.send_line("quit")
        await a.expect("BYE")
        await a.expect_closed()
        d = await server.connect()  # a freed its place
        await d.send_line("y")
        await d.expect("did y")


async def test_echo_limit_closes_silently(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(EchoService(max_connections=1)) as server:
        first = await server.connect()
        second = await server.connect()
        assert await second.receive_all() == b""
        await first.send(b"ping")
        assert await first.receive_exactly(4) == b"ping"


async def test_crash_is_logged_and_ends_only_its_connection(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_memory_server(Work()) as server:
        bystander = await server.connect()
        victim = await server.connect()
        await victim.send_line("crash")
        await victim.expect_closed()
        await bystander.send_line("still fine")
        await bystander.expect("did still fine")
        after = await server.connect()
        await after.send_line("new")
        await after.expect("did new")
    crash = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(crash) == 1
    assert "handler crashed" in crash[0].getMessage()
    assert crash[0].exc_info is not None and "handler bug" in str(crash[0].exc_info[1])
    assert "[work #" in crash[0].getMessage()
    access = [r.getMessage() for r in caplog.records if r.name == "trionet.access"]
    assert any("end=error" in m for m in access)
    assert any("end=shutdown" in m for m in access)


async def test_access_log_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet.access")
    async with open_memory_server(Work()) as server:
        client = await server.connect()
        await client.send_line("abc")
        await client.expect("did abc")
        await client.send_line("quit")
        await client.expect("BYE")
        await client.expect_closed()
        await trio.sleep(1)
    (line,) = [r.getMessage() for r in caplog.records if "end=quit" in r.getMessage()]
    assert line.startswith("work memory #")
    assert "in=9 out=12" in line
    assert "duration=" in line


async def test_graceful_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    """Idle clients are told at once; work in flight finishes within the grace."""
    listener = MemoryListener()
    server = Server([Work(work=3.0)], grace=5.0, listeners={"work": [listener]})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        from trionet.testing import Client

        idle = Client(await listener.connect())
        busy = Client(await listener.connect())
        await busy.send_line("job")
        await trio.sleep(1)  # the job is now in flight
        started = trio.current_time()
        server.shutdown()
        await idle.expect("BYE shutdown")
        await idle.expect_closed()
        assert trio.current_time() - started < 0.1
        # The busy client gets its answer, then the goodbye.
        await busy.expect("did job", "BYE shutdown")
        await busy.expect_closed()
        assert 1.9 < trio.current_time() - started < 2.1
        # Listeners closed at once: nobody new gets in.
        with pytest.raises(trio.BrokenResourceError):
            await listener.connect()
    assert server.connection_count == 0


async def test_grace_expires(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(Work(work=100.0), grace=5.0) as server:
        client = await server.connect()
        await client.send_line("forever")
        await trio.sleep(1)
        started = trio.current_time()
        server.shutdown()
        await client.expect("BYE shutdown")
        await client.expect_closed()
        assert 4.9 < trio.current_time() - started < 5.1


async def test_echo_shutdown_is_silent(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(EchoService()) as server:
        client = await server.connect()
        await client.send(b"abc")
        assert await client.receive_exactly(3) == b"abc"
        server.shutdown()
        assert await client.receive_all() == b""


async def test_echo_idle_timeout_is_silent(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(EchoService(idle_timeout=300)) as server:
        client = await server.connect(timeout=400)
        start = trio.current_time()
        assert await client.receive_all() == b""
        assert 299.9 < trio.current_time() - start < 301


async def test_serve_binds_port_zero_and_reports_addresses() -> None:
    import trionet

    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [EchoService(port=0), Work(port=0)])
        assert set(addresses) == {"echo", "work"}
        (host, port), *_ = addresses["echo"]
        assert host == "127.0.0.1" and port > 0
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"hi")
                assert await stream.receive_some() == b"hi"
        nursery.cancel_scope.cancel()


def test_service_options_are_validated() -> None:
    with pytest.raises(ValueError):
        Work(max_line=0)
    with pytest.raises(ValueError):
        Work(idle_timeout=-1)
    with pytest.raises(ValueError):
        Work(port=70000)
    with pytest.raises(ValueError):
        Server([Work(), Work()])
    assert Work(idle_timeout=0).effective_idle_timeout is None
    assert Work().effective_idle_timeout == 300


async def test_a_request_just_before_the_idle_deadline_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Work(work=5.0, idle_timeout=300)) as server:
        client = await server.connect()
        await client.expect_nothing(for_seconds=299.5)
        await client.send_line("late")
        # The work (5 s) runs past the old deadline: the request still counts.
        await client.expect("did late")
        await client.expect_nothing(for_seconds=295)
        await client.expect("BYE idle-timeout")


async def test_trionet_serve_stays_callable_after_importing_the_cli_module() -> None:
    import trionet
    import trionet.serve  # binds the package attribute to the submodule

    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [EchoService(port=0)])
        assert addresses["echo"][0][1] > 0
        nursery.cancel_scope.cancel()


async def test_no_bye_after_a_payload_cut_short(autojump_clock: trio.testing.MockClock) -> None:
    """Past the grace, a half-sent payload ends in a silent close, not 'BYE' glued to it."""

    @attrs.define(kw_only=True, eq=False)
    class Blob(Service):
        name: ClassVar[str] = "blob"

        async def handle(self, conn: Connection) -> None:
            async for _line in conn:
                await conn.send_all(b"x" * (3 << 20))

    # Lockstep streams: a send waits until the client reads, and this client
    # reads nothing until the grace period is over.
    async with open_memory_server(Blob(), grace=5.0, lockstep=True) as server:
        client = await server.connect(timeout=60)
        await client.send_line("get")
        await trio.sleep(2)
        server.shutdown()
        await trio.sleep(10)
        received = await client.receive_all()
    assert b"BYE" not in received


async def test_no_bye_after_a_file_cut_short(tmp_path: Path, opened: Opened) -> None:
    """The same for send_file over TCP (os.sendfile): the client sees a short payload."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * (64 << 20))

    @attrs.define(kw_only=True, eq=False)
    class Blob(Service):
        name: ClassVar[str] = "blob"

        async def handle(self, conn: Connection) -> None:
            async for _line in conn:
                async with await trio.open_file(blob, "rb") as f:
                    await conn.send_file(f)

    server = trionet.Server([Blob(port=0)], grace=0.3)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            host, port = addresses["blob"][0]
            stream = await opened.stream(port, host)
            await stream.send_all(b"get\n")
            first = await stream.receive_some(1000)  # the transfer has begun
            server.shutdown()
            await trio.sleep(0.6)  # past the grace, not reading
            received = bytearray(first)
            while chunk := await stream.receive_some(1 << 20):
                received += chunk
    assert 0 < len(received) < 64 << 20 and set(received) == {ord("x")}


async def test_bye_after_whole_sends(autojump_clock: trio.testing.MockClock) -> None:
    """Payload sent in whole pieces, then a shutdown: the BYE follows the last piece."""

    @attrs.define(kw_only=True, eq=False)
    class Pieces(Service):
        name: ClassVar[str] = "pieces"

        async def handle(self, conn: Connection) -> None:
            async for _line in conn:
                for _ in range(100):
                    await conn.send_all(b"x" * 1000)
                    await trio.sleep(0.7)  # not in step with the grace deadline

    async with open_memory_server(Pieces(), grace=5.0) as server:
        client = await server.connect(timeout=60)
        await client.send_line("get")
        await trio.sleep(2)
        server.shutdown()
        received = await client.receive_all()
    assert received.endswith(b"BYE shutdown\n")
    assert set(received[: -len(b"BYE shutdown\n")]) == {ord("x")}


async def test_cancelling_the_server_while_a_handler_fails_is_clean() -> None:
    """A failure inside a handler's own nursery, mixed with the server's
    cancellation in one exception group, stays that connection's failure."""

    @attrs.define(kw_only=True, eq=False)
    class Fragile(Service):
        name: ClassVar[str] = "fragile"

        async def handle(self, conn: Connection) -> None:
            async def breaks_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    raise trio.BrokenResourceError("peer went away during cleanup")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(breaks_when_cancelled)
                nursery.start_soon(trio.sleep_forever)
                await conn.send_line("ready")

    listener = MemoryListener()
    server = Server([Fragile()], listeners={"fragile": [listener]})
    from trionet.testing import Client

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = Client(await listener.connect())
            await client.expect("ready")
            nursery.cancel_scope.cancel()
    assert server.connection_count == 0


async def test_pipelined_lines_do_not_starve_other_tasks() -> None:
    order: list[str] = []

    @attrs.define(kw_only=True, eq=False)
    class Count(Service):
        name: ClassVar[str] = "count"

        async def handle(self, conn: Connection) -> None:
            async for line in conn:
                order.append("line")
                # A costly request: 1 ms of CPU (the test asserts no speed,
                # only that the other task gets turns in between).
                until = time.perf_counter() + 0.001
                while time.perf_counter() < until:
                    pass
                conn.write_line(line)

    async with open_memory_server(Count()) as server:
        client = await server.connect()

        async def ticker() -> None:
            while True:
                order.append("tick")
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await client.send(b"x\n" * 100)  # one segment, a hundred requests
            assert await client.receive_exactly(200) == b"x\n" * 100
            nursery.cancel_scope.cancel()
    first, last = order.index("line"), len(order) - order[::-1].index("line")
    ticks_between = order[first:last].count("tick")
    # 100 ms of work in one burst, a yield at least every 5 ms of it.
    assert ticks_between >= 10


async def test_background_work_outlives_every_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """run_background starts before anyone is served and ends after the last one."""
    events: list[str] = []

    @attrs.define(kw_only=True, eq=False)
    class WithBackground(Service):
        name: ClassVar[str] = "bg"
        ready: bool = False

        async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
            await trio.sleep(3)  # e.g. connecting to Redis
            self.ready = True
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                events.append("background stopped")

        async def handle(self, conn: Connection) -> None:
            try:
                async for line in conn:
                    conn.write_line(f"{line} ready={self.ready}")
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(1)  # a goodbye that still needs the background
                events.append("connection ended")

    async with open_memory_server(WithBackground(), grace=5) as server:
        client = await server.connect()
        await client.send_line("x")
        await client.expect("x ready=True")
        server.shutdown()
        await client.expect("BYE shutdown")
    assert events == ["connection ended", "background stopped"]
