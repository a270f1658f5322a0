"""The files client: ``python -m trionet.client files list|get``.

A download is written to ``PATH.part`` while it is hashed, checked against
the size and SHA-256 the server announced, and only then renamed into
place (atomically, with :func:`os.replace`): ``PATH`` either does not
change or holds a verified copy. A digest mismatch keeps nothing. A dropped
connection keeps ``PATH.part``; ``--resume`` asks the server to continue
from its length (``REST``) and still verifies the digest of the whole file,
hashing the kept part first. An existing ``PATH`` is only replaced with
``force`` (the command line's ``--force``). Ctrl-C stops the transfer
cleanly: the ``.part`` keeps every byte received, and the command to
resume is printed.

The receive path is built for speed: on a TCP socket the bytes land with
``recv_into`` in a small pool of reused 4 MiB buffers (no allocation per
receive, ``SO_RCVLOWAT`` so that a wake-up brings a MiB, not a segment),
and hashing and writing run in two threads of their own, so the network,
the hash and the disk overlap. See docs/protocol/files.md for the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import mmap
import os
import queue
import re
import shlex
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import cache, partial
from typing import Final, TextIO

import attrs
import trio

from ..._client import (
    EXIT_DROPPED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROTOCOL,
    EXIT_TLS,
    ClientError,
    add_address_arguments,
    connect_args,
    run_client,
)
from .digest import hash_range
from .paths import NameProblem, name_problem

__all__ = [
    "EXIT_DISK",
    "EXIT_EXISTS",
    "EXIT_FORBIDDEN",
    "EXIT_MISMATCH",
    "EXIT_NOT_FOUND",
    "Announce",
    "Preparing",
    "Progress",
    "client_main",
    "download",
    "format_progress",
    "list_remote",
    "parse_ok",
]

DEFAULT_PORT: Final = 7004
EXIT_NOT_FOUND: Final = 6
EXIT_FORBIDDEN: Final = 7
EXIT_MISMATCH: Final = 8
EXIT_DISK: Final = 9
EXIT_EXISTS: Final = 11
_PROG: Final = "python -m trionet.client files"

#: Size of each receive buffer; a few of them are reused for the whole file.
BUFFER: Final = 4 << 20
#: Buffers in flight between the network, the hash thread and the disk thread.
BUFFERS: Final = 8
#: Most bytes the receiver waits for before it is woken (``SO_RCVLOWAT``).
LOWAT: Final = 1 << 20
# O_DIRECT writes must be whole blocks at block-aligned offsets; 4096 covers
# 512-byte and 4 KiB logical block sizes.
_DIRECT_ALIGN: Final = 4096

_Item = tuple[mmap.mmap, int] | None

_OK = re.compile(r"OK ([0-9]{1,19}) ([0-9a-f]{64})")
_FILE = re.compile(r"FILE ([0-9]{1,19}) (.+)")


@attrs.frozen
class Announce:
    """What ``OK <size> <sha256>`` promised: the whole file's size and digest."""

    size: int
    sha256: str


def parse_ok(line: str) -> Announce | None:
    """Parse an ``OK <size> <sha256>`` reply, or ``None`` if the line is not one."""
    m = _OK.fullmatch(line)
    return Announce(int(m[1]), m[2]) if m else None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_progress(done: int, total: int, rate: float, width: int = 24) -> str:
    """One progress-bar line: bar, percent, bytes, rate (bytes/s) and ETA."""
    frac = 1.0 if total <= 0 else min(max(done, 0) / total, 1.0)
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    if done >= total:
        eta = "0:00"
    elif rate > 0:
        left = int((total - done) / rate)
        eta = f"{left // 60:d}:{left % 60:02d}"
    else:
        eta = "--:--"
    return f"[{bar}] {frac * 100:5.1f}% {_human(done)}/{_human(total)} {_human(rate)}/s ETA {eta}"


