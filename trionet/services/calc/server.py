"""calc: a safe calculator (port 7005), server and client.

Every line, blank included, gets exactly one reply, in order: ``OK <value>``
or ``ERR <code> <text>``. ``ans`` is this connection's last ``OK`` value (0
at first). ``QUIT`` (any case) gets ``BYE`` and the connection closes (the
connection answers it: a line service's built-in).

All of the language lives in :mod:`trionet.services.calc.evaluator` (pure, no
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

from typing import ClassVar

import attrs

from ..._connection import Connection
from ..._service import Service
from .evaluator import CalcError, Number, evaluate, format_value

__all__ = ["CalcService", "answer_line", "is_quit"]


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
        # (QUIT never gets here: the connection answers it with BYE.)
        async for line in conn:
            reply, ans = answer_line(line, ans)
            conn.write_line(reply)
