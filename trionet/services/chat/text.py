"""Pure rules of the chat protocol: nicks, text sanitizing, line parsing.

Nothing here does I/O or knows about Trio, so every rule is unit-tested on
its own and shared by the server (what it accepts and relays) and the client
(what it prints: a client should not trust the server to have stripped
terminal escapes either).
"""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = [
    "MAX_NICK",
    "BadRequest",
    "Command",
    "Help",
    "History",
    "Me",
    "Message",
    "Nick",
    "Private",
    "Quit",
    "Unknown",
    "Who",
    "echoed",
    "nick_key",
    "parse_line",
    "sanitize",
    "valid_nick",
]

#: Longest nick, in characters (PROTOCOL.md: 1–32).
MAX_NICK: Final = 32

_NICK_RE: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NICK}}}")

# Every character the protocol strips from relayed text: Unicode category Cc
# (C0, DEL, C1) except TAB, plus the bidi embedding/override (U+202A–U+202E)
# and isolate (U+2066–U+2069) characters, which let a sender reverse how the
# rest of a line is displayed ("Trojan Source"). Cc is a fixed set of 65 code
# points (U+0000–U+001F, U+007F–U+009F), so a translate table covers it.
_STRIP: Final[dict[int, None]] = {
    cp: None
    for cp in [
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
    if cp != 0x09
}


def valid_nick(nick: str) -> bool:
    """True if ``nick`` is 1–32 characters from ``A-Z a-z 0-9 _ -``."""
    return _NICK_RE.fullmatch(nick) is not None


def nick_key(nick: str) -> str:
    """The key under which nicks are unique: case is ignored (nicks are ASCII)."""
    return nick.lower()


def sanitize(text: str) -> str:
    """Remove control characters (keeping TAB) and bidi overrides/isolates."""
    # Fast path: ordinary text is printable, and no stripped character is
    # (Cc and the bidi controls, category Cf, are all non-printable), so the
    # common case costs one C-level scan and no copy.
    if text.isprintable():
        return text
    return text.translate(_STRIP)


def echoed(word: str) -> str:
    """A client's word as an ``ERR`` reply repeats it: :func:`sanitize`-d, TAB
    removed too (``/nick<TAB>`` must not come back with a control character:
    in a reply a TAB would read as a field separator, in a terminal it moves
    the cursor)."""
    return sanitize(word).replace("\t", "")


# -- commands -------------------------------------------------------------------


@attrs.frozen
class Message:
    """Plain text for the room (``hello`` or ``//text``)."""

    text: str


@attrs.frozen
class Me:
    """``/me <action>``."""

    text: str


@attrs.frozen
class Private:
    """``/msg <nick> <text>``; ``target`` is empty when no nick was given."""

    target: str
    text: str


@attrs.frozen
class Nick:
    """``/nick <name>`` (``name`` not yet validated)."""

    name: str


@attrs.frozen
class Who:
    """``/who``."""


@attrs.frozen
class Help:
    """``/help``."""


@attrs.frozen
class History:
    """``/history [N]``; ``count`` is ``None`` when no N was given."""

    count: int | None


@attrs.frozen
class BadRequest:
    """A known command with arguments it cannot take (``reason`` is for people)."""

    reason: str


@attrs.frozen
class Quit:
    """``/quit [reason]``."""

    reason: str


@attrs.frozen
class Unknown:
    """A ``/word`` that is no command."""

    word: str


Command = Message | Me | Private | Nick | Who | Help | History | BadRequest | Quit | Unknown

# A count with more digits than this is larger than any history a server
# keeps: clamp it instead of converting (int() refuses past 4300 digits).
_MAX_COUNT_DIGITS: Final = 9
_MAX_COUNT: Final = 10**_MAX_COUNT_DIGITS - 1


def _history(arg: str) -> History | BadRequest:
    arg = arg.strip(" ")
    if not arg:
        return History(None)
    # ASCII digits only: str.isdigit alone would also take "²" or "٣".
    if not (arg.isascii() and arg.isdigit()):
        return BadRequest("/history takes a whole number of lines, 0 or more")
    return History(int(arg) if len(arg) <= _MAX_COUNT_DIGITS else _MAX_COUNT)


def parse_line(line: str) -> Command | None:
    """Map one received line to a command; ``None`` for a blank line.

    The command word is case-insensitive and ends at the first space; what
    follows that one space is the argument. ``//text`` is the message
    ``/text`` (the escape for text that starts with a slash).
    """
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Message(line)
    if line.startswith("//"):
        return Message(line[1:])
    word, _, rest = line[1:].partition(" ")
    match word.lower():
        case "nick":
            return Nick(rest.strip())
        case "me":
            return Me(rest)
        case "msg":
            target, _, text = rest.lstrip(" ").partition(" ")
            return Private(target, text)
        case "who":
            return Who()
        case "help":
            return Help()
        case "history":
            return _history(rest)
        case "quit":
            return Quit(rest.strip())
        case _:
            return Unknown(word)
