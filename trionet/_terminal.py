"""Line editing for the interactive clients: prompt_toolkit beside Trio.

On a terminal the clients read what a person types with prompt_toolkit
(editing, arrow-key history, Ctrl-R search) while Trio goes on receiving
from the server. Lines printed meanwhile must appear *above* the line being
typed, which stays whole and is redrawn below them.

prompt_toolkit runs on asyncio, Trio on its own loop, so the prompt runs in a
thread of its own with one asyncio loop for the whole session. Everything
that touches the terminal happens on that loop: the prompt, and every line
printed (through ``run_in_terminal`` while a prompt is up, which hides the
prompt, prints, and redraws it). One loop that lives as long as the session
means no moment where output goes to a loop that just ended or races a
prompt being drawn, which ``patch_stdout`` with a new loop per prompt has.

Piped input is not a terminal: the clients keep their plain line mode then
(:func:`is_terminal` decides), so scripts see exactly the bytes they expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # imported when a terminal is opened: start-up time matters
    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

__all__ = ["Terminal", "is_terminal", "open_terminal"]


def is_terminal() -> bool:
    """True when standard input and output are both terminals (a person typing)."""
    try:
        return os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # replaced streams (tests, StringIO)
        return False


class Terminal:
    """A prompt with line editing, and printing above it, for a Trio program.

    Made by :func:`open_terminal`. :meth:`print` may be called at any time
    from the Trio thread and never blocks; :meth:`read_line` reads one line.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, session: PromptSession[str], output: Output
    ) -> None:
        self._loop = loop
        self._session = session
        self._output = output
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._flush_scheduled = False
        self._task: asyncio.Task[str] | None = None

    def print(self, text: str) -> None:
        """Show ``text`` as a line above the prompt (the typed line stays intact)."""
        with self._lock:
            self._pending.append(text + "\n")
            # Lines that arrive together are drawn together: one redraw of
            # the prompt per batch, not per line, keeps a busy room cheap.
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    async def read_line(self, prompt: str) -> str | None:
        """Read one edited line after showing ``prompt``; ``None`` at Ctrl-D or Ctrl-C.

        Cancelling the read closes the prompt and puts the terminal back in
        its normal mode.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[str | BaseException | None] = []

        def finished(task: asyncio.Task[str]) -> None:  # on the asyncio loop
            exc = None if task.cancelled() else task.exception()
            if task.cancelled() or isinstance(exc, EOFError | KeyboardInterrupt):
                outcome.append(None)  # Ctrl-D, Ctrl-C, or closed by us
            else:
                outcome.append(exc if exc is not None else task.result())
            token.run_sync_soon(done.set)

        async def reading() -> str:
            try:
                return await self._session.prompt_async(prompt)
            except KeyboardInterrupt:
                # Ctrl-C (a key in raw mode, not a signal). Let out of a
                # task, KeyboardInterrupt would stop the whole asyncio loop.
                raise EOFError from None

        def start() -> None:  # on the asyncio loop
            self._task = self._loop.create_task(reading())
            self._task.add_done_callback(finished)

        self._loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        finally:
            if not done.is_set():
                # Cancelled (the server ended the session): close the prompt
                # and wait until it has restored the terminal. Bounded, so a
                # wedged loop cannot hang the exit.
                self._loop.call_soon_threadsafe(self._cancel)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await done.wait()
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _run(self, token: trio.lowlevel.TrioToken, on_stop: Callable[[], None]) -> None:
        """The thread: run the asyncio loop until :meth:`_stop`, then tell Trio."""
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(on_stop)

    def _stop(self) -> None:
        """Print what is still to print, then stop the loop (from Trio's thread)."""

        async def drain_and_stop() -> None:
            # Let prints already scheduled (run_in_terminal tasks) finish first.
            # Bounded, so a wedged task cannot keep the program from exiting.
            others = asyncio.all_tasks(self._loop) - {asyncio.current_task(self._loop)}
            if others:
                await asyncio.wait(others, timeout=2)
            self._flush()
            self._loop.stop()

        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(drain_and_stop()))

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _flush(self) -> None:  # on the asyncio loop
        from prompt_toolkit.application import run_in_terminal

        with self._lock:
            text = "".join(self._pending)
            self._pending.clear()
            self._flush_scheduled = False
        if not text:
            return
        if self._session.app.is_running:
            run_in_terminal(lambda: self._write(text), in_executor=False)
        else:
            self._write(text)

    def _write(self, text: str) -> None:
        # Output.write escapes ESC, so nothing received can drive the terminal.
        self._output.write(text)
        self._output.flush()


