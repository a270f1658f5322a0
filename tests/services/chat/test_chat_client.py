"""The chat client (``python -m trionet.client chat``) in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio
from conftest import Opened
from terminal_screen import KEY_UP, TerminalScreen, run_in_terminal

import trionet
from trionet.services.chat.client import render, time_of
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


async def join(opened: Opened, port: int, nick: str) -> Client:
    c = await opened.client(port, timeout=10)
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


async def test_interactive_session(opened: Opened) -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(opened, port, "alice")
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


async def test_piped_script(opened: Opened) -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(opened, port, "alice")
        result = await trio.run_process(
            [*CLIENT, "--nick", "bot", "--port", str(port)],
            stdin=b"line one\n/me two\n/quit done\n",
            capture_stdout=True,
            capture_stderr=True,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines()[:2] == ["-- you are bot", "-- here: alice bot"]
        await alice.expect("JOIN bot", "MSG bot line one", "ACTION bot two", "LEAVE bot done")


async def test_nick_taken_exits_with_one_line(opened: Opened) -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(opened, port, "alice")
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


def test_render_history_and_help_lines() -> None:
    assert render("HIST 1700000000000 MSG alice hi there") == "<alice> hi there"
    assert render("HIST 1700000000000 ACTION alice waves") == "* alice waves"
    assert render("OK history 2") == "-- 2 earlier messages above"
    assert render("OK history 1") == "-- 1 earlier message above"
    assert render("OK history 0") == "-- no earlier messages"
    assert render("HELP /nick /me /quit") == "-- commands: /nick /me /quit"
    assert render("HIST 1 MSG eve \x1b[2Jboom") == "<eve> [2Jboom"  # escapes stripped


def test_time_of_a_line_is_its_own_for_history_else_now() -> None:
    earlier = time.strftime("%H:%M", time.localtime(1_700_000_000))
    assert time_of("HIST 1700000000000 MSG alice hi") == earlier
    now = time.strftime("%H:%M")  # (a minute may turn between the two calls)
    for line in ("MSG alice hi", "HIST x MSG a b", "HIST", f"HIST 1{'0' * 30} MSG a b"):
        assert time_of(line) in (now, time.strftime("%H:%M"))


# -- on a terminal (a real pty, the screen rendered by pyte) ---------------------

HH_MM = r"\d\d:\d\d "  # every line on a terminal starts with the time


def _typing(term: TerminalScreen, text: str) -> bool:
    return term.cursor_line() == f"bob> {text}".rstrip()


def _shows(term: TerminalScreen, line_end: str) -> bool:
    return any(line.endswith(line_end) for line in term.lines())


def _restored(term: TerminalScreen) -> bool:
    modes = term.local_modes()
    return bool(modes & termios.ICANON and modes & termios.ECHO)


async def test_terminal_message_arriving_mid_typing_leaves_the_line_whole(opened: Opened) -> None:
    async with running(ChatService(port=0)) as (_, port):
        alice = await join(opened, port, "alice")
        async with run_in_terminal([*CLIENT, "--nick", "bob", "--port", str(port)]) as term:
            await alice.expect("JOIN bob")
            await term.wait_for("-- here: alice bob")
            await term.type("half-typed")
            await term.wait_for(lambda t: _typing(t, "half-typed"))
            await alice.send_line("are you there?")
            # The message is drawn above the prompt; the typed line is redrawn whole.
            await term.wait_for(
                lambda t: _typing(t, "half-typed") and _shows(t, " <alice> are you there?")
            )
            lines = term.lines()
            shown = next(i for i, line in enumerate(lines) if "<alice> are you there?" in line)
            assert shown < term.cursor_row(), term.text()
            assert re.fullmatch(HH_MM + "<alice> are you there[?]", lines[shown])
            assert not any("half-typed<" in line or "?half" in line for line in lines)
            assert "error" not in term.text()  # /history unknown to an older server: quiet
            # Enter sends it; the client shows it (the server sends no copy).
            await term.type("\r")
            await alice.expect("MSG bob half-typed")
            await term.wait_for(lambda t: _shows(t, "<bob> half-typed"))
            # Up recalls it for editing; the edit is what is sent.
            await term.wait_for(lambda t: _typing(t, ""))
            await term.type(KEY_UP)
            await term.wait_for(lambda t: _typing(t, "half-typed"))
            await term.type("\x7f" * len("typed") + "written\r")
            await alice.expect("MSG bob half-written")
            await term.type("/me waves\r")
            await alice.expect("ACTION bob waves")
            await term.wait_for("* bob waves")
            # /help: the client's own keys at once (and the server's commands).
            await term.type("/help\r")
            await term.wait_for("-- keys: Up/Down recall earlier lines")
            await term.wait_for("-- commands: /")
            assert term.echoing_draws == 0  # keys only ever drawn by the prompt
            # Ctrl-D leaves as /quit would; the terminal is back in its normal mode.
            await term.type("\x04")
            await alice.expect("LEAVE bob")
            assert await term.wait_exit() == 0
            assert _restored(term)


async def test_terminal_burst_of_messages_keeps_the_typed_line(opened: Opened) -> None:
    async with running(ChatService(port=0, rate=1e6, burst=10_000)) as (_, port):
        alice = await join(opened, port, "alice")
        async with run_in_terminal([*CLIENT, "--nick", "bob", "--port", str(port)]) as term:
            await term.wait_for("-- here: alice bob")
            await term.type("half-typed")
            await term.wait_for(lambda t: _typing(t, "half-typed"))
            await alice.send("".join(f"line {i}\n" for i in range(500)).encode())
            await term.wait_for(lambda t: _typing(t, "half-typed") and _shows(t, "line 499"))
            rows = term.lines()[: term.cursor_row()]
            assert [row[6:] for row in rows] == [f"<alice> line {i}" for i in range(477, 500)]
            # Keys typed while lines trickle in (each one a redraw) land in the
            # typed line, never echoed among the messages.
            more = "".join(chr(ord("a") + i % 26) for i in range(40))

            async def trickle() -> None:
                for i in range(100):
                    await alice.send_line(f"trickle {i}")
                    await trio.sleep(0.004)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                for key in more:
                    await term.type(key)
                    await trio.sleep(0.01)
            typed = f"half-typed{more}"
            await term.wait_for(lambda t: _typing(t, typed) and _shows(t, "trickle 99"))
            assert term.echoing_draws == 0
            rows = term.lines()[: term.cursor_row()]
            assert [row[6:] for row in rows] == [f"<alice> trickle {i}" for i in range(77, 100)]
            await term.type("\r")
            await alice.expect("JOIN bob", f"MSG bob {typed}")


async def test_terminal_shows_history_on_joining_with_its_times() -> None:
    # A scripted server answering /history as PROTOCOL.md says.
    earlier = 1_700_000_000_000
    received: list[str] = []

    async def scripted(stream: trio.SocketStream) -> None:
        peer = Client(stream, timeout=60)
        await peer.send_line(WELCOME)
        while (line := await peer.receive_line()) is not None:
            received.append(line)
            match line:
                case "/nick bob":
                    await peer.send_line("OK nick bob")
                case "/history":
                    await peer.send(
                        f"HIST {earlier} MSG alice hello room\n"
                        f"HIST {earlier + 60_000} ACTION alice waves\n"
                        "OK history 2\n".encode()
                    )
                case "/who":
                    await peer.send_line("WHO alice bob")
                case "/quit":
                    await peer.send_line("BYE")
                    return

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, scripted, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with run_in_terminal([*CLIENT, "--nick", "bob", "--port", str(port)]) as term:
            await term.wait_for("-- here: alice bob")
            first = time.strftime("%H:%M", time.localtime(earlier / 1000))
            second = time.strftime("%H:%M", time.localtime(earlier / 1000 + 60))
            lines = [line for line in term.lines() if line]
            assert lines[1:3] == [f"{first} <alice> hello room", f"{second} * alice waves"]
            assert re.fullmatch(HH_MM + "-- 2 earlier messages above", lines[3]), term.text()
            # Ctrl-C leaves too. Typed once the prompt is up: before, the terminal
            # keeps Ctrl-C's signal (a client waiting for the server can be
            # stopped), and this pty, the controlling terminal of no process,
            # would swallow it. (It did once: the client waited for ever.)
            await term.wait_for(lambda t: _typing(t, ""))
            await term.type("\x03")
            assert await term.wait_exit() == 0
        nursery.cancel_scope.cancel()
    assert received == ["/nick bob", "/history", "/who", "/quit"]


async def test_terminal_server_shutdown_mid_typing_restores_the_terminal() -> None:
    async with running(ChatService(port=0)) as (server, port):
        argv = [*CLIENT, "--nick", "bob", "--port", str(port)]
        async with run_in_terminal(argv) as term:
            await term.wait_for("-- here: bob")
            await term.type("never sent")
            await term.wait_for(lambda t: _typing(t, "never sent"))
            server.shutdown()
            assert await term.wait_exit() == 4, term.text()
            await term.wait_for("chat: server closed the session: BYE shutdown")
            assert "Traceback" not in term.text()
            assert _restored(term)


async def test_terminal_keys_typed_while_no_prompt_is_up_reach_the_next_prompt() -> None:
    # Ctrl-D typed while the client waits for the server (here: before its
    # first prompt, the answer to /nick held back until the key is in) must
    # still leave, as at the prompt. In the terminal's own line mode it was
    # taken as end of input by the terminal itself and never reached the
    # prompt: the client stayed (a pty test that typed it just after /help
    # failed so, now and then).
    asked = trio.Event()
    typed = trio.Event()
    after_nick: list[str] = []

    async def server(stream: trio.SocketStream) -> None:
        conn = trionet.Connection(stream)
        assert await conn.receive_line() == "/nick bob"
        asked.set()
        await typed.wait()
        await conn.send_line("OK nick bob")
        with trio.fail_after(30):
            while (line := await conn.receive_line()) is not None:
                after_nick.append(line)
                if line == "/quit":
                    await conn.send_line("BYE")
                    return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with run_in_terminal([*CLIENT, "--nick", "bob", "--port", str(port)]) as term:
            with trio.fail_after(30):
                await asked.wait()  # the terminal is open, no prompt yet
            await term.type("\x04")
            await trio.sleep(0.2)  # (ordering only: the terminal has the key before a prompt)
            typed.set()
            assert await term.wait_exit() == 0, term.text()
            assert after_nick == ["/history", "/who", "/quit"], term.text()
            assert _restored(term)
        nursery.cancel_scope.cancel()
