"""Chat in a browser without a browser: the WebSocket stream adapter, the HTTP
side of the web listener, and WebSocket and TCP members in one room, in
memory (autojump clock) and over real sockets.

The browser itself is driven in test_web_browser.py.
"""

from __future__ import annotations

import itertools
import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import attrs
import pytest
import trio
import trio.testing
from conftest import Opened
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
    wrap_server_stream,
)

import trionet
from trionet._metrics import Metrics
from trionet._proxy import parse_networks
from trionet._proxy_stream import HEADER_TIMEOUT
from trionet.services.chat.server import WELCOME, ChatService
from trionet.services.chat.web import (
    CLOSE_LINGER,
    HANDSHAKE_TIMEOUT,
    MAX_HEAD,
    WebListener,
    WebSocketStream,
    load_page,
)
from trionet.testing import Client, MemoryListener

# -- a scripted WebSocket client --------------------------------------------------


class WsClient:
    """Like trionet.testing.Client, one line per WebSocket message."""

    def __init__(self, ws: WebSocketConnection, timeout: float = 5) -> None:
        self.ws = ws
        self.timeout = timeout

    async def send_line(self, line: str) -> None:
        await self.ws.send_message(line)

    async def receive_line(self) -> str | None:
        with trio.fail_after(self.timeout):
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return None
        assert isinstance(message, str), f"expected a text message, got {message!r}"
        assert "\n" not in message, f"a message holds an LF: {message!r}"
        return message

    async def expect(self, *lines: str) -> None:
        for want in lines:
            got = await self.receive_line()
            assert got == want, f"expected {want!r}, got {got!r}"

    async def expect_closed(self) -> None:
        got = await self.receive_line()
        assert got is None, f"expected the WebSocket to close, got {got!r}"

    async def join(self, nick: str) -> WsClient:
        await self.expect(WELCOME)
        await self.send_line(f"/nick {nick}")
        await self.expect(f"OK nick {nick}")
        return self


async def join_tcp(client: Client, nick: str) -> Client:
    await client.expect(WELCOME)
    await client.send_line(f"/nick {nick}")
    await client.expect(f"OK nick {nick}")
    return client


# -- the stream adapter, in memory: messages <-> lines ----------------------------


