"""The chat's web port against issue 19's outside probe: DNS rebinding, a port
held shut by silent connections, a WebSocket message trickling past the line
timeout, and malformed frames; in memory (autojump clock) and over sockets.

The WebSocket client here is wsproto driven by hand, so a test can send a
frame's bytes one at a time or send bytes no client library would.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from conftest import Opened
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

import trionet
from trionet.services.chat.frames import FrameWatch, close_frame
from trionet.services.chat.server import WELCOME, ChatService
from trionet.services.chat.web import WebListener, served_names
from trionet.testing import Client, MemoryListener

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


class RawWs:
    """A WebSocket client over any stream: wsproto's bytes, sent as the test likes."""

    def __init__(self, stream: trio.abc.Stream, timeout: float) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.timeout = timeout
        self.closed: CloseConnection | None = None
        self._events: list[object] = []

    @classmethod
    async def open(cls, stream: trio.abc.Stream, host: str, timeout: float = 5) -> RawWs:
        client = cls(stream, timeout)
        await stream.send_all(client.ws.send(Request(host=host, target="/ws")))
        event = await client._next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def _next_event(self) -> object:
        with trio.fail_after(self.timeout):
            while not self._events:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
                self._events.extend(self.ws.events())
                if not data and not self._events:
                    return None
        return self._events.pop(0)

    def frame(self, text: str) -> bytes:
        """The bytes of one text message (masked, as a client sends it)."""
        return self.ws.send(Message(data=text))

    async def send_line(self, text: str) -> None:
        await self.stream.send_all(self.frame(text))

    async def receive_line(self) -> str | None:
        """The next text message; ``None`` once closed (:attr:`closed` says how)."""
        event = await self._next_event()
        if isinstance(event, TextMessage):
            assert event.message_finished
            return event.data
        if isinstance(event, CloseConnection):
            self.closed = event
        else:
            assert event is None or isinstance(event, RejectConnection), event
        return None

    async def expect(self, *lines: str) -> None:
        for want in lines:
            got = await self.receive_line()
            assert got == want, f"expected {want!r}, got {got!r}"

    async def join(self, nick: str) -> RawWs:
        await self.expect(WELCOME)
        await self.send_line(f"/nick {nick}")
        await self.expect(f"OK nick {nick}")
        return self


async def read_status(stream: trio.abc.Stream, timeout: float = 5) -> int:
    """The status of the response on ``stream`` (its head only)."""
    data = b""
    with trio.fail_after(timeout):
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, f"closed without a response; got {data!r}"
            data += chunk
    return int(data.split(b" ", 2)[1])


async def request(stream: trio.abc.Stream, host: str, extra: bytes = b"") -> int:
    await stream.send_all(UPGRADE.replace(b"{host}", host.encode()) + extra + b"\r\n")
    return await read_status(stream)


# -- in memory -------------------------------------------------------------------------


@asynccontextmanager
async def memory_chat(service: ChatService) -> AsyncIterator[tuple[MemoryListener, WebListener]]:
    tcp = MemoryListener()
    # As ChatService.open_extra_listeners makes them (over TCP in the tests below).
    web = WebListener(
        MemoryListener(),
        host_names=service.web_host_names,
        max_pending=service.max_connections,
        max_per_address=service.effective_max_per_address,
    )
    server = trionet.Server([service], listeners={"chat": [tcp, web]})
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)
        await nursery.start(server.run)
        try:
            yield tcp, web
        finally:
            server.shutdown()


def memory_transport(web: WebListener) -> MemoryListener:
    assert isinstance(web.transport, MemoryListener)
    return web.transport


