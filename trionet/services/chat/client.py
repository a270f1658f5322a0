"""The chat client: ``python -m trionet.client chat``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

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
from .server import ChatService
from .text import sanitize

__all__ = ["client_main", "render"]


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
        case "OK":
            return f"-- you are {text}" if nick == "nick" else f"-- ok {rest}"
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
            "[REASON]; '//text' sends '/text'). The room is printed as it happens. "
            "At the end of input the client says /quit and exits."
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
    conn = Connection(stream, max_line=1 << 20)
    out = sys.stdout

    async def show(line: str) -> None:
        shown = render(line)
        if shown is not None:
            # A write to a full pipe blocks: keep it off the event loop.
            await trio.to_thread.run_sync(_print, out, shown)

    async with stream:
        await conn.send_line(f"/nick {nick}")
        # Wait for the answer to /nick before sending anything typed, so a
        # refused nick ends the client instead of sending lines that would
        # all get ERR no-nick.
        while True:
            line = await _receive(conn)
            if line.startswith("OK nick"):
                await show(line)
                # Newcomers are told of later arrivals only: ask who is here.
                await stream.send_all(b"/who\n")
                break
            if line.startswith("ERR"):
                raise ClientError(f"chat: nick refused: {line[4:]}", EXIT_PROTOCOL)
            if line.startswith("BYE"):
                raise ClientError(f"chat: server closed the session: {line}", EXIT_DROPPED)
            await show(line)
        quitting = False

        async def type_lines() -> None:
            nonlocal quitting
            # Blocking reads of the terminal or pipe, in a thread: making stdin
            # non-blocking would leak into the shell that shares it. os.read,
            # not sys.stdin: a thread left blocked in sys.stdin's buffered
            # reader holds its lock, and the interpreter aborts at exit when
            # the server ends the session first. Only this task sends, so it
            # writes to the stream directly.
            fd = sys.stdin.fileno()
            pending = b""
            while chunk := await trio.to_thread.run_sync(
                os.read, fd, 65536, abandon_on_cancel=True
            ):
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    text = raw.decode("utf-8", "replace").rstrip("\r")
                    # Set before sending: the BYE may arrive before send_all returns.
                    quitting = text.lower().split(" ", 1)[0] == "/quit"
                    await stream.send_all(text.encode() + b"\n")
                    if quitting:
                        return
            if pending:  # a last line without LF
                await stream.send_all(pending + b"\n")
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
                await show(line)
    return EXIT_OK  # pragma: no cover - the loop only ends by return or raise


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