@asynccontextmanager
async def adapter_pair() -> AsyncIterator[tuple[WebSocketStream, WebSocketConnection]]:
    """A WebSocketStream (server side) and a plain trio-websocket client,
    talking over a memory stream: a real WebSocket without sockets."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    accepted: list[WebSocketConnection] = []
    async with trio.open_nursery() as nursery:

        async def server_side() -> None:
            request = await wrap_server_stream(nursery, server_stream)
            accepted.append(await request.accept())

        nursery.start_soon(server_side)
        client = await wrap_client_stream(nursery, client_stream, "localhost", "/ws")
        await trio.testing.wait_all_tasks_blocked()
        stream = WebSocketStream(accepted[0])
        with trio.fail_after(5):
            yield stream, client
        await trio.aclose_forcefully(stream)
        await trio.aclose_forcefully(client)


async def test_each_message_becomes_a_line() -> None:
    async with adapter_pair() as (stream, client):
        for message in ["hello", "", "two\nlines", "é ✓"]:
            await client.send_message(message)
        await client.send_message(b"\xff\xfe")  # binary: bytes of a line, as sent
        got = [await stream.receive_some() for _ in range(5)]
        assert got == [b"hello\n", b"\n", b"two\nlines\n", "é ✓\n".encode(), b"\xff\xfe\n"]


async def test_receive_some_honours_max_bytes() -> None:
    async with adapter_pair() as (stream, client):
        await client.send_message("abcdef")
        assert await stream.receive_some(4) == b"abcd"
        assert await stream.receive_some(4) == b"ef\n"
        with pytest.raises(ValueError):
            await stream.receive_some(0)


async def test_each_line_becomes_a_message() -> None:
    async with adapter_pair() as (stream, client):
        await stream.send_all(b"one\ntw")
        await stream.send_all(b"o\nthree\n")
        e = "é".encode()
        await stream.send_all(e[:1])  # a character cut between two writes
        await stream.send_all(e[1:] + b"\n")
        got = [await client.get_message() for _ in range(4)]
        assert got == ["one", "two", "three", "é"]
        with trio.move_on_after(1):
            extra = await client.get_message()
            raise AssertionError(f"a partial line was sent: {extra!r}")


async def test_peer_close_is_end_of_input_and_sending_breaks() -> None:
    async with adapter_pair() as (stream, client):
        await client.send_message("last words")
        await client.aclose()
        assert await stream.receive_some() == b"last words\n"
        assert await stream.receive_some() == b""
        assert await stream.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"anyone there?\n")


async def test_aclose_closes_the_websocket() -> None:
    async with adapter_pair() as (stream, client):
        await stream.send_all(b"bye\n")
        await stream.aclose()
        assert await client.get_message() == "bye"
        with pytest.raises(ConnectionClosed) as info:
            await client.get_message()
        assert info.value.reason.code == 1000  # a clean close handshake
        for op in (stream.receive_some(), stream.send_all(b"x\n")):
            with pytest.raises(trio.ClosedResourceError):
                await op
        await stream.aclose()  # twice is fine


@attrs.define
class FakeSocket:
    """Records sent messages; just enough of a WebSocket for send_all."""

    sent: list[str | bytes] = attrs.field(factory=list)

    async def get_message(self) -> str | bytes:
        raise ConnectionClosed(None)

    async def send_message(self, message: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


lines = st.lists(st.text(st.characters(blacklist_characters="\n"), max_size=20), max_size=8)


@settings(max_examples=200, deadline=None)
@given(lines=lines, cuts=st.lists(st.integers(0, 400), max_size=10))
def test_any_chunking_gives_the_same_messages(lines: list[str], cuts: list[int]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    points = sorted({c for c in cuts if c <= len(data)} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]

    async def main() -> list[str | bytes]:
        fake = FakeSocket()
        stream = WebSocketStream(fake)
        for chunk in chunks:
            await stream.send_all(chunk)
        return fake.sent

    want = [line.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for line in lines]
    assert trio.run(main) == want


# -- the whole server in memory: web listener over a memory listener ---------------


@attrs.define
class MemoryWeb:
    """A chat server whose TCP and web listeners are both in memory."""

    server: trionet.Server
    tcp: MemoryListener
    web: WebListener
    nursery: trio.Nursery

    async def connect_tcp(self) -> Client:
        return Client(await self.tcp.connect(), timeout=10)

    async def connect_ws(self) -> WsClient:
        stream = await self.transport().connect()
        ws = await wrap_client_stream(self.nursery, stream, "localhost", "/ws")
        return WsClient(ws, timeout=100)  # virtual seconds: the autojump clock

    def transport(self) -> MemoryListener:
        assert isinstance(self.web.transport, MemoryListener)
        return self.web.transport

    async def http(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        stream = await self.transport().connect()
        await stream.send_all(request)
        return await read_response(stream)


async def read_response(stream: trio.abc.Stream) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a Connection: close response."""
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


@asynccontextmanager
async def memory_web(
    service: ChatService, grace: float = 5.0, proxy_from: str | None = None
) -> AsyncIterator[MemoryWeb]:
    """``proxy_from``: the web listener expects a PROXY header from those networks."""
    tcp = MemoryListener()
    networks = parse_networks(proxy_from) if proxy_from is not None else None
    web = WebListener(
        MemoryListener(),
        max_per_address=service.effective_max_per_address,
        proxy=None if networks is None else lambda: networks,
    )
    server = trionet.Server([service], grace=grace, listeners={"chat": [tcp, web]})
    with trio.fail_after((service.effective_idle_timeout or 0) + 60):
        async with trio.open_nursery() as nursery:
            # The listener's background work in the test's nursery: this block
            # ends only if it ends once the server has closed everything.
            await nursery.start(web.run)
            await nursery.start(server.run)
            try:
                yield MemoryWeb(server, tcp, web, nursery)
            finally:
                server.shutdown()


async def test_memory_web_and_tcp_members_share_the_room(autojump_clock: object) -> None:
    async with memory_web(ChatService()) as chat:
        alice = await (await chat.connect_ws()).join("alice")
        bob = await join_tcp(await chat.connect_tcp(), "bob")
        await alice.expect("JOIN bob")
        await alice.send_line("hello bob")
        await bob.expect("MSG alice hello bob")
        await bob.send_line("/me waves")
        await bob.send_line("/msg alice psst")
        await alice.expect("ACTION bob waves", "PRIV bob psst")
        await alice.send_line("/who")
        await alice.expect("WHO alice bob")
        await alice.send_line("/quit bye now")
        await alice.expect("BYE")
        await alice.expect_closed()
        await bob.expect("LEAVE alice bye now")


