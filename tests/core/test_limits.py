"""Defences against clients that hold slots: the line timeout, the per-address limit,
descriptor exhaustion, and start-up errors that say what failed.

In memory on the autojump clock (a trickler sending a byte every 5 s for minutes
takes no real time), then over real loopback sockets with short timeouts, using
127.0.0.2 as a second client address.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing

import trionet
from trionet import Connection, Server, Service
from trionet.services.echo import EchoService
from trionet.testing import Client, MemoryListener, open_memory_server

ROOT = Path(__file__).resolve().parents[2]


@attrs.define(kw_only=True, eq=False)
class Upper(Service):
    name: ClassVar[str] = "upper"

    async def handle(self, conn: Connection) -> None:
        async for line in conn:
            conn.write_line(line.upper())


async def trickle(client: Client, every: float, until: float) -> None:
    """Send one byte every ``every`` seconds, never a newline, until the server closes."""
    with trio.move_on_at(until):
        try:
            while True:
                await client.send(b"x")
                await trio.sleep(every)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_a_trickled_line_is_cut_at_the_line_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Upper(idle_timeout=10, line_timeout=60)) as server:
        client = await server.connect(timeout=1000)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            # A byte every 5 s: the idle timeout (10 s) never fires...
            nursery.start_soon(trickle, client, 5.0, start + 1000)
            # ...but the line, begun at `start`, must end by start + 60.
            assert await client.receive_line(timeout=1000) == "BYE line-timeout"
            assert trio.current_time() - start == pytest.approx(60, abs=0.1)
            nursery.cancel_scope.cancel()
        await client.expect_closed()


async def test_whole_lines_split_across_segments_never_hit_the_line_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each line restarts the line clock, even when every segment ends mid-line."""
    async with open_memory_server(Upper(idle_timeout=0, line_timeout=10)) as server:
        client = await server.connect()
        await client.send(b"a")
        for _ in range(20):  # 20 x 8 s = 160 s, far past the 10 s line timeout
            await trio.sleep(4)
            await client.send(b"b\nc")  # ends a line, begins the next
            await client.expect("AB")
            await trio.sleep(4)
            await client.send(b"\na")
            await client.expect("C")


async def test_line_timeout_also_covers_a_line_being_discarded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An over-long line's tail is thrown away as it comes: it may not trickle forever."""
    async with open_memory_server(Upper(idle_timeout=0, line_timeout=30, max_line=8)) as server:
        client = await server.connect(timeout=100)
        await client.send(b"y" * 20)
        await client.expect("ERR line-too-long 8")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle, client, 1.0, start + 100)
            await client.expect("BYE line-timeout")
            assert trio.current_time() - start <= 30.1
            nursery.cancel_scope.cancel()


