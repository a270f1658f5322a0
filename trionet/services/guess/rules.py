"""The guessing game's rules, with no I/O: parsing, rounds, statistics, bisection.

Everything the guess server and its clients *decide* lives here as plain
functions and small classes; :mod:`trionet.services.guess.server` only moves lines
between these and the network. That split keeps the rules testable on their
own (no sockets, no Trio, no clock) and lets the benchmark's load generator
reuse the exact bisection player the ``--auto`` client uses.

Server side:

* :func:`parse_move` turns one received line into a :class:`Move`;
* :class:`Game` is one connection's game: the current round's secret, its
  attempt count, and what each move yields (:data:`Outcome`);
* :class:`Stats` holds the server-wide statistics shown by ``STATS``;
* :func:`format_outcome` turns an outcome into the reply lines.

Client side:

* :func:`parse_reply` turns a server line into a :data:`Reply`;
* :class:`Bisector` picks the next guess so that a round never takes more
  than ``floor(log2(n)) + 1`` guesses for ``n`` candidates, which is optimal
  (see :func:`optimal_worst_case`).
"""

from __future__ import annotations

import random
import re
from typing import Final

import attrs

__all__ = [
    "MAX_DIGITS",
    "Answer",
    "Bisector",
    "Blank",
    "Bye",
    "Correct",
    "Error",
    "Game",
    "GiveUp",
    "Guess",
    "Hint",
    "Move",
    "NewRound",
    "NotANumber",
    "OutOfRange",
    "Outcome",
    "Quit",
    "Reply",
    "ShowStats",
    "Stats",
    "StatsReply",
    "format_outcome",
    "format_stats",
    "optimal_worst_case",
    "parse_move",
    "parse_number",
    "parse_reply",
]

#: Numbers with more significant digits than this are not converted to
#: ``int`` at all: CPython refuses (and would take quadratic time for) huge
#: decimal strings, and such a number is outside any range a person can
#: type anyway, so it is treated as ``±10**MAX_DIGITS``, still out of range.
MAX_DIGITS: Final = 4300

# ASCII digits only (``re.ASCII``: "٣" is a digit to Python's ``int``, not
# to the protocol), one optional sign, spaces or tabs around. Underscores,
# hex, exponents and decimals are deliberately not matched.
_NUMBER = re.compile(r"[ \t]*([+-]?)([0-9]+)[ \t]*", re.ASCII)
_BLANK = re.compile(r"[ \t]*", re.ASCII)


def parse_number(text: str) -> int | None:
    """The whole number ``text`` spells in ASCII decimal, or ``None``.

    >>> parse_number(" -42 "), parse_number("1_0"), parse_number("0x10")
    (-42, None, None)
    """
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    digits = digits.lstrip("0") or "0"
    value = 10**MAX_DIGITS if len(digits) > MAX_DIGITS else int(digits)
    return -value if sign == "-" else value


# -- moves: what a client line means ---------------------------------------------


@attrs.frozen
class Guess:
    """A guess of ``value`` (not yet checked against the range)."""

    value: int


@attrs.frozen
class NotANumber:
    """A line that is neither a number nor a command."""


@attrs.frozen
class Blank:
    """An empty (or all-space) line: ignored, no reply."""


@attrs.frozen
class GiveUp:
    """``GIVEUP``: reveal the secret and start a new round."""


@attrs.frozen
class ShowStats:
    """``STATS``: the server-wide statistics (a trionet extension)."""


@attrs.frozen
class Quit:
    """``QUIT``: say ``BYE`` and close."""


Move = Guess | NotANumber | Blank | GiveUp | ShowStats | Quit

_COMMANDS: Final[dict[str, Move]] = {"GIVEUP": GiveUp(), "STATS": ShowStats(), "QUIT": Quit()}


def parse_move(line: str) -> Move:
    """What the client line ``line`` (terminator already removed) asks for.

    Commands are matched in any case with surrounding spaces ignored, as
    PROTOCOL.md says of ``QUIT``; guesses follow :func:`parse_number`.
    """
    if _BLANK.fullmatch(line):
        return Blank()
    number = parse_number(line)
    if number is not None:
        return Guess(number)
    return _COMMANDS.get(line.strip(" \t").upper(), NotANumber())