async def test_memory_rebinding_and_foreign_origins_get_403(autojump_clock: object) -> None:
    async with memory_chat(ChatService(web_host_names=("chat.example",))) as (_, web):
        transport = memory_transport(web)
        refused = [
            # The probe's request: what a browser sends after DNS rebinding.
            ("evil.example:8080", b"Origin: http://evil.example:8080\r\n"),
            ("evil.example", b""),  # no Origin at all: still not our name
            ("127.0.0.1", b""),  # in memory only localhost and the names given
            ("", b""),
            ("localhost:x", b""),
            # The Host is fine, the page is from elsewhere (403 before too).
            ("localhost", b"Origin: http://evil.example\r\n"),
            ("localhost", b"Origin: null\r\n"),
            ("chat.example", b"Origin: http://localhost\r\n"),
        ]
        for host, extra in refused:
            assert await request(await transport.connect(), host, extra) == 403, (host, extra)
        stream = await transport.connect()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        assert await read_status(stream) == 403  # not even the page
        for host, extra in [
            ("localhost", b""),
            ("LocalHost:1234", b"Origin: http://LocalHost:1234\r\n"),
            ("chat.example", b"Origin: https://chat.example\r\n"),
        ]:
            assert await request(await transport.connect(), host, extra) == 101, host


async def test_memory_a_trickled_message_ends_at_the_line_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_chat(ChatService(line_timeout=10)) as (tcp, web):
        bob = Client(await tcp.connect(), timeout=100)
        await bob.expect(WELCOME)
        await bob.send_line("/nick bob")
        await bob.expect("OK nick bob")
        alice = await (
            await RawWs.open(await memory_transport(web).connect(), "localhost", timeout=100)
        ).join("alice")
        await bob.expect("JOIN alice")
        # Whole messages, however far apart, are fine.
        for i in range(3):
            await trio.sleep(30)
            await alice.send_line(f"hi {i}")
            await bob.expect(f"MSG alice hi {i}")
        # A frame header, then one payload byte per second.
        data = alice.frame("x" * 100)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                for i in range(len(data)):
                    await alice.stream.send_all(data[i : i + 1])
                    await trio.sleep(1)

            nursery.start_soon(trickle)
            await alice.expect("BYE line-timeout")
            assert await alice.receive_line() is None
            nursery.cancel_scope.cancel()
        assert 10 <= trio.current_time() - start <= 12
        await bob.expect("LEAVE alice")


async def test_memory_a_malformed_frame_gets_close_1002(autojump_clock: object) -> None:
    async with memory_chat(ChatService()) as (_, web):
        alice = await (await RawWs.open(await memory_transport(web).connect(), "localhost")).join(
            "alice"
        )
        await alice.stream.send_all(b"\xf1\x80\x00\x00\x00\x00")  # reserved bits set
        assert await alice.receive_line() is None
        assert alice.closed is not None and alice.closed.code == 1002


async def test_memory_connections_count_per_address_from_the_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ChatService(max_per_address=3, max_connections=6)
    async with memory_chat(service) as (_, web):
        transport = memory_transport(web)
        silent = [await transport.connect(peer="10.0.0.2:1000") for _ in range(3)]
        over = await transport.connect(peer="10.0.0.2:1001")
        with trio.fail_after(1):  # closed at once: the address's three are held
            assert await over.receive_some() == b""
        ws = await RawWs.open(await transport.connect(peer="10.0.0.3:1000"), "localhost")
        await ws.join("alice")
        # 3 + 1 held; two more from a third address fill the listener's 6.
        more = [await transport.connect(peer="10.0.0.4:1000") for _ in range(2)]
        with trio.fail_after(1):
            assert await (await transport.connect(peer="10.0.0.5:1000")).receive_some() == b""
        # The silent ones are dropped at the handshake deadline; room again.
        await trio.sleep(11)
        for stream in silent + more:
            with trio.fail_after(1):
                assert await stream.receive_some() == b""
        ws2 = await RawWs.open(await transport.connect(peer="10.0.0.2:1002"), "localhost")
        await ws2.join("bob")


# -- the frame watch, pure -------------------------------------------------------------


