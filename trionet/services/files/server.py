"""files: read-only file transfer (port 7004).

``LIST`` lists the visible regular files under the root, ``GET NAME``
answers ``OK <size> <sha256>`` followed by exactly ``size`` raw bytes (from
the ``REST`` offset, if one was given), and the connection then takes the
next command. See ``docs/protocol/files.md``.

Safety, in the order a request meets it:

1. the name's text is judged by :func:`~trionet.services.files.paths.name_problem`;
2. the name is resolved (symlinks included) and the result must lie inside
   the root and have no hidden part;
3. the file is opened component by component from a descriptor of the
   root with ``O_NOFOLLOW``, so a symlink swapped in after step 2 makes the
   open fail instead of leading outside; the last component is ``lstat``-ed
   first and opened only if it is a regular file, with ``O_NONBLOCK`` (a
   FIFO swapped in at the last moment cannot hang the open), and the
   opened descriptor is ``fstat``-ed and must be that same regular file;
4. size, digest and bytes all come from that one descriptor.

Nothing is ever opened for writing. All file-system work runs in worker
threads, so a slow disk or a huge directory never stalls other clients.

The bytes go out with ``conn.send_file``: the connection uses
``os.sendfile`` on a plain TCP socket (zero copy, about 3x faster than a
copy loop here) and reads 1 MiB chunks in worker threads on any other
stream (TLS, memory). A client that stops reading mid-transfer is dropped
by the idle timeout like any other stalled send.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
from typing import Any, ClassVar, Self

import attrs
import trio

from ..._connection import Connection
from ..._service import Service
from .digest import DigestCache, DigestKey
from .paths import is_hidden_part, listable, name_problem, relative_inside

__all__ = [
    "FilesService",
    "OpenedFile",
    "Refused",
    "list_files",
    "open_served",
]

log = logging.getLogger("trionet.files")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
# Offsets longer than this many digits are refused outright (no file is
# that big; it also keeps int() far from Python's digit limit).
_MAX_OFFSET_DIGITS = 19


class Refused(Exception):
    """A ``GET`` answered with ``ERR <code> <name>``."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(f"{code}: {why}")
        self.code = code
        self.why = why


@attrs.define(eq=False)
class OpenedFile:
    """A file opened for one transfer: everything comes from ``fd``."""

    fd: int
    key: DigestKey

    @property
    def size(self) -> int:
        """The size promised in ``OK`` (from ``fstat`` of ``fd``)."""
        return self.key.size

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


def _open_below(root_fd: int, parts: tuple[str, ...]) -> OpenedFile:
    dfd = root_fd
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            if dfd != root_fd:
                os.close(dfd)
            dfd = nfd
        # lstat first: a FIFO or device is refused without being opened
        # at all (opening some devices has side effects).
        st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("forbidden", "not a regular file")
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
    finally:
        if dfd != root_fd:
            os.close(dfd)
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise Refused("forbidden", "replaced while being opened")
        return OpenedFile(fd, DigestKey.from_stat(fst))
    except BaseException:
        os.close(fd)
        raise


def open_served(root: str, name: str) -> OpenedFile:
    """Open ``name`` below ``root`` for reading, or raise :exc:`Refused` (blocking).

    ``root`` must be an absolute, resolved path (``os.path.realpath``).
    """
    problem = name_problem(name)
    if problem is not None:
        raise Refused("forbidden", problem.value)
    try:
        real = os.path.realpath(os.path.join(root, name))
    except OSError as exc:
        # E.g. EINVAL: a symlink on the path was replaced by a plain file
        # between realpath's lstat and its readlink (a rename race).
        raise _refused(exc) from None
    parts = relative_inside(root, real)
    if parts is None:
        raise Refused("forbidden", "resolves outside the root")
    if not listable(parts):
        raise Refused("forbidden", "resolves to a hidden or unservable name")
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused("not-found", f"root unavailable: {exc.strerror}") from None
    try:
        return _open_below(root_fd, parts)
    except OSError as exc:
        raise _refused(exc) from None
    finally:
        os.close(root_fd)


