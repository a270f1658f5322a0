"""The chat inside TLS: the real client reads and writes one TLS connection at once.

The chat client has a reader task and a writer task on the same stream, and
the server a reader and a writer per member: inside TLS both sides then
send while a receive is pending, which is what this exercises.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from conftest import Opened, TLSFiles
from test_chat_client import CLIENT, Lines, running
from test_web import read_response

from trionet._tls import server_context
from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client, MemoryListener


async def test_interactive_session_inside_tls(tls_files: TLSFiles, opened: Opened) -> None:
    service = ChatService(port=0, tls_cert=tls_files.cert, tls_key=tls_files.key)
    async with running(service) as (_, port):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        ctx = tls_files.client_context()
        alice = opened.add(
            Client(trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1"), timeout=10)
        )
        await alice.expect(WELCOME)
        await alice.send_line("/nick alice")
        await alice.expect("OK nick alice")
        proc = await trio.lowlevel.open_process(
            [*CLIENT, "--nick", "bob", "--port", str(port), "--tls", "--cafile", tls_files.ca],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        out = Lines(proc.stdout)
        try:
            await alice.expect("JOIN bob")
            assert await out.next() == "-- you are bob"
            assert await out.next() == "-- here: alice bob"
            await alice.send(b"hello bob\n/msg bob psst\n")
            assert await out.next() == "<alice> hello bob"
            assert await out.next() == "[private] <alice> psst"
            await proc.stdin.send_all(b"hi alice\n/me nods\n")
            await alice.expect("MSG bob hi alice", "ACTION bob nods")
            await proc.stdin.aclose()  # end of input: the client says /quit
            await alice.expect("LEAVE bob")
            with trio.fail_after(10):
                assert await proc.wait() == 0
        finally:
            proc.kill()
            await proc.wait()


async def test_the_browser_page_is_https_when_the_chat_speaks_tls(
    tls_files: TLSFiles, opened: Opened
) -> None:
    """With TLS the web port serves HTTPS and a wss:// WebSocket, in the same room as TCP."""

    import trio_websocket

    import trionet

    service = ChatService(port=0, web_port=0, tls_cert=tls_files.cert, tls_key=tls_files.key)
    ctx = tls_files.client_context()
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [service])
        tcp_port = addresses["chat"][0][1]
        web_port = addresses["chat web"][0][1]
        with trio.fail_after(10):
            # The page, over HTTPS.
            raw = await trio.open_tcp_stream("127.0.0.1", web_port)
            page = trio.SSLStream(raw, ctx, server_hostname="127.0.0.1")
            await page.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await page.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 200")
            await page.aclose()
            # Plain HTTP to the TLS web port is sent to https://, in plain text.
            plain = await opened.stream(web_port)
            await plain.send_all(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{web_port}\r\n\r\n".encode())
            status, headers, body = await read_response(plain)
            assert (status, headers["location"]) == (307, f"https://127.0.0.1:{web_port}/")
            assert body == f"This port speaks HTTPS: https://127.0.0.1:{web_port}/\n".encode()
            # A wss:// member and a TLS TCP member talk.
            tcp = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", tcp_port), ctx, server_hostname="127.0.0.1"
            )
            alice = opened.add(Client(tcp, timeout=10))
            await alice.expect(WELCOME)
            await alice.send_line("/nick alice")
            await alice.expect("OK nick alice")
            url = f"wss://127.0.0.1:{web_port}/ws"
            async with trio_websocket.open_websocket_url(url, ssl_context=ctx) as ws:
                assert await ws.get_message() == WELCOME
                await ws.send_message("/nick bob")
                assert await ws.get_message() == "OK nick bob"
                await alice.expect("JOIN bob")
                await ws.send_message("hello over wss")
                await alice.expect("MSG bob hello over wss")
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tls_web(tls_files: TLSFiles) -> AsyncIterator[tuple[MemoryListener, Any]]:
    """A TLS web listener on a memory listener, running: (the memory listener, it)."""
    from trionet.services.chat.web import WebListener, _TLSListener

    memory = MemoryListener()
    web = WebListener(_TLSListener(memory, server_context(tls_files.cert, tls_files.key)))
    async with trio.open_nursery() as nursery:
        await nursery.start(web.run)
        yield memory, web
        await web.aclose()


