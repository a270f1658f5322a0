"""TLS: every service inside TLS, in memory and over sockets, and the failures.

Certificates come from ``trustme`` (``tls_files`` in conftest.py): a CA and a
server certificate for ``localhost`` and ``127.0.0.1``. In memory, both ends
run a real :class:`trio.SSLStream` over memory streams, on the autojump
clock; over TCP, everything runs on 127.0.0.1 with bounded waits.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import ssl
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme
from conftest import Opened, TLSFiles

import trionet
from trionet._client import EXIT_TLS, EXIT_USAGE
from trionet._socket import SocketTransport, SSLSocketStream
from trionet._tls import server_context, transport_for
from trionet.services.calc.client import client_main as calc_main
from trionet.services.calc.server import CalcService
from trionet.services.chat.server import ChatService
from trionet.services.echo.server import EchoService
from trionet.services.files.server import FilesService
from trionet.services.guess.server import GuessService
from trionet.testing import Client, open_memory_server

ROOT = Path(__file__).resolve().parents[2]
HELLO = b"hello world\n"


def tls(files: TLSFiles) -> dict[str, str]:
    return {"tls_cert": files.cert, "tls_key": files.key}


@attrs.define
class Wire:
    """A running server (memory or TCP) and ways to reach it."""

    connect: Callable[..., Awaitable[Client]]  # (name=None, *, tls=ctx) -> Client
    open_raw: Callable[..., Awaitable[trio.abc.Stream]]  # (name=None) -> plain stream
    server: trionet.Server
    addresses: dict[str, list[tuple[str, int]]]  # over TCP: name -> [(host, port)]

    def port(self, name: str | None = None) -> int:
        """The TCP port of service ``name`` (the only one when ``None``)."""
        (found,) = self.addresses.values() if name is None else [self.addresses[name]]
        return found[0][1]


@asynccontextmanager
async def running(kind: str, *services: trionet.Service, grace: float = 5.0) -> AsyncIterator[Wire]:
    """Run ``services`` in memory or on 127.0.0.1 (``kind`` is "memory" or "tcp")."""
    if kind == "memory":
        async with open_memory_server(*services, grace=grace) as srv:

            async def connect_memory(
                name: str | None = None, *, tls: ssl.SSLContext | None = None
            ) -> Client:
                return await srv.connect(name, tls=tls)

            yield Wire(connect_memory, srv.open_stream, srv.server, {})
        return
    server = trionet.Server([s for s in services], grace=grace)
    async with Opened() as opened, trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)

        async def open_raw(name: str | None = None) -> trio.abc.Stream:
            host, port = addresses[name or services[0].name][0]
            return await opened.stream(port, host)

        async def connect_tcp(
            name: str | None = None, *, tls: ssl.SSLContext | None = None
        ) -> Client:
            stream = await open_raw(name)
            if tls is not None:
                stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
            return Client(stream, timeout=30)

        yield Wire(connect_tcp, open_raw, server, addresses)
        server.shutdown()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trionet.access"]


# -- configuration -------------------------------------------------------------------


def test_bad_certificate_files_are_named(tls_files: TLSFiles, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=f"cannot read TLS certificate {missing}: No such file"):
        CalcService(tls_cert=missing, tls_key=tls_files.key)
    with pytest.raises(ValueError, match=f"cannot read TLS key {missing}: No such file"):
        CalcService(tls_cert=tls_files.cert, tls_key=missing)
    with pytest.raises(ValueError, match=f"TLS certificate {tls_files.key}: no PEM certificate"):
        CalcService(tls_cert=tls_files.key, tls_key=tls_files.key)
    with pytest.raises(ValueError, match=f"TLS key {tls_files.cert}: no PEM private key"):
        CalcService(tls_cert=tls_files.cert, tls_key=tls_files.cert)
    other_key = tmp_path / "other.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(ValueError, match=f"TLS key {other_key} does not match certificate"):
        CalcService(tls_cert=tls_files.cert, tls_key=str(other_key))
    with pytest.raises(ValueError, match="both a certificate and a key"):
        CalcService(tls_cert=tls_files.cert)
    assert CalcService().tls_context is None
    assert CalcService(**tls(tls_files)).tls_context is not None


# -- every service inside TLS -------------------------------------------------------------


async def talk_echo(c: Client) -> None:
    payload = bytes(range(256)) * 1000  # binary, several TLS records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send, payload)
        assert await c.receive_exactly(len(payload)) == payload


async def talk_guess(c: Client) -> None:
    await c.expect("NEW 1 100")
    await c.send_line("0")
    await c.expect("ERR out-of-range 1 100")
    await c.send_line("QUIT")
    await c.expect("BYE")
    await c.expect_closed()


async def talk_chat(c: Client) -> None:
    await c.expect("WELCOME trionet chat — send /nick <name> to join")
    await c.send_line("/nick alice")
    await c.expect("OK nick alice")
    await c.send_line("/who")
    await c.expect("WHO alice")
    await c.send_line("/quit")
    await c.expect("BYE")
    await c.expect_closed()


async def talk_files(c: Client) -> None:
    await c.send_line("LIST")
    await c.expect("FILE 12 hello.txt", "END 1")
    await c.send_line("GET hello.txt")
    await c.expect(f"OK 12 {hashlib.sha256(HELLO).hexdigest()}")
    assert await c.receive_exactly(12) == HELLO
    await c.send_line("QUIT")
    await c.expect("BYE")
    await c.expect_closed()


async def talk_calc(c: Client) -> None:
    await c.send_line("2**64")
    await c.expect("OK 18446744073709551616")
    await c.send_line("QUIT")
    await c.expect("BYE")
    await c.expect_closed()


TALKS = {
    "echo": talk_echo,
    "guess": talk_guess,
    "chat": talk_chat,
    "files": talk_files,
    "calc": talk_calc,
}


def make_services(files: TLSFiles, root: Path) -> list[trionet.Service]:
    (root / "hello.txt").write_bytes(HELLO)
    options: dict[str, Any] = {"port": 0, **tls(files)}
    return [
        EchoService(**options),
        GuessService(**options),
        ChatService(**options),
        FilesService(root=str(root), **options),
        CalcService(**options),
    ]


async def check_every_service(
    kind: str, tls_files: TLSFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ctx = tls_files.client_context()
    with trio.fail_after(20):
        async with running(kind, *make_services(tls_files, tmp_path)) as wire:
            for name, talk in TALKS.items():
                client = await wire.connect(name, tls=ctx)
                await talk(client)
                await client.aclose()
    # One access-log line per connection, each marked tls.
    served = [line for line in access_lines(caplog) if " end=" in line]
    assert sorted(line.split()[0] for line in served) == sorted(TALKS)
    assert all(line.endswith(" tls") for line in served), served


async def test_every_service_inside_tls_in_memory(
    tls_files: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not on the autojump clock: files lists and hashes in worker threads,
    # and the clock would jump past the client's timeout while they run.
    await check_every_service("memory", tls_files, tmp_path, caplog)


async def test_every_service_inside_tls_over_tcp(
    tls_files: TLSFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await check_every_service("tcp", tls_files, tmp_path, caplog)
    listening = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert len(listening) == 5
    assert all(line.endswith(" (tls)") for line in listening), listening


async def test_plain_services_are_not_marked_tls(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with running("tcp", CalcService(port=0)) as wire:
            client = await wire.connect()
            await talk_calc(client)
    (listening,) = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert not listening.endswith("(tls)")
    (line,) = access_lines(caplog)
    assert not line.endswith(" tls")


# -- the shared rules inside TLS -------------------------------------------------------


async def test_line_limits_and_idle_timeout_inside_tls(
    autojump_clock: trio.testing.MockClock,
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    service = CalcService(max_line=10, idle_timeout=60, **tls(tls_files))
    async with running("memory", service) as wire:
        c = await wire.connect(tls=tls_files.client_context())
        await c.send(b"1+1+1+1+1+1+1\n\xff\xfe\n1+1\n")
        await c.expect("ERR line-too-long 10", "ERR bad-encoding", "OK 2")
        await c.expect_nothing(for_seconds=59)
        await c.expect("BYE idle-timeout")
        await c.expect_closed()  # a clean TLS close (close_notify), not a reset
    (line,) = access_lines(caplog)
    assert " end=idle-timeout " in line and line.endswith(" tls")


@pytest.mark.parametrize("kind", ["memory", "tcp"])
async def test_shutdown_says_bye_inside_tls(kind: str, tls_files: TLSFiles) -> None:
    ctx = tls_files.client_context()
    with trio.fail_after(10):
        async with running(kind, CalcService(port=0, **tls(tls_files))) as wire:
            c = await wire.connect(tls=ctx)
            await c.send_line("6*7")
            await c.expect("OK 42")
            wire.server.shutdown()
            await c.expect("BYE shutdown")
            await c.expect_closed()


@pytest.mark.parametrize("kind", ["memory", "tcp"])
async def test_connection_limit_says_busy_inside_tls(kind: str, tls_files: TLSFiles) -> None:
    ctx = tls_files.client_context()
    with trio.fail_after(10):
        async with running(kind, CalcService(port=0, max_connections=1, **tls(tls_files))) as w:
            first = await w.connect(tls=ctx)
            await first.send_line("1")
            await first.expect("OK 1")
            second = await w.connect(tls=ctx)
            await second.expect("BYE busy")
            await second.expect_closed()
            await first.send_line("2")
            await first.expect("OK 2")


# -- failed handshakes: one log line, the server carries on ----------------------------


async def test_silent_client_is_dropped_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running("memory", EchoService(**tls(tls_files))) as wire:
        silent = await wire.open_raw()
        start = trio.current_time()
        # Meanwhile others are served.
        other = await wire.connect(tls=tls_files.client_context())
        await other.send(b"ping")
        assert await other.receive_exactly(4) == b"ping"
        with trio.fail_after(60):
            assert await silent.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(10, abs=0.1)
    (line,) = [m for m in access_lines(caplog) if "handshake" in m]
    assert line == "echo memory tls handshake failed: timed out after 10s"


async def test_handshake_deadline_is_the_idle_timeout_when_shorter(
    autojump_clock: trio.testing.MockClock, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running("memory", CalcService(idle_timeout=2, **tls(tls_files))) as wire:
        silent = await wire.open_raw()
        with trio.fail_after(30):
            assert await silent.receive_some() == b""
    assert any(m.endswith("timed out after 2s") for m in access_lines(caplog))


async def test_shutdown_does_not_wait_for_a_pending_handshake(
    autojump_clock: trio.testing.MockClock, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running("memory", CalcService(**tls(tls_files))) as wire:
        silent = await wire.open_raw()
        await trio.sleep(1)  # its handshake is under way
        start = trio.current_time()
        wire.server.shutdown()
    assert trio.current_time() - start < 0.5
    assert await silent.receive_some() == b""
    assert any("handshake failed: abandoned" in m for m in access_lines(caplog))


def assert_one_line(caplog: pytest.LogCaptureFixture, reason: str) -> None:
    failures = [r for r in caplog.records if "handshake failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert reason in failures[0].getMessage()
    assert failures[0].exc_info is None and "\n" not in failures[0].getMessage()


@pytest.mark.parametrize("kind", ["memory", "tcp"])
async def test_plain_text_to_a_tls_port(
    kind: str, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with running(kind, CalcService(port=0, **tls(tls_files))) as wire:
            plain = Client(await wire.open_raw(), timeout=30)
            await plain.send(b"6*7\nQUIT\n")
            try:
                got = await plain.receive_all()  # closed (an alert at most), no answer
            except trio.BrokenResourceError:  # or reset: either way, no reply
                got = b""
            assert b"OK" not in got
            good = await wire.connect(tls=tls_files.client_context())
            await talk_calc(good)
    assert_one_line(caplog, "not TLS (plain text sent to a TLS port?)")


async def test_client_that_rejects_the_certificate(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with running("tcp", CalcService(port=0, **tls(tls_files))) as wire:
            address = ("127.0.0.1", wire.port())

            def stranger() -> None:
                # A blocking stdlib client: unlike SSLStream it sends its
                # "unknown CA" alert before it gives up.
                ctx = ssl.create_default_context()  # the system's CAs only
                with socket.create_connection(address, timeout=5) as sock:
                    ctx.wrap_socket(sock, server_hostname="127.0.0.1")

            with pytest.raises(ssl.SSLCertVerificationError):
                await trio.to_thread.run_sync(stranger)
            good = await wire.connect(tls=tls_files.client_context())
            await talk_calc(good)
    assert_one_line(caplog, "unknown ca")


def client_hello() -> bytes:
    """The first bytes a real TLS client sends."""
    obj = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def test_reset_in_the_middle_of_the_handshake(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with running("tcp", CalcService(port=0, **tls(tls_files))) as wire:
            stream = await wire.open_raw()
            assert isinstance(stream, trio.SocketStream)
            hello = client_hello()
            await stream.send_all(hello[: len(hello) // 2])
            await trio.sleep(0.05)  # the server is waiting for the rest
            # SO_LINGER 0: close() sends a reset.
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            while not any("handshake failed" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                await trio.sleep(0.01)
            good = await wire.connect(tls=tls_files.client_context())
            await talk_calc(good)
    assert_one_line(caplog, "connection reset by peer")


# -- outside clients and our own ----------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_openssl_s_client_talks_to_calc(tls_files: TLSFiles) -> None:
    with trio.fail_after(20):
        async with running("tcp", CalcService(port=0, **tls(tls_files))) as wire:
            port = wire.port()
            result = await trio.run_process(
                [
                    *["openssl", "s_client", "-connect", f"127.0.0.1:{port}"],
                    *["-CAfile", tls_files.ca, "-verify_return_error", "-verify_ip", "127.0.0.1"],
                    "-quiet",  # no session dump; stays connected after stdin ends
                ],
                stdin=b"6*7\n2**10\nQUIT\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.stdout.decode().splitlines() == ["OK 42", "OK 1024", "BYE"], result.stderr
    assert result.returncode == 0, result.stderr


async def run_calc(argv: list[str]) -> int:
    """Run the calc client (its own ``trio.run``) in a worker thread."""
    return await trio.to_thread.run_sync(calc_main, argv)


async def test_clients_over_tls_and_certificate_errors(
    tls_files: TLSFiles, tls_ca: trustme.CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A second service whose certificate names another host.
    elsewhere = tls_ca.issue_cert("example.org")
    cert, key = tmp_path / "else.pem", tmp_path / "else.key"
    elsewhere.cert_chain_pems[0].write_to_path(str(cert))
    elsewhere.private_key_pem.write_to_path(str(key))
    calc = CalcService(port=0, **tls(tls_files))
    other = GuessService(port=0, tls_cert=str(cert), tls_key=str(key))
    with trio.fail_after(20):
        server = trionet.Server([calc, other])
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            port = str(addresses["calc"][0][1])
            trusted = ["--port", port, "--tls", "--cafile", tls_files.ca]
            assert await run_calc([*trusted, "6*7"]) == 0
            assert capsys.readouterr().out == "42\n"
            # The host name is checked too: localhost is in the certificate.
            assert await run_calc([*trusted, "--host", "localhost", "1+1"]) == 0
            assert capsys.readouterr().out == "2\n"
            # The system's trust store does not know our test CA.
            assert await run_calc(["--port", port, "--tls", "1"]) == EXIT_TLS
            err = capsys.readouterr().err
            assert err.startswith(
                f"calc: TLS certificate verification failed for 127.0.0.1:{port}: "
            )
            assert err.count("\n") == 1
            # A trusted certificate for another name.
            other_port = str(addresses["guess"][0][1])
            assert await run_calc(["--port", other_port, "--cafile", tls_files.ca]) == EXIT_TLS
            err = capsys.readouterr().err
            assert err == (
                f"calc: TLS certificate verification failed for 127.0.0.1:{other_port}: "
                "IP address mismatch, certificate is not valid for '127.0.0.1'.\n"
            )
            # A plain client at a TLS port, a TLS client at a plain port.
            missing = str(tmp_path / "none.pem")
            assert await run_calc(["--port", port, "--cafile", missing, "1"]) == EXIT_USAGE
            assert capsys.readouterr().err == (
                f"calc: cannot read TLS CA file {missing}: No such file or directory\n"
            )
            server.shutdown()


async def test_tls_client_at_a_plain_port(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(20):
        async with running("tcp", EchoService(port=0)) as wire:
            port = wire.port()
            # A plain echo server sends the ClientHello back, which is not
            # what a TLS server answers: a clear error, not a hang.
            assert await run_calc(["--port", str(port), "--tls", "1"]) == EXIT_TLS
    err = capsys.readouterr().err
    assert err.startswith(f"calc: TLS handshake failed with 127.0.0.1:{port}: "), err
    assert err.count("\n") == 1


async def test_echo_client_over_tls(tls_files: TLSFiles) -> None:
    payload = bytes(range(256)) * 4000  # 1 MB, binary
    with trio.fail_after(30):
        async with running("tcp", EchoService(port=0, **tls(tls_files))) as wire:
            port = wire.port()
            command = [sys.executable, "-m", "trionet.client", "echo", "--port", str(port)]
            result = await trio.run_process(
                [*command, "--tls", "--cafile", tls_files.ca],
                stdin=payload,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=ROOT,
            )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload


# -- the socket transport under TLS -----------------------------------------------------


async def test_socket_transport_is_a_half_closeable_trio_stream() -> None:
    async def make() -> tuple[SocketTransport, SocketTransport]:
        a, b = trio.socket.socketpair()
        return SocketTransport(trio.SocketStream(a)), SocketTransport(trio.SocketStream(b))

    await trio.testing.check_half_closeable_stream(make, None)


async def test_socket_transport_carries_bulk_both_ways() -> None:
    a, b = trio.socket.socketpair()
    left, right = SocketTransport(trio.SocketStream(a)), SocketTransport(trio.SocketStream(b))
    payload = bytes(range(256)) * 20_000  # bigger than the socket buffers
    got = bytearray()

    async def receive() -> None:
        while len(got) < len(payload):
            got.extend(await right.receive_some())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await left.send_all(payload)
    assert got == payload
    await left.aclose()
    assert await right.receive_some() == b""
    await right.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await right.receive_some()


async def test_tls_over_the_lean_transport_is_a_trio_stream(
    tls_files: TLSFiles, opened: Opened
) -> None:
    """Under SSLStream the transport skips its own checkpoints: the TLS stream keeps them."""
    server_ctx = server_context(tls_files.cert, tls_files.key)

    async def make() -> tuple[trio.SSLStream[Any], trio.SSLStream[Any]]:
        a, b = trio.socket.socketpair()
        client_side, server_side = (
            transport_for(trio.SocketStream(a)),
            transport_for(trio.SocketStream(b)),
        )
        assert isinstance(client_side, SocketTransport) and not client_side.checkpoints
        client = trio.SSLStream(
            client_side, tls_files.client_context(), server_hostname="localhost"
        )
        server = trio.SSLStream(server_side, server_ctx, server_side=True)
        return client, server

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(make, None)
        client, server = await make()
        opened.add(client), opened.add(server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        # Every call is still a checkpoint, even when nothing has to wait.
        for _ in range(3):
            with trio.testing.assert_checkpoints():
                await client.send_all(b"ping")
            await trio.testing.wait_all_tasks_blocked()
            with trio.testing.assert_checkpoints():
                assert await server.receive_some(4) == b"ping"


async def test_client_tls_stream_is_a_trio_stream(tls_files: TLSFiles) -> None:
    """The clients' SSLSocketStream against an SSLStream server: Trio's own stream checks."""
    server_ctx = server_context(tls_files.cert, tls_files.key)
    client_ctx = tls_files.client_context()

    async def make() -> tuple[SSLSocketStream, trio.SSLStream[Any]]:
        a, b = trio.socket.socketpair()
        server = trio.SSLStream(trio.SocketStream(b), server_ctx, server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            client = await SSLSocketStream.open(trio.SocketStream(a), client_ctx, "localhost")
        return client, server

    async def make_reversed() -> tuple[trio.SSLStream[Any], SSLSocketStream]:
        client, server = await make()
        return server, client

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(make, None)
        await trio.testing.check_two_way_stream(make_reversed, None)
        # Many records in, one receive out: what makes downloads fast.
        client, server = await make()
        payload = bytes(range(256)) * 4096  # 1 MiB, 64 TLS records
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, payload)
            got = bytearray()
            calls = 0
            while len(got) < len(payload):
                got += await client.receive_some(len(payload))
                calls += 1
        assert got == payload
        assert calls < 64
        # A connection cut without close_notify is an error, not an end.
        await trio.aclose_forcefully(server.transport_stream)
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")


async def test_client_tls_stream_refuses_a_wrong_certificate(
    tls_files: TLSFiles, opened: Opened
) -> None:
    server_ctx = server_context(tls_files.cert, tls_files.key)
    a, b = trio.socket.socketpair()
    server = opened.add(trio.SSLStream(trio.SocketStream(b), server_ctx, server_side=True))

    async def serve() -> None:
        with pytest.raises(trio.BrokenResourceError):  # the client gives up
            await server.do_handshake()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                await SSLSocketStream.open(
                    trio.SocketStream(a), tls_files.client_context(), "example.org"
                )


async def test_guess_client_plays_inside_tls(tls_files: TLSFiles) -> None:
    with trio.fail_after(20):
        async with running("tcp", GuessService(port=0, **tls(tls_files))) as wire:
            command = [sys.executable, "-m", "trionet.client", "guess", "--auto"]
            result = await trio.run_process(
                [*command, "--port", str(wire.port()), "--tls", "--cafile", tls_files.ca],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=ROOT,
            )
    assert result.returncode == 0, result.stderr
    transcript = result.stdout.decode().splitlines()
    assert transcript[0] == "S: NEW 1 100"
    assert any(line.startswith("S: CORRECT ") for line in transcript)


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux's quick-ACK mode")
async def test_first_reply_to_a_client_without_nodelay_is_not_held_40_ms(
    tls_files: TLSFiles,
) -> None:
    """Issue 19: a fresh TLS 1.3 connection's first reply took 44 ms when the
    client does not set TCP_NODELAY (Python's ssl, most scripts). OpenSSL sends
    the session tickets with the first reply, so after the client's Finished
    the server sent nothing, its ACK waited for the kernel's delayed-ACK timer
    (40 ms), and the client's Nagle held the request until then."""

    def first_replies(port: int) -> list[float]:
        ctx = tls_files.client_context()
        times = []
        for _ in range(7):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    assert s.version() == "TLSv1.3"
                    start = time.perf_counter()
                    s.sendall(b"6*7\n")
                    reply = b""
                    while not reply.endswith(b"\n"):
                        reply += s.recv(100)
                    times.append(time.perf_counter() - start)
                    assert reply == b"OK 42\n"
        return times

    with trio.fail_after(60):
        async with running("tcp", CalcService(port=0, **tls(tls_files))) as wire:
            times = await trio.to_thread.run_sync(first_replies, wire.port())
    # Without the fix every one takes at least the delayed ACK's 40 ms.
    assert statistics.median(times) < 0.030, [f"{t * 1000:.1f} ms" for t in times]
