"""files: the wire protocol, in memory and over real loopback sockets (both send paths).

Most tests run twice: over memory streams (the connection's chunked file
path) and over TCP (its ``sendfile`` path).
Socket tests use 127.0.0.1 and port 0, and every wait is bounded (the
scripted client's 10 s timeout, ``trio.fail_after``). Memory tests that
need long waits run on the autojump clock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import socket
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from conftest import Opened

import trionet
from trionet.services.files import digest as files_digest
from trionet.services.files.server import FilesService, Refused, list_files, open_served, shown
from trionet.testing import Client, open_memory_server

TRANSPORTS = ["memory", "tcp"]
BIG = 20 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@attrs.define
class Wire:
    """A running files server and ways to reach it."""

    service: FilesService
    open_stream: Callable[[], Awaitable[trio.abc.Stream]]
    shutdown: Callable[[], None]

    async def connect(self) -> Client:
        return Client(await self.open_stream())


@asynccontextmanager
async def running(
    service: FilesService, transport: str, *, lockstep: bool = False, grace: float = 5
) -> AsyncIterator[Wire]:
    """Run ``service`` in memory or on 127.0.0.1 (``transport`` from TRANSPORTS).

    ``lockstep`` (memory only) makes the server's sends wait for the
    client's reads, as a socket with full buffers does.
    """
    if transport == "memory":
        async with open_memory_server(service, lockstep=lockstep, grace=grace) as srv:
            yield Wire(service, srv.open_stream, srv.shutdown)
        return
    server = trionet.Server([service], grace=grace)
    async with Opened() as opened, trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        host, port = addresses["files"][0]

        async def open_stream() -> trio.abc.Stream:
            return await opened.stream(port, host)

        yield Wire(service, open_stream, server.shutdown)
        nursery.cancel_scope.cancel()


def make_service(root: Path, transport: str, **options: object) -> FilesService:
    return FilesService(root=str(root), port=0, **options)  # type: ignore[arg-type]


async def get(client: Client, name: str) -> tuple[int, str, bytes]:
    """Send GET and read the OK line and the bytes that follow it."""
    await client.send_line(f"GET {name}")
    line = await client.receive_line()
    assert line is not None and line.startswith("OK "), line
    _, size, digest = line.split(" ")
    body = await client.receive_exactly(int(size))
    return int(size), digest, body


HELLO = b"hello world\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_start_says_which_folder_is_shared(
    tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator learns at start what the world can download."""
    caplog.set_level(logging.INFO, logger="trionet.files")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"12345")
    (tmp_path / "sub" / "b.txt").write_bytes(b"678")
    (tmp_path / ".hidden").write_bytes(b"not listed")
    said_it = trio.Event()
    handler = logging.Handler()
    handler.emit = lambda record: said_it.set()  # type: ignore[method-assign]
    logging.getLogger("trionet.files").addHandler(handler)
    try:
        async with running(make_service(tmp_path, transport), transport):
            with trio.fail_after(30):
                await said_it.wait()
    finally:
        logging.getLogger("trionet.files").removeHandler(handler)
    (said,) = [r.getMessage() for r in caplog.records if r.name == "trionet.files"]
    assert said == f"files: sharing {tmp_path} read-only (2 files, 8 bytes)"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The path matrix on disk: what LIST shows and GET serves or refuses."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside secret\n")
    (root / "data" / ".cache").mkdir(parents=True)
    (root / ".hid").mkdir()
    (root / "hello.txt").write_bytes(HELLO)
    (root / "a b.txt").write_bytes(b"spaces")
    (root / "empty.txt").write_bytes(b"")
    (root / "data" / "blob.bin").write_bytes(random.Random(2).randbytes(100_000))
    (root / "data" / ".cache" / "c").write_bytes(b"hidden")
    (root / ".secret").write_bytes(b"hidden")
    (root / ".hid" / "x.txt").write_bytes(b"hidden")
    (root / "back\\slash").write_bytes(b"unlisted")
    (root / "tab\tname").write_bytes(b"unlisted")
    os.mkfifo(root / "fifo")
    (root / "in").symlink_to("hello.txt")
    (root / "indir").symlink_to("data")
    (root / "out").symlink_to(outside / "secret.txt")
    (root / "outdir").symlink_to(outside)
    (root / "up").symlink_to("../outside/secret.txt")
    (root / "tohidden").symlink_to(".secret")
    (root / "devnull").symlink_to("/dev/null")
    (root / "dangling").symlink_to("nowhere")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    try:
        os.mknod(root / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        (root / "dev").symlink_to("fifo")  # still not a regular file
    return root


LISTING = [
    ("a b.txt", 6),
    ("data/blob.bin", 100_000),
    ("empty.txt", 0),
    ("hello.txt", 12),
    ("in", 12),
]

# name -> the error code GET must answer (None: served)
GET_MATRIX = {
    "hello.txt": None,
    "in": None,  # symlink inside the root, to a visible file
    "indir/blob.bin": None,  # through a symlinked directory inside the root
    "a b.txt": None,
    "nope.txt": "not-found",
    "data/nope": "not-found",
    "hello.txt/x": "not-found",
    "dangling": "not-found",
    "../outside/secret.txt": "forbidden",
    "data/../../outside/secret.txt": "forbidden",
    "data/../hello.txt": "forbidden",  # a '..' part, even one that stays inside
    "./hello.txt": "forbidden",
    "/etc/passwd": "forbidden",
    "data//blob.bin": "forbidden",
    "data\\blob.bin": "forbidden",
    "back\\slash": "forbidden",
    "hello.txt\x00": "forbidden",
    "tab\tname": "forbidden",
    "hello\x1b.txt": "forbidden",
    ".secret": "forbidden",
    ".hid/x.txt": "forbidden",
    "data/.cache/c": "forbidden",
    "out": "forbidden",  # symlink to a file outside
    "up": "forbidden",  # relative symlink climbing out
    "outdir/secret.txt": "forbidden",  # through a symlinked directory outside
    "devnull": "forbidden",  # symlink to a device outside
    "tohidden": "forbidden",  # symlink to a hidden file inside
    "fifo": "forbidden",
    "sock": "forbidden",
    "dev": "forbidden",
    "data": "forbidden",  # a directory
    "indir": "forbidden",
}


# -- pure-ish file-system functions (blocking, no network) ------------------------------


def test_list_files(tree: Path) -> None:
    assert list_files(os.path.realpath(tree)) == LISTING


@pytest.mark.parametrize(("name", "code"), GET_MATRIX.items())
def test_open_served_matrix(tree: Path, name: str, code: str | None) -> None:
    root = os.path.realpath(tree)
    if code is None:
        opened = open_served(root, name)
        try:
            assert os.pread(opened.fd, opened.size, 0) == (tree / name).read_bytes()
        finally:
            opened.close()
    else:
        with pytest.raises(Refused) as info:
            open_served(root, name)
        assert info.value.code == code


def test_open_refuses_a_symlink_swapped_in_after_resolution(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate the race: the name resolved to a plain path, but by the time
    # it is opened a component is a symlink (to outside the root).
    root = os.path.realpath(tree)
    monkeypatch.setattr(os.path, "realpath", lambda p: os.path.normpath(p))
    for name in ("out", "outdir/secret.txt", "in"):
        with pytest.raises(Refused) as info:
            open_served(root, name)
        assert info.value.code in ("forbidden", "not-found")


# -- the wire -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_list_and_get(tree: Path, transport: str) -> None:
    with trio.fail_after(15):
        async with running(make_service(tree, transport), transport) as wire:
            c = await wire.connect()
            await c.send_line("LIST")
            await c.expect(*(f"FILE {size} {name}" for name, size in LISTING), "END 5")
            assert await get(c, "hello.txt") == (12, sha(HELLO), HELLO)
            # REST: the size and digest still describe the whole file.
            await c.send_line("REST 5")
            await c.expect("OK rest 5")
            await c.send_line("GET hello.txt")
            await c.expect(f"OK 12 {sha(HELLO)}")
            assert await c.receive_exactly(7) == HELLO[5:]
            # The offset applies to one GET only.
            assert (await get(c, "in"))[2] == HELLO
            # REST to the very end: nothing follows the OK line.
            await c.send_line("REST 12")
            await c.send_line("GET hello.txt")
            await c.send_line("REST 13")
            await c.send_line("GET hello.txt")
            await c.send_line("GET empty.txt")
            await c.expect(
                "OK rest 12",
                f"OK 12 {sha(HELLO)}",
                "OK rest 13",
                "ERR bad-offset 12",
                f"OK 0 {sha(b'')}",
            )
            blob = (tree / "data" / "blob.bin").read_bytes()
            assert await get(c, "data/blob.bin") == (len(blob), sha(blob), blob)
            await c.send_line("quit")
            await c.expect("BYE")
            await c.expect_closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_get_matrix_over_the_wire(tree: Path, transport: str) -> None:
    with trio.fail_after(15):
        async with running(make_service(tree, transport), transport) as wire:
            c = await wire.connect()
            for name, code in GET_MATRIX.items():
                if code is None:
                    size, digest, body = await get(c, name)
                    want = (tree / name).read_bytes()
                    assert (size, digest, body) == (len(want), sha(want), want)
                else:
                    await c.send_line(f"GET {name}")
                    await c.expect(f"ERR {code} {shown(name)}")
            # A failed GET also consumes a pending REST.
            await c.send_line("REST 3")
            await c.send_line("GET nope.txt")
            await c.expect("OK rest 3", "ERR not-found nope.txt")
            assert (await get(c, "hello.txt"))[2] == HELLO


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_bad_requests_keep_the_connection(tree: Path, transport: str) -> None:
    with trio.fail_after(15):
        async with running(make_service(tree, transport), transport) as wire:
            c = await wire.connect()
            for line in ["", "FOO bar", "LIST x", "LIST ", "GET", "GET ", "REST", "REST -1"]:
                await c.send_line(line)
            await c.send_line("REST 1.5")
            await c.send(b"GET \xff\n")
            await c.send_line("get hello.txt")
            await c.expect(
                "ERR bad-request empty command",
                "ERR unknown-command FOO",
                "ERR bad-request LIST takes no argument",
                "ERR bad-request LIST takes no argument",
                "ERR bad-request GET needs a file name",
                "ERR bad-request GET needs a file name",
                "ERR bad-request REST needs a byte offset",
                "ERR bad-request REST needs a byte offset",
                "ERR bad-request REST needs a byte offset",
                "ERR bad-encoding",
                f"OK 12 {sha(HELLO)}",
            )
            assert await c.receive_exactly(12) == HELLO
            await c.send_line("GET " + "x" * 5000)
            await c.send_line("Quit")
            await c.expect("ERR line-too-long 4096", "BYE")
            await c.expect_closed()


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_pipelined_requests_get_replies_in_order(tree: Path, transport: str) -> None:
    with trio.fail_after(15):
        async with running(make_service(tree, transport), transport) as wire:
            c = await wire.connect()
            await c.send(b"GET hello.txt\r\nGET in\nREST 6\nGET hello.txt\nLIST\n")
            head = f"OK 12 {sha(HELLO)}"
            await c.expect(head)
            assert await c.receive_exactly(12) == HELLO
            await c.expect(head)
            assert await c.receive_exactly(12) == HELLO
            await c.expect("OK rest 6", head)
            assert await c.receive_exactly(6) == b"world\n"
            await c.expect(*(f"FILE {size} {name}" for name, size in LISTING), "END 5")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A root holding one 20 MiB file of random bytes (created once per module)."""
    root = tmp_path_factory.mktemp("big")
    data = random.Random(1).randbytes(BIG)
    (root / "big.bin").write_bytes(data)
    return root, data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_big_file_both_send_paths_identical(
    big: tuple[Path, bytes], transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet.access")
    root, data = big
    with trio.fail_after(20):
        async with running(make_service(root, transport), transport) as wire:
            c = await wire.connect()
            assert await get(c, "big.bin") == (BIG, sha(data), data)
            offset = BIG - 3_000_001
            await c.send_line(f"REST {offset}")
            await c.send_line("GET big.bin")
            await c.expect(f"OK rest {offset}", f"OK {BIG} {sha(data)}")
            assert await c.receive_exactly(BIG - offset) == data[offset:]
            await c.send_line("LIST")
            await c.expect(f"FILE {BIG} big.bin", "END 1")
            # The second and third GET reused the digest.
            assert wire.service.digests.computed == 1
            await c.aclose()
    # bytes_out counts every byte on both paths: the access log shows it.
    (record,) = [r for r in caplog.records if r.name == "trionet.access"]
    head = len(f"OK {BIG} {sha(data)}\n")
    want = 2 * head + len(f"OK rest {offset}\n") + BIG + BIG - offset
    want += len(f"FILE {BIG} big.bin\nEND 1\n")
    assert f" out={want}" in record.getMessage()


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_cache_rehashes_a_changed_file(tmp_path: Path, transport: str) -> None:
    (tmp_path / "f").write_bytes(b"one")
    with trio.fail_after(15):
        async with running(make_service(tmp_path, transport), transport) as wire:
            c = await wire.connect()
            assert (await get(c, "f"))[1] == sha(b"one")
            assert (await get(c, "f"))[1] == sha(b"one")
            assert wire.service.digests.computed == 1
            (tmp_path / "f").write_bytes(b"two!")
            assert await get(c, "f") == (4, sha(b"two!"), b"two!")
            assert wire.service.digests.computed == 2


class HashGate:
    """Holds every hashing thread until released, to test what runs meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        original = files_digest.hash_range

        def gated(*args: object) -> int:
            self.started.set()
            # Bounded: a broken test must not leave a thread blocked forever.
            self.release.wait(20)
            return original(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(files_digest, "hash_range", gated)

    async def wait_started(self) -> None:
        assert await trio.to_thread.run_sync(self.started.wait, 10), "hashing never started"


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_list_answers_while_a_file_is_hashed(
    big: tuple[Path, bytes], transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, data = big
    gate = HashGate(monkeypatch)
    with trio.fail_after(15):
        async with running(make_service(root, transport), transport) as wire:
            downloader = await wire.connect()
            await downloader.send_line("GET big.bin")
            await gate.wait_started()
            other = await wire.connect()
            await other.send_line("LIST")
            await other.expect(f"FILE {BIG} big.bin", "END 1")
            await other.send_line("GET nope")
            await other.expect("ERR not-found nope")
            assert not gate.release.is_set()  # the hash really was still running
            gate.release.set()
            await downloader.expect(f"OK {BIG} {sha(data)}")
            assert await downloader.receive_exactly(BIG) == data


async def test_file_shrinking_while_hashed_is_not_promised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(b"x" * 1000)
    gate = HashGate(monkeypatch)
    async with running(make_service(tmp_path, "memory"), "memory") as wire:
        c = await wire.connect()
        await c.send_line("GET f")
        await gate.wait_started()
        os.truncate(tmp_path / "f", 10)
        gate.release.set()
        await c.expect("ERR not-found f")
        assert await get(c, "f") == (10, sha(b"x" * 10), b"x" * 10)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_file_shrinking_during_transfer_closes(tmp_path: Path, transport: str) -> None:
    # 32 MiB: more than loopback socket buffers hold, so the server is still
    # sending when the file is cut.
    size = 32 << 20
    (tmp_path / "f").write_bytes(b"\0" * size)
    with trio.fail_after(15):
        service = make_service(tmp_path, transport)
        async with running(service, transport, lockstep=True) as wire:
            c = await wire.connect()
            await c.send_line("GET f")
            line = await c.receive_line()
            assert line is not None and line.startswith(f"OK {size} ")
            await c.receive_exactly(1 << 20)
            os.truncate(tmp_path / "f", 2 << 20)
            rest = await c.receive_all()  # the server closes: it cannot keep the promise
            assert (1 << 20) + len(rest) < size


async def test_graceful_shutdown_lets_a_download_finish(
    big: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, data = big
    gate = HashGate(monkeypatch)
    async with running(make_service(root, "memory"), "memory") as wire:
        c = await wire.connect()
        idle = await wire.connect()
        await c.send_line("GET big.bin")
        await gate.wait_started()
        wire.shutdown()
        await idle.expect("BYE shutdown")
        gate.release.set()
        await c.expect(f"OK {BIG} {sha(data)}")
        assert await c.receive_exactly(BIG) == data
        await c.expect("BYE shutdown")
        await c.expect_closed()


async def test_shutdown_past_the_grace_period_closes_without_bye(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A transfer still running when the grace period ends is cut, and no
    # "BYE shutdown" is mixed into the file bytes: the client just sees a
    # short transfer (and can resume it elsewhere).
    data = random.Random(4).randbytes(4 << 20)
    (tmp_path / "f").write_bytes(data)
    async with open_memory_server(FilesService(root=str(tmp_path)), grace=10, lockstep=True) as srv:
        stream = await srv.open_stream()
        await stream.send_all(b"GET f\n")
        head = f"OK {len(data)} {sha(data)}\n".encode()
        got = bytearray()
        while len(got) < len(head) + 1000:
            got += await stream.receive_some(1000)
        srv.shutdown()
        await trio.sleep(30)  # a reader far too slow for the 10 s grace
        while chunk := await stream.receive_some(1 << 20):
            got += chunk
        assert got.startswith(head)
        body = bytes(got[len(head) :])
        assert len(body) < len(data) and data.startswith(body)


@pytest.mark.parametrize("transport", ["tcp", "tcp-copy"])
async def test_shutdown_past_the_grace_period_over_tcp_closes_without_bye(
    big: tuple[Path, bytes], transport: str
) -> None:
    # The same over a socket, on both send paths: the client stops reading,
    # the grace period ends, and the connection closes after a prefix of
    # the file, with no "BYE shutdown" after it.
    root, data = big
    with trio.fail_after(15):
        async with running(make_service(root, transport), transport, grace=0.5) as wire:
            probe = await wire.open_stream()
            assert isinstance(probe, trio.SocketStream)
            address = probe.socket.getpeername()
            await probe.aclose()
            sock = trio.socket.socket()
            # A small fixed receive buffer: the 20 MiB cannot all be queued.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            await sock.connect(address)
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(b"GET big.bin\n")
                head = f"OK {BIG} {sha(data)}\n".encode()
                got = bytearray()
                while len(got) < len(head) + 1000:
                    got += await stream.receive_some(1000)
                wire.shutdown()
                await trio.sleep(1.5)  # not reading, well past the grace period
                while chunk := await stream.receive_some(1 << 20):
                    got += chunk
            assert got.startswith(head)
            body = bytes(got[len(head) :])
            assert len(body) < BIG and data.startswith(body)


async def test_shutdown_during_a_transfer_over_tcp(big: tuple[Path, bytes]) -> None:
    root, data = big
    with trio.fail_after(15):
        async with running(make_service(root, "tcp"), "tcp") as wire:
            c = await wire.connect()
            await c.send_line("GET big.bin")
            await c.expect(f"OK {BIG} {sha(data)}")
            first = await c.receive_exactly(1 << 20)
            wire.shutdown()
            assert first + await c.receive_exactly(BIG - (1 << 20)) == data
            await c.expect("BYE shutdown")
            await c.expect_closed()


async def test_slow_reader_is_not_cut_by_the_idle_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = random.Random(3).randbytes(4 << 20)
    (tmp_path / "f").write_bytes(data)
    async with open_memory_server(FilesService(root=str(tmp_path)), lockstep=True) as srv:
        stream = await srv.open_stream()
        await stream.send_all(b"GET f\n")
        got = bytearray()
        start = trio.current_time()
        head = f"OK {len(data)} {sha(data)}\n".encode()
        while len(got) < len(head) + len(data):
            chunk = await stream.receive_some(1 << 20)
            assert chunk, "closed during the transfer"
            got += chunk
            await trio.sleep(100)  # 100 s per MiB: far past the 300 s idle timeout
        assert trio.current_time() - start > 400
        assert bytes(got) == head + data
        # Idle again now: the idle timeout applies as usual.
        with trio.fail_after(301):
            assert await stream.receive_some() == b"BYE idle-timeout\n"


async def test_a_stalled_transfer_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "f").write_bytes(b"z" * (4 << 20))
    service = FilesService(root=str(tmp_path), idle_timeout=60)
    async with open_memory_server(service, lockstep=True) as srv:
        stream = await srv.open_stream()
        await stream.send_all(b"GET f\n")
        assert (await stream.receive_some(100)).startswith(b"OK ")
        # Take a little of the payload, so the server is surely blocked in its
        # send (not reading the file in a worker thread, during which the
        # autojump clock could run past the test's sleep).
        assert await stream.receive_some(1000)
        await trio.sleep(1000)  # read nothing more, far past the 60 s stall limit
        received = 0
        with trio.fail_after(1000):  # without the stall limit: no close, this fails
            while chunk := await stream.receive_some(1 << 20):
                received += len(chunk)
        assert received < 4 << 20


def test_from_args_and_root_validation(tmp_path: Path) -> None:
    (service,) = trionet.build_services(["files", "--root", str(tmp_path)])
    assert isinstance(service, FilesService)
    assert service.root == os.path.realpath(tmp_path)
    (service,) = trionet.build_services(["files"])
    assert isinstance(service, FilesService)
    assert service.root == os.path.realpath(".")
    assert service.effective_port == 7004
    with pytest.raises(ValueError, match="not a directory"):
        FilesService(root=str(tmp_path / "missing"))
    with pytest.raises(trionet.StartupError, match=r"cannot start files on \S+:7004: root"):
        trionet.build_services(["files", "--root", str(tmp_path / "missing")])


def test_shown_escapes_control_characters() -> None:
    assert shown("hello.txt") == "hello.txt"
    assert shown("x\r") == "x\\x0d"
    assert shown("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert shown("a\u202eb") == "a\\u202eb"
    assert shown("é ü") == "é ü"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_echoed_names_keep_every_reply_on_one_lf_line(tmp_path: Path, transport: str) -> None:
    """Found by an outside conformance probe: a name ending in CR was echoed raw,
    so the reply ended in CRLF; a name over 255 bytes was 'forbidden'."""
    (tmp_path / "hello.txt").write_bytes(b"hi\n")
    async with running(make_service(tmp_path, transport), transport) as wire:
        client = await wire.connect()
        with trio.fail_after(10):
            await client.send(b"GET x\r\r\nGET a\x1bb\nXY\x07Z\n")
            await client.send(b"GET " + b"a" * 256 + b"\nQUIT\n")
            raw = await client.receive_all()
    assert raw == (
        b"ERR forbidden x\\x0d\n"
        b"ERR forbidden a\\x1bb\n"
        b"ERR unknown-command XY\\x07Z\n"
        b"ERR not-found " + b"a" * 256 + b"\n"
        b"BYE\n"
    )


# -- issue 19: errors while resolving a name, and a real rename race ------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("err", "code"),
    [(errno.EINVAL, "not-found"), (errno.ELOOP, "forbidden"), (errno.ENAMETOOLONG, "not-found")],
)
async def test_an_error_while_resolving_a_name_is_an_err_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str, err: int, code: str
) -> None:
    """The probe saw ``os.path.realpath`` raise EINVAL in a rename race and the
    handler crash: it must be an ERR reply, and the connection carries on."""
    (tmp_path / "hello.txt").write_bytes(HELLO)
    real_realpath = os.path.realpath

    def realpath(path: str) -> str:
        if path.endswith("racy"):
            raise OSError(err, os.strerror(err), path)
        return real_realpath(path)

    async with running(make_service(tmp_path, transport), transport) as wire:
        monkeypatch.setattr(os.path, "realpath", realpath)
        client = await wire.connect()
        await client.send_line("GET racy")
        await client.expect(f"ERR {code} racy")
        assert await get(client, "hello.txt") == (len(HELLO), sha(HELLO), HELLO)


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for name in ["loop", "a", "a/x"]:
        with pytest.raises(Refused) as info:
            open_served(os.path.realpath(tmp_path), name)
        assert info.value.code in ("forbidden", "not-found")


async def test_a_rename_race_never_drops_the_connection_or_leaks(tmp_path: Path) -> None:
    """The probe's race, bounded: a thread renames a regular file and a symlink
    to a file outside the root onto the same name, over and over, while a
    client GETs that name. Every reply is the file or an ERR; never the
    outside file, never a dropped connection."""
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside secret\n")
    body = b"inside\n"
    stop = threading.Event()

    def swap() -> None:
        plain, link = root / ".plain", root / ".link"
        count = 0
        while not stop.is_set() and count < 200_000:
            plain.write_bytes(body)
            os.replace(plain, root / "racy")
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(secret)
            os.replace(link, root / "racy")
            count += 1

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    replies: dict[str, int] = {}
    try:
        async with running(make_service(root, "tcp"), "tcp") as wire:
            client = await wire.connect()
            with trio.fail_after(60):
                for _ in range(300):
                    await client.send_line("GET racy")
                    line = await client.receive_line()
                    assert line is not None, "the connection was dropped"
                    if line.startswith("OK "):
                        assert line == f"OK {len(body)} {sha(body)}", line
                        assert await client.receive_exactly(len(body)) == body
                        line = "OK"
                    else:
                        assert line in ("ERR forbidden racy", "ERR not-found racy"), line
                    replies[line] = replies.get(line, 0) + 1
                await client.send_line("GET racy")  # still served after all that
                assert await client.receive_line() is not None
    finally:
        stop.set()
        swapper.join(10)
    assert replies.get("OK", 0) + replies.get("ERR forbidden racy", 0) > 0, replies
