"""Reload on SIGHUP: new settings for new connections, nobody refused or cut off.

In memory (autojump clock): :meth:`Server.reload` changes limits and
timeouts for connections accepted afterwards only; :meth:`Server.retire`
stops accepting and lets open connections finish, then says ``BYE
shutdown``. As real processes: a client loop through five reloads in a row
(one process, and two workers) loses nothing; a new certificate is what
``openssl s_client`` sees next; a config that does not load leaves the old
one running; SIGHUP never stops the server.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from conftest import Opened, Serve, TLSFiles, _free_port

from trionet import Connection, Server, Service
from trionet.testing import Client, MemoryListener, open_memory_server


class Hold(Service):
    """Answers each line with ``ok LINE``; nothing else."""

    name = "hold"

    async def handle(self, conn: Connection) -> None:
        async for line in conn:
            await conn.send_line(f"ok {line}")


# -- in memory ---------------------------------------------------------------------------


async def test_reload_changes_limits_for_the_next_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Hold(max_connections=1)) as server:
        first = await server.connect()
        await first.send_line("a")
        await first.expect("ok a")
        turned_away = await server.connect()
        await turned_away.expect("BYE busy")
        server.server.reload({"hold": {"max_connections": 2, "max_line": 3}})
        second = await server.connect()
        await second.send_line("abcd")  # the new max_line applies to it...
        await second.expect("ERR line-too-long 3")
        await first.send_line("abcd")  # ...not to the connection already open
        await first.expect("ok abcd")


async def test_reload_gives_new_timeouts_to_new_connections_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Hold(idle_timeout=10)) as server:
        old = await server.connect(timeout=200)
        await old.send_line("a")  # now it is being served
        await old.expect("ok a")
        started = trio.current_time()
        server.server.reload({"hold": {"idle_timeout": 100.0}})
        new = await server.connect(timeout=200)
        await old.expect("BYE idle-timeout")
        assert 9.9 < trio.current_time() - started < 10.5
        await new.expect_nothing(for_seconds=80)
        await new.expect("BYE idle-timeout")
        assert 99.9 < trio.current_time() - started < 100.5


async def _serving(nursery: trio.Nursery) -> tuple[Server, MemoryListener]:
    """A server of :class:`Hold` on a memory listener, running in ``nursery``."""
    listener = MemoryListener()
    server = Server([Hold()], listeners={"hold": [listener]})
    await nursery.start(server.run)
    return server, listener


async def test_retire_keeps_open_connections_until_they_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server, listener = await _serving(nursery)
        client = Client(await listener.connect())
        server.retire(60)
        await trio.sleep(30)
        with pytest.raises(trio.BrokenResourceError):  # no longer accepting
            await listener.connect()
        await client.send_line("still here")  # but the open one is served
        await client.expect("ok still here")
        await client.send_eof()
        await client.expect_closed()
    # The server stopped as soon as its last connection ended.
    assert trio.current_time() < 31


async def test_retire_says_bye_shutdown_when_the_grace_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server, listener = await _serving(nursery)
        client = Client(await listener.connect(), timeout=100)
        server.retire(20)
        await client.expect_nothing(for_seconds=19)
        await client.expect("BYE shutdown")
        await client.expect_closed()
    assert 19.9 < trio.current_time() < 20.5


async def test_shutdown_while_retiring_ends_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(Hold()) as server:
        client = await server.connect()
        server.server.retire(1000)
        await trio.sleep(5)
        server.shutdown()
        await client.expect("BYE shutdown")
    assert trio.current_time() < 6


# -- real processes ---------------------------------------------------------------------


class Tally:
    """What a client loop saw: answers, refusals, resets, wrong answers."""

    def __init__(self) -> None:
        self.answered = 0
        self.refused = 0
        self.reset = 0
        self.wrong: list[str] = []


async def _short_clients(port: int, tally: Tally, stop: trio.Event, who: int) -> None:
    """Connect, ask, QUIT, again and again until ``stop``."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except ConnectionRefusedError:
            tally.refused += 1
            continue
        client = Client(stream, timeout=30)
        try:
            await client.send(f"{who} * {n}\nQUIT\n".encode())
            got = [await client.receive_line(), await client.receive_line()]
            if got != [f"OK {who * n}", "BYE"]:
                tally.wrong.append(repr(got))
            else:
                tally.answered += 1
        except (trio.BrokenResourceError, ConnectionResetError):
            tally.reset += 1
        finally:
            await client.aclose()


