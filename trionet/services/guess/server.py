"""guess: the number-guessing game (port 7002), server and client.

Each connection plays its own game: the server draws a secret whole number
in ``lo..hi`` and answers each guess with ``HIGHER``, ``LOWER`` or
``CORRECT n`` (then a new round starts at once); ``GIVEUP`` reveals the
secret, ``STATS`` shows server-wide statistics (a trionet extension,
see docs/protocol/guess.md), ``QUIT`` ends the session.

The rules live in :mod:`trionet.services.guess.rules` (no I/O); this module
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
import os
import random
from typing import Any, ClassVar, Self

import attrs
import trio

from ..._connection import RECEIVE_SIZE, Connection, translate_os_error
from ..._framing import LineBuffer
from ..._service import Service
from .rules import (
    Blank,
    Correct,
    Game,
    GiveUp,
    Guess,
    NotANumber,
    Quit,
    ShowStats,
    Stats,
    format_outcome,
    format_stats,
    parse_move,
)

__all__ = ["GuessService"]

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
