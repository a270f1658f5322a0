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
few milliseconds of such work (``Connection.receive_line``'s run budget).

Costly lines take turns. Every line is bounded (a few milliseconds of CPU
at most, see the evaluator), but eight clients pipelining the costliest
ones would still put eight of them, one per client, between another
client's request and its answer on every pass of the scheduler. So each
connection keeps a *debt*: the time its costly lines took (those over
:data:`COSTLY_LINE`; cheap lines in bulk are the run budget's business),
forgiven at :data:`FORGIVEN` of the time that passes. While the debt is over
:data:`COSTLY`, its next line waits for the service's single *costly lane*
(a fair lock): however many clients send costly lines, at most one such
line runs per pass, and a client sending cheap lines waits for one costly
line at most. Mixing in cheap lines does not get a client out of the lane;
only time does. A client with nobody to share the lane with never waits.

The client (``python -m trionet.client calc``) evaluates the expressions
given as arguments, or the lines of a piped standard input, or runs a
read-eval-print loop on a terminal.
"""

from __future__ import annotations

import time
from typing import ClassVar, Final

import attrs
import trio

from ..._connection import Connection
from ..._service import Service
from .evaluator import CalcError, Number, evaluate, format_value

__all__ = ["COSTLY", "COSTLY_LINE", "FORGIVEN", "CalcService", "answer_line", "is_quit"]

#: Seconds of computing owed after which a connection's next line takes the
#: costly lane.
COSTLY: Final = 0.0005
#: A line taking longer than this (seconds) is costly, and its time is owed
#: (a typical line takes 5-20 microseconds).
COSTLY_LINE: Final = 0.0001
#: The share of passing time forgiven of a connection's debt: a client may
#: compute for a tenth of the time without taking turns.
FORGIVEN: Final = 0.1


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

    _costly_lane: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)

    async def handle(self, conn: Connection) -> None:
        # Pipelined lines are answered in order; write_line queues replies
        # and the connection sends them together before it waits, and yields
        # to other connections after a few milliseconds of work on lines it
        # already holds, so a hostile client cannot hold the server.
        ans: Number = 0
        debt = 0.0  # seconds of computing owed (see the module's docstring)
        last = time.perf_counter()
        # (QUIT never gets here: the connection answers it with BYE.)
        async for line in conn:
            start = time.perf_counter()
            debt = max(0.0, debt - (start - last) * FORGIVEN)
            if debt > COSTLY:
                # The lock is fair: the connections waiting take turns, one
                # line each, and it is a checkpoint, so the others run too.
                # (Time spent waiting for it is not forgiven.)
                async with self._costly_lane:
                    start = time.perf_counter()
                    reply, ans = answer_line(line, ans)
            else:
                reply, ans = answer_line(line, ans)
            last = time.perf_counter()
            if last - start > COSTLY_LINE:
                debt += last - start
            conn.write_line(reply)
