"""The guessing game's rules on their own: no sockets, no Trio."""

from __future__ import annotations

import functools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trionet.services.guess.rules import (
    MAX_DIGITS,
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
    OutOfRange,
    Quit,
    ShowStats,
    Stats,
    StatsReply,
    format_outcome,
    format_stats,
    optimal_worst_case,
    parse_move,
    parse_number,
    parse_reply,
)

# -- numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50", 50),
        ("  50  ", 50),
        ("\t7\t", 7),
        ("+5", 5),
        ("-5", -5),
        ("-0", 0),
        ("007", 7),
        ("0", 0),
    ],
)
def test_numbers(text: str, value: int) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    ["1_0", "0x10", "1e2", "1.5", "", " ", "+", "-", "+-1", "- 1", "1 2", "٣", "５", "abc", "5a"],
)
def test_not_numbers(text: str) -> None:
    assert parse_number(text) is None


def test_huge_numbers_are_clamped_not_converted() -> None:
    # Over CPython's int/str limit: still a number, far out of any range.
    assert parse_number("9" * (MAX_DIGITS + 5)) == 10**MAX_DIGITS
    assert parse_number("-" + "1" * (MAX_DIGITS + 1)) == -(10**MAX_DIGITS)
    # Leading zeros do not make a small number huge.
    assert parse_number("0" * (MAX_DIGITS + 10) + "42") == 42


@settings(deadline=None)  # a loaded machine must not make timing fail a test
@given(st.integers(min_value=-(10**30), max_value=10**30), st.sampled_from(["", " ", "  \t"]))
def test_number_round_trip(value: int, pad: str) -> None:
    assert parse_number(f"{pad}{value}{pad}") == value


# -- moves -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "move"),
    [
        ("42", Guess(42)),
        ("", Blank()),
        ("   ", Blank()),
        ("GIVEUP", GiveUp()),
        (" giveup ", GiveUp()),
        ("Stats", ShowStats()),
        ("QUIT", Quit()),
        ("quit", Quit()),
        ("qUiT ", Quit()),
        ("QUIT now", NotANumber()),
        ("hello", NotANumber()),
        ("1.5", NotANumber()),
    ],
)
def test_parse_move(line: str, move: object) -> None:
    assert parse_move(line) == move


@settings(deadline=None)  # a loaded machine must not make timing fail a test
@given(st.text())
def test_parse_move_is_total(line: str) -> None:
    move = parse_move(line)
    stripped = line.strip(" \t")
    if isinstance(move, Guess):
        assert stripped.lstrip("+-").isascii() and stripped.lstrip("+-").isdigit()
        assert move.value == int(stripped)
    elif isinstance(move, Blank):
        assert stripped == ""
    elif not isinstance(move, NotANumber):
        assert stripped.upper() in ("GIVEUP", "STATS", "QUIT")


# -- a game ----------------------------------------------------------------------


def test_round_hints_and_count() -> None:
    game = Game(1, 100, random.Random(1))
    assert game.new_round() == NewRound(1, 100)
    secret = random.Random(1).randint(1, 100)
    assert game.secret == secret
    if secret > 1:
        assert game.guess(secret - 1) == Hint(higher=True)
    if secret < 100:
        assert game.guess(secret + 1) == Hint(higher=False)
    expected = 1 + (secret > 1) + (secret < 100)
    assert game.guess(secret) == Correct(expected)


def test_invalid_guesses_do_not_count() -> None:
    game = Game(10, 20, random.Random(2))
    game.new_round()
    assert game.guess(9) == OutOfRange(10, 20)
    assert game.guess(21) == OutOfRange(10, 20)
    assert game.guess(-(10**MAX_DIGITS)) == OutOfRange(10, 20)
    assert game.attempts == 0
    assert game.guess(game.secret) == Correct(1)


def test_new_round_resets_attempts_and_draws_again() -> None:
    rng = random.Random(3)
    probe = random.Random(3)
    game = Game(1, 1000, rng)
    for _ in range(5):
        game.new_round()
        assert game.secret == probe.randint(1, 1000)
        assert game.attempts == 0
        game.guess(game.secret)


def test_give_up_reveals_secret() -> None:
    game = Game(-5, 5, random.Random(4))
    game.new_round()
    assert game.give_up() == Answer(game.secret)
    assert -5 <= game.secret <= 5


def test_one_number_range() -> None:
    game = Game(7, 7, random.Random())
    game.new_round()
    assert game.guess(6) == OutOfRange(7, 7)
    assert game.guess(7) == Correct(1)


def test_range_validation() -> None:
    with pytest.raises(ValueError, match="LO <= HI"):
        Game(5, 4)
    with pytest.raises(ValueError, match="LO <= HI"):
        Bisector(5, 4)


@settings(deadline=None)  # a loaded machine must not make timing fail a test
@given(st.integers(-1000, 1000), st.integers(0, 1000), st.integers(0, 2**32))
def test_secret_always_in_range(lo: int, span: int, seed: int) -> None:
    game = Game(lo, lo + span, random.Random(seed))
    game.new_round()
    assert lo <= game.secret <= lo + span


