"""The calc client: ``python -m trionet.client calc``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Final

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
from .server import CalcService, is_quit

#: PROTOCOL.md's error codes (and the framing ones), in words for people.
ERROR_WORDS: Final = {
    "syntax": "syntax error",
    "not-allowed": "not allowed",
    "zero-division": "division by zero",
    "too-large": "result too large",
    "domain": "outside the function's domain",
    "line-too-long": "expression too long",
    "bad-encoding": "not valid UTF-8",
}

__all__ = ["CalcSession", "client_main", "describe_error", "edited_repl", "evaluate_all", "repl"]


def describe_error(reply: str) -> str:
    """An ``ERR code text`` reply in words: ``division by zero: ...``."""
    _, _, rest = reply.partition(" ")
    code, _, text = rest.partition(" ")
    words = ERROR_WORDS.get(code, f"error {code}")
    if code == "line-too-long":
        return f"{words} (the server accepts {text} bytes)" if text else words
    return f"{words}: {text}" if text and text != words else words


def build_client_parser() -> argparse.ArgumentParser:
    """The ``python -m trionet.client calc`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m trionet.client calc",
        description=(
            "Evaluate arithmetic expressions on a trionet calc server. With EXPR "
            "arguments, each is evaluated and its value printed, one per line. "
            "Without, the lines of standard input are evaluated (a pipe or file), "
            "or, on a terminal, an interactive prompt runs, with line editing and "
            "history (Up/Down, Ctrl-R; QUIT, Ctrl-D or Ctrl-C leaves it). Errors "
            "are printed in words on standard error. "
            "'ans' is the last value. Put '--' before expressions that start with "
            "'-': python -m trionet.client calc -- -2**2"
        ),
        epilog=(
            "exit status: 0 every expression evaluated, 1 some expression failed, "
            "3 cannot connect, 4 connection lost, 5 unexpected reply"
            ", 10 TLS handshake failed (certificate not trusted or not for --host)"
        ),
    )
    parser.add_argument(
        "expressions", nargs="*", metavar="EXPR", help="expressions to evaluate (default: none)"
    )
    add_address_arguments(parser, CalcService.default_port)
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up when the server sends no reply for this long (default: %(default)s)",
    )
    return parser


class CalcSession:
    """A client connection: send expression lines, read their replies."""

    def __init__(self, stream: trio.abc.Stream, timeout: float) -> None:
        self.conn = Connection(stream, max_line=1 << 20)
        self.timeout = timeout

    async def send(self, line: str) -> None:
        """Send one expression line."""
        await self.conn.send_line(line)

    async def reply(self) -> str:
        """The next reply line, checked to be ``OK`` or ``ERR``."""
        try:
            with trio.fail_after(self.timeout):
                line = await self.conn.receive_line()
        except trio.TooSlowError:
            raise ClientError(
                f"calc: no reply from the server in {self.timeout:g}s", EXIT_DROPPED
            ) from None
        except LineError as exc:
            raise ClientError(f"calc: unreadable reply: {exc}", EXIT_PROTOCOL) from None
        if line is None:
            raise ClientError("calc: the server closed the connection", EXIT_DROPPED)
        if line.startswith("BYE"):
            reason = line[3:].strip() or "closed"
            raise ClientError(f"calc: the server ended the session ({reason})", EXIT_DROPPED)
        if not (line.startswith("OK ") or line.startswith("ERR ")):
            raise ClientError(f"calc: unexpected reply {line[:80]!r}", EXIT_PROTOCOL)
        return line


def _print_reply(reply: str, expression: str | None) -> bool:
    """Print a reply (value to stdout, error in words to stderr); True if OK."""
    if reply.startswith("OK "):
        print(reply[3:], flush=True)
        return True
    if expression is None:
        where = ""
    elif not expression.strip():
        where = "(empty line): "  # a blank line has no text to name it by
    else:
        where = f"{expression}: "
    print(f"{where}{describe_error(reply)}", file=sys.stderr, flush=True)
    return False


async def evaluate_all(session: CalcSession, lines: Iterable[str]) -> int:
    """Pipeline ``lines`` to the server and print each reply; 0 if all were OK.

    Sending runs beside receiving: with many lines, a client that sent
    everything before reading would fill both socket buffers and deadlock
    with the server.
    """
    sent: trio.MemorySendChannel[str]
    sent, pending = trio.open_memory_channel[str](64)
    failed = False

    async def sender() -> None:
        async with sent:
            for line in lines:
                await session.send(line)
                await sent.send(line)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        async for line in pending:
            ok = _print_reply(await session.reply(), line)
            failed = failed or not ok
    return 1 if failed else EXIT_OK


async def edited_repl(session: CalcSession, terminal: Terminal) -> int:
    """The prompt on a terminal: line editing, Up/Down history, Ctrl-R search.

    Blank lines are skipped here (a person pressing Enter wants no syntax
    error); Ctrl-D, Ctrl-C or QUIT leaves.
    """
    while (typed := await terminal.read_line("calc> ")) is not None:
        # A paste may hold several lines: each is an expression.
        for line in typed.splitlines():
            if is_quit(line):
                return EXIT_OK
            if not line.strip():
                continue
            await session.send(line)
            reply = await session.reply()
            # Errors too go through the terminal (not stderr), so they stay
            # in order above the prompt.
            terminal.print(reply[3:] if reply.startswith("OK ") else describe_error(reply))
    return EXIT_OK


async def repl(session: CalcSession) -> int:
    """The plain prompt (no line editing): one expression, one answer, until QUIT or EOF."""
    failed = False
    while True:
        print("calc> ", end="", flush=True)
        typed: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not typed:
            print(flush=True)
            return EXIT_OK
        line = typed.rstrip("\r\n")
        if is_quit(line):
            return EXIT_OK
        await session.send(line)
        failed = not _print_reply(await session.reply(), None) or failed


def _stdin_lines() -> Iterable[str]:
    for raw in sys.stdin:
        yield raw.rstrip("\r\n")


def client_main(argv: list[str]) -> int:
    """``python -m trionet.client calc``: evaluate arguments, piped lines, or a REPL."""
    args = build_client_parser().parse_args(argv)
    for expr in args.expressions:
        if "\n" in expr or "\r" in expr:
            print("calc: an expression may not contain a line break", file=sys.stderr)
            return 2

    async def main() -> int:
        stream = await connect_args(args, "calc")
        session = CalcSession(stream, args.timeout)
        async with stream:
            if args.expressions:
                return await evaluate_all(session, args.expressions)
            if is_terminal():
                async with open_terminal() as terminal:
                    return await edited_repl(session, terminal)
            if sys.stdin.isatty():  # a terminal we cannot drive (stdout redirected)
                return await repl(session)
            lines = await trio.to_thread.run_sync(lambda: list(_stdin_lines()))
            return await evaluate_all(session, lines)

    return run_client(main, "calc")
