"""calc: a safe calculator (port 7005), server and client.

Every line, blank included, gets exactly one reply, in order: ``OK <value>``
or ``ERR <code> <text>``. ``ans`` is this connection's last ``OK`` value (0
at first). ``QUIT`` (any case) gets ``BYE`` and the connection closes.

All of the language lives in :mod:`trionet.services.calc_eval` (pure, no
I/O, every operation bounded before it runs); this module maps lines to
evaluations and results to reply lines.

Replies are queued with ``write_line`` and flushed before the connection
next waits for input, so a client that pipelines a thousand lines gets its
replies in a few large writes. Because a burst of buffered lines is
answered without waiting, the connection yields to the scheduler after a
few milliseconds of such work (``Connection.receive_line``'s run budget):
a client sending hostile lines in bulk cannot delay other connections by
more than that (each line is itself bounded to a few milliseconds).

The client (``python -m trionet.client calc``) evaluates the expressions
given as arguments, or the lines of a piped standard input, or runs a
read-eval-print loop on a terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import ClassVar, Final

import attrs
import trio

from .._client import (
    EXIT_DROPPED,
    EXIT_OK,
    EXIT_PROTOCOL,
    ClientError,
    add_address_arguments,
    connect,
    run_client,
)
from .._connection import Connection, LineError
from .._service import Service
from .calc_eval import CalcError, Number, evaluate, format_value

__all__ = ["SERVICE", "CalcService", "answer_line", "client_main", "describe_error"]


def is_quit(line: str) -> bool:
    """True for ``QUIT`` in any case (ASCII only), surrounding blanks allowed."""
    word = line.strip()
    return len(word) == 4 and word.isascii() and word.lower() == "quit"


def answer_line(line: str, ans: Number) -> tuple[str, Number]:
    """The reply to one expression line, and the new ``ans``.

    Pure: ``ans`` changes only when the reply is ``OK``.
    """
    try:
        value = evaluate(line, ans)
    except CalcError as exc:
        return f"ERR {exc.code} {exc.text}", ans
    return "OK " + format_value(value), value


@attrs.define(kw_only=True, eq=False)
class CalcService(Service):
    """Evaluates arithmetic expressions, one reply per line."""

    name: ClassVar[str] = "calc"
    default_port: ClassVar[int] = 7005
    line_based: ClassVar[bool] = True
    summary: ClassVar[str] = "safe calculator: Python arithmetic, one OK/ERR reply per line"

    async def handle(self, conn: Connection) -> None:
        # Pipelined lines are answered in order; write_line queues replies
        # and the connection sends them together before it waits, and yields
        # to other connections after a few milliseconds of work on lines it
        # already holds, so a hostile client cannot hold the server.
        ans: Number = 0
        while (line := await conn.receive_line()) is not None:
            if is_quit(line):
                conn.end_reason = "quit"
                await conn.send_line("BYE")
                return
            reply, ans = answer_line(line, ans)
            conn.write_line(reply)


SERVICE = CalcService


# -- client ----------------------------------------------------------------------

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
            "or, on a terminal, an interactive prompt runs (QUIT or end of input "
            "leaves it). Errors are printed in words on standard error. "
            "'ans' is the last value. Put '--' before expressions that start with "
            "'-': python -m trionet.client calc -- -2**2"
        ),
        epilog=(
            "exit status: 0 every expression evaluated, 1 some expression failed, "
            "3 cannot connect, 4 connection lost, 5 unexpected reply"
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
    where = f"{expression}: " if expression is not None else ""
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


async def repl(session: CalcSession) -> int:
    """The interactive prompt: one expression, one answer, until QUIT or EOF."""
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
        stream = await connect(args.host, args.port, "calc")
        session = CalcSession(stream, args.timeout)
        async with stream:
            if args.expressions:
                return await evaluate_all(session, args.expressions)
            if sys.stdin.isatty():
                return await repl(session)
            lines = await trio.to_thread.run_sync(lambda: list(_stdin_lines()))
            return await evaluate_all(session, lines)

    return run_client(main, "calc")