async def test_a_thousand_tricklers_from_one_address_never_lock_out_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The probe's attack: 1,000 connections from one address, each sending a byte
    every 5 s and never a newline. Half the slots at most go to that address, the
    rest stay free for everyone else, and each trickler is dropped at the line
    timeout."""
    service = Upper(idle_timeout=10, line_timeout=60)  # max_connections 1000: 500 per address
    async with open_memory_server(service) as server:
        listener = server.listeners["upper"]
        results: dict[str, int] = {"busy": 0, "line-timeout": 0}
        start = trio.current_time()

        async def attacker(i: int) -> None:
            client = Client(await listener.connect(f"10.0.0.66:{10000 + i}"), timeout=1000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, client, 5.0, start + 1000)
                line = await client.receive_line()
                nursery.cancel_scope.cancel()
            key = "busy" if line == "BYE busy" else "line-timeout"
            assert line == f"BYE {key}", line
            results[key] += 1

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(attacker, i)
            await trio.sleep(1)
            # Every slot the attacker could take is taken; others still get in.
            assert server.server.connection_count == 500
            for i in range(20):
                victim = await server.connect(peer=f"10.0.0.{i + 1}:4000")
                await victim.send_line("hello")
                await victim.expect("HELLO")
        assert results == {"busy": 500, "line-timeout": 500}
        assert trio.current_time() - start < 61


async def test_per_address_limit_frees_slots_as_connections_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Upper(max_connections=10, max_per_address=2)) as server:
        a = await server.connect(peer="10.1.1.1:1")
        b = await server.connect(peer="10.1.1.1:2")
        c = await server.connect(peer="10.1.1.1:3")
        await c.expect("BYE busy")
        d = await server.connect(peer="10.1.1.2:1")  # another address: room
        await d.send_line("d")
        await d.expect("D")
        await a.send_line("QUIT")
        await a.expect("BYE")
        await a.expect_closed()
        e = await server.connect(peer="10.1.1.1:4")  # a's slot is free again
        await e.send_line("e")
        await e.expect("E")
        await b.send_line("b")
        await b.expect("B")


def test_max_per_address_default_is_half_the_connections() -> None:
    assert Upper().effective_max_per_address == 500
    assert Upper(max_connections=3).effective_max_per_address == 1
    assert Upper(max_per_address=7).effective_max_per_address == 7
    with pytest.raises(ValueError, match="max_per_address"):
        Upper(max_per_address=0)


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class _Highest(dict[str, int]):
    """A per-address table that remembers the highest count each key reached."""

    def __init__(self) -> None:
        super().__init__()
        self.most: dict[str, int] = {}

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        self.most[key] = max(self.most.get(key, 0), value)


async def test_tricklers_over_tcp_do_not_lock_out_another_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real sockets: 1,000 tricklers from 127.0.0.1 against a 1,000-slot server;
    a client from 127.0.0.2 is served throughout, and the tricklers are cut at
    the line timeout (short here, to keep the test quick)."""
    _raise_fd_limit(4096)
    caplog.set_level(logging.INFO, logger="trionet.access")
    service = Upper(port=0, idle_timeout=5, line_timeout=2)
    server = Server([service], grace=0.5)
    ended = 0
    # The most connections 127.0.0.1 ever held at once, recorded by the
    # server's own per-address table as it counts (no polling to miss a peak).
    held = _Highest()
    server._per_address["upper"] = held

    # Generous deadlines: this one process runs 1,000 clients and the server,
    # and a busy machine may give it a fraction of a core.
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            host, port = (await nursery.start(server.run))["upper"][0]

            async def attacker() -> None:
                nonlocal ended
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    # Generous: under load, accepting 1,000 clients takes a while.
                    with trio.move_on_after(120):
                        try:
                            while True:
                                with trio.move_on_after(0.4):
                                    if not await stream.receive_some():
                                        break
                                await stream.send_all(b"x")
                        except trio.BrokenResourceError:
                            pass  # closed on us while we still sent: a reset
                        ended += 1

            async with trio.open_nursery() as attackers:
                for _ in range(1000):
                    attackers.start_soon(attacker)
                await trio.sleep(0.5)
                sock = trio.socket.socket()
                await sock.bind(("127.0.0.2", 0))
                await sock.connect((host, port))
                # Refused, it would get "BYE busy" at once; slow, it is still served.
                victim = Client(trio.SocketStream(sock), timeout=60)
                await victim.send_line("hello from elsewhere")
                await victim.expect("HELLO FROM ELSEWHERE")
                await victim.aclose()
            server.shutdown()
            nursery.cancel_scope.cancel()
    access = [r.getMessage() for r in caplog.records if r.name == "trionet.access"]
    assert ended == 1000  # every trickler was closed by the server
    # Each was either turned away (its address held its 500 slots) or cut at the
    # line timeout. (How many of each depends on how fast 1,000 clients connect.)
    turned_away = sum("turned away (address limit for 127.0.0.1)" in m for m in access)
    cut = sum("end=line-timeout" in m for m in access)
    assert turned_away + cut == 1000, (turned_away, cut)
    most = held.most.get("127.0.0.1", 0)
    assert most <= 500 and (turned_away == 0 or most == 500), most
    assert sum("127.0.0.2:" in m and "end=eof" in m for m in access) == 1


@attrs.define(eq=False)
class FlakyListener(trio.abc.Listener[trio.abc.Stream]):
    """Fails ``failures`` accepts with EMFILE, then hands out memory connections."""

    failures: int
    inner: MemoryListener = attrs.field(factory=MemoryListener)

    async def accept(self) -> trio.abc.Stream:
        if self.failures:
            self.failures -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_descriptor_exhaustion_is_logged_once_per_episode(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet")
    listener = FlakyListener(failures=50)  # 5 s of failures at one retry per 0.1 s
    server = Server([Upper()], listeners={"upper": [listener]})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await trio.sleep(10)
        client = Client(await listener.inner.connect())
        await client.send_line("ok")
        await client.expect("OK")
        server.shutdown()
    messages = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "accept failed (EMFILE: too many open files)" in messages[0]
    assert "accepting again after 50 failed accept(s) over 10.0s" in messages[1]


def test_start_up_error_names_the_service_and_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "trionet.serve", "chat", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].endswith(f"cannot start chat on 127.0.0.1:{port}: address already in use"), (
        errors[0]
    )
    assert "Traceback" not in done.stderr


async def test_start_up_error_from_the_server_api() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = Server([Upper(port=0), EchoService(port=port)])
        with pytest.raises(trionet.StartupError) as info:
            await server.run()
    assert str(info.value) == f"cannot start echo on 127.0.0.1:{port}: address already in use"