@attrs.define(eq=False)
class Progress:
    """A progress bar on ``out`` when it is a terminal, silent otherwise.

    Redrawn at most every ``interval`` seconds; ``clock`` is injectable for tests.
    """

    total: int
    out: TextIO | None = None
    interval: float = 0.1
    clock: Callable[[], float] = time.monotonic
    start_bytes: int = 0
    _started: float = attrs.field(init=False, default=0.0)
    _last: float = attrs.field(init=False, default=float("-inf"))
    drawn: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._started = self.clock()

    @classmethod
    def for_stderr(cls, total: int, start_bytes: int = 0) -> Progress:
        """A bar on stderr if it is a terminal, else a silent one."""
        out = sys.stderr if sys.stderr.isatty() else None
        return cls(total, out, start_bytes=start_bytes)

    def update(self, done: int, *, final: bool = False) -> None:
        """Report that ``done`` bytes of the file are present."""
        if self.out is None:
            return
        now = self.clock()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        # The rate counts only bytes received in this run, not a resumed part.
        elapsed = now - self._started
        rate = (done - self.start_bytes) / elapsed if elapsed > 0 else 0.0
        line = format_progress(done, self.total, rate)
        self.out.write("\r" + line + ("\n" if final else ""))
        self.out.flush()
        self.drawn += 1


@attrs.define(eq=False)
class Preparing:
    """Shows that the server is still preparing a file, while ``GET`` waits for ``OK``.

    The server hashes the whole file before it can answer ``OK <size>
    <sha256>``: for a large file not hashed before, that takes a while with
    nothing on the wire. On a terminal a spinner line says so (and is wiped
    when the reply comes); elsewhere nothing is printed, so scripts keep a
    clean stderr. ``waiting`` tells a Ctrl-C handler what was interrupted.
    """

    name: str
    out: TextIO | None = None
    #: Seconds of silence before the spinner appears (a cached digest answers at once).
    after: float = 0.3
    interval: float = 0.1
    waiting: bool = attrs.field(init=False, default=False)
    drawn: int = attrs.field(init=False, default=0)

    @classmethod
    def for_stderr(cls, name: str) -> Preparing:
        """A spinner on stderr if it is a terminal, else a silent one."""
        return cls(name, sys.stderr if sys.stderr.isatty() else None)

    async def wait_for(self, reply: Callable[[], Awaitable[str]]) -> str:
        """``await reply()``, with the spinner running while it takes time."""
        self.waiting = True
        async with trio.open_nursery() as nursery:
            if self.out is not None:
                nursery.start_soon(self._spin)
            line = await reply()
            nursery.cancel_scope.cancel()
        self.waiting = False
        if self.drawn and self.out is not None:
            self.out.write("\r\x1b[K")  # wipe the spinner line for the progress bar
            self.out.flush()
        return line

    async def _spin(self) -> None:
        assert self.out is not None
        await trio.sleep(self.after)
        started = trio.current_time() - self.after
        for frame in itertools.cycle("|/-\\"):
            elapsed = trio.current_time() - started
            self.out.write(
                f"\r{frame} the server is preparing {self.name} "
                f"(computing its sha256 before sending) {elapsed:.0f}s"
            )
            self.out.flush()
            self.drawn += 1
            await trio.sleep(self.interval)