if sys.platform != "win32":

    def _quiet_input() -> Input:
        """prompt_toolkit's terminal input, kept in raw mode while lines are printed.

        ``run_in_terminal`` switches the terminal to cooked mode (echo on)
        while it prints, for code that might read input there. We only write
        text, and with echo on a key typed at that moment would be echoed
        mid-screen (``half-typedbob> half-typed``); in raw mode it waits for
        the prompt, which draws it in its place.
        """
        from prompt_toolkit.input.vt100 import Vt100Input

        class QuietInput(Vt100Input):
            def cooked_mode(self) -> contextlib.AbstractContextManager[None]:
                return contextlib.nullcontext()

        return QuietInput(sys.stdin)


@contextlib.contextmanager
def _keys_for_the_prompt(fd: int) -> Iterator[None]:
    """For the block, leave every key typed to the prompt, even between two prompts.

    prompt_toolkit puts the terminal in raw mode while a prompt is up and
    back as it found it after. As found, the terminal would echo keys typed
    before the first prompt or between two (waiting for a reply) in the
    middle of the screen, and, in its line mode (ICANON), treat some of them
    itself: a Ctrl-D there was taken as the end of input and never reached
    the next prompt (the client then did not leave), Ctrl-U and Ctrl-W
    edited its own copy of the line. So for the session it is put in the
    same raw input mode the prompt uses (no echo, no line mode, no literal-
    next, bytes as typed), except that Ctrl-C and Ctrl-Z keep their signals
    when no prompt is up: a client waiting for the server can still be
    stopped. Then back to what it was.
    """
    if sys.platform == "win32":  # the console has no termios; nothing to do
        yield
        return
    import termios

    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    raw = list(saved)
    raw[0] &= ~(termios.IXON | termios.IXOFF | termios.ICRNL | termios.INLCR | termios.IGNCR)
    raw[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
    raw[6] = list(raw[6])
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


@contextlib.asynccontextmanager
async def open_terminal(*, erase_typed: bool = False) -> AsyncIterator[Terminal]:
    """Run prompt_toolkit's loop in a thread for the duration of the block.

    ``erase_typed`` removes each line from the screen once Enter is pressed
    (for a program that shows it again in its own form). On leaving, lines
    still to print are printed and the thread ends.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.input import create_input
    from prompt_toolkit.output import create_output

    with _keys_for_the_prompt(sys.stdin.fileno()):
        output = create_output(sys.stdout)
        # History in memory only: what people type in a chat is not written to disk.
        session: PromptSession[str] = PromptSession(
            history=InMemoryHistory(),
            input=_quiet_input() if sys.platform != "win32" else create_input(sys.stdin),
            output=output,
            erase_when_done=erase_typed,
        )
        terminal = Terminal(asyncio.new_event_loop(), session, output)
        stopped = trio.Event()
        # A thread of our own rather than a nursery task: an error in the block
        # then leaves as it is, not wrapped in an exception group. Daemon, so a
        # wedged loop cannot keep the interpreter from exiting.
        token = trio.lowlevel.current_trio_token()
        threading.Thread(
            target=terminal._run, args=(token, stopped.set), name="trionet-terminal", daemon=True
        ).start()
        try:
            yield terminal
        finally:
            terminal._stop()
            # Wait for the terminal to be restored before the program goes on
            # (to print an error, say).
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await stopped.wait()