async def test_plain_http_to_the_tls_web_port_is_answered_in_memory(
    tls_files: TLSFiles, autojump_clock: object
) -> None:
    """The first bytes decide: a request line gets a plain-text redirect (or a
    400 without a usable Host), a ClientHello gets TLS and the page."""
    async with tls_web(tls_files) as (memory, _):

        async def ask(request: bytes, tls: bool = False) -> tuple[int, dict[str, str], bytes]:
            stream: trio.abc.Stream = await memory.connect()
            if tls:
                ctx = tls_files.client_context()
                stream = trio.SSLStream(
                    stream, ctx, server_hostname="localhost", https_compatible=True
                )
            await stream.send_all(request)
            return await read_response(stream)

        status, headers, _ = await ask(b"GET /?a=b HTTP/1.1\r\nHost: localhost:8443\r\n\r\n")
        assert (status, headers["location"]) == (307, "https://localhost:8443/")  # path only
        assert headers["cache-control"] == "no-store"  # never remembered by the browser
        for no_host in (b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a b<\r\n\r\n"):
            status, _, body = await ask(no_host)
            assert (status, body) == (
                400,
                b"400 this port speaks HTTPS: use https:// in the address\n",
            )
        # A ClientHello: TLS as before.
        status, headers, body = await ask(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", tls=True)
        assert status == 200 and body.startswith(b"<!doctype html>")


async def test_a_tls_web_connection_under_way_when_the_listener_closes_is_answered(
    tls_files: TLSFiles, autojump_clock: object
) -> None:
    """Under TLS a request is under way from its first raw byte (a ClientHello, or
    here a plain-HTTP request line), not from its first decrypted one: closing
    the listener does not cut it off, however long it then takes."""
    from trionet.services.chat.web import CLOSE_LINGER

    async with tls_web(tls_files) as (memory, web):
        plain = await memory.connect()
        await plain.send_all(b"GET / HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked()
        await web.aclose()
        await trio.sleep(CLOSE_LINGER * 2)
        await plain.send_all(b"Host: localhost:8443\r\n\r\n")
        status, headers, _ = await read_response(plain)
        assert (status, headers["location"]) == (307, "https://localhost:8443/")


async def test_a_tls_web_request_begun_within_the_close_linger_may_take_longer(
    tls_files: TLSFiles, autojump_clock: object
) -> None:
    """A connection that sends its first raw byte within CLOSE_LINGER of the
    close (a shutdown) is under way from then on: the rest of its TLS
    handshake, or here of its plain-HTTP request, is not held to the linger."""
    from trionet.services.chat.web import CLOSE_LINGER

    async with tls_web(tls_files) as (memory, web):
        plain = await memory.connect()
        await trio.testing.wait_all_tasks_blocked()
        await web.aclose()
        await trio.sleep(CLOSE_LINGER / 2)
        await plain.send_all(b"GET / HTTP/1.1\r\n")
        await trio.sleep(CLOSE_LINGER * 2)
        await plain.send_all(b"Host: localhost:8443\r\n\r\n")
        status, headers, _ = await read_response(plain)
        assert (status, headers["location"]) == (307, "https://localhost:8443/")


async def test_a_tls_web_request_begun_as_the_server_shuts_down_is_answered_over_sockets(
    tls_files: TLSFiles, opened: Opened
) -> None:
    """The socket side of the test above: a connection that has sent nothing
    when the shutdown begins, then sends a request slowly, still gets its answer."""
    import pytest

    import trionet
    from trionet.services.chat.web import CLOSE_LINGER, WebListener

    service = ChatService(port=0, web_port=0, tls_cert=tls_files.cert, tls_key=tls_files.key)
    server = trionet.Server([service], grace=30)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            web_port = (await nursery.start(server.run))["chat web"][0][1]
            plain = await opened.stream(web_port)
            (web,) = server._finishing
            assert isinstance(web, WebListener)
            for _ in range(500):  # 5 s at most: until the listener holds it
                if len(web._first_waits) == 1:
                    break
                await trio.sleep(0.01)
            else:
                pytest.fail("the web listener did not take the connection")
            server.shutdown()
            await server.wait_not_accepting()
            assert web._closing  # (closed: the first byte comes within the linger)
            await plain.send_all(b"GET / HTTP/1.1\r\n")
            await trio.sleep(2 * CLOSE_LINGER)
            await plain.send_all(f"Host: 127.0.0.1:{web_port}\r\n\r\n".encode())
            status, headers, _ = await read_response(plain)
            assert (status, headers["location"]) == (307, f"https://127.0.0.1:{web_port}/")
