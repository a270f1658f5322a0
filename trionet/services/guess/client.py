"""The guess client: ``python -m trionet.client guess``."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Awaitable, Callable

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
from ..._terminal import is_terminal, open_terminal
from .rules import (
    Answer,
    Bisector,
    Bye,
    Correct,
    Error,
    Hint,
    NewRound,
    Reply,
    StatsReply,
    parse_number,
    parse_reply,
)
from .server import GuessService

__all__ = ["ServerSession", "client_main", "play_auto", "play_interactive"]


class ServerSession:
    """The client's view of a connection: send lines, read parsed replies."""

    def __init__(self, stream: trio.abc.Stream, *, timeout: float | None = None) -> None:
        # A client accepts long lines; it polices meaning, not size.
        self.conn = Connection(stream, max_line=1 << 20)
        self.timeout = timeout
        #: The last line received, as sent (for transcripts).
        self.last_line = ""

    async def send(self, line: str) -> None:
        """Send one line."""
        await self.conn.send_line(line)

    async def receive(self) -> Reply:
        """The next reply; :class:`ClientError` on EOF, garbage or timeout."""
        try:
            with trio.fail_after(self.timeout or float("inf")):
                line = await self.conn.receive_line()
        except trio.TooSlowError:
            raise ClientError(
                f"guess: no reply from the server in {self.timeout}s", EXIT_DROPPED
            ) from None
        except LineError:
            raise ClientError(
                "guess: the server sent a line that is not UTF-8", EXIT_PROTOCOL
            ) from None
        if line is None:
            raise ClientError("guess: connection lost: the server closed it", EXIT_DROPPED)
        self.last_line = line
        try:
            return parse_reply(line)
        except ValueError as exc:
            raise ClientError(f"guess: {exc}", EXIT_PROTOCOL) from None

    async def expect_new(self) -> NewRound:
        """Read the ``NEW lo hi`` that starts a round."""
        reply = await self.receive()
        if isinstance(reply, NewRound):
            return reply
        raise _unexpected(reply, "NEW")

    async def quit(self) -> None:
        """Send ``QUIT`` and wait for ``BYE``."""
        await self.send("QUIT")
        reply = await self.receive()
        if not isinstance(reply, Bye):
            raise _unexpected(reply, "BYE")

    async def aclose(self) -> None:
        """Close the connection."""
        await self.conn.aclose()


def _unexpected(reply: Reply, wanted: str) -> ClientError:
    if isinstance(reply, Bye):
        why = f" ({reply.reason})" if reply.reason else ""
        return ClientError(f"guess: the server closed the connection{why}", EXIT_DROPPED)
    if isinstance(reply, Error):
        return ClientError(f"guess: server error {reply.code} (expected {wanted})", EXIT_PROTOCOL)
    return ClientError(f"guess: expected {wanted} from the server, got {reply!r}", EXIT_PROTOCOL)


async def play_auto(session: ServerSession, rounds: int, say: Callable[[str], None]) -> list[int]:
    """Play ``rounds`` rounds by bisection, reporting every line through ``say``.

    Returns the number of guesses each round took (as the server counted
    them in ``CORRECT n``), then quits.
    """
    counts = []
    new = await session.expect_new()
    say(f"S: NEW {new.lo} {new.hi}")
    for _ in range(rounds):
        player = Bisector(new.lo, new.hi)
        while True:
            try:
                guess = player.next_guess()
            except ValueError as exc:
                raise ClientError(f"guess: {exc}", EXIT_PROTOCOL) from None
            await session.send(str(guess))
            say(f"C: {guess}")
            reply = await session.receive()
            say(f"S: {session.last_line}")
            if isinstance(reply, Hint):
                player.hint(reply.higher)
            elif isinstance(reply, Correct):
                counts.append(reply.attempts)
                break
            else:
                raise _unexpected(reply, "HIGHER, LOWER or CORRECT")
        new = await session.expect_new()
        say(f"S: NEW {new.lo} {new.hi}")
    await session.send("QUIT")
    say("C: QUIT")
    reply = await session.receive()
    if not isinstance(reply, Bye):
        raise _unexpected(reply, "BYE")
    say("S: BYE")
    return counts


#: Reads one line typed by the player after showing a prompt; ``None`` at EOF.
Ask = Callable[[str], Awaitable[str | None]]

_YES = {"", "y", "yes"}