async def _long_client(port: int, tally: Tally, stop: trio.Event) -> None:
    """One connection asking every 20 ms through the whole run."""
    client = Client(await trio.open_tcp_stream("127.0.0.1", port), timeout=30)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            await client.send_line(f"{n} + 1")
            got = await client.receive_line()
            if got != f"OK {n + 1}":
                tally.wrong.append(repr(got))
            else:
                tally.answered += 1
            await trio.sleep(0.02)
    except (trio.BrokenResourceError, ConnectionResetError):
        tally.reset += 1
    finally:
        await client.aclose()


async def _reload_five_times_under_load(p: Serve, reloaded: str) -> Tally:
    port = p.port("calc")
    tally = Tally()
    stop = trio.Event()
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            for who in range(4):
                nursery.start_soon(_short_clients, port, tally, stop, who + 1)
            nursery.start_soon(_long_client, port, tally, stop)
            for i in range(1, 6):
                await trio.sleep(0.3)
                p.signal(signal.SIGHUP)
                # Blocking wait in a thread: the clients keep going meanwhile.
                await trio.to_thread.run_sync(lambda i=i: p.wait_for(reloaded, count=i, timeout=60))
            await trio.sleep(0.3)
            stop.set()
    return tally


@pytest.mark.parametrize("workers", [1, 2])
async def test_five_reloads_under_a_client_loop_lose_nothing(
    serve: Callable[..., Serve], tmp_path: Path, workers: int
) -> None:
    config = tmp_path / "trionet.toml"
    config.write_text("[common]\nmax-line = 100\n")
    # With workers, a long grace: the long-lived client stays on the first
    # generation through all five reloads however slowly new workers start.
    p = serve(
        *("calc", "--port", "0", "--config", str(config), "--workers", str(workers)),
        *("--reload-grace", "600"),
    )
    if workers > 1:
        p.wait_for(r"worker \d+ started", count=workers)
    done = r"reloaded: generation \d+ serves" if workers > 1 else r"reloaded: new connections"
    tally = await _reload_five_times_under_load(p, done)
    assert (tally.refused, tally.reset, tally.wrong) == (0, 0, [])
    assert tally.answered > 50
    assert p.count(r"reload failed") == 0
    # With workers, five new generations were started, every one complete.
    started = p.count(r"worker \d started \(pid \d+, generation [1-5]\)")
    assert started == (5 * workers if workers > 1 else 0)
    assert p.stop() == 0


async def test_with_workers_the_old_generation_says_bye_after_the_reload_grace(
    serve: Callable[..., Serve], tmp_path: Path, opened: Opened
) -> None:
    config = tmp_path / "trionet.toml"
    config.write_text("[common]\nmax-line = 100\nreload-grace = 2\n")  # (a config key too)
    p = serve("calc", "--port", "0", "--config", str(config), "--workers", "2")
    port = p.port("calc")
    p.wait_for(r"worker \d+ started", count=2)
    with trio.fail_after(60):
        old = await opened.client(port, timeout=50)
        await old.send_line("1+1")
        await old.expect("OK 2")
        config.write_text("[common]\nmax-line = 5\nreload-grace = 2\n")
        p.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(lambda: p.wait_for(r"reloaded: generation 1", timeout=50))
        # (Until a retired worker has read its parent's word, it may still accept.)
        await trio.to_thread.run_sync(lambda: p.wait_for(r"replaced by a new generation", 2))
        # The old connection still works, with its old settings...
        await old.send_line("100000 + 1")
        await old.expect("OK 100001")
        # ...new ones get the new settings...
        new = await opened.client(port, timeout=50)
        await new.send_line("100000 + 1")
        await new.expect("ERR line-too-long 5")
        # ...and after --reload-grace the old one is sent off.
        await old.expect("BYE shutdown")
        await old.expect_closed()
        await new.send_line("1+1")
        await new.expect("OK 2")
    assert p.stop() == 0


