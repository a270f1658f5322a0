"""guess: the number-guessing game (port 7002), server and client.

Each connection plays its own game: the server draws a secret whole number
in ``lo..hi`` and answers each guess with ``HIGHER``, ``LOWER`` or
``CORRECT n`` (then a new round starts at once); ``GIVEUP`` reveals the
secret, ``STATS`` shows server-wide statistics (a trionet extension,
see docs/protocol/guess.md), ``QUIT`` ends the session.

The rules live in :mod:`trionet.services.guess.rules` (no I/O); this module
only maps lines to moves and outcomes to lines, and holds what all
connections share: the range, the random source and the statistics.

``QUIT`` is answered by the connection itself (a line service's built-in
``QUIT`` -> ``BYE``), so the handler only ever sees moves.

The client (``python -m trionet.client guess``) is interactive for a person
by default, and with ``--auto`` plays by bisection and prints the
transcript.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from typing import Any, ClassVar, Self

import attrs
import trio

from ..._connection import Connection
from ..._redis import add_redis_argument, validate_redis_cafile, validate_redis_url
from ..._service import Service
from .rules import (
    Blank,
    Correct,
    Game,
    GiveUp,
    Guess,
    Move,
    NotANumber,
    Quit,
    ShowStats,
    Stats,
    format_outcome,
    format_stats,
    parse_move,
)
from .shared import SharedStats

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
    #: This process's statistics, shared by its connections (Trio runs them
    #: on one thread: no lock).
    stats: Stats = attrs.field(factory=Stats)
    #: ``redis://HOST:PORT[/DB]``: STATS over every process using it (``None``: off).
    redis: str | None = attrs.field(default=None, validator=validate_redis_url)
    #: With a ``rediss://`` URL: the certificate authority to trust (``None``: the system's).
    redis_cafile: str | None = attrs.field(default=None, validator=validate_redis_cafile)
    #: With ``redis``: the statistics every process shares.
    shared: SharedStats | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.redis is not None:
            self.shared = SharedStats(self.redis, cafile=self.redis_cafile)

    async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        """With ``redis``: apply wins and give-ups there, answer STATS from there."""
        if self.shared is None:
            task_status.started()
            return
        await self.shared.run(task_status=task_status)

    async def handle(self, conn: Connection) -> None:
        game = Game(self.lo, self.hi, self.rng)
        conn.write_line(format_outcome(game.new_round()))
        # write_line only queues: the connection flushes before it waits for
        # input, so a client that pipelines guesses gets its replies in one
        # segment, and a win's CORRECT + NEW leave together.
        shared = self.shared
        if shared is None:
            async for line in conn:
                self.respond(game, line, conn.write_line)
            return
        # With Redis only STATS waits (for the shared numbers); moves never do.
        async for line in conn:
            move = parse_move(line)
            if isinstance(move, ShowStats):
                conn.write_line(format_stats(await shared.totals(self.stats)))
            else:
                self.play(game, move, conn.write_line)

    def respond(self, game: Game, line: str, reply: Callable[[str], None]) -> None:
        """Pass the replies to one client line to ``reply``, in order.

        This is the only place lines become replies (``STATS`` here is this
        process's numbers; with Redis, :meth:`handle` answers it instead).
        """
        self.play(game, parse_move(line), reply)

    def play(self, game: Game, move: Move, reply: Callable[[str], None]) -> None:
        """Pass the replies to one move to ``reply``, in order."""
        match move:
            case Guess(value):
                outcome = game.guess(value)
                reply(format_outcome(outcome))
                if isinstance(outcome, Correct):
                    self.stats.record_win(outcome.attempts)
                    if self.shared is not None:
                        self.shared.record_win(outcome.attempts)
                    reply(format_outcome(game.new_round()))
            case GiveUp():
                reply(format_outcome(game.give_up()))
                self.stats.record_give_up()
                if self.shared is not None:
                    self.shared.record_give_up()
                reply(format_outcome(game.new_round()))
            case ShowStats():
                reply(format_stats(self.stats))
            case NotANumber():
                reply(format_outcome(NotANumber()))
            case Blank() | Quit():  # (QUIT never gets here: the connection answers it)
                pass

    def workers_problem(self, workers: int) -> str | None:
        """STATS are one set of numbers: more than one worker needs Redis."""
        if workers > 1 and self.redis is None:
            return (
                "STATS are kept in one process, so --workers above 1 would give each "
                "worker its own statistics (share them through Redis with --redis)"
            )
        return None

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
        add_redis_argument(group)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **common: Any) -> Self:
        lo, hi = getattr(args, "guess_range", (DEFAULT_LO, DEFAULT_HI))
        seed = getattr(args, "guess_seed", None)
        redis = getattr(args, "redis", None)
        cafile = getattr(args, "redis_cafile", None)
        return cls(
            lo=lo, hi=hi, rng=random.Random(seed), redis=redis, redis_cafile=cafile, **common
        )