async def test_memory_line_rules_apply_to_a_web_member(autojump_clock: object) -> None:
    async with memory_web(ChatService(max_line=100)) as chat:
        alice = await (await chat.connect_ws()).join("alice")
        await alice.send_line("x" * 101)
        await alice.expect("ERR line-too-long 100")
        await alice.send_line("/nick")
        await alice.expect("ERR bad-nick")
        await alice.ws.send_message(b"\xff")  # binary: bad UTF-8 in a line
        await alice.expect("ERR bad-encoding")
        await alice.send_line("/who")  # the connection carried on
        await alice.expect("WHO alice")


async def test_memory_message_over_the_size_bound_closes_the_websocket(
    autojump_clock: object,
) -> None:
    async with memory_web(ChatService()) as chat:
        alice = await (await chat.connect_ws()).join("alice")
        bob = await join_tcp(await chat.connect_tcp(), "bob")
        await alice.expect("JOIN bob")
        await alice.send_line("x" * (chat.web.max_message_size + 1))
        with pytest.raises(ConnectionClosed) as info:
            await alice.ws.get_message()
        assert info.value.reason.code == 1009  # Message Too Big
        await bob.expect("LEAVE alice")
    # memory_web ended: the TCP stream under the WebSocket was closed too.


async def test_memory_idle_timeout_applies_to_a_web_member(autojump_clock: object) -> None:
    async with memory_web(ChatService(idle_timeout=60)) as chat:
        alice = await (await chat.connect_ws()).join("alice")
        bob = await join_tcp(await chat.connect_tcp(), "bob")
        await alice.expect("JOIN bob")
        await bob.expect_nothing(for_seconds=30)
        await bob.send_line("still here")
        await alice.expect("MSG bob still here", "BYE idle-timeout")
        await alice.expect_closed()
        await bob.expect("LEAVE alice")


async def test_memory_shutdown_says_bye_and_ends_the_listener(autojump_clock: object) -> None:
    async with memory_web(ChatService()) as chat:
        alice = await (await chat.connect_ws()).join("alice")
        bob = await join_tcp(await chat.connect_tcp(), "bob")
        await alice.expect("JOIN bob")
        half_open = await chat.transport().connect()  # never sends its request
        chat.server.shutdown()
        await alice.expect("BYE shutdown")
        await alice.expect_closed()
        await bob.expect("BYE shutdown")
        with trio.fail_after(1):
            assert await half_open.receive_some() == b""  # dropped at once
    # memory_web's nursery, holding web.run, has ended: nothing was left behind.


WS_HEAD_REST = (
    b"Host: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_memory_a_retiring_server_answers_the_requests_under_way(
    autojump_clock: object,
) -> None:
    """A reload retires the old server: a page request it has begun is still
    answered, a WebSocket handshake gets 503 (the page retries, reaching the
    new one), a connection that had sent nothing yet (a browser's, opened
    ahead of its request) is answered when its request comes within the
    handshake deadline, and a request that never ends, or never begins, holds
    the retirement only until that deadline."""
    web = WebListener(MemoryListener())
    server = trionet.Server([ChatService()], listeners={"chat": [MemoryListener(), web]})
    assert isinstance(web.transport, MemoryListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)
        await nursery.start(server.run)
        page = await web.transport.connect()
        await page.send_all(b"GET / HTTP/1.1\r\n")
        ws = await web.transport.connect()
        await ws.send_all(b"GET /ws HTTP/1.1\r\n")
        slow = await web.transport.connect()
        await slow.send_all(b"GET / HTTP/1.1\r\n")  # ...and nothing more, ever
        ahead = await web.transport.connect()
        silent = await web.transport.connect()  # ...forever
        await trio.testing.wait_all_tasks_blocked()
        retired_at = trio.current_time()
        server.retire(HANDSHAKE_TIMEOUT * 3)
        await server.wait_not_accepting()
        # Far past CLOSE_LINGER (a shutdown's), within the handshake deadline.
        await trio.sleep(HANDSHAKE_TIMEOUT / 2)
        await ahead.send_all(GET_PAGE)
        assert (await read_response(ahead))[0] == 200
        await page.send_all(b"Host: localhost\r\n\r\n")
        status, _, body = await read_response(page)
        assert status == 200 and body.startswith(b"<!doctype html>") and web.page.endswith(body)
        await ws.send_all(WS_HEAD_REST)
        status, headers, _ = await read_response(ws)
        assert (status, headers["retry-after"]) == (503, "1")
        with trio.fail_after(HANDSHAKE_TIMEOUT + 1):
            assert await slow.receive_some() == b""
            assert await silent.receive_some() == b""
    # The server and the listener have ended: once the slow request's deadline
    # passed, not after the whole grace.
    assert trio.current_time() - retired_at < HANDSHAKE_TIMEOUT + 1


