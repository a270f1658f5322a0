"""Fixtures shared by the test suite: a real redis-server, and servers in processes.

``redis_server`` starts Debian's ``redis-server`` on a free loopback port in
a temporary directory, with nothing saved to disk, and kills it after the
test; the test may kill and restart it (same port) to play an outage. It
skips the test, saying why, only when ``redis-server`` is not installed
(scripts/test installs it where it can).

``serve`` starts ``python -m trionet.serve ...`` processes whose log is read
in a thread (``wait_for`` a pattern, ``port`` of a service), all killed at
the end of the test.

``opened`` opens client connections (``await opened.client(port)``, a
:class:`trionet.testing.Client`; ``opened.stream``, a raw stream) and closes
every one at the end of the test, so none is left to the garbage collector.

``tls_files`` makes TLS certificates with ``trustme``: one certificate
authority per test session (key generation is the slow part), and a server
certificate valid for ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import attrs
import pytest
import trio
import trustme

from trionet.testing import DEFAULT_TIMEOUT, Client

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_command(port: int, *words: str, timeout: float = 2.0) -> bytes:
    """Send one command to the Redis on ``port``; its raw reply (RESP), first read only."""
    payload = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload.encode())
        return s.recv(1 << 20)


class RedisServer:
    """One ``redis-server`` process on a fixed port; :meth:`kill` and :meth:`start` again.

    ``args`` go to ``redis-server`` as they are (``--requirepass PW``, the
    TLS options with a ``--tls-port``); the plain port always answers, for
    :meth:`command` and the start-up check.
    """

    def __init__(self, directory: Path, args: tuple[str, ...] = ()) -> None:
        self.dir = directory
        self.port = _free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or restart, empty: nothing is saved) and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                # (NOAUTH: up, and asking for the password it was given)
                if redis_command(self.port, "PING", timeout=0.5).startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, f"redis-server exited ({self.proc.returncode})"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: an outage, everything it held is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def command(self, *words: str) -> bytes:
        """One command's raw reply (``XLEN``, ``HGETALL``...)."""
        return redis_command(self.port, *words)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A fresh, empty redis-server for this test (killed afterwards)."""
    return redis_factory()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers with extra arguments (``--requirepass ...``); all killed afterwards."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path, args)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


class Serve:
    """``python -m trionet.serve ARGS`` with its log (stderr) read in a thread.

    ``prefix``: a command that runs it (``ip netns exec NS``,
    ``systemd-socket-activate ...``); it must exec the server, so that
    :attr:`proc` is the server's process. ``env`` adds environment variables.
    """

    def __init__(
        self, *args: str, prefix: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "trionet.serve", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    def count(self, pattern: str) -> int:
        """How many log lines so far match ``pattern``."""
        return len(self.matching(pattern))

    def matching(self, pattern: str) -> list[str]:
        """The log lines so far that match ``pattern`` (for an assertion's message)."""
        with self._changed:
            return [line for line in self.lines if re.search(pattern, line)]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60) -> list[re.Match[str]]:
        """The first ``count`` log lines matching ``pattern`` (waiting for them)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := re.search(pattern, line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                assert left > 0 and "<eof>" not in self.lines, (pattern, self.lines[-20:])
                self._changed.wait(left)

    def port(self, name: str) -> int:
        """The port service ``name`` listens on (from its log line)."""
        return int(self.wait_for(rf"{name} listening on 127\.0\.0\.1:(\d+)")[0][1])

    def worker_pids(self, count: int) -> list[int]:
        """The pids of the first ``count`` workers started, in order (from the log).

        Workers 0..N-1 start in index order, so the first N are worker i at [i];
        a replacement comes later in the list.
        """
        return [int(m[1]) for m in self.wait_for(r"worker \d+ started \(pid (\d+)\)", count)]

    def close_log(self) -> None:
        """Close the pipe of the exited process's log, once the reader has read it all.

        A worker that outlives its parent for a moment still holds the pipe: the
        reader then is not done, and the pipe is left open rather than closed
        under the reader's feet.
        """
        self._reader.join(timeout=2)
        if not self._reader.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        if status:  # say why, in the test's output
            print("\n".join(self.lines[-30:]), file=sys.stderr)
        return status


@pytest.fixture
def serve() -> Iterator[Callable[..., Serve]]:
    """Start ``python -m trionet.serve`` processes; every one is killed after the test."""
    started: list[Serve] = []

    def start(
        *args: str, prefix: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> Serve:
        process = Serve(*args, prefix=prefix, env=env)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGCONT)  # (a test may have stopped it)
                process.proc.kill()
                process.proc.wait()
            process.close_log()


class PlainStream(trio.abc.Stream):
    """Forwards to ``inner``, as a stream that cannot half-close (like TLS
    without a way to say so); subclass it to watch the calls."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Closable(Protocol):
    async def aclose(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


class Opened:
    """Client connections a test opened, all closed when it ends (see :func:`opened`).

    Also an async context manager, for a helper that hands out connections:
    ``async with Opened() as opened:`` closes them all on the way out.
    """

    def __init__(self) -> None:
        self._resources: list[_Closable] = []

    async def __aenter__(self) -> Opened:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def add(self, resource: _C) -> _C:
        """Close ``resource`` (anything with ``aclose``) at the end of the test; returns it."""
        self._resources.append(resource)
        return resource

    async def stream(self, port: int, host: str = "127.0.0.1") -> trio.SocketStream:
        """A TCP connection to ``host:port``."""
        return self.add(await trio.open_tcp_stream(host, port))

    async def client(
        self, port: int, host: str = "127.0.0.1", *, timeout: float = DEFAULT_TIMEOUT
    ) -> Client:
        """A :class:`~trionet.testing.Client` over a TCP connection to ``host:port``."""
        return self.add(Client(await trio.open_tcp_stream(host, port), timeout=timeout))

    async def aclose(self) -> None:
        """Close everything (forcefully: a TLS goodbye must not wait on a dead server).

        Shielded, so that a cancelled caller (a test that failed) still closes
        all; a connection already broken is closed all the same, without error.
        """
        with trio.CancelScope(shield=True):
            for resource in self._resources:
                with contextlib.suppress(trio.BrokenResourceError):
                    await trio.aclose_forcefully(resource)
        self._resources.clear()


@pytest.fixture
async def opened() -> AsyncIterator[Opened]:
    """Open client connections that are closed when the test ends.

    A socket left to the garbage collector is finalized whenever a reference
    cycle is collected, perhaps inside another test; if that test has turned
    warnings into errors, its ResourceWarning fails it. Closing here keeps
    each test's sockets its own.
    """
    async with Opened() as connections:
        yield connections


@attrs.frozen
class TLSFiles:
    """PEM files of a test CA and a server certificate it issued."""

    ca: str  #: the CA certificate (what a client trusts: ``--cafile``)
    cert: str  #: the server certificate chain (``--tls-cert``)
    key: str  #: the server's private key (``--tls-key``)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        return ssl.create_default_context(cafile=self.ca)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and a server certificate for ``localhost`` and ``127.0.0.1``, as PEM files."""
    folder: Path = tmp_path_factory.mktemp("tls")
    leaf = tls_ca.issue_cert("localhost", "127.0.0.1")
    files = TLSFiles(
        ca=str(folder / "ca.pem"), cert=str(folder / "cert.pem"), key=str(folder / "key.pem")
    )
    tls_ca.cert_pem.write_to_path(files.ca)
    Path(files.cert).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(files.key)
    return files
