"""The chat client (``python -m trionet.client chat``) in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

import trionet
from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client

CLIENT = [sys.executable, "-m", "trionet.client", "chat"]


@asynccontextmanager
async def running(service: ChatService) -> AsyncIterator[tuple[trionet.Server, int]]:
    server = trionet.Server([service])
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        yield server, addresses["chat"][0][1]
        nursery.cancel_scope.cancel()


async def join(port: int, nick: str) -> Client:
    c = Client(await trio.open_tcp_stream("127.0.0.1", port), timeout=10)
    await c.expect(WELCOME)
    await c.send_line(f"/nick {nick}")
    await c.expect(f"OK nick {nick}")
    return c


class Lines:
    """Reads lines from a subprocess pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> str:
        with trio.fail_after(10):
            while b"\n" not in self.buf:
                chunk = await self.stream.receive_some()
                assert chunk, f"output ended; got so far {self.buf!r}"
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


async def test_interactive_session() -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(port, "alice")
        proc = await trio.lowlevel.open_process(
            [*CLIENT, "--nick", "bob", "--port", str(port)],
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
            await alice.send(b"hello bob\n/me waves\n/msg bob psst\n")
            assert await out.next() == "<alice> hello bob"
            assert await out.next() == "* alice waves"
            assert await out.next() == "[private] <alice> psst"
            # Typing while receiving: bob's line reaches alice.
            await proc.stdin.send_all(b"hi alice\n/me nods\n//slash\n")
            await alice.expect("MSG bob hi alice", "ACTION bob nods", "MSG bob /slash")
            await alice.send_line("/quit bye")
            assert await out.next() == "-- alice left (bye)"
            await proc.stdin.aclose()  # end of input: the client says /quit
            with trio.fail_after(10):
                assert await proc.wait() == 0
        finally:
            proc.kill()
            await proc.wait()


async def test_piped_script() -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(port, "alice")
        result = await trio.run_process(
            [*CLIENT, "--nick", "bot", "--port", str(port)],
            stdin=b"line one\n/me two\n/quit done\n",
            capture_stdout=True,
            capture_stderr=True,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines()[:2] == ["-- you are bot", "-- here: alice bot"]
        await alice.expect("JOIN bot", "MSG bot line one", "ACTION bot two", "LEAVE bot done")


async def test_nick_taken_exits_with_one_line() -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(port, "alice")
        result = await trio.run_process(
            [*CLIENT, "--nick", "ALICE", "--port", str(port)],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 5
        assert result.stderr.decode() == "chat: nick refused: nick-taken ALICE\n"
        await alice.expect_nothing(0.1)  # it never joined


async def test_refused_connection_exits_with_one_line() -> None:
    # A port that was just free: nothing listens there.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    result = await trio.run_process(
        [*CLIENT, "--nick", "bob", "--port", str(port)],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 3
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "cannot connect" in err and "Traceback" not in err


async def test_server_shutdown_exits_nonzero_with_one_line() -> None:
    async with running(ChatService(port=0)) as (server, port):
        proc = await trio.lowlevel.open_process(
            [*CLIENT, "--nick", "bob", "--port", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            assert await Lines(proc.stdout).next() == "-- you are bob"
            server.shutdown()
            with trio.fail_after(10):
                assert await proc.wait() == 4
            err = await proc.stderr.receive_some()
            assert err == b"chat: server closed the session: BYE shutdown\n"
        finally:
            proc.kill()
            await proc.wait()


async def test_help_explains_every_option() -> None:
    result = await trio.run_process([*CLIENT, "--help"], capture_stdout=True)
    text = result.stdout.decode()
    for option in ("--nick", "--host", "--port", "default: 127.0.0.1", "default: 7003"):
        assert option in text


async def test_garbage_from_server_exits_with_one_line() -> None:
    async def bogus(stream: trio.SocketStream) -> None:
        await stream.send_all(b"WELCOME\n\xff\xfe\n")
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, bogus, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        result = await trio.run_process(
            [*CLIENT, "--nick", "bob", "--port", str(port)],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    assert result.returncode == 5
    assert result.stderr.decode() == "chat: the server sent a bad line: ERR bad-encoding\n"