# -- formatting and statistics ---------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "line"),
    [
        (Hint(higher=True), "HIGHER"),
        (Hint(higher=False), "LOWER"),
        (Correct(3), "CORRECT 3"),
        (Answer(-17), "ANSWER -17"),
        (NewRound(1, 100), "NEW 1 100"),
        (NotANumber(), "ERR not-a-number"),
        (OutOfRange(1, 100), "ERR out-of-range 1 100"),
    ],
)
def test_format_outcome(outcome: object, line: str) -> None:
    assert format_outcome(outcome) == line  # type: ignore[arg-type]


def test_stats() -> None:
    stats = Stats()
    assert format_stats(stats) == "STATS 0 0 - -"
    stats.record_give_up()
    assert format_stats(stats) == "STATS 1 0 - -"
    stats.record_win(5)
    stats.record_win(2)
    stats.record_win(4)
    assert format_stats(stats) == "STATS 4 3 2 3.67"
    assert stats.average == pytest.approx(11 / 3)


# -- the client side -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("NEW 1 100", NewRound(1, 100)),
        ("NEW -5 5", NewRound(-5, 5)),
        ("HIGHER", Hint(higher=True)),
        ("LOWER", Hint(higher=False)),
        ("CORRECT 7", Correct(7)),
        ("ANSWER 17", Answer(17)),
        ("ERR not-a-number", Error("not-a-number")),
        ("ERR out-of-range 1 100", Error("out-of-range", ("1", "100"))),
        ("BYE", Bye()),
        ("BYE idle-timeout", Bye("idle-timeout")),
        ("STATS 0 0 - -", StatsReply(0, 0, None, None)),
        ("STATS 4 3 2 3.67", StatsReply(4, 3, 2, 3.67)),
    ],
)
def test_parse_reply(line: str, reply: object) -> None:
    assert parse_reply(line) == reply


@pytest.mark.parametrize(
    "line", ["", "HIGHER 5", "NEW 1", "NEW a b", "CORRECT", "WHAT", "NEW 1  2"]
)
def test_parse_reply_rejects(line: str) -> None:
    with pytest.raises(ValueError, match=r"not a number|unexpected"):
        parse_reply(line)


def _play(lo: int, hi: int, secret: int, uncertain: list[int] | None = None) -> int:
    """Bisect for ``secret`` with the pure rules on both sides; the server's count.

    ``uncertain``, if given, receives the number of guesses made while more
    than one number was still possible.
    """
    game = Game(lo, hi, random.Random())
    game.new_round()
    game.secret = secret  # the test decides the secret
    player = Bisector(lo, hi)
    open_guesses = 0
    for _ in range(hi - lo + 2):
        open_guesses += player.candidates > 1
        outcome = game.guess(player.next_guess())
        if isinstance(outcome, Correct):
            assert outcome.attempts == player.guesses
            if uncertain is not None:
                uncertain.append(open_guesses)
            return outcome.attempts
        assert isinstance(outcome, Hint)
        player.hint(outcome.higher)
    raise AssertionError("bisection did not finish")


@functools.cache
def _best_possible(n: int) -> int:
    """Fewest guesses any strategy needs in the worst case, by exhaustive search."""
    if n == 0:
        return 0
    return 1 + min(max(_best_possible(g), _best_possible(n - 1 - g)) for g in range(n))


def test_bisection_is_optimal_for_every_secret_of_small_ranges() -> None:
    for n in range(1, 130):
        worst = max(_play(0, n - 1, secret) for secret in range(n))
        # The client's worst case is exactly the best any strategy can do...
        assert worst == _best_possible(n) == optimal_worst_case(n)
        # ... which is ceil(log2(n + 1)), i.e. ceil(log2(n)) unless n is a
        # power of two (1 included), where a last confirming guess is needed.
        assert worst == math.ceil(math.log2(n + 1))
        power_of_two = n & (n - 1) == 0
        assert worst == math.ceil(math.log2(n)) + power_of_two
        # Guesses made while the answer was still open stay within log2(n).
        open_guesses: list[int] = []
        for secret in range(n):
            _play(0, n - 1, secret, open_guesses)
        assert max(open_guesses) == math.floor(math.log2(n)) <= math.ceil(math.log2(n))


def test_one_number_range_takes_one_guess() -> None:
    assert _play(42, 42, 42) == 1


@settings(deadline=None)  # a loaded machine must not make timing fail a test
@given(
    lo=st.integers(-(10**12), 10**12),
    span=st.integers(0, 10**12),
    seed=st.integers(0, 2**32),
)
def test_bisection_bound_over_many_ranges_and_seeds(lo: int, span: int, seed: int) -> None:
    hi = lo + span
    secret = random.Random(seed).randint(lo, hi)
    assert _play(lo, hi, secret) <= (span + 1).bit_length()


def test_bisector_detects_lying_hints() -> None:
    player = Bisector(1, 2)
    assert player.next_guess() == 1
    player.hint(higher=False)  # "lower than 1" in 1..2: impossible
    with pytest.raises(ValueError, match="contradict"):
        player.next_guess()
    with pytest.raises(ValueError, match="before any guess"):
        Bisector(1, 2).hint(higher=True)
