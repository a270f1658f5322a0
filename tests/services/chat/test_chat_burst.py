"""Bursts that flood control allows, at default settings: nobody is evicted.

The probe from issue 12: N members each send 10 lines of 4,000 bytes at
once. With a queue per member holding its own copy of the traffic, 23 of 50
(47 of 100) healthy members were evicted as slow consumers and the server
grew by 130 MB. With the log, every member gets every message and the
server holds each relayed line once.

Run in memory, over TCP in this process, and over TCP against a server in a
subprocess whose memory is read from /proc.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import trionet
from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client, open_memory_server

PER = 10  # lines each member sends: the default flood-control burst
SIZE = 4000  # bytes per line


def burst_of(i: int) -> bytes:
    """Member i's 10 lines of 4,000 bytes, each naming its sender and number."""
    lines = []
    for k in range(PER):
        head = b"c%d #%d " % (i, k)
        lines.append(head + b"x" * (SIZE - len(head)) + b"\n")
    return b"".join(lines)


async def join_all(connect: Callable[[], Awaitable[Client]], n: int) -> list[Client]:
    clients = []
    for i in range(n):
        c = await connect()
        await c.send_line(f"/nick c{i}")
        await c.expect(WELCOME, f"OK nick c{i}")
        clients.append(c)
    return clients


async def run_burst(clients: list[Client]) -> None:
    """Everyone sends its burst at once and reads all it is sent; check every line."""
    n = len(clients)
    received: dict[int, list[bytes]] = {}

    async def member(i: int, c: Client) -> None:
        await c.send(burst_of(i))
        rest = b""
        msgs: list[bytes] = []
        while len(msgs) < (n - 1) * PER:
            chunk = await c.conn.receive_some()
            assert chunk, f"c{i} was disconnected after {len(msgs)} messages"
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                assert not line.startswith(b"LEAVE"), line[:80]
                if line.startswith(b"MSG "):
                    msgs.append(line)
        received[i] = msgs

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i, c in enumerate(clients):
                nursery.start_soon(member, i, c)
    expected_text = {j: burst_of(j).split(b"\n") for j in range(n)}
    for i in range(n):
        want = {
            b"MSG c%d %s" % (j, expected_text[j][k]) for j in range(n) if j != i for k in range(PER)
        }
        assert len(received[i]) == len(want) and set(received[i]) == want, f"c{i}"


@pytest.mark.parametrize("n", [50, 100])
async def test_burst_in_memory_evicts_nobody(n: int) -> None:
    service = ChatService()
    async with open_memory_server(service) as srv:
        clients = await join_all(srv.connect, n)
        await run_burst(clients)
        assert service.room.nicks() == sorted((f"c{i}" for i in range(n)), key=str.lower)
        # Bytes relayed are held once: never more than the burst itself
        # (4 MB for 100 members, not members x that).
        assert service.room.log_bytes <= n * PER * (SIZE + 10)


@asynccontextmanager
async def tcp_chat(service: ChatService) -> AsyncIterator[tuple[str, int]]:
    service.port = 0
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.Server([service]).run)
        yield addresses["chat"][0]
        nursery.cancel_scope.cancel()


async def test_burst_over_tcp_evicts_nobody() -> None:
    n = 50
    async with tcp_chat(ChatService()) as addr:

        async def connect() -> Client:
            return Client(await trio.open_tcp_stream(*addr), timeout=20)

        clients = await join_all(connect, n)
        await run_burst(clients)
        for c in clients:
            await c.aclose()


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, f"no {field} in /proc/{pid}/status"
    return int(match.group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_burst_of_100_over_tcp_memory_growth_below_64_mb() -> None:
    """100 members against a server process: all delivered, peak RSS growth < 64 MB.

    Memory is read from /proc/PID/status of a server in its own process, so
    nothing the test itself allocates is counted: VmRSS once everyone has
    joined, VmHWM (the peak resident size) after the burst. HWM minus the
    RSS before is an upper bound on what the burst cost at its worst, and
    it is exact about resident memory, unlike tracemalloc, which misses
    allocator overhead and fragmentation.
    """
    n = 100
    with tempfile.TemporaryFile() as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trionet.serve", "chat", "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            port = None
            with trio.fail_after(20):
                while port is None:
                    assert proc.returncode is None, "the server exited"
                    log.seek(0)
                    found = re.search(rb"chat listening on [\d.]+:(\d+)", log.read())
                    if found:
                        port = int(found.group(1))
                    else:
                        await trio.sleep(0.05)

            async def connect() -> Client:
                return Client(await trio.open_tcp_stream("127.0.0.1", port), timeout=30)

            clients = await join_all(connect, n)
            before = _status_kib(proc.pid, "VmRSS")
            await run_burst(clients)
            peak = _status_kib(proc.pid, "VmHWM")
            growth_mb = (peak - before) / 1024
            print(f"server RSS before {before / 1024:.1f} MB, peak growth {growth_mb:.1f} MB")
            assert growth_mb < 64
            for c in clients:
                await c.aclose()
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()


async def test_never_reading_member_evicted_at_default_sendq(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A member that stops reading is evicted once 8 MiB behind; the others never wait.

    Lockstep streams have no buffer at all, so everything slow does not
    read stays in the server's log, where it counts against --sendq.
    """
    async with open_memory_server(ChatService(rate=0), lockstep=True) as srv:
        alice, slow, bob = (await join_all(srv.connect, 3))[0:3]
        await alice.expect("JOIN c1", "JOIN c2")
        # slow (c1) has not read "JOIN c2" and never will.
        line = "y" * 4000
        batch = 16
        evicted_after = None
        for b in range(200):  # up to 12.8 MB, far past 8 MiB
            await alice.send(
                b"".join(b"%d %s\n" % (b * batch + k, line.encode()) for k in range(batch))
            )
            # bob gets each batch before alice sends the next: never delayed.
            for k in range(batch):
                got = await bob.receive_line()
                if got == "LEAVE c1 slow-consumer":
                    evicted_after = b
                    got = await bob.receive_line()
                assert got == f"MSG c0 {b * batch + k} {line}"
            if evicted_after is not None:
                break
        # 8 MiB is 130.7 batches of 16 lines of 4,011 bytes.
        assert evicted_after == 130
        await alice.expect("LEAVE c1 slow-consumer")
        await alice.send_line("/who")
        await alice.expect("WHO c0 c2")
        await slow.aclose()