def _served_certificate(port: int) -> str:
    """The certificate ``openssl s_client`` receives from 127.0.0.1:``port`` (PEM)."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost"],
        input=b"",
        capture_output=True,
        timeout=60,
        check=False,
    ).stdout.decode()
    found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", out, re.S)
    assert found, out
    return found[0]


def _new_leaf(ca: trustme.CA, folder: Path) -> tuple[str, str]:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = folder / "new-cert.pem", folder / "new-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def _first_pem(path: str) -> str:
    text = Path(path).read_text()
    return text[: text.index("-----END CERTIFICATE-----\n") + 26]


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found")


@needs_openssl
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_with_a_new_certificate_presents_it(
    serve: Callable[..., Serve],
    tmp_path: Path,
    tls_files: TLSFiles,
    tls_ca: trustme.CA,
    workers: str,
) -> None:
    config = tmp_path / "trionet.toml"
    config.write_text(f'[common]\ntls-cert = "{tls_files.cert}"\ntls-key = "{tls_files.key}"\n')
    p = serve("calc", "--port", "0", "--config", str(config), "--workers", workers)
    port = p.port("calc")
    assert _served_certificate(port) == _first_pem(tls_files.cert)
    cert, key = _new_leaf(tls_ca, tmp_path)
    config.write_text(f'[common]\ntls-cert = "{cert}"\ntls-key = "{key}"\n')
    p.signal(signal.SIGHUP)
    p.wait_for(r"reloaded")
    assert _served_certificate(port) == _first_pem(cert) != _first_pem(tls_files.cert)
    assert p.stop() == 0


@needs_openssl
def test_without_config_sighup_reads_the_certificate_files_again(
    serve: Callable[..., Serve], tmp_path: Path, tls_files: TLSFiles, tls_ca: trustme.CA
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(tls_files.cert, cert)
    shutil.copy(tls_files.key, key)
    p = serve("calc", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    port = p.port("calc")
    assert _served_certificate(port) == _first_pem(tls_files.cert)
    new_cert, new_key = _new_leaf(tls_ca, tmp_path)
    shutil.copy(new_cert, cert)  # rotated in place, as certbot's deploy hook would
    shutil.copy(new_key, key)
    p.signal(signal.SIGHUP)
    p.wait_for(r"reloaded")
    assert _served_certificate(port) == _first_pem(new_cert)
    assert p.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_config_that_fails_to_load_leaves_the_old_one_running(
    serve: Callable[..., Serve], tmp_path: Path, workers: str, opened: Opened
) -> None:
    config = tmp_path / "trionet.toml"
    config.write_text("[common]\nmax-line = 5\n")
    p = serve("calc", "--port", "0", "--config", str(config), "--workers", workers)
    port = p.port("calc")
    bad = [
        "[common]\nmax-line = \n",  # not TOML
        "[common]\nmax-line = -3\n",  # a bad value
        '[common]\ntls-cert = "/nonexistent.pem"\ntls-key = "/nonexistent.pem"\n',
    ]
    for i, text in enumerate(bad, 1):
        config.write_text(text)
        p.signal(signal.SIGHUP)
        (failure,) = p.wait_for(r"ERROR trionet: reload failed: .*", count=i)[-1:]
        assert "\n" not in failure[0]
    assert p.count("reload failed") == 3
    with trio.fail_after(30):
        client = await opened.client(port, timeout=20)
        await client.send_line("123456")  # still max-line 5
        await client.expect("ERR line-too-long 5")
    assert p.stop() == 0


async def test_sighup_never_stops_the_server(serve: Callable[..., Serve], opened: Opened) -> None:
    p = serve("calc", "--port", "0", "--workers", "2")
    port = p.port("calc")
    p.wait_for(r"worker \d+ started \(pid (\d+)\)", count=2)
    for _ in range(3):  # in a burst, without waiting
        p.signal(signal.SIGHUP)
    p.wait_for(r"reloaded: generation 1 ")
    # The burst made one reload, or two (signals that arrive during one make
    # at most one more, and the kernel merges a pending SIGHUP with the next):
    # both were requested long before the first generation was ready.
    last = p.count(r"SIGHUP received: reloading")
    assert last in (1, 2), p.matching(r"SIGHUP")
    p.wait_for(rf"reloaded: generation {last} ")
    # Once ready, a worker ignores SIGHUP (its parent reloads), logging why.
    # (One of the last generation: an earlier one may be retiring, and one
    # whose signal watcher has stopped says nothing.)
    pid = int(p.wait_for(rf"worker \d+ started \(pid (\d+), generation {last}\)")[0][1])
    os.kill(pid, signal.SIGHUP)
    p.wait_for(r"SIGHUP ignored: a worker reloads when its parent")
    with trio.fail_after(30):
        client = await opened.client(port, timeout=20)
        await client.send_line("6*7")
        await client.expect("OK 42")
    assert p.proc.poll() is None
    assert p.count(r"died") == 0
    assert p.stop() == 0


def test_what_one_process_cannot_change_is_named(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    config = tmp_path / "trionet.toml"
    config.write_text("[chat]\nport = 0\nrate = 5\n[calc]\nport = 0\n")
    p = serve("chat", "calc", "--config", str(config))
    p.port("calc")
    config.write_text(
        '[common]\nlog-level = "DEBUG"\nmax-line = 50\n[chat]\nport = 0\nrate = 7\n'
        "[calc]\nport = 1\n"
    )
    p.signal(signal.SIGHUP)
    p.wait_for(r"reloaded: new connections get the new settings")
    warnings = [line.split(": ", 1)[1] for line in p.lines if " WARNING " in line]
    assert sorted(warnings) == [
        "reload: --log-level changed but applies only after a restart",
        "reload: calc keeps its address; a new host or port needs a restart",
        "reload: chat: --rate changed but applies only after a restart",
    ]
    assert p.stop() == 0


def test_a_sighup_during_start_up_is_not_lost(serve: Callable[..., Serve]) -> None:
    # The parent logs its sockets before its signal handler is in place; a
    # SIGHUP then is remembered and the reload follows once workers serve.
    p = serve("calc", "--port", "0", "--workers", "2")
    p.port("calc")
    p.signal(signal.SIGHUP)
    p.wait_for(r"reloaded: generation 1 serves")
    assert p.count(r"died") == 0
    assert p.stop() == 0


def _family(pid: int) -> list[int]:
    """``pid`` and its children (from /proc: each thread lists the ones it started)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            found += map(int, (task / "children").read_text().split())
    return found


