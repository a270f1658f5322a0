"""echo: in memory, over real loopback sockets, and as a real process.

Rules: memory tests run on the ``autojump_clock``. Socket tests use
127.0.0.1 with port 0, and every wait is bounded by ``trio.fail_after`` so
a regression fails in seconds instead of hanging the suite. Subprocess tests
read the real port from the server's ``listening on`` log line.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import Opened

import trionet
from trionet.services.echo.server import EchoService
from trionet.testing import open_memory_server

ROOT = Path(__file__).resolve().parents[3]


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_echo_in_memory_binary_and_half_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    data = random_bytes(300_000)
    async with open_memory_server(EchoService()) as server:
        client = await server.connect()
        await client.send(data)
        await client.send_eof()
        assert await client.receive_all() == data


async def start_echo(nursery: trio.Nursery, **options: object) -> tuple[str, int]:
    addresses = await nursery.start(trionet.serve, [EchoService(port=0, **options)])  # type: ignore[arg-type]
    host, port = addresses["echo"][0]
    return str(host), int(port)


async def roundtrip(host: str, port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and collect the echo until the server closes."""
    stream = await trio.open_tcp_stream(host, port)
    received = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            for i in range(0, len(data), 100_000):
                await stream.send_all(data[i : i + 100_000])
            await stream.send_eof()

        nursery.start_soon(send)
        while chunk := await stream.receive_some(1 << 16):
            received += chunk
    return bytes(received)


async def test_one_mib_of_random_bytes_over_tcp() -> None:
    data = random_bytes(1 << 20, seed=1)
    async with trio.open_nursery() as nursery:
        host, port = await start_echo(nursery)
        with trio.fail_after(20):
            assert await roundtrip(host, port, data) == data
        nursery.cancel_scope.cancel()


async def test_half_close_returns_everything_then_closes() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start_echo(nursery)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"last words")
                await stream.send_eof()
                got = b""
                while chunk := await stream.receive_some():
                    got += chunk
                assert got == b"last words"
        nursery.cancel_scope.cancel()


async def test_200_concurrent_clients() -> None:
    results: dict[int, bool] = {}
    async with trio.open_nursery() as nursery:
        host, port = await start_echo(nursery)

        async def client(i: int) -> None:
            data = random_bytes(5000 + i, seed=i)
            results[i] = await roundtrip(host, port, data) == data

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for i in range(200):
                    clients.start_soon(client, i)
        nursery.cancel_scope.cancel()
    assert len(results) == 200 and all(results.values())


async def test_peer_reset_ends_only_that_connection() -> None:
    import socket

    async with trio.open_nursery() as nursery:
        host, port = await start_echo(nursery)
        with trio.fail_after(10):
            # A client that resets (SO_LINGER 0) mid-stream.
            rude = trio.socket.socket()
            rude.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            await rude.connect((host, port))
            await rude.send(b"x" * 1000)
            rude.close()
            assert await roundtrip(host, port, b"fine") == b"fine"
        nursery.cancel_scope.cancel()


def run_cli(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, *args], cwd=ROOT, **kwargs
    )


def wait_for_port(proc: subprocess.Popen[bytes], service: str) -> tuple[int, list[str]]:
    """Read stderr until '<service> listening on host:port'; return the port."""
    assert proc.stderr is not None
    lines = []
    for _ in range(50):
        line = proc.stderr.readline().decode()
        lines.append(line)
        if f"{service} listening on" in line:
            return int(line.rsplit(":", 1)[1]), lines
        if not line:
            break
    raise AssertionError(f"no listening line; stderr: {lines}")