class _Lines:
    """Reads reply lines from a stream, keeping any bytes that follow them."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self, what: str) -> str:
        while (i := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > 1 << 16:
                raise ClientError(f"files: reply to {what} is too long", EXIT_PROTOCOL)
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise ClientError(
                    f"files: connection lost waiting for the reply to {what}", EXIT_DROPPED
                )
            self.buffer += data
        raw = bytes(self.buffer[:i]).removesuffix(b"\r")
        del self.buffer[: i + 1]
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ClientError(f"files: server sent invalid text to {what}", EXIT_PROTOCOL) from None


def _refusal(line: str, name: str) -> ClientError:
    """The error for a reply that is not the expected ``OK``."""
    code = line.split(" ", 2)[1] if line.startswith("ERR ") else ""
    if code == "not-found":
        return ClientError(f"files: {name}: not found on the server", EXIT_NOT_FOUND)
    if code == "forbidden":
        return ClientError(f"files: {name}: the server refuses to send it", EXIT_FORBIDDEN)
    if line.startswith("BYE"):
        return ClientError(f"files: the server closed the connection ({line})", EXIT_DROPPED)
    return ClientError(f"files: unexpected reply: {line[:200]}", EXIT_PROTOCOL)


async def list_remote(stream: trio.abc.Stream) -> list[tuple[int, str]]:
    """Send ``LIST`` and return ``(size, name)`` for every file, checking the count."""
    await stream.send_all(b"LIST\n")
    lines = _Lines(stream)
    files: list[tuple[int, str]] = []
    while True:
        line = await lines.line("LIST")
        if m := _FILE.fullmatch(line):
            files.append((int(m[1]), m[2]))
        elif line.startswith("END ") and line[4:].isdigit():
            if int(line[4:]) != len(files):
                raise ClientError("files: LIST count does not match", EXIT_PROTOCOL)
            return files
        else:
            raise _refusal(line, "LIST")


def _disk_error(exc: OSError, path: str) -> ClientError:
    return ClientError(f"files: {path}: {exc.strerror or exc}", EXIT_DISK)


_FALLOC_FL_KEEP_SIZE: Final = 1


@cache
def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate`` (loaded on first use: ctypes costs start-up time)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    func.restype = ctypes.c_int
    return func


def _reserve(fd: int, offset: int, length: int) -> None:
    """Reserve disk blocks for ``length`` bytes at ``offset`` without changing the size.

    Linux ``fallocate(FALLOC_FL_KEEP_SIZE)``: a full disk is reported before
    the download starts, not after a gigabyte, and the file system allocates
    one extent at once instead of block by block during writeback (measured
    here: 1 GiB written in 0.14 s every time, against 0.2 to 2.5 s without).
    The size is kept so that an interrupted download's ``.part`` length is
    still exactly the bytes received (what ``--resume`` relies on). Where
    this is not supported nothing is reserved.
    """
    fallocate = _load_fallocate() if length > 0 else None
    if fallocate is None:
        return
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        from ctypes import get_errno  # loaded already by _load_fallocate

        err = get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))
        # EOPNOTSUPP and the like: the file system cannot; writing still works.


@attrs.define(eq=False)
class _Sink:
    """The ``.part`` file and the running digest, fed by worker threads.

    Writes that are whole, aligned blocks go through a second descriptor
    opened with ``O_DIRECT``: they bypass the page cache, so a large
    download neither fills memory with dirty pages nor gets throttled by
    the kernel's writeback (measured here from the same state: 1 GiB in
    0.46 s every time with O_DIRECT, 0.15 to 3.7 s through the page cache,
    medians 0.8 to 1.9 s; see docs/protocol/files.md). The receive loop makes every chunk
    but the first and last one a whole aligned buffer (see
    :func:`_receive_into_sink`); the others, and every write on a file
    system without ``O_DIRECT`` (tmpfs), use the ordinary descriptor.
    """

    path: str
    fd: int
    direct_fd: int | None
    h: hashlib._Hash
    written: int
    #: The first write error (set by the writer thread; the transfer then stops).
    error: OSError | None = None

    @classmethod
    def open(cls, path: str, keep: int, size: int) -> _Sink:
        """Open ``path`` for a ``size``-byte file, keeping (and hashing) ``keep`` bytes.

        Blocking. Disk space for the rest is reserved up front (see :func:`_reserve`).
        """
        h = hashlib.sha256()
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if keep else os.O_TRUNC)
        # 0o666 minus the umask, as for any file a program saves (os.open's
        # default, 0o777, would make every download executable).
        fd = os.open(path, flags, 0o666)
        try:
            if hash_range(fd, 0, keep, h) != keep:
                raise OSError(errno.EIO, "the partial file got shorter while being read")
            os.ftruncate(fd, keep)
            _reserve(fd, keep, size - keep)
        except BaseException:
            os.close(fd)
            raise
        direct_fd: int | None = None
        if size - keep >= BUFFER and hasattr(os, "O_DIRECT"):
            try:
                direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                direct_fd = None  # not supported here (tmpfs): buffered writes only
        return cls(path, fd, direct_fd, h, keep)

    def close(self) -> None:
        """Close the descriptors (blocking)."""
        if self.direct_fd is not None:
            os.close(self.direct_fd)
        os.close(self.fd)

    def hash(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` to the digest (blocking; hashlib releases the GIL)."""
        self.h.update(data)

    def write(self, data: memoryview) -> None:
        """Append ``data`` to the file (blocking).

        ``data`` must start at the beginning of one of the page-aligned
        receive buffers (``O_DIRECT`` needs an aligned memory address).
        """
        view = data
        if (
            self.direct_fd is not None
            and self.written % _DIRECT_ALIGN == 0
            and len(view) % _DIRECT_ALIGN == 0
        ):
            try:
                while view:
                    n = os.pwrite(self.direct_fd, view, self.written)
                    self.written += n
                    view = view[n:]
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Alignment this device will not take: buffered from now on.
                os.close(self.direct_fd)
                self.direct_fd = None
        while view:
            n = os.pwrite(self.fd, view, self.written)
            self.written += n
            view = view[n:]