# -- outcomes: what the server answers -------------------------------------------


@attrs.frozen
class OutOfRange:
    """The guess was a number outside ``lo..hi``; it does not count."""

    lo: int
    hi: int


@attrs.frozen
class Hint:
    """A wrong guess: ``higher`` is True if the secret is above it."""

    higher: bool


@attrs.frozen
class Correct:
    """The guess was right, after ``attempts`` valid guesses."""

    attempts: int


@attrs.frozen
class Answer:
    """The client gave up; the secret was ``secret``."""

    secret: int


@attrs.frozen
class NewRound:
    """A new secret was drawn from ``lo..hi``."""

    lo: int
    hi: int


Outcome = NotANumber | OutOfRange | Hint | Correct | Answer | NewRound


def format_outcome(outcome: Outcome) -> str:
    """The reply line PROTOCOL.md gives for ``outcome``."""
    match outcome:
        case Hint(higher=True):
            return "HIGHER"
        case Hint():
            return "LOWER"
        case NotANumber():
            return "ERR not-a-number"
        case OutOfRange(lo, hi):
            return f"ERR out-of-range {lo} {hi}"
        case Correct(attempts):
            return f"CORRECT {attempts}"
        case Answer(secret):
            return f"ANSWER {secret}"
        case NewRound(lo, hi):
            return f"NEW {lo} {hi}"


def _check_range(inst: object, attr: attrs.Attribute[int], hi: int) -> None:
    lo: int = inst.lo  # type: ignore[attr-defined]
    if lo > hi:
        raise ValueError(f"range must have LO <= HI, got {lo} {hi}")


# Game and Bisector validate their range once, at creation; their fields then
# change on every guess, and attrs' per-assignment hooks would only cost time.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class Game:
    """One connection's game: a series of rounds over ``lo..hi``.

    The random source is injected so a caller (a test, ``--seed``) decides
    the secrets. Call :meth:`new_round` to draw the first secret; a win or
    a give-up ends the round and the caller then starts the next one.
    """

    lo: int
    hi: int = attrs.field(validator=_check_range)
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    secret: int = attrs.field(init=False, default=0, repr=False)
    #: Valid guesses in the current round.
    attempts: int = attrs.field(init=False, default=0)

    def new_round(self) -> NewRound:
        """Draw a new secret from ``lo..hi`` and reset the attempt count."""
        self.secret = self.rng.randint(self.lo, self.hi)
        self.attempts = 0
        return NewRound(self.lo, self.hi)

    def guess(self, value: int) -> OutOfRange | Hint | Correct:
        """Judge a guess; only guesses inside the range count as attempts."""
        if not self.lo <= value <= self.hi:
            return OutOfRange(self.lo, self.hi)
        self.attempts += 1
        if value == self.secret:
            return Correct(self.attempts)
        return Hint(higher=self.secret > value)

    def give_up(self) -> Answer:
        """End the round without a win, revealing the secret."""
        return Answer(self.secret)


@attrs.define
class Stats:
    """Server-wide statistics, shared by every connection.

    ``played`` counts finished rounds (won, or given up); a round left
    unfinished by ``QUIT`` or a disconnect is not a game played. ``best``
    and the average are over won rounds only.
    """

    played: int = 0
    won: int = 0
    best: int | None = None
    total_attempts: int = 0

    def record_win(self, attempts: int) -> None:
        """A round was won in ``attempts`` valid guesses."""
        self.played += 1
        self.won += 1
        self.total_attempts += attempts
        if self.best is None or attempts < self.best:
            self.best = attempts

    def record_give_up(self) -> None:
        """A round ended with ``GIVEUP``."""
        self.played += 1

    @property
    def average(self) -> float | None:
        """Mean valid guesses per won round, ``None`` before the first win."""
        return self.total_attempts / self.won if self.won else None

    def add(self, other: Stats) -> None:
        """Add ``other``'s rounds to these (statistics of two servers, or a batch)."""
        self.played += other.played
        self.won += other.won
        self.total_attempts += other.total_attempts
        if other.best is not None and (self.best is None or other.best < self.best):
            self.best = other.best