def test_frame_watch_follows_messages_and_frames() -> None:
    seen: list[float] = []
    watch = FrameWatch(seen.append)
    one = bytes([0x81, 0x85, 0, 0, 0, 0]) + b"hello"  # a whole masked text frame
    watch.feed(one[:3], 1.0)
    assert watch.since == 1.0
    watch.feed(one[3:], 2.0)
    assert watch.since == math.inf
    # A fragmented message: the clock runs from its first frame to its last.
    first = bytes([0x01, 0x82, 0, 0, 0, 0]) + b"ab"  # text, not final
    ping = bytes([0x89, 0x80, 0, 0, 0, 0])  # a control frame between fragments
    last = bytes([0x80, 0x81, 0, 0, 0, 0]) + b"c"  # continuation, final
    watch.feed(first, 3.0)
    assert watch.since == 3.0
    watch.feed(ping, 4.0)
    assert watch.since == 3.0
    watch.feed(last[:2], 5.0)
    assert watch.since == 3.0
    watch.feed(last[2:] + one, 6.0)
    assert watch.since == math.inf
    # Long lengths (16 and 64 bits) and a frame with no payload.
    long16 = bytes([0x82, 0xFE]) + (300).to_bytes(2, "big") + bytes(4) + bytes(300)
    long64 = bytes([0x82, 0xFF]) + (70000).to_bytes(8, "big") + bytes(4) + bytes(70000)
    empty = bytes([0x81, 0x80, 0, 0, 0, 0])
    for i in range(0, len(long16), 7):
        watch.feed(long16[i : i + 7], 7.0)
    watch.feed(long64 + empty, 8.0)
    assert watch.since == math.inf
    # Told at each change (after a feed: the last one began and ended in it).
    assert seen == [1.0, math.inf, 3.0, math.inf, 7.0, math.inf]


def test_close_frame() -> None:
    assert close_frame(1002, "x") == b"\x88\x03\x03\xeax"


def test_served_names() -> None:
    assert served_names("127.0.0.1") == {"127.0.0.1", "localhost"}
    assert served_names("::1") == {"[::1]", "localhost"}
    assert served_names("::ffff:127.0.0.1") == {"127.0.0.1", "localhost"}
    assert served_names("192.0.2.7", ["Chat.Example."]) == {"192.0.2.7", "chat.example"}
    assert served_names(None) == {"localhost"}


def test_web_host_name_option_and_config(tmp_path: Path) -> None:
    (chat,) = trionet.build_services(
        ["chat", "--web-host-name", "a.example", "--web-host-name", "b.example"]
    )
    assert isinstance(chat, ChatService) and chat.web_host_names == ("a.example", "b.example")
    config = tmp_path / "trionet.toml"
    config.write_text('[chat]\nweb-host-name = ["c.example", "d.example"]\n')
    (chat,) = trionet.build_services(["chat", "--config", str(config)])
    assert isinstance(chat, ChatService) and chat.web_host_names == ("c.example", "d.example")
    (chat,) = trionet.build_services(["chat"])
    assert isinstance(chat, ChatService) and chat.web_host_names == ()


# -- over real sockets -----------------------------------------------------------------


@asynccontextmanager
async def running(service: ChatService) -> AsyncIterator[tuple[int, int]]:
    server = trionet.Server([service])
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        try:
            yield addresses["chat"][0][1], addresses["chat web"][0][1]
        finally:
            server.shutdown()