def _hash_worker(
    sink: _Sink, full: queue.SimpleQueue[_Item], hashed: queue.SimpleQueue[_Item]
) -> None:
    """Hash every buffer from ``full`` in order and pass it on (a worker thread)."""
    try:
        while (item := full.get()) is not None:
            buf, n = item
            sink.hash(memoryview(buf)[:n])
            hashed.put(item)
    finally:
        hashed.put(None)  # even after a crash here, so the writer thread ends too


def _write_worker(
    sink: _Sink, hashed: queue.SimpleQueue[_Item], give_back: Callable[[mmap.mmap | None], None]
) -> None:
    """Write every buffer from ``hashed`` in order, then hand it back (a worker thread).

    After a disk error the error is kept in ``sink.error``, ``None`` is handed
    back (the receiver stops) and the remaining buffers are only drained.
    """
    while (item := hashed.get()) is not None:
        buf, n = item
        if sink.error is None:
            try:
                sink.write(memoryview(buf)[:n])
            except OSError as exc:
                sink.error = exc
                give_back(None)
                continue
            give_back(buf)


async def _receive_into_sink(
    stream: trio.abc.Stream, lines: _Lines, sink: _Sink, announce: Announce, progress: Progress
) -> None:
    """Receive the file's remaining bytes into ``sink``; returns early at EOF or a disk error.

    A three-stage pipeline over a few reused buffers: receive (this task) ->
    hash (one thread) -> write (another thread) -> back to the receiver.
    The two threads run for the whole transfer and pass buffers through
    plain queues, so a buffer is hashed while the previous one is written
    and the next one received: the slowest stage (SHA-256, on this kind of
    machine) sets the pace, not the sum of the three. Both hashlib and
    ``os.pwrite`` release the GIL for the whole call.
    """
    remaining = announce.size - sink.written
    full: queue.SimpleQueue[_Item] = queue.SimpleQueue()
    hashed: queue.SimpleQueue[_Item] = queue.SimpleQueue()
    free_send, free_recv = trio.open_memory_channel[mmap.mmap | None](BUFFERS)
    for _ in range(BUFFERS):
        # Anonymous mmaps: page-aligned, as O_DIRECT writes need.
        free_send.send_nowait(mmap.mmap(-1, BUFFER))
    token = trio.lowlevel.current_trio_token()

    def give_back(buf: mmap.mmap | None) -> None:
        # From the writer thread: fire and forget, never blocks the writer.
        token.run_sync_soon(free_send.send_nowait, buf)

    async def receive() -> None:
        nonlocal remaining
        # Bytes that came with the OK line are the first of the file.
        head = bytes(lines.buffer[:remaining])
        del lines.buffer[: len(head)]
        pos = sink.written
        sock = stream.socket if type(stream) is trio.SocketStream else None
        lowat = _Lowat(sock)
        try:
            while remaining > 0:
                buf = await free_recv.receive()
                if buf is None:
                    return  # the writer failed: sink.error says why
                progress.update(sink.written)
                view = memoryview(buf)
                # Chunks end where the file offset is a multiple of BUFFER,
                # so every chunk but the first and the last is a whole,
                # aligned block (O_DIRECT in _Sink.write).
                want = min(BUFFER - pos % BUFFER, remaining)
                filled = min(len(head), want)
                view[:filled] = head[:filled]
                head = head[filled:]
                dropped = False
                try:
                    while filled < want:
                        if sock is not None:
                            lowat.set(want - filled)
                            n = await lowat.recv_into(sock, view[filled:want])
                        else:
                            data = await stream.receive_some(want - filled)
                            n = len(data)
                            view[filled : filled + n] = data
                        if not n:
                            break
                        filled += n
                except (trio.BrokenResourceError, ConnectionError, OSError):
                    # A drop: keep what came (the caller sees the short count).
                    dropped = True
                finally:
                    # Cancelled too (Ctrl-C): the bytes already received go to
                    # the .part, which a resume then need not fetch again.
                    del view
                    remaining -= filled
                    pos += filled
                    if filled:
                        full.put((buf, filled))
                if dropped or filled < want:
                    return
        finally:
            full.put(None)  # the workers finish what they hold, then stop
            lowat.reset()

    # The workers live as long as the transfer: they get their own limiter,
    # not Trio's shared default one (twenty downloads would hold all of its
    # tokens, and every other to_thread call, the server's included, would wait).
    own = trio.CapacityLimiter(2)
    async with trio.open_nursery() as nursery:
        # Not abandoned on cancel: the threads stop at the end-of-data mark
        # that receive() always queues, after at most BUFFERS buffers.
        nursery.start_soon(
            partial(trio.to_thread.run_sync, _hash_worker, sink, full, hashed, limiter=own)
        )
        nursery.start_soon(
            partial(trio.to_thread.run_sync, _write_worker, sink, hashed, give_back, limiter=own)
        )
        nursery.start_soon(receive)


