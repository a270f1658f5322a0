"""Run a program in a pseudo-terminal and read its screen as a person sees it.

The program gets a real pty (so it knows it talks to a terminal and turns on
line editing); what it writes is fed to pyte, a terminal emulator, so tests
assert on the rendered screen, not on escape codes. pyte also answers the
cursor-position requests prompt_toolkit sends, as a real terminal does.
(Imported by tests through ``pythonpath = ["tests"]`` in pyproject.toml.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import signal
import struct
import termios
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pyte
import trio

__all__ = ["KEY_DOWN", "KEY_UP", "TerminalScreen", "run_in_terminal"]

KEY_UP = b"\x1b[A"
KEY_DOWN = b"\x1b[B"


class _AnsweringScreen(pyte.Screen):
    """A pyte screen that collects its answers (to ``ESC [ 6 n``) for the program."""

    def __init__(self, columns: int, lines: int) -> None:
        super().__init__(columns, lines)
        self.answers: list[str] = []

    def write_process_input(self, data: str) -> None:
        self.answers.append(data)


class TerminalScreen:
    """A program on a pty: type keys with :meth:`type`, wait for what it shows."""

    def __init__(self, process: trio.Process, master: int, slave: int, screen: _AnsweringScreen):
        self.process = process
        self._master = master
        self._slave = slave
        self._screen = screen
        self._stream = pyte.ByteStream(screen)
        self._changed = trio.Event()
        #: How many times the program drew on the screen while the terminal
        #: echoed keys itself (a key typed then shows up wherever the cursor is).
        self.echoing_draws = 0
        #: Everything the program wrote, as written (for failure messages).
        self.transcript = bytearray()

    def lines(self) -> list[str]:
        """The screen, one string per row, trailing blanks removed."""
        return [row.rstrip() for row in self._screen.display]

    def cursor_row(self) -> int:
        """The number of the row the cursor is on (0: the top)."""
        return int(self._screen.cursor.y)

    def cursor_line(self) -> str:
        """The row the cursor is on: the line being typed."""
        return self.lines()[self.cursor_row()]

    def text(self) -> str:
        """The non-blank rows, for assertion messages."""
        return "\n".join(line for line in self.lines() if line)

    def local_modes(self) -> int:
        """The pty's termios local modes (``ICANON``, ``ECHO``...) as set now."""
        return int(termios.tcgetattr(self._slave)[3])

    async def type(self, keys: bytes | str) -> None:
        """Send keystrokes (``\\r`` is Enter, as a terminal sends it)."""
        data = keys.encode() if isinstance(keys, str) else keys
        await trio.lowlevel.wait_writable(self._master)
        os.write(self._master, data)

    async def wait_for(
        self, what: str | Callable[[TerminalScreen], bool], timeout: float = 30
    ) -> None:
        """Wait until ``what`` (a text on some row, or a test) holds on the screen."""

        def holds() -> bool:
            if isinstance(what, str):
                return any(what in line for line in self.lines())
            return what(self)

        try:
            with trio.fail_after(timeout):
                while not holds():
                    await self._changed.wait()
        except trio.TooSlowError:
            status = self.process.poll()
            ended = "" if status is None else f" (the program ended with status {status})"
            raise AssertionError(
                f"timed out waiting for {what!r}{ended}; screen:\n{self.text()}"
            ) from None

    async def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the program to end; its exit status."""
        try:
            with trio.fail_after(timeout):
                return await self.process.wait()
        except trio.TooSlowError:
            # Where it stopped: SIGABRT makes Python's fault handler (enabled
            # by run_in_terminal) write every thread's stack to the terminal.
            self.process.send_signal(signal.SIGABRT)
            with trio.move_on_after(2):
                await self.process.wait()
            tail = self.transcript[-6000:].decode(errors="replace")
            raise AssertionError(
                f"the program did not end within {timeout}s; screen:\n{self.text()}\n"
                f"its output's end, with its threads' stacks:\n{tail}"
            ) from None

    async def _read(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._master)
            try:
                data = os.read(self._master, 65536)
            except OSError as exc:  # EIO: every copy of the other side is closed
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                break
            if self.local_modes() & termios.ECHO:
                self.echoing_draws += 1
            self.transcript += data
            self._stream.feed(data)
            for answer in self._screen.answers:
                os.write(self._master, answer.encode())
            self._screen.answers.clear()
            self._changed.set()
            self._changed = trio.Event()


@asynccontextmanager
async def run_in_terminal(
    argv: Sequence[str], *, columns: int = 100, rows: int = 24
) -> AsyncIterator[TerminalScreen]:
    """Start ``argv`` on a fresh pty of ``columns`` x ``rows``; kill it on leaving."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    os.set_blocking(master, False)
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(columns), "LINES": str(rows)}
    env["PYTHONFAULTHANDLER"] = "1"  # (see TerminalScreen.wait_exit)
    process = await trio.lowlevel.open_process(
        list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    term = TerminalScreen(process, master, slave, _AnsweringScreen(columns, rows))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(term._read)
            try:
                yield term
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()
        os.close(master)
        os.close(slave)