async def test_memory_a_retirement_during_start_up_keeps_a_connection_that_sent_nothing(
    autojump_clock: object,
) -> None:
    """A worker's parent may say "retire" while the server is still opening its
    listeners (a reload given up on): the web listener, running already, must
    then be closed as a retirement too, not with a shutdown's CLOSE_LINGER."""
    web = WebListener(MemoryListener())
    server = trionet.Server(
        [ChatService()],
        listeners={"chat": [MemoryListener(), web]},
        # Called while the listeners open, before the server knows which
        # answer requests of their own.
        on_listening=lambda: server.retire(HANDSHAKE_TIMEOUT * 3),
    )
    assert isinstance(web.transport, MemoryListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)
        ahead = await web.transport.connect()  # a browser's, opened ahead of its request
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(server.run)
        await server.wait_not_accepting()
        await trio.sleep(HANDSHAKE_TIMEOUT / 2)  # far past CLOSE_LINGER
        with suppress(trio.BrokenResourceError):
            await ahead.send_all(GET_PAGE)
        assert (await read_response(ahead))[0] == 200


async def test_memory_the_end_of_a_short_retire_grace_gives_a_silent_connection_close_linger(
    autojump_clock: object,
) -> None:
    """A reload grace shorter than the handshake deadline: once it has passed,
    a connection that has sent nothing gets a shutdown's CLOSE_LINGER, not the
    rest of its deadline (nor the server's grace)."""
    web = WebListener(MemoryListener())
    server = trionet.Server([ChatService()], listeners={"chat": [MemoryListener(), web]}, grace=5)
    assert isinstance(web.transport, MemoryListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)  # (the test's: it ends with the silent connection)
        async with trio.open_nursery() as serving:
            await serving.start(server.run)
            silent = await web.transport.connect()  # ...forever
            await trio.testing.wait_all_tasks_blocked()
            retired_at = trio.current_time()
            server.retire(1)
        assert trio.current_time() - retired_at <= 1 + CLOSE_LINGER + 0.1
        with trio.fail_after(0.1):
            assert await silent.receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_memory_a_request_sent_as_the_listener_closes_is_answered(
    autojump_clock: object,
) -> None:
    """Sent, but not read yet when the listener closes (a reload): still answered.
    One that sends its first byte within CLOSE_LINGER is too; later, it is dropped."""
    web = WebListener(MemoryListener())
    assert isinstance(web.transport, MemoryListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)
        unread = await web.transport.connect()
        late = await web.transport.connect()
        too_late = await web.transport.connect()
        await trio.testing.wait_all_tasks_blocked()  # each waits for its first byte
        await unread.send_all(GET_PAGE)
        await web.aclose()  # (no checkpoint since the send: not read yet)
        assert (await read_response(unread))[0] == 200
        await trio.sleep(CLOSE_LINGER / 2)
        await late.send_all(GET_PAGE)
        assert (await read_response(late))[0] == 200
        await trio.sleep(CLOSE_LINGER)
        with suppress(trio.BrokenResourceError):
            await too_late.send_all(GET_PAGE)
        with trio.fail_after(1):
            assert await too_late.receive_some() == b""


async def test_memory_a_shutdown_while_retiring_takes_the_shutdown_grace_only(
    autojump_clock: object,
) -> None:
    """A request under way holds a retirement up to its deadline, but a shutdown
    meanwhile ends the wait: the server stops within its own grace, and a
    connection that has sent nothing gets only CLOSE_LINGER from the shutdown."""
    web = WebListener(MemoryListener())
    server = trionet.Server([ChatService()], listeners={"chat": [MemoryListener(), web]}, grace=1)
    assert isinstance(web.transport, MemoryListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)  # (here the test's: it ends with the slow request)
        async with trio.open_nursery() as serving:
            await serving.start(server.run)
            slow = await web.transport.connect()
            await slow.send_all(b"G")  # ...and nothing more
            silent = await web.transport.connect()
            await trio.testing.wait_all_tasks_blocked()
            server.retire(600)
            await server.wait_not_accepting()
            await trio.sleep(0.1)
            stopped_at = trio.current_time()
            server.shutdown()
            with trio.fail_after(CLOSE_LINGER + 0.01):
                assert await silent.receive_some() == b""
        assert trio.current_time() - stopped_at <= server.grace + 0.1
        nursery.cancel_scope.cancel()


