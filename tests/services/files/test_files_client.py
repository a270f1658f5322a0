"""The files client: verified downloads, resume, refusals and exit statuses.

Each scenario runs over memory streams (the client's generic receive path)
and over TCP on 127.0.0.1 (the ``recv_into`` fast path). A connection
killed mid-transfer is a stream wrapper in memory and a byte-limited proxy
over TCP.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import mmap
import os
import random
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from test_files import Wire, running

from trionet._client import EXIT_DROPPED, EXIT_INTERRUPTED, EXIT_REFUSED, ClientError
from trionet.services.files.client import (
    EXIT_DISK,
    EXIT_EXISTS,
    EXIT_FORBIDDEN,
    EXIT_MISMATCH,
    EXIT_NOT_FOUND,
    Preparing,
    Progress,
    client_main,
    download,
    list_remote,
)
from trionet.services.files.digest import DigestCache, DigestKey
from trionet.services.files.server import FilesService
from trionet.testing import open_memory_server

TRANSPORTS = ["memory", "tcp"]
BIG = 20 << 20
SMALL_SHA = "sha256 " + hashlib.sha256(b"small file\n").hexdigest()
ROOT = Path(__file__).resolve().parents[3]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A root with a 20 MiB random file (once per module) and a small one."""
    root = tmp_path_factory.mktemp("served")
    data = random.Random(7).randbytes(BIG)
    (root / "big.bin").write_bytes(data)
    (root / "sub").mkdir()
    (root / "sub" / "small.txt").write_bytes(b"small file\n")
    (root / ".hidden").write_bytes(b"no")
    return root, data


class CutStream(trio.abc.Stream):
    """Passes ``limit`` received bytes through, then reports end of file.

    With ``stalled`` it blocks instead (the bytes stop coming) and sets the event.
    """

    def __init__(self, inner: trio.abc.Stream, limit: int, stalled: trio.Event | None = None):
        self.inner = inner
        self.left = limit
        self.stalled = stalled
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.left <= 0:
            if self.stalled is not None:
                self.stalled.set()
                await trio.sleep_forever()
            await trio.lowlevel.checkpoint()
            return b""
        data = await self.inner.receive_some(min(max_bytes or 65536, self.left))
        self.left -= len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def cutting_proxy(
    target: tuple[str, int], limit: int, stalled: trio.Event | None = None
) -> AsyncIterator[tuple[str, int]]:
    """A TCP proxy on 127.0.0.1 that closes each connection after ``limit`` bytes down.

    With ``stalled`` it keeps the connection open instead, sends nothing
    more, and sets the event.
    """

    async def handle(client: trio.SocketStream) -> None:
        # (client first: closed even if connecting upstream fails or is cancelled)
        async with (
            client,
            await trio.open_tcp_stream(*target) as upstream,
            trio.open_nursery() as nursery,
        ):

            async def up() -> None:
                while data := await client.receive_some():
                    await upstream.send_all(data)

            nursery.start_soon(up)
            left = limit
            while left > 0 and (data := await upstream.receive_some(min(left, 65536))):
                await client.send_all(data)
                left -= len(data)
            if stalled is not None:
                stalled.set()
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        yield listener.socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def tcp_address(wire: Wire) -> tuple[str, int]:
    stream = await wire.open_stream()
    assert isinstance(stream, trio.SocketStream)
    address = stream.socket.getpeername()[:2]
    await stream.aclose()
    return address  # type: ignore[no-any-return]


@asynccontextmanager
async def cut_connection(
    wire: Wire, transport: str, limit: int, stalled: trio.Event | None = None
) -> AsyncIterator[trio.abc.Stream]:
    """A client connection to ``wire`` that dies (or with ``stalled``, stalls) after ``limit``
    received bytes."""
    if transport == "memory":
        yield CutStream(await wire.open_stream(), limit, stalled)
        return
    async with (
        cutting_proxy(await tcp_address(wire), limit, stalled) as (host, port),
        await trio.open_tcp_stream(host, port) as stream,
    ):
        yield stream