def test_sighup_to_every_process_in_a_burst_kills_no_worker(
    serve: Callable[..., Serve],
) -> None:
    """``pkill -HUP -f trionet`` reaches the workers too, including starting ones."""
    p = serve("calc", "--port", "0", "--workers", "2")
    port = p.port("calc")
    p.wait_for(r"worker \d+ started", count=2)
    for _ in range(30):  # 3 s: new workers start (and import) meanwhile
        for pid in _family(p.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        time.sleep(0.1)
    # Every reload the parent began completes (one at a time; signals that
    # come while one waits its turn add none).
    deadline = time.monotonic() + 120
    while p.count(r"reloaded: generation") < p.count(r"trionet: SIGHUP received: reloading"):
        assert time.monotonic() < deadline, [x for x in p.lines if "trionet: [" not in x][-25:]
        time.sleep(0.1)
    assert p.count(r"reloaded: generation") >= 1
    assert p.count(r"a reload is already waiting its turn") >= 1
    assert (p.count("died"), p.count("reload failed")) == (0, 0)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"7*6\n")
        assert client.recv(100) == b"OK 42\n"
    assert p.stop() == 0


def _readyz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_readyz_stays_ready_through_a_reload(serve: Callable[..., Serve]) -> None:
    metrics = _free_port()
    p = serve("calc", "--port", "0", "--workers", "2", "--metrics-port", str(metrics))
    p.wait_for(r"metrics listening")
    deadline = time.monotonic() + 60
    while _readyz(metrics) != 200:  # until a worker serves
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.signal(signal.SIGHUP)
    seen = []
    while not p.count(r"reloaded: generation 1"):
        assert time.monotonic() < deadline + 60, p.lines[-10:]
        seen.append(_readyz(metrics))
        time.sleep(0.02)
    for _ in range(20):  # and while the old generation leaves
        seen.append(_readyz(metrics))
        time.sleep(0.02)
    assert set(seen) == {200}, seen
    assert p.stop() == 0
