"""The chat client: ``python -m trionet.client chat``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import deque
from typing import Final, TextIO

import trio

from ..._client import (
    EXIT_DROPPED,
    EXIT_OK,
    EXIT_PROTOCOL,
    ClientError,
    add_address_arguments,
    connect_args,
    run_client,
)
from ..._connection import Connection, LineError
from ..._terminal import Terminal, is_terminal, open_terminal
from .server import ChatService
from .text import Me, Message, Private, parse_line, sanitize

__all__ = ["client_main", "render", "time_of"]


def render(line: str) -> str | None:
    """How the client shows one server line to a person (``None``: show nothing)."""
    keyword, _, rest = sanitize(line).partition(" ")
    nick, _, text = rest.partition(" ")
    match keyword:
        case "MSG":
            return f"<{nick}> {text}"
        case "ACTION":
            return f"* {nick} {text}"
        case "PRIV":
            return f"[private] <{nick}> {text}"
        case "JOIN":
            return f"-- {nick} joined"
        case "LEAVE":
            return f"-- {nick} left ({text})" if text else f"-- {nick} left"
        case "NICK":
            return f"-- {nick} is now {text}"
        case "WHO":
            return f"-- here: {rest}"
        case "HIST":  # HIST <unix-ms> MSG|ACTION <nick> <text>: shown as it was
            return render(text)
        case "HELP":
            return f"-- commands: {rest}"
        case "OK" if nick == "nick":
            return f"-- you are {text}"
        case "OK" if nick == "history":
            if text == "0":
                return "-- no earlier messages"
            return f"-- {text} earlier {'message' if text == '1' else 'messages'} above"
        case "OK":
            return f"-- ok {rest}"
        case "ERR":
            return f"-- error: {rest}"
        case "WELCOME":
            return None
        case _:
            return f"-- {line}"


def client_main(argv: list[str]) -> int:
    """``python -m trionet.client chat --nick NAME``: a line-mode chat client."""
    parser = argparse.ArgumentParser(
        prog="python -m trionet.client chat",
        description=(
            "Join a trionet chat room as NAME. Lines typed (or piped) on standard "
            "input are sent as messages; lines starting with '/' are commands passed "
            "to the server (/me ACTION, /msg NICK TEXT, /who, /nick NEW, /quit "
            "[REASON], /history [N], /help; '//text' sends '/text'). The room is printed "
            "as it happens. At the end of input the client says /quit and exits. On a "
            "terminal the line being typed stays intact below what arrives, with line "
            "editing and history (Up/Down, Ctrl-R); every line shows its time (HH:MM), "
            "your own messages are shown too, and the room's recent messages are shown "
            "on joining. Ctrl-D or Ctrl-C leaves."
        ),
        epilog="exit status: 0 done, 3 cannot connect, 4 connection lost or closed by "
        "the server, 5 refused (bad or taken nick)"
        ", 10 TLS handshake failed (certificate not trusted or not for --host)",
    )
    parser.add_argument(
        "--nick",
        required=True,
        metavar="NAME",
        help="the nick to join with: 1-32 of A-Z a-z 0-9 _ - (required, no default)",
    )
    add_address_arguments(parser, ChatService.default_port)
    args = parser.parse_args(argv)
    return run_client(lambda: _client(args), "chat")


async def _client(args: argparse.Namespace) -> int:
    nick = args.nick
    stream = await connect_args(args, "chat")
    async with stream:
        if not is_terminal():
            return await _session(stream, nick, _Pipe())
        # On a terminal each sent line is shown again in the room's form, with
        # the time: the typed copy is erased after Enter.
        async with open_terminal(erase_typed=True) as terminal:
            return await _session(stream, nick, _Screen(terminal, nick))


class _Pipe:
    """Plain line mode (piped input, or output to a file): lines in, room out, as is."""

    after_join = b"/who\n"

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        self._unread = b""
        self._lines: deque[bytes] = deque()
        self._eof = False

    async def show(self, line: str) -> None:
        shown = render(line)
        if shown is not None:
            # A write to a full pipe blocks: keep it off the event loop.
            await trio.to_thread.run_sync(_print, sys.stdout, shown)

    async def read_line(self) -> str | None:
        # Blocking reads of the terminal or pipe, in a thread: making stdin
        # non-blocking would leak into the shell that shares it. os.read,
        # not sys.stdin: a thread left blocked in sys.stdin's buffered
        # reader holds its lock, and the interpreter aborts at exit when
        # the server ends the session first.
        while not self._lines:
            if self._eof:
                return None
            chunk = await trio.to_thread.run_sync(os.read, self._fd, 65536, abandon_on_cancel=True)
            if chunk:
                *lines, self._unread = (self._unread + chunk).split(b"\n")
                self._lines.extend(lines)
            else:
                self._eof = True
                if self._unread:  # a last line without LF
                    self._lines.append(self._unread)
        return self._lines.popleft().decode("utf-8", "replace").rstrip("\r")

    def sending(self, line: str) -> None:
        """Nothing to do: a script knows what it sends."""


class _Screen:
    """A person at a terminal: line editing, times, own lines, history on joining."""

    # The room's recent past first, then who is here.
    after_join = b"/history\n/who\n"

    def __init__(self, terminal: Terminal, nick: str) -> None:
        self._terminal = terminal
        self._nick = nick
        self._typed: deque[str] = deque()
        # Answers to the commands the client sends itself, not yet received:
        # an older server answers ``ERR unknown-command``, which is no news
        # to the person (PROTOCOL.md grew /history and /help later).
        self._asked = {"history"}

    async def show(self, line: str) -> None:
        keyword, _, rest = line.partition(" ")
        if keyword == "OK" and rest.startswith("nick "):
            self._nick = sanitize(rest[5:])
        if keyword == "OK" and rest.startswith("history "):
            self._asked.discard("history")
        if keyword == "ERR" and rest.startswith("unknown-command "):
            word = rest.partition(" ")[2].lstrip("/").lower()
            if word in self._asked:
                self._asked.discard(word)
                if word == "help":
                    self._say(f"-- commands: {FALLBACK_COMMANDS}")
                return
        if keyword == "HELP":
            self._asked.discard("help")
        shown = render(line)
        if shown is not None:
            self._terminal.print(f"{time_of(line)} {shown}")
        await trio.lowlevel.checkpoint()

    async def read_line(self) -> str | None:
        while not self._typed:
            typed = await self._terminal.read_line(f"{self._nick}> ")
            if typed is None:
                return None
            # A paste may hold several lines: each is a line of its own.
            self._typed.extend(typed.splitlines())
        return self._typed.popleft()

    def sending(self, line: str) -> None:
        """Show what the person sends as the others see it (the server sends no copy)."""
        if line.split(" ", 1)[0].lower() == "/help":
            self._asked.add("help")
            for help_line in KEYS_HELP:
                self._say(help_line)
            return
        # Shown as relayed: sanitized, and not at all if nothing is left.
        match parse_line(line):
            case Message(text) if text := sanitize(text):
                self._say(f"<{self._nick}> {text}")
            case Me(text) if text := sanitize(text):
                self._say(f"* {self._nick} {text}")
            case Private(target, text) if text := sanitize(text):
                self._say(f"[private to {sanitize(target)}] <{self._nick}> {text}")

    def _say(self, text: str) -> None:
        self._terminal.print(f"{time_of('')} {text}")


#: The client's own keys, shown on ``/help`` beside the server's list of commands.
KEYS_HELP: Final = (
    "-- keys: Up/Down recall earlier lines, Ctrl-R searches them; Left/Right, Home/End move;",
    "--   Ctrl-W deletes a word, Ctrl-U the line; Ctrl-D or Ctrl-C leaves (as /quit).",
    "-- a line starting with '/' is a command; '//text' sends the message '/text'.",
)
#: Shown for /help when the server does not know the command yet.
FALLBACK_COMMANDS: Final = "/nick NEW, /me ACTION, /msg NICK TEXT, /who, /quit [REASON]"


async def _session(stream: trio.abc.Stream, nick: str, view: _Pipe | _Screen) -> int:
    conn = Connection(stream, max_line=1 << 20)
    await conn.send_line(f"/nick {nick}")
    # Wait for the answer to /nick before sending anything typed, so a
    # refused nick ends the client instead of sending lines that would
    # all get ERR no-nick.
    while True:
        line = await _receive(conn)
        if line.startswith("OK nick"):
            await view.show(line)
            # Newcomers are told of later arrivals only: ask who is here.
            await stream.send_all(view.after_join)
            break
        if line.startswith("ERR"):
            raise ClientError(f"chat: nick refused: {line[4:]}", EXIT_PROTOCOL)
        if line.startswith("BYE"):
            raise ClientError(f"chat: server closed the session: {line}", EXIT_DROPPED)
        await view.show(line)
    quitting = False

    async def type_lines() -> None:
        nonlocal quitting
        # Only this task sends, so it writes to the stream directly.
        while (text := await view.read_line()) is not None:
            # Set before sending: the BYE may arrive before send_all returns.
            quitting = text.lower().split(" ", 1)[0] == "/quit"
            # Shown before sending, so it comes before any answer to it.
            view.sending(text)
            await stream.send_all(text.encode() + b"\n")
            if quitting:
                return
        quitting = True
        await stream.send_all(b"/quit\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(type_lines)
        while True:
            line = await _receive(conn)
            if line.startswith("BYE"):
                if line == "BYE" and quitting:
                    nursery.cancel_scope.cancel()
                    return EXIT_OK
                raise ClientError(f"chat: server closed the session: {line}", EXIT_DROPPED)
            await view.show(line)
    return EXIT_OK  # pragma: no cover - the loop only ends by return or raise


def time_of(line: str) -> str:
    """The ``HH:MM`` (local time) a line is shown with on a terminal.

    A ``HIST <unix-ms> ...`` line has its own time; any other line, or one
    whose time makes no sense, is shown with the time it arrived: now.
    """
    when = None
    if line.startswith("HIST "):
        with contextlib.suppress(IndexError, ValueError):
            when = int(line.split(" ", 2)[1]) / 1000
    try:
        return time.strftime("%H:%M", time.localtime(when))
    except (OverflowError, OSError, ValueError):  # out of the platform's range
        return time.strftime("%H:%M")


async def _receive(conn: Connection) -> str:
    try:
        line = await conn.receive_line()
    except LineError as exc:
        raise ClientError(f"chat: the server sent a bad line: {exc}", EXIT_PROTOCOL) from None
    if line is None:
        raise ClientError("chat: connection closed by the server", EXIT_DROPPED)
    return line


def _print(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)