def test_cli_serves_echo_and_stops_cleanly_on_sigterm() -> None:
    server = run_cli(["-m", "trionet.serve", "echo", "--port", "0"], stderr=subprocess.PIPE)
    try:
        port, _ = wait_for_port(server, "echo")
        data = random_bytes(200_000, seed=7)
        client = subprocess.run(
            [sys.executable, "-m", "trionet.client", "echo", "--port", str(port)],
            input=data,
            capture_output=True,
            timeout=20,
            cwd=ROOT,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout == data
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        assert server.stderr is not None
        rest = server.stderr.read().decode()
        assert "SIGTERM received" in rest
        assert "end=eof" in rest and "in=200000 out=200000" in rest
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def test_cli_sigint_with_a_client_connected() -> None:
    server = run_cli(["-m", "trionet.serve", "echo", "--port", "0"], stderr=subprocess.PIPE)
    try:
        port, _ = wait_for_port(server, "echo")
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"hello")
            assert sock.recv(100) == b"hello"
            server.send_signal(signal.SIGINT)
            # Echo closes silently on shutdown: EOF, no BYE.
            assert sock.recv(100) == b""
        assert server.wait(timeout=15) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def test_client_reports_refused_connection() -> None:
    import socket

    with socket.socket() as s:  # find a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "trionet.client", "echo", "--port", str(port)],
        input=b"x",
        capture_output=True,
        timeout=20,
        cwd=ROOT,
    )
    assert result.returncode == 3
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "Connection refused" in err and "Traceback" not in err


def test_serve_cli_rejects_bad_options() -> None:
    for args in (
        ["echo", "--port", "99999"],
        ["nope"],
        ["echo", "--max-line", "0"],
        ["echo", "--grace", "-1"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "trionet.serve", *args],
            capture_output=True,
            timeout=20,
            cwd=ROOT,
        )
        # PROTOCOL.md: a service that cannot start (a bad option) exits 1.
        assert result.returncode == 1, args
        assert b"error:" in result.stderr and b"Traceback" not in result.stderr


def test_serve_cli_port_in_use_is_one_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "trionet.serve", "echo", "--port", str(port)],
            capture_output=True,
            timeout=20,
            cwd=ROOT,
            env={**os.environ},
        )
    assert result.returncode == 1
    assert b"cannot start" in result.stderr and b"Traceback" not in result.stderr


async def test_shutdown_ends_a_client_that_streams_without_pause() -> None:
    server = trionet.Server([EchoService(port=0)], grace=30)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        host, port = addresses["echo"][0]
        stream = await trio.open_tcp_stream(host, port)
        closed = trio.Event()

        async def stream_forever() -> None:
            chunk = b"z" * 65536
            with contextlib.suppress(trio.BrokenResourceError):
                while not closed.is_set():
                    await stream.send_all(chunk)

        async def drain() -> None:
            # Closing on a client that is still sending may reset the
            # connection: either way it ends.
            try:
                with contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some(1 << 20):
                        pass
            finally:
                closed.set()

        with trio.fail_after(10):  # far less than the 30 s grace
            async with trio.open_nursery() as clients:
                clients.start_soon(stream_forever)
                clients.start_soon(drain)
                await trio.sleep(0.2)
                server.shutdown()
        await stream.aclose()


async def test_idle_timeout_drops_a_client_that_sends_and_never_reads_in_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The probe's finding: a client that streams and never reads stalls the echo's
    sends, and a stalled send is the client doing nothing: dropped at the timeout."""
    async with open_memory_server(EchoService(idle_timeout=5), lockstep=True) as server:
        stream = await server.open_stream()
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            with trio.fail_after(60):
                while True:
                    await stream.send_all(b"z" * 65536)
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)


async def test_idle_timeout_drops_a_client_that_sends_and_never_reads_over_tcp(
    opened: Opened,
) -> None:
    server = trionet.Server([EchoService(port=0, idle_timeout=1)])
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(server.run))["echo"][0]
        stream = await opened.stream(port, host)
        sent = 0
        started = trio.current_time()
        with trio.fail_after(15), pytest.raises(trio.BrokenResourceError):
            while True:  # never reads: both socket buffers fill, then the server's send stalls
                await stream.send_all(b"z" * 65536)
                sent += 65536
        # Dropped about a second after the stall began, not tens of seconds later.
        assert trio.current_time() - started < 10
        assert sent > 65536
        nursery.cancel_scope.cancel()