@attrs.define(eq=False)
class _Lowat:
    """Receives with ``SO_RCVLOWAT`` raised: wake up for big batches only.

    Without it the receiver wakes for every 64 KiB segment that loopback
    delivers (about 16,000 wake-ups and event-loop turns per GiB); with it
    the kernel reports the socket readable once ``LOWAT`` bytes are queued
    (or the connection ends). The mark is never above the bytes still due
    in the current buffer: the server does not close after a file, so a
    higher mark would never be reached.

    The kernel's mark is a wake-up heuristic, and it was seen here to leave
    a blocked reader asleep with its bytes queued (a plain blocking reader,
    on loopback). So a wait with a raised mark is bounded by ``patience``:
    if nothing woke it by then, the mark goes back to 1 for the rest of
    the transfer, which costs speed, never correctness.
    """

    sock: trio.socket.SocketType | None
    patience: float = 0.05
    current: int = 1

    def set(self, want: int) -> None:
        """Wake up once ``want`` bytes (at most ``LOWAT``) are waiting."""
        mark = max(1, min(want, LOWAT))
        if self.sock is not None and mark != self.current:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            except OSError:
                self.sock = None  # not supported: every segment wakes us, still correct
                return
            self.current = mark

    async def recv_into(self, sock: trio.socket.SocketType, view: memoryview) -> int:
        """``sock.recv_into(view)``, falling back to a mark of 1 if the mark stalls."""
        if self.current > 1:
            with trio.move_on_after(self.patience):
                return await sock.recv_into(view)
            self.reset()  # nothing consumed: a cancelled wait takes no bytes
            self.sock = None
        return await sock.recv_into(view)

    def reset(self) -> None:
        """Back to the default (1), for whatever the connection does next."""
        self.set(1)


def _output_path(name: str, output: str | None) -> str:
    base = name.rsplit("/", 1)[-1]
    if output is None:
        return base
    if os.path.isdir(output):
        return os.path.join(output, base)
    return output


