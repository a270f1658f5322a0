"""The files client: verified downloads, resume, refusals and exit statuses.

Each scenario runs over memory streams (the client's generic receive path)
and over TCP on 127.0.0.1 (the ``recv_into`` fast path). A connection
killed mid-transfer is a stream wrapper in memory and a byte-limited proxy
over TCP.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from test_files import Wire, running

from trionet._client import EXIT_DROPPED, EXIT_REFUSED, ClientError
from trionet.services.files.client import (
    EXIT_DISK,
    EXIT_FORBIDDEN,
    EXIT_MISMATCH,
    EXIT_NOT_FOUND,
    client_main,
    download,
    list_remote,
)
from trionet.services.files.server import FilesService
from trionet.testing import open_memory_server

TRANSPORTS = ["memory", "tcp"]
BIG = 20 << 20
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
    """Passes ``limit`` received bytes through, then reports end of file."""

    def __init__(self, inner: trio.abc.Stream, limit: int) -> None:
        self.inner = inner
        self.left = limit

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.left <= 0:
            await trio.lowlevel.checkpoint()
            return b""
        data = await self.inner.receive_some(min(max_bytes or 65536, self.left))
        self.left -= len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
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
        upstream = await trio.open_tcp_stream(*target)
        async with client, upstream, trio.open_nursery() as nursery:

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
async def cut_connection(wire: Wire, transport: str, limit: int) -> AsyncIterator[trio.abc.Stream]:
    """A client connection to ``wire`` that dies after ``limit`` received bytes."""
    if transport == "memory":
        yield CutStream(await wire.open_stream(), limit)
        return
    async with cutting_proxy(await tcp_address(wire), limit) as (host, port):
        yield await trio.open_tcp_stream(host, port)


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
            assert (tmp_path / "small.txt").read_bytes() == b"small file\n"
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
    get = subprocess.run(
        [*cmd, "get", "--help"], capture_output=True, text=True, env=env, timeout=20
    )
    assert get.returncode == 0
    for text in ("--resume", "--output", "--host", "--port", "default: 7004", "default: off"):
        assert text in get.stdout
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


async def test_cancelled_download_keeps_a_consistent_part(
    served: tuple[Path, bytes], tmp_path: Path
) -> None:
    # Cancelled while waiting for bytes that do not come (over TCP, with the
    # receive mark raised): download returns at once, the worker threads
    # end, nothing is renamed, and the kept .part is a prefix a resume can
    # continue into the verified file.
    root, data = served
    out = tmp_path / "big"
    with trio.fail_after(20):
        async with running(service(root), "tcp") as wire:
            address = await tcp_address(wire)
            stalled = trio.Event()
            async with cutting_proxy(address, 9_000_000, stalled) as (phost, pport):
                stream = await trio.open_tcp_stream(phost, pport)
                async with stream, trio.open_nursery() as nursery:

                    async def get() -> None:
                        await download(stream, "big.bin", str(out))

                    nursery.start_soon(get)
                    await stalled.wait()
                    await trio.sleep(0.1)
                    nursery.cancel_scope.cancel()
            assert not out.exists()
            kept = await trio.to_thread.run_sync(Path(str(out) + ".part").read_bytes)
            assert len(kept) <= 9_000_000 and kept == data[: len(kept)]
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
