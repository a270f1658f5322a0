"""The chat service over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from conftest import Opened

import trionet
from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client


@asynccontextmanager
async def running(service: ChatService) -> AsyncIterator[tuple[str, int]]:
    # trionet.Server, not trionet.serve: once ``trionet.serve`` the CLI module
    # is imported (as test_chat.py does), it shadows the function of that name.
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.Server([service]).run)
        yield addresses["chat"][0]
        nursery.cancel_scope.cancel()


async def join(opened: Opened, addr: tuple[str, int], nick: str) -> Client:
    c = await opened.client(addr[1], addr[0], timeout=30)
    await c.expect(WELCOME)
    await c.send_line(f"/nick {nick}")
    await c.expect(f"OK nick {nick}")
    return c


async def test_protocol_over_tcp(opened: Opened) -> None:
    async with running(ChatService(port=0)) as addr:
        alice = await join(opened, addr, "alice")
        bob = await join(opened, addr, "bob")
        await alice.expect("JOIN bob")
        await alice.send(b"hello all\r\n/me waves\n/msg bob psst\n/who\n")
        await alice.expect("WHO alice bob")
        await bob.expect("MSG alice hello all", "ACTION alice waves", "PRIV alice psst")
        await bob.send_line("/quit gotta go")
        await bob.expect("BYE")
        await bob.expect_closed()
        await alice.expect("LEAVE bob gotta go")
        await alice.aclose()


async def test_hundred_clients_each_message_reaches_every_other(opened: Opened) -> None:
    """100 members each send 10 lines at once (a burst): all arrive, nobody is evicted."""
    n, per = 100, 10
    async with running(ChatService(port=0)) as addr:
        clients = [await join(opened, addr, f"c{i}") for i in range(n)]
        received: dict[int, list[bytes]] = {}

        async def member(i: int, c: Client) -> None:
            await c.send(b"".join(b"hi from c%d #%d\n" % (i, k) for k in range(per)))
            buf = b""
            msgs: list[bytes] = []
            while len(msgs) < (n - 1) * per:
                chunk = await c.conn.receive_some()
                assert chunk, f"c{i} was disconnected"
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    assert not line.startswith(b"LEAVE"), line
                    if line.startswith(b"MSG "):
                        msgs.append(line)
            received[i] = msgs

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i, c in enumerate(clients):
                    nursery.start_soon(member, i, c)
        for i in range(n):
            want = {
                b"MSG c%d hi from c%d #%d" % (j, j, k)
                for j in range(n)
                if j != i
                for k in range(per)
            }
            assert set(received[i]) == want
        for c in clients:
            await c.aclose()


async def test_slow_consumer_evicted_while_others_keep_receiving(opened: Opened) -> None:
    sendq = 256 * 1024
    async with running(ChatService(port=0, rate=0, sendq=sendq)) as addr:
        alice = await join(opened, addr, "alice")
        bob = await join(opened, addr, "bob")
        # A small receive buffer, set before connecting, keeps the kernel from
        # absorbing megabytes on the slow client's behalf.
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(addr)
        slow = opened.add(Client(trio.SocketStream(sock), timeout=30))
        await slow.send_line("/nick slow")
        # ...and slow never reads again.
        await alice.expect("JOIN bob", "JOIN slow")
        await bob.expect("JOIN slow")
        line = "x" * 4000
        # 64 KB a batch: well under bob's bound even if the kernel buffered
        # nothing for bob, so only slow can be over it.
        batch = 16
        evicted_after = None
        for b in range(400):  # at most 25 MB: far past the kernel buffers
            await alice.send(
                b"".join(b"%d %s\n" % (b * batch + k, line.encode()) for k in range(batch))
            )
            # bob is served every time, however stuck slow is (were he blocked
            # behind slow, no deadline would save him; this one is for a busy machine).
            with trio.fail_after(20):
                for k in range(batch):
                    got = await bob.receive_line()
                    if got == "LEAVE slow slow-consumer":
                        evicted_after = b
                        got = await bob.receive_line()
                    assert got == f"MSG alice {b * batch + k} {line}"
            if evicted_after is not None:
                break
        assert evicted_after is not None, "the slow consumer was never evicted"
        assert evicted_after >= 3  # bob got 4+ batches (256 KiB) while slow was stuck
        await alice.expect("LEAVE slow slow-consumer")
        await alice.send_line("/who")
        await alice.expect("WHO alice bob")
        # The server closed slow's connection.
        with trio.fail_after(5):
            try:
                while await slow.conn.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass
        for c in (alice, bob, slow):
            await c.aclose()


async def test_reset_connection_is_announced_as_leave(opened: Opened) -> None:
    async with running(ChatService(port=0)) as addr:
        alice = await join(opened, addr, "alice")
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        await sock.connect(addr)
        bob = Client(trio.SocketStream(sock), timeout=30)
        await bob.send_line("/nick bob")
        await alice.expect("JOIN bob")
        # Linger 0: close() sends RST, so the server's read fails with a reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await alice.expect("LEAVE bob")
        await alice.send_line("/who")
        await alice.expect("WHO alice")
        await alice.aclose()


async def test_idle_timeout_over_tcp(opened: Opened) -> None:
    # bob's round trips must stay under the idle timeout even on a busy
    # machine, so it is not tiny; alice's silence outlasts it all the same.
    async with running(ChatService(port=0, idle_timeout=3.0)) as addr:
        alice = await join(opened, addr, "alice")
        bob = await join(opened, addr, "bob")
        await alice.expect("JOIN bob")
        with trio.fail_after(30):
            for _ in range(2):  # bob keeps talking; alice only listens
                await trio.sleep(0.2)
                await bob.send_line("/who")
                await bob.expect("WHO alice bob")
            await alice.expect("BYE idle-timeout")
            await alice.expect_closed()
            await bob.expect("LEAVE alice")
        await bob.aclose()