async def connect_from(opened: Opened, address: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from ``address`` (any of 127.0.0.0/8).

    ``opened`` closes it at the end of the test (if the test did not already).
    """
    sock = trio.socket.socket()
    stream = opened.add(trio.SocketStream(sock))
    await sock.bind((address, 0))
    await sock.connect(("127.0.0.1", port))
    return stream


async def test_rebinding_over_sockets(opened: Opened) -> None:
    service = ChatService(port=0, web_port=0, web_host_names=("chat.example",))
    with trio.fail_after(30):
        async with running(service) as (_, web):
            for host, extra in [
                (f"evil.example:{web}", f"Origin: http://evil.example:{web}\r\n".encode()),
                (f"127.0.0.2:{web}", b""),
                (f"localhost.evil.example:{web}", b""),
                (f"127.0.0.1:{web}", b"Origin: http://evil.example\r\n"),
            ]:
                stream = await opened.stream(web)
                assert await request(stream, host, extra) == 403, host
            for host in [f"127.0.0.1:{web}", f"localhost:{web}", "127.0.0.1", "chat.example"]:
                stream = await opened.stream(web)
                origin = f"Origin: http://{host}\r\n".encode()
                assert await request(stream, host, origin) == 101, host
            ws = await RawWs.open(await opened.stream(web), f"127.0.0.1:{web}")
            await ws.join("alice")


async def test_silent_connections_from_one_address_lock_nobody_out(opened: Opened) -> None:
    """The probe held the port shut with 256 connections sending nothing."""
    with trio.fail_after(60):
        async with running(ChatService(port=0, web_port=0)) as (_, web):
            silent = [await connect_from(opened, "127.0.0.2", web) for _ in range(300)]
            ws = await RawWs.open(await connect_from(opened, "127.0.0.3", web), f"127.0.0.1:{web}")
            await ws.join("alice")
            for stream in silent:
                await stream.aclose()


async def test_pending_handshakes_count_against_the_per_address_cap(opened: Opened) -> None:
    service = ChatService(port=0, web_port=0, max_per_address=5)
    with trio.fail_after(60):
        async with running(service) as (_, web):
            silent = [await connect_from(opened, "127.0.0.2", web) for _ in range(5)]
            over = await connect_from(opened, "127.0.0.2", web)
            # Closed at once, without a word (or reset).
            with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
                assert await over.receive_some(100) == b""
            ws = await RawWs.open(await connect_from(opened, "127.0.0.3", web), f"127.0.0.1:{web}")
            await ws.join("alice")
            for stream in silent:
                await stream.aclose()
            # Their slots are free again.
            ws2 = await RawWs.open(await connect_from(opened, "127.0.0.2", web), f"127.0.0.1:{web}")
            await ws2.join("bob")


async def test_a_burst_of_500_reconnecting_pages_from_50_addresses_all_get_in(
    opened: Opened,
) -> None:
    """All connect first, then all send their requests: every one is pending at once."""
    pages, addresses = 500, 50
    with trio.fail_after(120):
        async with running(ChatService(port=0, web_port=0)) as (_, web):
            streams = [
                await connect_from(opened, f"127.0.0.{10 + i % addresses}", web)
                for i in range(pages)
            ]
            welcomed = 0

            async def page(stream: trio.SocketStream) -> None:
                nonlocal welcomed
                ws = await RawWs.open(stream, f"127.0.0.1:{web}", timeout=60)
                await ws.expect(WELCOME)
                welcomed += 1

            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(page, stream)
            assert welcomed == pages
            for stream in streams:
                await stream.aclose()


async def test_a_trickled_message_ends_at_the_line_timeout_over_sockets(opened: Opened) -> None:
    with trio.fail_after(30):
        async with running(ChatService(port=0, web_port=0, line_timeout=1)) as (_, web):
            stream = await opened.stream(web)
            alice = await (await RawWs.open(stream, f"127.0.0.1:{web}", timeout=20)).join("alice")
            data = alice.frame("x" * 100)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    for i in range(len(data)):
                        await stream.send_all(data[i : i + 1])
                        await trio.sleep(0.2)

                nursery.start_soon(trickle)
                await alice.expect("BYE line-timeout")
                assert await alice.receive_line() is None
                nursery.cancel_scope.cancel()
            # Well before the 100 bytes could have arrived (20 s), and not
            # before the line timeout.
            assert 1 <= trio.current_time() - start < 15


async def test_a_malformed_frame_gets_close_1002_over_sockets(opened: Opened) -> None:
    with trio.fail_after(30):
        async with running(ChatService(port=0, web_port=0)) as (_, web):
            for bad in [
                b"\xf1\x80\x00\x00\x00\x00",  # reserved bits
                b"\x83\x80\x00\x00\x00\x00",  # a reserved opcode
                b"\x81\x05hello",  # not masked
                b"\x89\xfe\x00\xc8" + bytes(4 + 200),  # a control frame over 125 bytes
            ]:
                stream = await opened.stream(web)
                ws = await (await RawWs.open(stream, f"127.0.0.1:{web}")).join("alice")
                await stream.send_all(bad)
                assert await ws.receive_line() is None
                assert ws.closed is not None and ws.closed.code == 1002, bad
                with trio.fail_after(5):  # then the server closes the TCP connection
                    while await stream.receive_some(4096):
                        pass
