"""Pure chat rules: nicks, sanitizing, line parsing, the token bucket, the client's rendering."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trionet.services.chat.client import render
from trionet.services.chat.flood import TokenBucket
from trionet.services.chat.text import (
    BadRequest,
    Help,
    History,
    Me,
    Message,
    Nick,
    Private,
    Quit,
    Unknown,
    Who,
    nick_key,
    parse_line,
    sanitize,
    valid_nick,
)

# -- nicks ----------------------------------------------------------------------


@pytest.mark.parametrize("nick", ["a", "alice", "A-b_9", "x" * 32, "0", "-", "_"])
def test_valid_nicks(nick: str) -> None:
    assert valid_nick(nick)


@pytest.mark.parametrize(
    "nick", ["", "x" * 33, "al ice", "alice!", "élise", "a\tb", "a\n", "bob.", "ａ", "ß"]
)
def test_invalid_nicks(nick: str) -> None:
    assert not valid_nick(nick)


def test_nick_key_ignores_case() -> None:
    assert nick_key("Alice") == nick_key("aLICE") == "alice"
    assert nick_key("bob") != nick_key("bob_")


# -- sanitizing -----------------------------------------------------------------


def test_sanitize_strips_controls_keeps_tab() -> None:
    assert sanitize("a\x1b[31mred\x07\tb") == "a[31mred\tb"
    assert sanitize("\x00\x7f\x85\x9f") == ""
    assert sanitize("plain text, unicode ok: é ✓ 日本") == "plain text, unicode ok: é ✓ 日本"


def test_sanitize_strips_bidi_overrides_and_isolates() -> None:
    bidi = "".join(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
    assert sanitize(f"x{bidi}y") == "xy"
    # Neighbours of those ranges are left alone (LRM/RLM, zero-width joiner).
    assert sanitize("\u200e\u200f\u2029\u206a\u200d") == "\u200e\u200f\u2029\u206a\u200d"


@given(st.text())
def test_sanitize_property(text: str) -> None:
    out = sanitize(text)
    removed = {c for c in text if c not in out}
    for c in out:
        assert c == "\t" or not (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)
        assert not (0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069)
    for c in removed:
        assert c != "\t"
    # Only removal happens, in order: what is kept is a subsequence.
    it = iter(text)
    assert all(c in it for c in out)
    assert sanitize(out) == out


# -- parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("", None),
        ("   ", None),
        ("hello all", Message("hello all")),
        ("//text", Message("/text")),
        ("///x", Message("//x")),
        ("/me waves", Me("waves")),
        ("/ME waves", Me("waves")),
        ("/me", Me("")),
        ("/msg bob psst now", Private("bob", "psst now")),
        ("/msg  bob  x", Private("bob", " x")),
        ("/msg", Private("", "")),
        ("/msg bob", Private("bob", "")),
        ("/nick alice", Nick("alice")),
        ("/Nick  alice ", Nick("alice")),
        ("/nick", Nick("")),
        ("/who", Who()),
        ("/quit", Quit("")),
        ("/QUIT gotta go ", Quit("gotta go")),
        ("/dance now", Unknown("dance")),
        ("/", Unknown("")),
        ("/help", Help()),
        ("/HELP me", Help()),
        ("/history", History(None)),
        ("/history  ", History(None)),
        ("/history 5", History(5)),
        ("/History 0", History(0)),
        ("/history 007", History(7)),
        ("/history " + "9" * 40, History(999_999_999)),  # more than any server keeps
        ("/history -1", BadRequest("/history takes a whole number of lines, 0 or more")),
        ("/history 1.5", BadRequest("/history takes a whole number of lines, 0 or more")),
        ("/history x", BadRequest("/history takes a whole number of lines, 0 or more")),
        ("/history 1 2", BadRequest("/history takes a whole number of lines, 0 or more")),
        ("/history \u0663", BadRequest("/history takes a whole number of lines, 0 or more")),
    ],
)
def test_parse_line(line: str, want: object) -> None:
    assert parse_line(line) == want


# -- token bucket ---------------------------------------------------------------


def test_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=5, burst=10, now=100.0)
    assert [b.take(100.0) for _ in range(11)] == [True] * 10 + [False]
    assert not b.take(100.1)  # half a token
    assert b.take(100.2)  # one token after 0.2 s
    assert not b.take(100.2)
    # A long pause refills to the burst, never beyond.
    assert [b.take(1000.0) for _ in range(11)] == [True] * 10 + [False]


def test_bucket_refused_lines_cost_nothing() -> None:
    b = TokenBucket(rate=1, burst=1, now=0.0)
    assert b.take(0.0)
    assert not b.take(0.5)
    assert not b.take(0.9)
    assert b.take(1.0)


def test_bucket_clock_going_back_mints_nothing() -> None:
    b = TokenBucket(rate=1, burst=2, now=10.0)
    assert b.take(10.0) and b.take(10.0)
    assert not b.take(5.0)
    assert not b.take(10.5)
    assert b.take(11.0)


def test_bucket_rate_zero_is_off() -> None:
    b = TokenBucket(rate=0, burst=1, now=0.0)
    assert b.rate == math.inf
    assert all(b.take(0.0) for _ in range(10_000))


@pytest.mark.parametrize(("rate", "burst"), [(-1, 10), (5, 0), (math.nan, 10), (5, math.nan)])
def test_bucket_rejects_bad_settings(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


# -- client rendering -----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("MSG alice hello all", "<alice> hello all"),
        ("ACTION alice waves", "* alice waves"),
        ("PRIV alice psst", "[private] <alice> psst"),
        ("JOIN bob", "-- bob joined"),
        ("LEAVE bob gotta go", "-- bob left (gotta go)"),
        ("LEAVE bob", "-- bob left"),
        ("LEAVE bob slow-consumer", "-- bob left (slow-consumer)"),
        ("NICK alice alicia", "-- alice is now alicia"),
        ("WHO alice bob", "-- here: alice bob"),
        ("OK nick alice", "-- you are alice"),
        ("ERR rate-limited", "-- error: rate-limited"),
        ("MSG eve \x1b[2Jgotcha", "<eve> [2Jgotcha"),
        ("WELCOME trionet chat — send /nick <name> to join", None),
    ],
)
def test_render(line: str, shown: str | None) -> None:
    assert render(line) == shown