async def download(
    stream: trio.abc.Stream,
    name: str,
    path: str,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int], Progress] | None = None,
    preparing: Preparing | None = None,
) -> Announce:
    """Download ``name`` to ``path`` via ``path + ".part"``, verified; raise :exc:`ClientError`.

    With ``resume`` an existing ``.part`` is continued (``REST``). An
    existing ``path`` is refused (:data:`EXIT_EXISTS`) before anything is
    sent, unless ``force``. Returns what the server announced once ``path``
    holds the verified file. Cancelled, it returns only once every byte
    received so far is written to the ``.part``. ``preparing`` shows the
    wait for ``OK`` (default: a spinner when stderr is a terminal).
    """
    problem = name_problem(name)
    if problem in (NameProblem.EMPTY, NameProblem.CONTROL, NameProblem.ENCODING):
        # Names that cannot be sent as one UTF-8 line (a newline would even
        # be sent as a second command); the server would refuse them anyway.
        assert problem is not None
        raise ClientError(f"files: {name!r}: invalid name ({problem.value})", EXIT_FORBIDDEN)
    await trio.to_thread.run_sync(_check_destination, path, force)
    part = path + ".part"
    # The .part file is only created (or touched) once the server has said
    # OK: a refused name leaves the disk exactly as it was.
    keep = await trio.to_thread.run_sync(_part_size, part) if resume else 0
    lines = _Lines(stream)
    if keep:
        await stream.send_all(f"REST {keep}\nGET {name}\n".encode())
        reply = await lines.line("REST")
        if reply != f"OK rest {keep}":
            raise _refusal(reply, name)
    else:
        await stream.send_all(f"GET {name}\n".encode())
    preparing = preparing or Preparing.for_stderr(name)
    reply = await preparing.wait_for(partial(lines.line, "GET"))
    if keep and reply.startswith("ERR bad-offset"):
        # The kept part is longer than the file now is: start afresh.
        print(f"files: {part} is longer than the remote file; restarting", file=sys.stderr)
        keep = 0
        await stream.send_all(f"GET {name}\n".encode())
        reply = await preparing.wait_for(partial(lines.line, "GET"))
    announce = parse_ok(reply)
    if announce is None:
        raise _refusal(reply, name)
    try:
        sink = await trio.to_thread.run_sync(_Sink.open, part, keep, announce.size)
    except OSError as exc:
        raise _disk_error(exc, part) from None
    bar = (progress or Progress.for_stderr)(announce.size, keep)
    try:
        await _receive_into_sink(stream, lines, sink, announce, bar)
    finally:
        sink.close()
        bar.update(sink.written, final=True)  # ends the bar's line before any message
    if sink.error is not None:
        raise _disk_error(sink.error, part)
    if sink.written < announce.size:
        raise ClientError(
            f"files: connection lost after {sink.written} of {announce.size} bytes; "
            f"kept {part} (rerun with --resume to continue)",
            EXIT_DROPPED,
        )
    if sink.h.hexdigest() != announce.sha256:
        await trio.to_thread.run_sync(_remove_quietly, part)
        raise ClientError(
            f"files: {name}: sha256 mismatch (the file changed on the server or was "
            "damaged in transit); nothing kept",
            EXIT_MISMATCH,
        )
    try:
        await trio.to_thread.run_sync(_move_into_place, part, path, force)
    except OSError as exc:
        raise _disk_error(exc, path) from None
    return announce