def _refused(exc: OSError) -> Refused:
    """The reply to an error met while resolving or opening a name."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return Refused("not-found", "no such file")
    if exc.errno == errno.ENAMETOOLONG:
        # A part longer than the file system allows cannot name a file:
        # the name is not forbidden, there is just nothing by that name.
        return Refused("not-found", "name too long")
    if exc.errno == errno.EINVAL:
        # The path changed while it was being resolved: nothing stable
        # by that name right now.
        return Refused("not-found", "changed while being resolved")
    # ELOOP: a symlink loop, or a symlink appeared on the resolved path
    # since it was resolved; EACCES/EPERM: not ours to read. Anything else
    # (EIO...) is refused too: the client cannot do better by retrying.
    return Refused("forbidden", exc.strerror or "cannot open")


def shown(text: str) -> str:
    """``text`` as echoed in a reply: control characters as ``\\xNN`` escapes.

    Error replies repeat the name the client sent, but a raw control
    character could end the reply line early (a CR before the LF would
    make it CRLF) or drive the client's terminal. Escaping cannot collide
    with a servable name: names holding a backslash are always forbidden.
    """
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch.isprintable()
        else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )


def list_files(root: str) -> list[tuple[str, int]]:
    """``(name, size)`` of every servable regular file below ``root``, sorted (blocking).

    Hidden entries are skipped (hidden directories are not entered), as
    are names ``GET`` would refuse. A symlink is listed when it points to
    a regular file inside the root whose resolved name is visible, exactly
    as ``GET`` would serve it; symlinked directories are not followed (no
    loops, and every file inside the root is listed under its own name).
    Unreadable directories are skipped.
    """
    found: list[tuple[str, int]] = []
    pending: list[tuple[str, ...]] = [()]
    while pending:
        prefix = pending.pop()
        try:
            with os.scandir(os.path.join(root, *prefix)) as entries:
                listing = list(entries)
        except OSError:
            continue
        for entry in listing:
            if is_hidden_part(entry.name):
                continue
            parts = (*prefix, entry.name)
            if not listable(parts):
                continue
            try:
                if entry.is_symlink():
                    target = relative_inside(root, os.path.realpath(entry.path))
                    if target is None or not listable(target):
                        continue
                    st = os.stat(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(parts)
                    continue
                else:
                    st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(("/".join(parts), st.st_size))
    found.sort()
    return found


def _parse_offset(text: str) -> int | None:
    """The offset in a ``REST`` argument (ASCII digits, spaces around allowed)."""
    digits = text.strip(" ")
    if not digits or len(digits) > _MAX_OFFSET_DIGITS or not digits.isascii():
        return None
    return int(digits) if digits.isdigit() else None


@attrs.define(kw_only=True, eq=False)
class FilesService(Service):
    """Serves the regular files below ``root``, read-only."""

    name: ClassVar[str] = "files"
    default_port: ClassVar[int] = 7004
    summary: ClassVar[str] = "read-only file transfer with sha256 digests and resume"

    #: The directory served (default: the working directory at start).
    root: str = attrs.field(default=".", converter=os.path.realpath)
    #: Digests by (device, inode, size, mtime), shared by all connections.
    digests: DigestCache = attrs.field(factory=DigestCache)

    def __attrs_post_init__(self) -> None:
        if not os.path.isdir(self.root):
            raise ValueError(f"root is not a directory: {self.root}")

    async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Say once, at start, which folder is shared and how many files it lists.

        With no ``--root`` the folder is wherever the server was started, so
        the operator reads here what the world can download. Counting walks
        the tree, so it runs in a worker thread after start-up, never in
        the way of the first clients.
        """
        task_status.started()
        files = await trio.to_thread.run_sync(list_files, self.root)
        total = sum(size for _, size in files)
        log.info(
            "files: sharing %s read-only (%d file%s, %d bytes)",
            self.root,
            len(files),
            "" if len(files) == 1 else "s",
            total,
        )

    async def handle(self, conn: Connection) -> None:
        offset = 0  # set by REST, used (and reset) by the next GET
        async for line in conn:
            word, space, arg = line.partition(" ")
            command = word.upper()
            # (QUIT never gets here: the connection answers it with BYE.)
            if command == "GET":
                start, offset = offset, 0
                if not arg:
                    conn.write_line("ERR bad-request GET needs a file name")
                elif not await self._get(conn, arg, start):
                    return
            elif command == "REST":
                value = _parse_offset(arg)
                if value is None:
                    conn.write_line("ERR bad-request REST needs a byte offset")
                else:
                    offset = value
                    conn.write_line(f"OK rest {value}")
            elif command == "LIST":
                if arg or space:
                    conn.write_line("ERR bad-request LIST takes no argument")
                else:
                    await self._list(conn)
            elif not word:
                conn.write_line("ERR bad-request empty command")
            else:
                conn.write_line(f"ERR unknown-command {shown(word)}")

    async def _list(self, conn: Connection) -> None:
        files = await trio.to_thread.run_sync(list_files, self.root)
        for name, size in files:
            conn.write_line(f"FILE {size} {name}")
        conn.write_line(f"END {len(files)}")

    async def _get(self, conn: Connection, name: str, offset: int) -> bool:
        """Answer one ``GET``; ``False`` if the connection must end."""
        # Opening and hashing run in worker threads: work, not waiting on the
        # client, so they never count as idle. The send counts only if it
        # stalls (the client stopped reading) for the whole idle timeout.
        try:
            opened = await trio.to_thread.run_sync(open_served, self.root, name)
        except Refused as exc:
            conn.log.info("GET %r refused: %s", name, exc)
            conn.write_line(f"ERR {exc.code} {shown(name)}")
            return True
        try:
            if offset > opened.size:
                conn.write_line(f"ERR bad-offset {opened.size}")
                return True
            digest = await self.digests.digest(opened.fd, opened.key)
            if digest is None:
                conn.log.warning("GET %r: file got shorter while hashing", name)
                conn.write_line(f"ERR not-found {shown(name)}")
                return True
            conn.write_line(f"OK {opened.size} {digest}")
            return await self._send(conn, opened, offset)
        finally:
            opened.close()

    async def _send(self, conn: Connection, opened: OpenedFile, offset: int) -> bool:
        try:
            await conn.send_file(opened.fd, offset, opened.size - offset)
        except EOFError:
            # The byte count was promised in OK; the only honest way out is
            # to close, and the client keeps its .part for a resume.
            conn.log.warning("file got shorter during the transfer: closing")
            conn.end_reason = "truncated"
            return False
        return True

    # -- command line -----------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--root",
            default=".",
            metavar="DIR",
            help="directory to serve, read-only; hidden files are left out "
            "(default: the working directory)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **common: Any) -> Self:
        return cls(root=args.root, **common)
