"""guess: the number-guessing game (port 7002), server and client.

Each connection plays its own game: the server draws a secret whole number
in ``lo..hi`` and answers each guess with ``HIGHER``, ``LOWER`` or
``CORRECT n`` (then a new round starts at once); ``GIVEUP`` reveals the
secret, ``STATS`` shows server-wide statistics (a trionet extension,
see docs/protocol/guess.md), ``QUIT`` ends the session.

The rules live in :mod:`trionet.services.guess_rules` (no I/O); this module
only maps lines to moves and outcomes to lines, and holds what all
connections share: the range, the random source and the statistics.

Two serving paths, one behaviour (the tests run every conversation over
both): the generic path works on any stream (memory streams in tests, TLS);
the fast path, for a plain TCP socket, reads and writes the descriptor
directly, like echo's, to spend less per tiny request/reply exchange.

The client (``python -m trionet.client guess``) is interactive for a person
by default, and with ``--auto`` plays by bisection and prints the
transcript.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Self

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
from .._connection import RECEIVE_SIZE, Connection, LineError, translate_os_error
from .._framing import LineBuffer
from .._service import Service
from .guess_rules import (
    Answer,
    Bisector,
    Blank,
    Bye,
    Correct,
    Error,
    Game,
    GiveUp,
    Guess,
    Hint,
    NewRound,
    NotANumber,
    Quit,
    Reply,
    ShowStats,
    Stats,
    StatsReply,
    format_outcome,
    format_stats,
    parse_move,
    parse_number,
    parse_reply,
)

__all__ = [
    "SERVICE",
    "GuessService",
    "ServerSession",
    "client_main",
    "play_auto",
    "play_interactive",
]

DEFAULT_LO = 1
DEFAULT_HI = 100


def _check_range(inst: GuessService, attr: attrs.Attribute[int], hi: int) -> None:
    if inst.lo > hi:
        raise ValueError(f"--range needs LO <= HI, got {inst.lo} {hi}")


@attrs.define(kw_only=True, eq=False)
class GuessService(Service):
    """The guessing game. ``rng`` is the injected random source for secrets."""

    name: ClassVar[str] = "guess"
    default_port: ClassVar[int] = 7002
    line_based: ClassVar[bool] = True
    default_idle_timeout: ClassVar[float] = 300.0
    summary: ClassVar[str] = "guess the secret number: HIGHER / LOWER / CORRECT n"

    lo: int = DEFAULT_LO
    hi: int = attrs.field(default=DEFAULT_HI, validator=_check_range)
    #: Every connection draws its secrets from this one source, so a seeded
    #: source makes a server's games reproducible in connection order.
    rng: random.Random = attrs.field(factory=random.Random)
    #: Shared by all connections (Trio runs them on one thread: no lock).
    stats: Stats = attrs.field(factory=Stats)

    #: Take the descriptor fast path for plain TCP sockets (see :meth:`_serve_socket`).
    fast_path: bool = True

    async def handle(self, conn: Connection) -> None:
        game = Game(self.lo, self.hi, self.rng)
        stream = conn.stream
        if self.fast_path and type(stream) is trio.SocketStream:
            await self._serve_socket(conn, stream.socket.fileno(), game)
        else:
            await self._serve_stream(conn, game)

    def respond(self, game: Game, line: str, out: list[str]) -> bool:
        """Append the replies to one client line to ``out``; True if it was ``QUIT``.

        Shared by both paths: this is the only place moves become replies.
        """
        match parse_move(line):
            case Guess(value):
                outcome = game.guess(value)
                out.append(format_outcome(outcome))
                if isinstance(outcome, Correct):
                    self.stats.record_win(outcome.attempts)
                    out.append(format_outcome(game.new_round()))
            case Blank():
                pass
            case GiveUp():
                out.append(format_outcome(game.give_up()))
                self.stats.record_give_up()
                out.append(format_outcome(game.new_round()))
            case ShowStats():
                out.append(format_stats(self.stats))
            case NotANumber():
                out.append(format_outcome(NotANumber()))
            case Quit():
                out.append("BYE")
                return True
        return False

    async def _serve_stream(self, conn: Connection, game: Game) -> None:
        """The generic path: any stream (memory streams in tests, TLS)."""
        conn.write_line(format_outcome(game.new_round()))
        out: list[str] = []
        # write_line only queues: the connection flushes before it waits for
        # input, so a client that pipelines guesses gets its replies in one
        # segment, and a win's CORRECT + NEW leave together.
        async for line in conn:
            done = self.respond(game, line, out)
            for reply in out:
                conn.write_line(reply)
            out.clear()
            if done:
                conn.end_reason = "quit"
                break
        # Also answers a last line sent without LF just before EOF.
        await conn.flush()

    async def _serve_socket(self, conn: Connection, fd: int, game: Game) -> None:
        """The fast path on a TCP socket's descriptor (non-blocking, as Trio sets it).

        Why: a guess exchange is one tiny request and one tiny reply, so the
        cost is all per-message overhead. Trio's ``SocketStream`` tries each
        ``recv`` before waiting (a wasted ``EAGAIN`` system call when the
        client is waiting for us) and yields to the scheduler after every
        ``send`` that succeeded at once; here a request costs one readiness
        wait, one read and one write. Behaviour is the generic path's:
        ``conn.wait_readable`` applies the idle deadline and graceful
        shutdown, :class:`~trionet.LineBuffer` frames lines with the same
        limits, framing errors go to ``on_line_error``, byte counts are kept,
        and replies go through ``conn.send_all`` (one ``os.write`` when the
        kernel takes it whole). Measured with ``scripts/bench_guess.py``: this
        path 1.18x the plain-Trio baseline, ``Connection``'s generic line
        path 0.98x, so the read side is kept here until the core's catches up.
        """
        lines = LineBuffer(conn.max_line)
        out = [format_outcome(game.new_round())]
        done = False
        while True:
            if out:
                await conn.send_all(("\n".join(out) + "\n").encode(), checkpoint=False)
                out.clear()
            if done:
                conn.end_reason = "quit"
                return
            if lines.at_eof:
                return
            await conn.wait_readable(fd)
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise translate_os_error(exc) from exc
            if data:
                conn.bytes_in += len(data)
                lines.feed(data)
            else:
                conn.eof_received = True
                lines.feed_eof()
            while not done and (event := lines.next_event()) is not None:
                if isinstance(event, str):
                    done = self.respond(game, event, out)
                else:
                    # Rare: keep the order of replies, then let the hook answer.
                    if out:
                        await conn.send_all(("\n".join(out) + "\n").encode(), checkpoint=False)
                        out.clear()
                    await self.on_line_error(conn, event)

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--range",
            dest="guess_range",
            nargs=2,
            type=int,
            metavar=("LO", "HI"),
            default=[DEFAULT_LO, DEFAULT_HI],
            help="secrets are whole numbers LO..HI, LO <= HI; a one-number range is "
            f"allowed (default: {DEFAULT_LO} {DEFAULT_HI})",
        )
        group.add_argument(
            "--seed",
            dest="guess_seed",
            type=int,
            default=None,
            metavar="N",
            help="seed the random source so every game is reproducible "
            "(default: unseeded, from the OS)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **common: Any) -> Self:
        lo, hi = getattr(args, "guess_range", (DEFAULT_LO, DEFAULT_HI))
        seed = getattr(args, "guess_seed", None)
        return cls(lo=lo, hi=hi, rng=random.Random(seed), **common)


SERVICE = GuessService

# -- client ----------------------------------------------------------------------


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
        "4 connection lost or timed out, 5 unexpected reply from the server",
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
        stream = await connect(args.host, args.port, "guess")
        session = ServerSession(stream, timeout=args.timeout if args.auto else None)
        async with stream:
            if args.auto:
                await play_auto(session, args.rounds, say)
            else:
                await play_interactive(session, ask, say)
        return EXIT_OK

    return run_client(main, "guess")