def _check_destination(path: str, force: bool) -> None:
    """Refuse a ``path`` that exists unless ``force``, and a directory always (blocking)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _disk_error(exc, path) from None
    if stat.S_ISDIR(mode):
        # Checked now: os.replace would only fail after the whole download.
        raise ClientError(f"files: {path} is a directory", EXIT_DISK)
    if not force:
        raise ClientError(f"files: {path} exists; use --force to overwrite it", EXIT_EXISTS)


def _move_into_place(part: str, path: str, force: bool) -> None:
    """Rename the verified ``part`` to ``path`` (blocking).

    ``path`` is checked again: it may have appeared during the download. The
    complete ``.part`` is then kept (``--resume --force`` finishes at once).
    """
    _check_destination(path, force)
    os.replace(part, path)


def _part_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise _disk_error(exc, path) from None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_EXIT_CODES = (
    (0, "done"),
    (2, "bad command-line usage"),
    (3, "cannot connect (refused, timed out)"),
    (4, "connection dropped (a partial download is kept as PATH.part)"),
    (5, "the server said something unexpected"),
    (EXIT_NOT_FOUND, "no such file on the server"),
    (EXIT_FORBIDDEN, "the server refuses that name (outside the root, hidden, not a regular file)"),
    (EXIT_MISMATCH, "size or sha256 mismatch: nothing was kept"),
    (EXIT_DISK, "local disk error (cannot write PATH.part or rename it)"),
    (EXIT_TLS, "TLS handshake failed (e.g. certificate not trusted or not for --host)"),
    (EXIT_EXISTS, "PATH exists (use --force to overwrite it)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C): PATH.part is kept and the --resume command printed"),
)
# One status a line, in numeric order (built, so a new one cannot be glued
# onto its neighbour's line).
_EXIT_HELP = "exit status:\n" + "\n".join(
    f"  {code:<3} {text}" for code, text in sorted(_EXIT_CODES)
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List and download the files a trionet files server offers.",
        epilog=_EXIT_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lister = sub.add_parser("list", help="list the files: size and name, one a line")
    add_address_arguments(lister, DEFAULT_PORT)
    getter = sub.add_parser(
        "get",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXIT_HELP,
        help="download one file, verified by size and sha256",
        description=(
            # Raw text (for the exit status list): the lines are broken here.
            "Download NAME to PATH.part, verify its size and sha256, then rename it to\n"
            "PATH and print 'saved PATH (SIZE bytes, sha256 HEX)'. An existing PATH is\n"
            "only overwritten with --force. A progress bar is shown on stderr when it\n"
            "is a terminal. Ctrl-C keeps PATH.part and prints the command that resumes it."
        ),
    )
    getter.add_argument("name", metavar="NAME", help="the file's name as LIST shows it")
    getter.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        default=None,
        help="where to save it; a directory keeps the remote base name "
        "(default: the remote base name in the current directory)",
    )
    getter.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted download from PATH.part instead of starting "
        "over; the whole file is still verified (default: off)",
    )
    getter.add_argument(
        "--force",
        action="store_true",
        help=f"overwrite PATH if it exists (default: off; refused with exit status {EXIT_EXISTS})",
    )
    add_address_arguments(getter, DEFAULT_PORT)
    return parser


def client_main(argv: list[str]) -> int:
    """``python -m trionet.client files list|get``."""
    args = _build_parser().parse_args(argv)

    async def main() -> int:
        if args.command == "get":
            return await _get(args)
        stream = await connect_args(args, "files")
        async with stream:
            for size, name in await list_remote(stream):
                print(f"{size:>14}  {name}")
        return EXIT_OK

    return run_client(main, "files")


async def _get(args: argparse.Namespace) -> int:
    """``get``: download, then report what was saved, or what Ctrl-C left behind."""
    path = _output_path(args.name, args.output)
    # A local refusal needs no server: checked before connecting too.
    await trio.to_thread.run_sync(_check_destination, path, args.force)
    announce: Announce | None = None
    preparing = Preparing.for_stderr(args.name)
    with trio.CancelScope() as scope, _sigint_cancels(scope):
        stream = await connect_args(args, "files")
        async with stream:
            announce = await download(
                stream,
                args.name,
                path,
                resume=args.resume,
                force=args.force,
                preparing=preparing,
            )
    if announce is None:  # cancelled by Ctrl-C
        part = path + ".part"
        # download() has returned, so its writer thread is done: the size on
        # disk is every byte kept, all of them a prefix of the file.
        kept = await trio.to_thread.run_sync(_part_size, part)
        for line in interrupted_message(args.name, part, kept, preparing.waiting):
            print(line, file=sys.stderr)
        if kept:
            print(f"files: to continue: {_resume_command(args, path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"saved {path} ({announce.size} bytes, sha256 {announce.sha256})")
    return EXIT_OK


def interrupted_message(name: str, part: str, kept: int, preparing: bool) -> list[str]:
    """What Ctrl-C left behind, in words (``preparing``: no ``OK`` had come yet)."""
    if kept:
        return [f"files: interrupted; kept {part} ({kept} bytes)"]
    if preparing:
        return [
            f"files: interrupted while the server was still preparing {name} (it computes "
            "the file's sha256 before sending); nothing was received"
        ]
    return ["files: interrupted before any byte was received"]


@contextlib.contextmanager
def _sigint_cancels(scope: trio.CancelScope) -> Iterator[None]:
    """Make the first Ctrl-C (SIGINT) cancel ``scope`` instead of raising KeyboardInterrupt.

    A KeyboardInterrupt can strike between any two bytecodes of the receive
    loop, even in the ``finally`` that tells the worker threads to stop
    (they would then wait forever); a cancellation arrives only at an
    ``await``, and the pipeline ends cleanly from there. A second Ctrl-C
    gets the previous handler back: it interrupts at once. Signals reach
    only the main thread, so elsewhere (a test running the client in a
    worker thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    token = trio.lowlevel.current_trio_token()

    def on_sigint(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, previous)
        token.run_sync_soon(scope.cancel)  # safe from a signal handler

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _resume_command(args: argparse.Namespace, path: str) -> str:
    """The shell command that continues this download with ``--resume``."""
    defaults = _build_parser().parse_args(["get", "NAME"])  # the parser knows the defaults
    # "./" keeps a PATH starting with "-" from looking like an option.
    options = ["-o", os.path.join(".", path) if path.startswith("-") else path, "--resume"]
    if args.force:
        options.append("--force")
    if args.host != defaults.host:
        options += ["--host", args.host]
    if args.port != defaults.port:
        options += ["--port", str(args.port)]
    if getattr(args, "cafile", None):
        options += ["--cafile", args.cafile]
    elif getattr(args, "tls", False):
        options.append("--tls")
    words = [*options, "--", args.name] if args.name.startswith("-") else [args.name, *options]
    return f"{_PROG} get {shlex.join(words)}"