def format_stats(stats: Stats) -> str:
    """``STATS played won best avg``; ``-`` for best/avg before any win, avg to 2 places."""
    best = "-" if stats.best is None else str(stats.best)
    avg = "-" if stats.average is None else f"{stats.average:.2f}"
    return f"STATS {stats.played} {stats.won} {best} {avg}"


# -- the client side -------------------------------------------------------------


@attrs.frozen
class Error:
    """``ERR <code> [args...]``."""

    code: str
    args: tuple[str, ...] = ()


@attrs.frozen
class Bye:
    """``BYE [reason]``; ``reason`` is empty after ``QUIT``."""

    reason: str = ""


@attrs.frozen
class StatsReply:
    """``STATS played won best avg`` (``best``/``avg`` ``None`` for ``-``)."""

    played: int
    won: int
    best: int | None
    avg: float | None


Reply = NewRound | Hint | Correct | Answer | Error | Bye | StatsReply


def _int_field(text: str) -> int:
    value = parse_number(text)
    if value is None or text != text.strip():
        raise ValueError(f"not a number: {text!r}")
    return value


def parse_reply(line: str) -> Reply:
    """Parse one line from a guess server; :exc:`ValueError` if it is not one."""
    keyword, _, rest = line.partition(" ")
    args = rest.split(" ") if rest else []
    match keyword, args:
        case "HIGHER" | "LOWER", []:
            return Hint(higher=keyword == "HIGHER")
        case "NEW", [lo, hi]:
            return NewRound(_int_field(lo), _int_field(hi))
        case "CORRECT", [n]:
            return Correct(_int_field(n))
        case "ANSWER", [n]:
            return Answer(_int_field(n))
        case "ERR", [code, *more]:
            return Error(code, tuple(more))
        case "BYE", _:
            return Bye(rest)
        case "STATS", [played, won, best, avg]:
            return StatsReply(
                _int_field(played),
                _int_field(won),
                None if best == "-" else _int_field(best),
                None if avg == "-" else float(avg),
            )
    raise ValueError(f"unexpected line from the server: {line!r}")


@attrs.define(on_setattr=attrs.setters.NO_OP)
class Bisector:
    """Bisection over ``lo..hi``: guess the middle, keep the half the hint points to.

    Each wrong guess leaves at most ``floor(m / 2)`` of ``m`` candidates, so
    a round takes at most ``floor(log2(n)) + 1 == ceil(log2(n + 1))`` guesses
    for ``n = hi - lo + 1``: the fewest any strategy can promise, since k
    guesses with three possible answers can single out at most ``2**k - 1``
    numbers (:func:`optimal_worst_case`).
    """

    lo: int
    # Hints narrow lo..hi (and may cross it, if they lie: next_guess says so).
    hi: int = attrs.field(validator=_check_range)
    guesses: int = attrs.field(init=False, default=0)
    _last: int | None = attrs.field(init=False, default=None)

    @property
    def candidates(self) -> int:
        """How many numbers are still possible."""
        return self.hi - self.lo + 1

    def next_guess(self) -> int:
        """The next number to send (the middle of what is left)."""
        if self.lo > self.hi:
            raise ValueError("the hints contradict each other: no number is left")
        self._last = (self.lo + self.hi) // 2
        self.guesses += 1
        return self._last

    def hint(self, higher: bool) -> None:
        """Narrow the candidates after ``HIGHER`` (``True``) or ``LOWER``."""
        if self._last is None:
            raise ValueError("a hint arrived before any guess")
        if higher:
            self.lo = self._last + 1
        else:
            self.hi = self._last - 1
        self._last = None


def optimal_worst_case(n: int) -> int:
    """The fewest guesses that always find one of ``n`` numbers: ``ceil(log2(n + 1))``.

    A strategy is a binary search tree of guesses (each wrong guess sends
    the search left or right), and a tree of depth k has at most
    ``2**k - 1`` nodes, hence ``2**k - 1 >= n``.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    return n.bit_length()