def service(root: Path) -> FilesService:
    return FilesService(root=str(root), port=0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_download_verifies_and_renames(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    root, data = served
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            out = tmp_path / "copy.bin"
            announce = await download(await wire.open_stream(), "big.bin", str(out))
            assert (announce.size, announce.sha256) == (BIG, sha(data))
            assert out.read_bytes() == data
            assert not (tmp_path / "copy.bin.part").exists()
            small = tmp_path / "small.txt"
            await download(await wire.open_stream(), "sub/small.txt", str(small))
            assert small.read_bytes() == b"small file\n"
            files = await list_remote(await wire.open_stream())
            assert files == [(BIG, "big.bin"), (11, "sub/small.txt")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_after_a_killed_connection(
    served: tuple[Path, bytes], transport: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet.access")
    root, data = served
    out = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            async with cut_connection(wire, transport, 5_000_000) as stream:
                with pytest.raises(ClientError) as info:
                    await download(stream, "big.bin", str(out))
            assert info.value.status == EXIT_DROPPED
            assert "--resume" in str(info.value)
            kept = part.read_bytes()
            assert 0 < len(kept) < 5_000_000 and data.startswith(kept)
            assert not out.exists()
            caplog.clear()
            await download(await wire.open_stream(), "big.bin", str(out), resume=True)
            assert out.read_bytes() == data and not part.exists()
    # Only the missing bytes crossed the wire the second time. (The first
    # connection sent only "GET big.bin\n", 12 bytes; the resumed one more.)
    logs = [r.getMessage() for r in caplog.records if r.name == "trionet.access"]
    (line,) = [m for m in logs if " in=12 " not in m]
    sent = int(line.rsplit(" out=", 1)[1])
    assert sent < BIG - len(kept) + 200


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_checks_the_whole_digest(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    # A kept part whose bytes are wrong: the bytes after it are right, but
    # the whole-file digest is not, so nothing is kept.
    root, _ = served
    out = tmp_path / "big.bin"
    (tmp_path / "big.bin.part").write_bytes(b"\0" * 1000)
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            with pytest.raises(ClientError) as info:
                await download(await wire.open_stream(), "big.bin", str(out), resume=True)
            assert info.value.status == EXIT_MISMATCH
            assert not out.exists() and not (tmp_path / "big.bin.part").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_with_a_part_longer_than_the_file_restarts(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    root, _ = served
    out = tmp_path / "small.txt"
    (tmp_path / "small.txt.part").write_bytes(b"x" * 100)
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            await download(await wire.open_stream(), "sub/small.txt", str(out), resume=True)
            assert out.read_bytes() == b"small file\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_file_changed_under_the_server_is_refused(tmp_path: Path, transport: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = root / "f.bin"
    target.write_bytes(b"a" * 100_000)
    st = target.stat()
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            first = tmp_path / "first"
            await download(await wire.open_stream(), "f.bin", str(first))
            # Rewrite in place, same size, mtime put back: the server's
            # cached digest now describes other bytes than it will send.
            with open(target, "r+b") as f:  # noqa: ASYNC230 - tiny test file
                f.write(b"b")
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            out = tmp_path / "second"
            with pytest.raises(ClientError) as info:
                await download(await wire.open_stream(), "f.bin", str(out))
            assert info.value.status == EXIT_MISMATCH and "sha256 mismatch" in str(info.value)
            assert not out.exists() and not (tmp_path / "second.part").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_twenty_parallel_downloads_verify(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    root, data = served
    svc = service(root)
    with trio.fail_after(25):
        async with running(svc, transport) as wire:

            async def one(i: int) -> None:
                await download(await wire.open_stream(), "big.bin", str(tmp_path / f"c{i}"))

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
    assert svc.digests.computed == 1  # one hash for twenty downloads
    want = sha(data)
    for i in range(20):
        got = await trio.to_thread.run_sync((tmp_path / f"c{i}").read_bytes)
        assert sha(got) == want


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refusals_and_disk_errors(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    root, _ = served
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            cases = [
                ("nope", str(tmp_path / "x"), EXIT_NOT_FOUND),
                (".hidden", str(tmp_path / "x"), EXIT_FORBIDDEN),
                ("../etc/passwd", str(tmp_path / "x"), EXIT_FORBIDDEN),
                ("sub/small.txt", str(tmp_path / "missing-dir" / "x"), EXIT_DISK),
                # Refused before sending: the newline would be a second command.
                ("nope\nLIST", str(tmp_path / "x"), EXIT_FORBIDDEN),
            ]
            for name, out, status in cases:
                with pytest.raises(ClientError) as info:
                    await download(await wire.open_stream(), name, out)
                assert info.value.status == status
            assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
async def test_a_download_gets_the_usual_mode_for_new_files(
    served: tuple[Path, bytes], transport: str, umask: int, mode: int, tmp_path: Path
) -> None:
    # 0o666 minus the umask, like any file a program saves: never executable.
    root, _ = served
    out = tmp_path / "small.txt"
    old = os.umask(umask)
    try:
        with trio.fail_after(20):
            async with running(service(root), transport) as wire:
                await download(await wire.open_stream(), "sub/small.txt", str(out))
    finally:
        os.umask(old)
    assert out.read_bytes() == b"small file\n"
    assert out.stat().st_mode & 0o7777 == mode


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_existing_file_is_only_overwritten_with_force(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    root, data = served
    out = tmp_path / "big"
    part = tmp_path / "big.part"
    out.write_bytes(b"precious")
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            # Refused before anything is sent or created, with --resume too.
            for resume in (False, True):
                stream = CutStream(await wire.open_stream(), 1 << 30)  # records what is sent
                with pytest.raises(ClientError) as info:
                    await download(stream, "big.bin", str(out), resume=resume)
                assert stream.sent == b""
                assert info.value.status == EXIT_EXISTS
                assert str(info.value) == f"files: {out} exists; use --force to overwrite it"
                assert out.read_bytes() == b"precious" and not part.exists()
            # A kept part is left as it was, then continued with --resume --force.
            part.write_bytes(data[:1000])
            with pytest.raises(ClientError) as info:
                await download(await wire.open_stream(), "big.bin", str(out), resume=True)
            assert info.value.status == EXIT_EXISTS and part.read_bytes() == data[:1000]
            await download(await wire.open_stream(), "big.bin", str(out), resume=True, force=True)
            assert out.read_bytes() == data and not part.exists()
            # --force alone starts over and replaces the file.
            out.write_bytes(b"precious")
            await download(await wire.open_stream(), "sub/small.txt", str(out), force=True)
            assert out.read_bytes() == b"small file\n"
            # A directory is never replaced, --force or not.
            a_dir = tmp_path / "small.txt"
            a_dir.mkdir()
            with pytest.raises(ClientError) as info:
                await download(await wire.open_stream(), "sub/small.txt", str(a_dir), force=True)
            assert info.value.status == EXIT_DISK and "is a directory" in str(info.value)
            assert not (tmp_path / "small.txt.part").exists()


async def test_a_file_that_appears_during_the_download_is_not_overwritten(
    served: tuple[Path, bytes], tmp_path: Path
) -> None:
    root, data = served
    out = tmp_path / "big"

    def progress(total: int, start: int) -> Progress:
        out.write_bytes(b"written meanwhile")  # after OK, before the bytes
        return Progress(total)

    with trio.fail_after(20):
        async with running(service(root), "memory") as wire:
            with pytest.raises(ClientError) as info:
                await download(await wire.open_stream(), "big.bin", str(out), progress=progress)
            assert info.value.status == EXIT_EXISTS
            assert out.read_bytes() == b"written meanwhile"
            # The verified part is kept: --resume --force only renames it.
            part = tmp_path / "big.part"
            assert await trio.to_thread.run_sync(part.read_bytes) == data
            await download(await wire.open_stream(), "big.bin", str(out), resume=True, force=True)
    assert await trio.to_thread.run_sync(out.read_bytes) == data


# -- the command line -----------------------------------------------------------------


async def run_cli(argv: list[str]) -> int:
    """Run the client's ``main`` (its own ``trio.run``) in a worker thread."""
    return await trio.to_thread.run_sync(client_main, argv)


async def test_cli_get_list_and_exit_statuses(
    served: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, data = served
    with trio.fail_after(20):
        async with running(service(root), "tcp") as wire:
            host, port = await tcp_address(wire)
            addr = ["--host", host, "--port", str(port)]
            assert await run_cli(["list", *addr]) == 0
            out = capsys.readouterr().out.splitlines()
            assert [line.split() for line in out] == [
                [str(BIG), "big.bin"],
                ["11", "sub/small.txt"],
            ]
            # -o DIR keeps the remote base name.
            assert await run_cli(["get", "sub/small.txt", "-o", str(tmp_path), *addr]) == 0
            small = tmp_path / "small.txt"
            assert small.read_bytes() == b"small file\n"
            assert capsys.readouterr().out == f"saved {small} (11 bytes, {SMALL_SHA})\n"
            # Not again without --force: one line, and not even a connection.
            get_small = ["get", "sub/small.txt", "-o", str(small)]
            assert await run_cli([*get_small, "--port", "1"]) == EXIT_EXISTS
            refusal = f"files: {small} exists; use --force to overwrite it\n"
            assert capsys.readouterr().err == refusal
            small.write_bytes(b"old")
            assert await run_cli([*get_small, "--force", *addr]) == 0
            assert small.read_bytes() == b"small file\n"
            assert capsys.readouterr().out == f"saved {small} (11 bytes, {SMALL_SHA})\n"
            assert await run_cli(["get", "nope", *addr]) == EXIT_NOT_FOUND
            assert await run_cli(["get", ".hidden", *addr]) == EXIT_FORBIDDEN
            err = capsys.readouterr().err.splitlines()
            assert err == [
                "files: nope: not found on the server",
                "files: .hidden: the server refuses to send it",
            ]
            async with cutting_proxy((host, port), 3_000_000) as (phost, pport):
                cut = ["--host", phost, "--port", str(pport)]
                out_path = str(tmp_path / "big")
                assert await run_cli(["get", "big.bin", "-o", out_path, *cut]) == EXIT_DROPPED
            (line,) = capsys.readouterr().err.splitlines()
            assert "connection lost" in line and "big.part" in line
            assert await run_cli(["get", "big.bin", "-o", out_path, "--resume", *addr]) == 0
            assert (tmp_path / "big").read_bytes() == data
    # Nothing listens there any more.
    assert await run_cli(["list", *addr]) == EXIT_REFUSED
    assert "cannot connect" in capsys.readouterr().err


def test_cli_help_and_usage_in_a_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "trionet.client", "files"]
    top = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=20)
    assert top.returncode == 0
    for text in ("list", "get", "exit status", "digest", "local disk error"):
        assert text in top.stdout.replace("sha256", "digest")
    # One exit status a line, in numeric order.
    statuses = top.stdout.split("exit status:\n", 1)[1].splitlines()
    codes = [int(line.split()[0]) for line in statuses if line.strip()]
    assert codes == sorted(codes) and {0, 10, EXIT_EXISTS, EXIT_INTERRUPTED} <= set(codes)
    for line in statuses:
        assert not re.search(r"\s\d{1,3} [A-Za-z]", line.strip()[4:]), line  # no glued status
    get = subprocess.run(
        [*cmd, "get", "--help"], capture_output=True, text=True, env=env, timeout=20
    )
    assert get.returncode == 0
    for text in ("--resume", "--force", "--output", "--host", "--port", "default: 7004"):
        assert text in get.stdout
    assert "default: off" in get.stdout and f"  {EXIT_INTERRUPTED} interrupted" in get.stdout
    bad = subprocess.run([*cmd, "get"], capture_output=True, text=True, env=env, timeout=20)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


async def test_memory_server_with_lockstep_download(
    served: tuple[Path, bytes], tmp_path: Path
) -> None:
    # Back-pressure all the way: every server send waits for the client.
    root, data = served
    with trio.fail_after(20):
        async with open_memory_server(service(root), lockstep=True) as srv:
            out = tmp_path / "b"
            await download(await srv.open_stream(), "big.bin", str(out))
            assert sha(out.read_bytes()) == sha(data)


def test_sink_direct_writes_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whole aligned buffers go through the O_DIRECT descriptor where the file
    # system has one; if the device refuses (EINVAL) the sink falls back to
    # buffered writes without losing or reordering a byte.
    from trionet.services.files import client as fc

    size = 3 * fc.BUFFER + 123
    data = random.Random(9).randbytes(size)
    buf = mmap.mmap(-1, fc.BUFFER)
    direct_writes = 0
    real_pwrite = os.pwrite

    def pwrite(fd: int, chunk: memoryview, offset: int) -> int:
        nonlocal direct_writes
        if fd == sink.direct_fd:
            direct_writes += 1
            if direct_writes == 2:
                raise OSError(errno.EINVAL, "refused")
        return real_pwrite(fd, chunk, offset)

    monkeypatch.setattr(fc.os, "pwrite", pwrite)
    path = str(tmp_path / "f.part")
    sink = fc._Sink.open(path, 0, size)
    has_direct = sink.direct_fd is not None
    try:
        for start in range(0, size, fc.BUFFER):
            piece = data[start : start + fc.BUFFER]
            buf[: len(piece)] = piece
            sink.hash(memoryview(buf)[: len(piece)])
            sink.write(memoryview(buf)[: len(piece)])
            # The reserved space never shows in the size: it stays the bytes written.
            assert os.stat(path).st_size == start + len(piece)
    finally:
        sink.close()
    assert Path(path).read_bytes() == data and sink.h.hexdigest() == sha(data)
    if has_direct:  # not on tmpfs
        assert direct_writes == 2 and sink.direct_fd is None


async def test_receive_mark_that_is_never_reached_falls_back() -> None:
    # SO_RCVLOWAT is only a wake-up hint: a reader waiting under a raised
    # mark that the kernel never reports as reached must still get its bytes.
    from trionet.services.files import client as fc

    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = trio.socket.socket()
        with sender:
            await sender.connect(listener.getsockname())
            receiver, _ = await listener.accept()
            with receiver:
                lowat = fc._Lowat(receiver, patience=0.01)
                lowat.set(1 << 20)
                assert lowat.current == min(1 << 20, fc.LOWAT)

                async def send_later() -> None:
                    # Far below the mark, and only after the reader gave up on it.
                    await trio.sleep(0.2)
                    await sender.send(b"0123456789")

                buf = bytearray(64)
                with trio.fail_after(10):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send_later)
                        n = await lowat.recv_into(receiver, memoryview(buf))
                assert buf[:n] == b"0123456789"[:n] and n > 0
                # The mark is back at 1 for the rest of this transfer.
                assert lowat.current == 1 and lowat.sock is None
                assert receiver.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVLOWAT) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_write_error_mid_transfer_stops_the_download(
    served: tuple[Path, bytes], transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer thread fails on its second buffer: the receiver stops, the
    # threads end, and the error is reported as a disk error (no rename).
    from trionet.services.files import client as fc

    root, _ = served
    real_write = fc._Sink.write
    calls = 0

    def write(self: fc._Sink, data: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(fc._Sink, "write", write)
    out = tmp_path / "big"
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            with pytest.raises(ClientError) as info:
                await download(await wire.open_stream(), "big.bin", str(out))
    assert info.value.status == EXIT_DISK
    assert "No space left on device" in str(info.value)
    assert not out.exists()
    assert calls == 2  # nothing written after the failure


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancelled_download_keeps_a_consistent_part(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    # Cancelled while waiting for bytes that do not come (over TCP with the
    # receive mark raised): download returns at once, the worker threads
    # end, nothing is renamed, and the kept .part is a prefix a resume can
    # continue into the verified file.
    root, data = served
    out = tmp_path / "big"
    head = len(f"OK {BIG} {sha(data)}\n")
    with trio.fail_after(20):
        async with running(service(root), transport) as wire:
            stalled = trio.Event()
            async with (
                cut_connection(wire, transport, 9_000_000, stalled) as stream,
                stream,
                trio.open_nursery() as nursery,
            ):

                async def get() -> None:
                    await download(stream, "big.bin", str(out))

                nursery.start_soon(get)
                await stalled.wait()
                if transport == "tcp":
                    await trio.sleep(0.1)  # the last bytes are still on their way
                nursery.cancel_scope.cancel()
            assert not out.exists()
            kept = await trio.to_thread.run_sync(Path(str(out) + ".part").read_bytes)
            assert kept == data[: len(kept)]
            if transport == "memory":
                # Every byte received is kept, also those of a buffer not yet full.
                assert len(kept) == 9_000_000 - head
            else:
                assert len(kept) <= 9_000_000 - head
            await download(await wire.open_stream(), "big.bin", str(out), resume=True)
    assert await trio.to_thread.run_sync(out.read_bytes) == data


async def test_a_crash_in_the_hash_thread_does_not_hang(
    served: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trionet.services.files import client as fc

    root, _ = served
    calls = 0
    real_hash = fc._Sink.hash

    def hash_(self: fc._Sink, data: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("hash crashed")
        real_hash(self, data)

    monkeypatch.setattr(fc._Sink, "hash", hash_)
    out = tmp_path / "big"
    caught: BaseException | None = None
    with trio.fail_after(20):
        async with running(service(root), "tcp") as wire:
            try:
                await download(await wire.open_stream(), "big.bin", str(out))
            except Exception as exc:  # an exception group from the pipeline's nursery
                caught = exc
    assert caught is not None and "hash crashed" in repr(caught)
    assert not out.exists()


_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


async def _get_from(
    nursery: trio.Nursery, handle: Callable[[trio.SocketStream], Awaitable[None]], out: Path
) -> tuple[trio.Process, int]:
    """A fake files server running ``handle`` on 127.0.0.1, and a real client process
    getting ``big.bin`` from it into ``out`` (stdout and stderr piped); (client, port).

    run_process kills the client if the test fails or times out.
    """
    (listener,) = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    argv = [sys.executable, "-m", "trionet.client", "files", "get", "big.bin"]
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [*argv, "-o", str(out), "--port", str(port)],
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_ENV,
        )
    )
    return proc, port


async def _all_stderr(proc: trio.Process) -> bytes:
    """Everything the process writes to stderr, until it closes it."""
    assert proc.stderr is not None
    err = bytearray()
    while chunk := await proc.stderr.receive_some():
        err += chunk
    return bytes(err)


async def test_ctrl_c_keeps_the_part_and_prints_the_resume_command(tmp_path: Path) -> None:
    # A real client process gets SIGINT while the server (a plain trio server
    # here) has sent part of a big file and stalls. The client exits 130,
    # says what it kept, and the command it prints finishes the file.
    size, cut = 32 << 20, 9_000_123  # the cut falls inside a receive buffer
    data = random.Random(11).randbytes(size)
    sent_part = trio.Event()
    requests: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        first = not requests
        offset, buffer = 0, bytearray()
        async with stream:
            while True:
                while b"\n" not in buffer:
                    if not (chunk := await stream.receive_some()):
                        return
                    buffer += chunk
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer = bytearray(rest)
                requests.append(line)
                if line.startswith(b"REST "):
                    offset = int(line[5:])
                    await stream.send_all(b"OK rest %d\n" % offset)
                elif line == b"GET big.bin":
                    await stream.send_all(f"OK {size} {sha(data)}\n".encode())
                    await stream.send_all(data[offset : cut if first else size])
                    if first:
                        sent_part.set()
                        await trio.sleep_forever()
                    offset = 0

    out = tmp_path / "big"
    part = tmp_path / "big.part"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proc, port = await _get_from(nursery, handle, out)
            await sent_part.wait()
            # Two whole buffers are on disk: the transfer is well under way.
            while not part.exists() or part.stat().st_size < 8 << 20:  # noqa: ASYNC110
                await trio.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            assert proc.stdout is not None
            err = await _all_stderr(proc)
            stdout = await proc.stdout.receive_some()
            await proc.wait()
            assert proc.returncode == EXIT_INTERRUPTED
            assert stdout == b""
            kept = await trio.to_thread.run_sync(part.read_bytes)
            assert 8 << 20 <= len(kept) <= cut and kept == data[: len(kept)]
            assert not out.exists()
            command = f"python -m trionet.client files get big.bin -o {shlex.quote(str(out))}"
            assert err.decode().splitlines() == [
                f"files: interrupted; kept {part} ({len(kept)} bytes)",
                f"files: to continue: {command} --resume --port {port}",
            ]
            # Run the command as printed (with this interpreter for "python").
            words = shlex.split(err.decode().splitlines()[1].removeprefix("files: to continue: "))
            assert words[0] == "python"
            done = await trio.run_process(
                [sys.executable, *words[1:]], capture_stdout=True, capture_stderr=True, env=_ENV
            )
            nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"saved {out} ({size} bytes, sha256 {sha(data)})\n"
    assert requests[-2:] == [b"REST %d" % len(kept), b"GET big.bin"]
    assert sha(await trio.to_thread.run_sync(out.read_bytes)) == sha(data)
    assert not part.exists()


class _SlowDigests(DigestCache):
    """Digests that take until ``release`` is set (a big file being hashed)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def digest(self, fd: int, key: DigestKey) -> str | None:
        await self.release.wait()
        return await super().digest(fd, key)


class _Terminal(io.StringIO):
    """A fake terminal that wakes the test at every write."""

    def __init__(self) -> None:
        super().__init__()
        self.wrote = trio.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.wrote.set()
        return super().write(text)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_wait_while_the_server_hashes_is_shown(
    served: tuple[Path, bytes], transport: str, tmp_path: Path
) -> None:
    """Before OK, a spinner says the server is preparing the file; it is wiped after."""
    root, data = served
    digests = _SlowDigests()
    screen = _Terminal()
    preparing = Preparing("big.bin", screen, after=0.05)
    files = FilesService(root=str(root), port=0, digests=digests)

    async def get(wire: Wire) -> None:
        stream = await wire.open_stream()
        await download(stream, "big.bin", str(tmp_path / "big.bin"), preparing=preparing)

    with trio.fail_after(30):
        async with running(files, transport) as wire, trio.open_nursery() as nursery:
            nursery.start_soon(get, wire)
            await screen.wrote.wait()
            assert preparing.waiting
            digests.release.set()
    shown = screen.getvalue()
    assert "the server is preparing big.bin (computing its sha256 before sending)" in shown
    assert shown.endswith("\r\x1b[K")  # wiped once OK came
    assert not preparing.waiting and (tmp_path / "big.bin").read_bytes() == data


async def test_ctrl_c_while_the_server_prepares_says_so(tmp_path: Path) -> None:
    """A real client process interrupted before OK says the server was preparing."""
    asked = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if b"GET big.bin" in await stream.receive_some():
                asked.set()
            await trio.sleep_forever()  # hashing a huge file, as far as the client knows

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proc, _ = await _get_from(nursery, handle, tmp_path / "big")
            await asked.wait()
            proc.send_signal(signal.SIGINT)
            err = await _all_stderr(proc)
            await proc.wait()
            nursery.cancel_scope.cancel()
    assert proc.returncode == EXIT_INTERRUPTED
    assert err.decode().splitlines() == [
        "files: interrupted while the server was still preparing big.bin (it computes the "
        "file's sha256 before sending); nothing was received"
    ]


def test_the_resume_command_is_exact_for_a_shell() -> None:
    from trionet.services.files import client as fc

    def command(argv: list[str], path: str) -> str:
        args = fc._build_parser().parse_args(argv)
        line = fc._resume_command(args, path)
        # Read back as the shell and the parser would: the same download, resumed.
        again = fc._build_parser().parse_args(shlex.split(line)[4:])
        assert (again.name, again.host, again.port, again.force) == (
            args.name,
            args.host,
            args.port,
            args.force,
        )
        assert again.resume and os.path.normpath(again.output) == os.path.normpath(path)
        return line

    prog = "python -m trionet.client files get"
    assert command(["get", "a b.txt"], "a b.txt") == f"{prog} 'a b.txt' -o 'a b.txt' --resume"
    # Only the options that differ from the defaults; --force when it was given.
    assert command(["get", "x", "--host", "::1", "--port", "7004", "--force"], "d/x") == (
        f"{prog} x -o d/x --resume --force --host ::1"
    )
    # A name or PATH starting with "-" must not be read as an option.
    assert command(["get", "--output=-y", "--port", "1", "--", "-x"], "-y") == (
        f"{prog} -o ./-y --resume --port 1 -- -x"
    )