async def test_memory_web_limits_given_as_functions_are_read_at_each_connection(
    autojump_clock: object,
) -> None:
    """As the chat passes them, so that a reload changes them (see the socket test)."""
    limit = 1
    web = WebListener(MemoryListener(), max_pending=lambda: limit)
    assert isinstance(web.transport, MemoryListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)
        held = await web.transport.connect()  # holds the one place (sends nothing)
        turned_away = await web.transport.connect()
        with trio.fail_after(1):
            assert await turned_away.receive_some() == b""
        limit = 2
        served = await web.transport.connect()
        await served.send_all(GET_PAGE)
        assert (await read_response(served))[0] == 200
        await held.aclose()
        await web.aclose()


async def test_memory_max_connections_apply_to_web_members(autojump_clock: object) -> None:
    async with memory_web(ChatService(max_connections=1)) as chat:
        alice = await (await chat.connect_ws()).join("alice")
        turned_away = await chat.connect_ws()
        await turned_away.expect("BYE busy")
        await turned_away.expect_closed()
        await alice.send_line("/who")
        await alice.expect("WHO alice")


async def test_memory_http_routes(autojump_clock: object) -> None:
    async with memory_web(ChatService()) as chat:
        status, headers, body = await chat.http(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert body.startswith(b"<!doctype html>")
        assert (await chat.http(b"GET /?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 200
        assert (await chat.http(b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 404
        status, headers, _ = await chat.http(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert (status, headers["allow"]) == (405, "GET")
        assert (await chat.http(b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 405
        status, headers, _ = await chat.http(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (status, headers["upgrade"]) == (426, "websocket")
        assert (await chat.http(b"nonsense\r\n\r\n"))[0] == 400
        assert (await chat.http(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"))[0] == 400
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        assert (await chat.http(huge))[0] == 431
        # The server carries on serving WebSockets after all that.
        await (await chat.connect_ws()).join("alice")


async def test_memory_slow_request_is_dropped(autojump_clock: object) -> None:
    async with memory_web(ChatService()) as chat:
        stream = await chat.transport().connect()
        await stream.send_all(b"GET / HTTP/1.1\r\n")  # ...and nothing more
        start = trio.current_time()
        with trio.fail_after(HANDSHAKE_TIMEOUT + 1):
            assert await stream.receive_some() == b""
        assert trio.current_time() - start >= HANDSHAKE_TIMEOUT - 0.01


async def test_memory_websocket_from_another_site_is_refused(autojump_clock: object) -> None:
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    async with memory_web(ChatService()) as chat:
        status, _, body = await chat.http(upgrade + b"Origin: http://evil.example\r\n\r\n")
        assert (status, body) == (403, b"403 WebSocket from another origin\n")
        # The page's own origin (scheme and Host) is let in, as are clients
        # that send no Origin (connect_ws).
        stream = await chat.transport().connect()
        await stream.send_all(upgrade + b"Origin: http://localhost\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some()).startswith(b"HTTP/1.1 101 ")


def proxy_v1(source: str, port: int) -> bytes:
    """A PROXY protocol v1 header naming ``source:port`` as the client."""
    return f"PROXY TCP4 {source} 192.0.2.1 {port} 80\r\n".encode()


GET_PAGE = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def test_memory_every_connection_leaves_no_state_behind(autojump_clock: object) -> None:
    """A page, errors, members who quit or vanish, a head cut short, an idle
    connection, a refused PROXY header, a client over its per-address limit: once
    all have gone, the listener holds nothing for any of them (what
    scripts/bench/chat_web_soak.py checks from outside, as memory)."""
    service = ChatService(max_per_address=2)
    async with memory_web(service, proxy_from="127.0.0.1") as chat:
        web = chat.web

        async def connect(peer: str, source: str) -> trio.abc.Stream:
            stream = await chat.transport().connect(peer)
            await stream.send_all(proxy_v1(source, 1000))
            return stream

        for i in range(3):
            peer, source = f"127.0.0.1:{41000 + i}", f"198.51.100.{i + 1}"
            page = await connect(peer, source)
            await page.send_all(GET_PAGE)
            assert (await read_response(page))[0] == 200
            missing = await connect(peer, source)
            await missing.send_all(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await read_response(missing))[0] == 404
            cut = await connect(peer, source)
            await cut.send_all(b"GET / HT")
            await cut.aclose()
            await trio.testing.wait_all_tasks_blocked()  # (its place is free again)
            idle = await connect(peer, source)
            ws = await wrap_client_stream(
                chat.nursery, await connect(peer, source), "localhost", "/ws"
            )
            member = await WsClient(ws, timeout=100).join(f"m{i}")
            over = await connect(peer, source)  # the 3rd held from this client: refused
            with trio.fail_after(5):
                assert await over.receive_some() == b""
            await member.send_line("/quit")
            await member.expect("BYE")
            await member.expect_closed()
            await idle.aclose()
            await trio.testing.wait_all_tasks_blocked()  # (their places are free again)
            vanishing = await wrap_client_stream(
                chat.nursery, await connect(peer, source), "localhost", "/ws"
            )
            await WsClient(vanishing, timeout=100).join(f"v{i}")
            await vanishing.aclose()  # a tab closed
            refused = await chat.transport().connect("192.0.2.50:9")  # not a balancer
            with trio.fail_after(5):
                assert await refused.receive_some() == b""
        await trio.sleep(1)  # (virtual) the last closes run their course
        await trio.testing.wait_all_tasks_blocked()
        assert (web._held, web._requests, web._per_address) == (0, 0, {})
        assert not web._first_waits and web._requests_done.is_set()
        assert chat.server.connection_count == 0


async def test_memory_proxy_header_names_the_web_client(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet")
    service = ChatService(max_per_address=1)
    async with memory_web(service, proxy_from="127.0.0.1") as chat:
        stream = await chat.transport().connect("127.0.0.1:40000")
        await stream.send_all(proxy_v1("203.0.113.7", 5555) + GET_PAGE)
        assert (await read_response(stream))[0] == 200
        assert "chat web 203.0.113.7:5555 GET / 200" in caplog.messages
        # A WebSocket behind the balancer: the chat knows its member by the header.
        stream = await chat.transport().connect("127.0.0.1:40001")
        await stream.send_all(proxy_v1("198.51.100.9", 6000))
        ws = await wrap_client_stream(chat.nursery, stream, "localhost", "/ws")
        alice = await WsClient(ws, timeout=100).join("alice")
        # The per-address limit (1) counts real clients, not the balancer:
        # a second one from 198.51.100.9 is closed, one from elsewhere served.
        stream = await chat.transport().connect("127.0.0.1:40002")
        await stream.send_all(proxy_v1("198.51.100.9", 6001) + GET_PAGE)
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        stream = await chat.transport().connect("127.0.0.1:40003")
        await stream.send_all(proxy_v1("198.51.100.10", 6002) + GET_PAGE)
        assert (await read_response(stream))[0] == 200
        await alice.send_line("/quit")
        await alice.expect("BYE")
        await alice.expect_closed()
    assert any(
        m.startswith("chat 198.51.100.9:6000 ") and "end=quit" in m for m in caplog.messages
    ), caplog.messages


async def test_memory_proxy_header_only_from_proxy_from_and_in_time(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    metrics.activate()  # (in this test's own context: what Server.run does)
    async with memory_web(ChatService(), proxy_from="127.0.0.1") as chat:
        # From an address not in --proxy-from: closed unread.
        stream = await chat.transport().connect("10.1.2.3:5000")
        await stream.send_all(proxy_v1("203.0.113.7", 5555) + GET_PAGE)
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        # No header in time: closed when HEADER_TIMEOUT has passed.
        stream = await chat.transport().connect("127.0.0.1:5001")
        started = trio.current_time()
        with trio.fail_after(HEADER_TIMEOUT + 5):
            assert await stream.receive_some() == b""
        assert trio.current_time() - started == pytest.approx(HEADER_TIMEOUT)
        # A request without a header: a bad header.
        stream = await chat.transport().connect("127.0.0.1:5002")
        await stream.send_all(GET_PAGE)
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        # The listener carries on.
        stream = await chat.transport().connect("127.0.0.1:5003")
        await stream.send_all(proxy_v1("203.0.113.8", 7000) + GET_PAGE)
        assert (await read_response(stream))[0] == 200
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert refused[0].startswith("chat web 10.1.2.3:5000 refused: not a --proxy-from address")
    assert refused[1] == "chat web 127.0.0.1:5001 refused: no complete PROXY header within 5s"
    assert refused[2].startswith("chat web 127.0.0.1:5002 refused: ")
    assert len(refused) == 3, refused
    assert metrics.value("trionet_proxy_refused_total", service="chat") == 3


def test_page_is_self_contained() -> None:
    page = load_page().decode()
    body = page.partition("\r\n\r\n")[2]
    assert not re.search(r"https?://", body), "the page must load nothing from elsewhere"
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet|@import|url\(", body)
    assert "innerHTML" not in body and "outerHTML" not in body
    assert "insertAdjacentHTML" not in body and "document.write" not in body


# -- over real sockets ----------------------------------------------------------------


@asynccontextmanager
async def running(service: ChatService) -> AsyncIterator[tuple[trionet.Server, int, int]]:
    server = trionet.Server([service])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            yield server, addresses["chat"][0][1], addresses["chat web"][0][1]
            server.shutdown()


async def test_web_and_tcp_members_talk_over_sockets(
    caplog: pytest.LogCaptureFixture, opened: Opened
) -> None:
    caplog.set_level(logging.INFO, logger="trionet")
    async with (
        running(ChatService(port=0, web_port=0)) as (_, port, web_port),
        open_websocket_url(f"ws://127.0.0.1:{web_port}/ws") as ws,
    ):
        assert f"chat web listening on 127.0.0.1:{web_port}" in caplog.messages
        alice = await WsClient(ws).join("alice")
        bob = await join_tcp(await opened.client(port, timeout=30), "bob")
        await alice.expect("JOIN bob")
        await alice.send_line("hi from a browser <b>")
        await bob.expect("MSG alice hi from a browser <b>")
        await bob.send(b"hi from nc\r\n/me waves\n")
        await alice.expect("MSG bob hi from nc", "ACTION bob waves")
        await bob.send_line("/quit")
        await bob.expect("BYE")
        await alice.expect("LEAVE bob")


async def test_proxy_header_on_the_web_port_over_sockets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trionet")
    service = ChatService(
        port=0, web_port=0, proxy_protocol=True, proxy_from=parse_networks("127.0.0.1")
    )
    async with running(service) as (_, _, web_port), trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", web_port)
        await stream.send_all(proxy_v1("203.0.113.7", 5555) + GET_PAGE)
        status, _, body = await read_response(stream)
        assert status == 200 and body.startswith(b"<!doctype html>")
        await stream.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", web_port)
        await stream.send_all(proxy_v1("198.51.100.9", 6000))
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws")
        alice = await WsClient(ws).join("alice")
        await alice.send_line("/quit")
        await alice.expect("BYE")
        await alice.expect_closed()
        # Without a header the connection is refused (and logged): closed
        # unread, so the kernel may answer with a reset.
        stream = await trio.open_tcp_stream("127.0.0.1", web_port)
        await stream.send_all(GET_PAGE)
        with trio.fail_after(5), suppress(trio.BrokenResourceError):
            assert await stream.receive_some() == b""
        await stream.aclose()
    assert "chat web 203.0.113.7:5555 GET / 200" in caplog.messages
    assert any(
        m.startswith("chat 198.51.100.9:6000 ") and "end=quit" in m for m in caplog.messages
    ), caplog.messages
    assert any(
        m.startswith("chat web 127.0.0.1:") and " refused: " in m for m in caplog.messages
    ), caplog.messages


async def test_page_404_and_405_over_sockets(opened: Opened) -> None:
    async def get(web_port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
        stream = await opened.stream(web_port)
        await stream.send_all(request)
        return await read_response(stream)

    async with running(ChatService(port=0, web_port=0)) as (_, _, web_port):
        status, headers, body = await get(web_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert b"<title>trionet chat</title>" in body
        assert not re.search(rb"https?://", body)
        favicon = b"GET /favicon.ico HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        assert (await get(web_port, favicon))[0] == 404
        assert (await get(web_port, b"PUT / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))[0] == 405


async def test_flood_control_applies_to_a_web_member_over_sockets(opened: Opened) -> None:
    async with (
        running(ChatService(port=0, web_port=0, rate=0.01, burst=3)) as (_, port, web_port),
        open_websocket_url(f"ws://127.0.0.1:{web_port}/ws") as ws,
    ):
        bob = await join_tcp(await opened.client(port, timeout=30), "bob")
        alice = await WsClient(ws).join("alice")
        await bob.expect("JOIN alice")
        for i in range(4):
            await alice.send_line(f"flood {i}")
        await alice.expect("ERR rate-limited")
        await bob.expect("MSG alice flood 0", "MSG alice flood 1", "MSG alice flood 2")
        await bob.expect_nothing(for_seconds=0.2)


async def test_a_retiring_server_answers_a_page_request_under_way_over_sockets(
    opened: Opened,
) -> None:
    server = trionet.Server([ChatService(port=0, web_port=0)])
    # The retire grace is 30 s: ending well before shows it was not waited out.
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            web_port = (await nursery.start(server.run))["chat web"][0][1]
            page = await opened.stream(web_port)
            await page.send_all(b"GET / HTTP/1.1\r\n")
            ws = await opened.stream(web_port)
            await ws.send_all(b"GET /ws HTTP/1.1\r\n")
            ahead = await opened.stream(web_port)  # a browser's, opened ahead of its request
            # Until the listener has read a byte of the first two and holds
            # the third (its own count).
            (web,) = server._finishing
            assert isinstance(web, WebListener)
            for _ in range(500):  # 5 s at most
                if web._requests == 3 and len(web._first_waits) == 1:
                    break
                await trio.sleep(0.01)
            else:
                pytest.fail("the server did not read the two requests' first bytes")
            server.retire(30)
            await server.wait_not_accepting()
            # New connections are refused now (this server was the only one).
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", web_port)
            await trio.sleep(2 * CLOSE_LINGER)  # what a shutdown would give it, twice
            await ahead.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await read_response(ahead))[0] == 200
            await page.send_all(b"Host: 127.0.0.1\r\n\r\n")
            status, _, body = await read_response(page)
            assert status == 200 and body.startswith(b"<!doctype html>")
            await ws.send_all(WS_HEAD_REST.replace(b"localhost", b"127.0.0.1"))
            assert (await read_response(ws))[0] == 503
    # server.run returned by itself once both requests were answered.


async def test_a_reload_changes_the_web_ports_per_address_limit_over_sockets(
    opened: Opened,
) -> None:
    get = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    service = ChatService(port=0, web_port=0, max_per_address=1)
    async with running(service) as (server, _, web_port):
        await opened.stream(web_port)  # holds 127.0.0.1's one place (sends nothing)
        turned_away = await opened.stream(web_port)
        await turned_away.send_all(get)
        # Closed unread, so the kernel may answer with a reset.
        with trio.fail_after(5), suppress(trio.BrokenResourceError):
            assert await turned_away.receive_some() == b""
        server.reload({"chat": {"max_per_address": 2}})
        served = await opened.stream(web_port)
        await served.send_all(get)
        assert (await read_response(served))[0] == 200


async def test_shutdown_says_bye_to_a_web_member_over_sockets(opened: Opened) -> None:
    async with (
        running(ChatService(port=0, web_port=0)) as (server, _, web_port),
        trio.open_nursery() as nursery,
    ):
        # The test owns the TCP stream (closed by `opened`): trio-websocket's
        # client, told goodbye by the server, never closes its own.
        stream = await opened.stream(web_port)
        ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{web_port}", "/ws")
        alice = await WsClient(ws).join("alice")
        server.shutdown()
        await alice.expect("BYE shutdown")
        await alice.expect_closed()
    # running() returned: the server, its web listener and its tasks are done.


def test_web_port_option() -> None:

    (chat,) = trionet.build_services(["chat", "--web-port", "0"])
    assert isinstance(chat, ChatService) and chat.web_port == 0
    (chat,) = trionet.build_services(["chat"])
    assert isinstance(chat, ChatService) and chat.web_port is None
    with pytest.raises(trionet.StartupError, match="web_port"):
        trionet.build_services(["chat", "--web-port", "70000"])


def test_command_line_serves_the_page_and_stops_cleanly() -> None:
    """``python -m trionet.serve chat --port 0 --web-port 0``, as a person runs it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trionet.serve", "chat", "--port", "0", "--web-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        web_port = None
        for _ in range(20):
            line = proc.stderr.readline()
            if m := re.search(r"chat web listening on 127\.0\.0\.1:(\d+)", line):
                web_port = int(m[1])
                break
        assert web_port is not None, "no 'chat web listening on' line"
        with socket.create_connection(("127.0.0.1", web_port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
