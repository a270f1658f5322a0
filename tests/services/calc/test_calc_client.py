"""The calc client's interactive prompt on a real terminal (a pty read by pyte)."""

from __future__ import annotations

import sys
import termios

import trio
from terminal_screen import KEY_DOWN, KEY_UP, TerminalScreen, run_in_terminal

import trionet
from trionet.services.calc.server import CalcService

CLIENT = [sys.executable, "-m", "trionet.client", "calc"]


def _prompt_reads(term: TerminalScreen, text: str) -> bool:
    return term.cursor_line() == f"calc> {text}".rstrip()


async def test_terminal_prompt_recalls_earlier_expressions() -> None:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [CalcService(port=0)])
        port = addresses["calc"][0][1]
        async with run_in_terminal([*CLIENT, "--port", str(port)]) as term:
            await term.wait_for(lambda t: _prompt_reads(t, ""))
            await term.type("6*7\r")
            await term.wait_for(lambda t: "42" in t.lines() and _prompt_reads(t, ""))
            await term.type("ans + 1\r")
            await term.wait_for(lambda t: "43" in t.lines() and _prompt_reads(t, ""))
            # Up recalls the last expression, Up again the one before, Down goes back.
            await term.type(KEY_UP)
            await term.wait_for(lambda t: _prompt_reads(t, "ans + 1"))
            await term.type(KEY_UP)
            await term.wait_for(lambda t: _prompt_reads(t, "6*7"))
            await term.type(KEY_DOWN)
            await term.wait_for(lambda t: _prompt_reads(t, "ans + 1"))
            await term.type(KEY_UP + b"\x7f-2\r")  # edited: 6*-2
            await term.wait_for(lambda t: "-12" in t.lines() and _prompt_reads(t, ""))
            # Errors in words, in order above the prompt; blank lines are skipped.
            await term.type("\r1/0\r")
            await term.wait_for(lambda t: "division by zero" in t.lines() and _prompt_reads(t, ""))
            lines = [line for line in term.lines() if line]
            assert lines[-3:] == ["calc> 1/0", "division by zero", "calc>"], term.text()
            assert "syntax" not in term.text()
            assert term.echoing_draws == 0  # keys only ever drawn by the prompt
            await term.type("\x04")  # Ctrl-D leaves
            assert await term.wait_exit() == 0
            modes = term.local_modes()
            assert modes & termios.ICANON and modes & termios.ECHO  # terminal restored
        nursery.cancel_scope.cancel()


async def test_terminal_quit_leaves() -> None:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [CalcService(port=0)])
        port = addresses["calc"][0][1]
        async with run_in_terminal([*CLIENT, "--port", str(port)]) as term:
            await term.type("2**10\rquit\r")
            assert await term.wait_exit() == 0
            await term.wait_for("1024")
        nursery.cancel_scope.cancel()
