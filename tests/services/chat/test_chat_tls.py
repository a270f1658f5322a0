"""The chat inside TLS: the real client reads and writes one TLS connection at once.

The chat client has a reader task and a writer task on the same stream, and
the server a reader and a writer per member: inside TLS both sides then
send while a receive is pending, which is what this exercises.
"""

from __future__ import annotations

import subprocess

import trio
from conftest import TLSFiles
from test_chat_client import CLIENT, Lines, running

from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client


async def test_interactive_session_inside_tls(tls_files: TLSFiles) -> None:
    service = ChatService(port=0, tls_cert=tls_files.cert, tls_key=tls_files.key)
    async with running(service) as (_, port):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        ctx = tls_files.client_context()
        alice = Client(trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1"), timeout=10)
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
