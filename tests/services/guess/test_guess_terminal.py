"""The guess client on a real terminal (a pty read by pyte): line editing and recall."""

from __future__ import annotations

import sys

import trio
from terminal_screen import KEY_UP, run_in_terminal

import trionet
from trionet.services.guess.server import GuessService

CLIENT = [sys.executable, "-m", "trionet.client", "guess"]


async def test_terminal_play_recalls_earlier_guesses() -> None:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [GuessService(port=0)])
        port = addresses["guess"][0][1]
        async with run_in_terminal([*CLIENT, "--port", str(port)]) as term:
            await term.wait_for("I'm thinking of a whole number from 1 to 100.")
            await term.type("0\r")
            await term.wait_for("Out of range: pick a number from 1 to 100.")
            await term.wait_for(lambda t: t.cursor_line() == "guess #1>")
            await term.type("lots\r")
            await term.wait_for("That is not a whole number (nor giveup, stats or quit).")
            await term.type(KEY_UP)
            await term.wait_for(lambda t: t.cursor_line() == "guess #1> lots")
            await term.type(KEY_UP)
            await term.wait_for(lambda t: t.cursor_line() == "guess #1> 0")
            await term.type("\x15quit\r")  # Ctrl-U clears the line
            assert await term.wait_exit() == 0
            await term.wait_for("Bye!")
        nursery.cancel_scope.cancel()