def _describe_stats(s: StatsReply) -> str:
    if s.best is None or s.avg is None:
        return f"Server stats: {s.played} games played, none won yet."
    return (
        f"Server stats: {s.played} games played, {s.won} won, "
        f"best {s.best} guesses, average {s.avg:.2f}."
    )


async def play_interactive(session: ServerSession, ask: Ask, say: Callable[[str], None]) -> None:
    """Let a person play: prompts, hints in words, the attempt count, replay.

    ``ask`` shows a prompt and returns the typed line (``None`` at end of
    input, which quits); ``say`` prints a line.
    """
    new = await session.expect_new()
    say(f"I'm thinking of a whole number from {new.lo} to {new.hi}.")
    say("Type a guess, or: giveup, stats, quit.")
    attempts = 0
    while True:
        typed = await ask(f"guess #{attempts + 1}> ")
        if typed is None or typed.strip().lower() in ("quit", "q", "exit"):
            await session.quit()
            say("Bye!")
            return
        text = typed.strip()
        if not text:
            continue
        await session.send(text)
        reply = await session.receive()
        number = parse_number(text)
        round_over = False
        match reply:
            case Hint(higher):
                attempts += 1
                say(f"{'higher' if higher else 'lower'} than {number}")
            case Correct(n):
                say(f"Correct! {number} it is, in {n} {'guess' if n == 1 else 'guesses'}.")
                round_over = True
            case Answer(secret):
                say(f"You gave up: the number was {secret}.")
                round_over = True
            case StatsReply():
                say(_describe_stats(reply))
            case Error("not-a-number"):
                say("That is not a whole number (nor giveup, stats or quit).")
            case Error("out-of-range", (lo, hi)):
                say(f"Out of range: pick a number from {lo} to {hi}. (That did not count.)")
            case Error(code):  # line-too-long, bad-encoding: the line was refused
                say(f"The server refused that line ({code}); it did not count.")
            case _:
                raise _unexpected(reply, "a reply to a guess")
        if round_over:
            new = await session.expect_new()
            attempts = 0
            again = await ask("Play again? [Y/n] ")
            if again is None or again.strip().lower() not in _YES:
                await session.quit()
                say("Bye!")
                return
            say(f"New game: a whole number from {new.lo} to {new.hi}.")


def build_client_parser() -> argparse.ArgumentParser:
    """The ``python -m trionet.client guess`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m trionet.client guess",
        description=(
            "Play the guessing game. By default you play: type a guess and the "
            "client says 'higher than 50' or 'lower than 75' and counts your "
            "guesses; 'giveup', 'stats' and 'quit' also work, and after each "
            "round you may play again. With --auto the client plays by bisection, "
            "never needing more than floor(log2(HI-LO+1))+1 guesses a round, "
            "prints the transcript (C: sent, S: received) and exits 0."
        ),
        epilog="exit status: 0 done, 2 bad options, 3 cannot connect, "
        "4 connection lost or timed out, 5 unexpected reply from the server"
        ", 10 TLS handshake failed (certificate not trusted or not for --host)",
    )
    add_address_arguments(parser, GuessService.default_port)
    parser.add_argument(
        "--auto", action="store_true", help="play automatically by bisection (default: off)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="with --auto: rounds to play before quitting (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --auto: give up if a reply takes longer than this (default: %(default)s)",
    )
    return parser


def client_main(argv: list[str]) -> int:
    """``python -m trionet.client guess``: play, or let bisection play (``--auto``)."""
    parser = build_client_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    # A person may type (or paste) bytes that are not UTF-8: send them as
    # U+FFFD rather than die on a decoding error.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")

    def say(line: str) -> None:
        if line:
            print(line, flush=True)

    async def ask(prompt: str) -> str | None:
        print(prompt, end="", flush=True)
        typed: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not typed:
            print(flush=True)
            return None
        return typed.rstrip("\r\n")

    async def main() -> int:
        stream = await connect_args(args, "guess")
        session = ServerSession(stream, timeout=args.timeout if args.auto else None)
        async with stream:
            if args.auto:
                await play_auto(session, args.rounds, say)
            elif is_terminal():  # line editing, and Up recalls earlier guesses
                async with open_terminal() as terminal:
                    await play_interactive(session, terminal.read_line, terminal.print)
            else:
                await play_interactive(session, ask, say)
        return EXIT_OK

    return run_client(main, "guess")
