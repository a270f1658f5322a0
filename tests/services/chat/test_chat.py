"""The chat service: every protocol line and error, flood control, idle
timeout, slow consumers and shutdown.

Protocol tests run twice, in memory and over TCP on 127.0.0.1 (the
``transport`` fixture); long waits run in memory on the autojump clock.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import pytest
import trio
import trio.testing
from conftest import Opened, PlainStream

import trionet
from trionet._runner import build_parser
from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client, open_memory_server


class Chat(Protocol):
    """What a test needs of a running server: a way in, and a way to stop it."""

    server: trionet.Server

    async def connect(self) -> Client: ...

    def shutdown(self) -> None: ...


class TcpChat:
    """A chat server on a real socket (127.0.0.1, a free port)."""

    def __init__(self, server: trionet.Server, port: int, opened: Opened) -> None:
        self.server = server
        self.port = port
        self.opened = opened  # closed by open_chat

    async def connect(self) -> Client:
        return await self.opened.client(self.port, timeout=30)

    def shutdown(self) -> None:
        self.server.shutdown()


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def open_chat(transport: str, service: ChatService, grace: float = 5) -> AsyncIterator[Chat]:
    if transport == "memory":
        async with open_memory_server(service, grace=grace) as srv:
            yield srv
        return
    service.port = 0
    server = trionet.Server([service], grace=grace)
    async with Opened() as opened, trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        yield TcpChat(server, addresses["chat"][0][1], opened)
        nursery.cancel_scope.cancel()


async def join(srv: Chat, nick: str) -> Client:
    c = await srv.connect()
    await c.expect(WELCOME)
    await c.send_line(f"/nick {nick}")
    await c.expect(f"OK nick {nick}")
    return c


async def test_protocol_walkthrough(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        carol = await join(srv, "carol")
        await alice.expect("JOIN carol")
        await bob.expect("JOIN carol")
        await alice.send_line("hello all")
        await bob.expect("MSG alice hello all")
        await carol.expect("MSG alice hello all")
        await alice.send_line("/me waves")
        await bob.expect("ACTION alice waves")
        await carol.expect("ACTION alice waves")
        await alice.send_line("/msg bob psst")
        await bob.expect("PRIV alice psst")
        await alice.send_line("/who")
        await alice.expect("WHO alice bob carol")
        await alice.send_line("/nick alicia")
        await alice.expect("OK nick alicia")
        await bob.expect("NICK alice alicia")
        await carol.expect("NICK alice alicia")
        await alice.send_line("//text")
        await bob.expect("MSG alicia /text")
        await carol.expect("MSG alicia /text")
        await alice.send_line("/quit gotta go")
        await alice.expect("BYE")
        await alice.expect_closed()
        await bob.expect("LEAVE alicia gotta go")
        await carol.expect("LEAVE alicia gotta go")
        # The sender never got a copy, and carol never saw the private message.
        await carol.send_line("/who")
        await carol.expect("WHO bob carol")
        await bob.expect_nothing(0.05)


async def test_nick_errors(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        c = await srv.connect()
        await c.expect(WELCOME)
        for bad in ["/nick", "/nick bad nick", "/nick " + "x" * 33, "/nick café"]:
            await c.send_line(bad)
            await c.expect("ERR bad-nick")
        await c.send_line("/nick ALICE")
        await c.expect("ERR nick-taken ALICE")
        await c.send_line("/NICK Bob")
        await c.expect("OK nick Bob")
        await alice.expect("JOIN Bob")
        await c.send_line("/nick alice")
        await c.expect("ERR nick-taken alice")
        await alice.expect_nothing(0.05)


async def test_before_nick_only_nick_help_and_quit_and_no_traffic(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        lurker = await srv.connect()
        await lurker.expect(WELCOME)
        # Unknown commands and bad arguments too: no-nick comes first.
        for line in ["hello", "/me x", "/msg alice x", "/who", "//x", "/dance", "/", "/history"]:
            await lurker.send_line(line)
            await lurker.expect("ERR no-nick")
        await lurker.send_line("/history x")
        await lurker.expect("ERR no-nick")
        await lurker.send_line("/HELP")
        await lurker.expect("HELP /nick /me /msg /who /history /help /quit")
        bob = await join(srv, "bob")
        await alice.send_line("room traffic")
        await bob.expect("MSG alice room traffic")
        await lurker.expect_nothing(0.05)
        await lurker.send_line("/quit")
        await lurker.expect("BYE")
        await lurker.expect_closed()
        await alice.expect("JOIN bob")
        await alice.expect_nothing(0.05)  # no LEAVE for one who never joined


async def test_help_and_history(transport: str) -> None:
    now = [1700000000.123]
    service = ChatService(history=4, clock=lambda: now[0])
    async with open_chat(transport, service) as srv:
        alice = await join(srv, "alice")
        alice_help = "HELP /nick /me /msg /who /history /help /quit"
        await alice.send_line("/help")
        await alice.expect(alice_help)
        await alice.send_line("/history")
        await alice.expect("OK history 0")
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        for i in range(5):
            await alice.send_line(f"m{i}")
            await bob.expect(f"MSG alice m{i}")
            now[0] += 1
        await bob.send_line("/me waves")
        await bob.send_line("/msg alice not kept")
        await alice.expect("ACTION bob waves", "PRIV bob not kept")
        await bob.send_line("/history 2")
        await bob.expect(
            "HIST 1700000004123 MSG alice m4", "HIST 1700000005123 ACTION bob waves", "OK history 2"
        )
        await bob.send_line("/history")  # default 20, capped by --history 4
        await bob.expect(*(f"HIST 170000000{i}123 MSG alice m{i}" for i in (2, 3, 4)))
        await bob.expect("HIST 1700000005123 ACTION bob waves", "OK history 4")
        for bad in ("/history -1", "/history two", "/history 1.5"):
            await bob.send_line(bad)
            await bob.expect("ERR bad-request /history takes a whole number of lines, 0 or more")
        await bob.send_line("/history 0")
        await bob.expect("OK history 0")
        await alice.expect_nothing(0.05)


async def test_history_zero_keeps_nothing(transport: str) -> None:
    async with open_chat(transport, ChatService(history=0)) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.send_line("hi")
        await bob.expect("MSG alice hi")
        await bob.send_line("/history 5")
        await bob.expect("OK history 0")


async def test_pipelined_join_is_ordered_for_everyone(transport: str) -> None:
    """A newcomer's OK nick comes before any traffic; others see its JOIN before its MSG."""
    async with open_chat(transport, ChatService(rate=0)) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        c = await srv.connect()
        # alice talks while the newcomer joins, talks, whispers and asks /who.
        await alice.send(b"".join(b"a%d\n" % i for i in range(20)))
        await c.send(b"/who\n/nick new\nhello\n/msg bob psst\nagain\n/who\n")
        # bob sees both senders' lines, each sender's in order; over TCP the two
        # connections are read independently, so how they interleave is open.
        bobs = [await bob.receive_line() for _ in range(24)]
        assert [x for x in bobs if x and "alice" in x] == [f"MSG alice a{i}" for i in range(20)]
        news = ["JOIN new", "MSG new hello", "PRIV new psst", "MSG new again"]
        assert [x for x in bobs if x and "new" in x] == news
        await c.expect(WELCOME, "ERR no-nick", "OK nick new")
        # Then whatever of alice's lines came after it joined, in order (its own
        # WHO somewhere among them: over TCP the two connections race).
        await alice.send_line("/who")
        await alice.expect("JOIN new", "MSG new hello", "MSG new again", "WHO alice bob new")
        await alice.send_line("late")
        seen = []
        while (line := await c.receive_line()) != "MSG alice late":
            seen.append(line)
        assert seen.count("WHO alice bob new") == 1
        seen.remove("WHO alice bob new")
        assert seen == [f"MSG alice a{i}" for i in range(20 - len(seen), 20)]
        await c.expect_nothing(0.05)


async def test_command_errors_and_blank_lines(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        await alice.send_line("/dance now")
        await alice.expect("ERR unknown-command dance")
        await alice.send_line("/\x1bx")
        await alice.expect("ERR unknown-command x")
        # Issue 19: TAB is kept in relayed text, never in a word an ERR repeats.
        await alice.send_line("/nick\t")
        await alice.expect("ERR unknown-command nick")
        await alice.send_line("/msg zed\tx hi")
        await alice.expect("ERR no-such-nick zedx")
        await alice.send_line("/msg zed hi")
        await alice.expect("ERR no-such-nick zed")
        await alice.send_line("/msg")
        await alice.expect("ERR no-such-nick")
        await alice.send(b"\n  \r\n\t\n")  # blank lines: ignored
        await alice.send_line("/msg BOB case-insensitive")
        await bob.expect("PRIV alice case-insensitive")
        await alice.expect_nothing(0.05)


async def test_sanitizing_and_empty_messages(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.send_line("\x1b[2Jclear\u202eevil\ttab")
        await bob.expect("MSG alice [2Jclearevil\ttab")
        await alice.send(b"\x07\x08\r\n")  # empty once sanitized: not relayed
        await alice.send_line("/me \u2066")
        await alice.send_line("/msg bob \x00")
        await alice.send_line("last")
        await bob.expect("MSG alice last")


async def test_framing_errors_go_through_the_queue(transport: str) -> None:
    async with open_chat(transport, ChatService(max_line=64)) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.send(b"x" * 200 + b"\nafter\n\xff\xfe\nok\n")
        await alice.expect("JOIN bob", "ERR line-too-long 64", "ERR bad-encoding")
        await bob.expect("MSG alice after", "MSG alice ok")


async def test_drop_is_announced_as_leave(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        await bob.aclose()
        await alice.expect("LEAVE bob")


async def test_eof_still_gets_pending_replies(transport: str) -> None:
    async with open_chat(transport, ChatService()) as srv:
        alice = await join(srv, "alice")
        c = await srv.connect()
        await c.send(b"/nick bob\n/who\n")
        await c.send_eof()
        await c.expect(WELCOME, "OK nick bob", "WHO alice bob")
        await c.expect_closed()
        await alice.expect("JOIN bob", "LEAVE bob")


async def test_flood_control(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(ChatService()) as srv:
        alice = await join(srv, "alice")  # joining starts a fresh bucket
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        await alice.send(b"".join(b"m%d\n" % i for i in range(12)))
        await bob.expect(*(f"MSG alice m{i}" for i in range(10)))
        await alice.expect("ERR rate-limited", "ERR rate-limited")
        await trio.sleep(0.1)  # half a token
        await alice.send_line("too soon")
        await alice.expect("ERR rate-limited")
        await trio.sleep(0.1)
        await alice.send_line("one more")
        await bob.expect("MSG alice one more")
        await trio.sleep(2.0)  # back to a full burst of 10
        await alice.send(b"".join(b"n%d\n" % i for i in range(11)))
        await bob.expect(*(f"MSG alice n{i}" for i in range(10)))
        await alice.expect("ERR rate-limited")
        # /quit is never refused, even with an empty bucket.
        await alice.send_line("/quit")
        await alice.expect("BYE")
        await bob.expect("LEAVE alice")


async def test_flood_control_any_transport(transport: str) -> None:
    # A bucket that practically never refills: no waiting needed over TCP.
    async with open_chat(transport, ChatService(rate=0.001, burst=3)) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.send(b"a\nb\n/who\nc\n/quit\n")
        await alice.expect("JOIN bob", "WHO alice bob", "ERR rate-limited", "BYE")
        await bob.expect("MSG alice a", "MSG alice b", "LEAVE alice")


async def test_flood_control_options(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(ChatService(rate=1, burst=2)) as srv:
        c = await srv.connect()
        await c.expect(WELCOME)
        await c.send(b"/who\n" * 3)  # lines before a nick are charged too
        await c.expect("ERR no-nick", "ERR no-nick", "ERR rate-limited")
        await trio.sleep(1.0)
        # Joining starts a fresh bucket: the whole burst is for the room.
        await c.send(b"/nick c\n/who\n/who\n/who\n")
        await c.expect("OK nick c", "WHO c", "WHO c", "ERR rate-limited")
        await trio.sleep(0.9)
        await c.send_line("/who")
        await c.expect("ERR rate-limited")
        await trio.sleep(0.1)
        await c.send_line("/who")
        await c.expect("WHO c")
    async with open_memory_server(ChatService(rate=0)) as srv:  # 0: off
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.send(b"x\n" * 500)
        await bob.expect(*["MSG alice x"] * 500)


async def test_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(ChatService()) as srv:
        alice = await join(srv, "alice")
        await trio.sleep(3000)
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        await trio.sleep(500)  # alice silent for 3500 s: still here
        await bob.send_line("/who")
        await bob.expect("WHO alice bob")
        await alice.expect_nothing(99)  # 3599 s
        await alice.expect("BYE idle-timeout")
        await alice.expect_closed()
        await bob.expect("LEAVE alice")
        # Receiving is not activity: bob, who only listened since, times out too.
        bob.timeout = 4000
        await bob.expect("BYE idle-timeout")


async def test_idle_timeout_option(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(ChatService(idle_timeout=10)) as srv:
        c = await srv.connect()
        await c.expect(WELCOME)
        await c.expect_nothing(9.9)
        await c.expect("BYE idle-timeout")


async def test_slow_consumer_evicted_others_unaffected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # lockstep streams have no buffer at all: a client that does not read
    # stalls its writer's send at once, so only the server's queue grows.
    async with open_memory_server(ChatService(rate=0, sendq=4096), lockstep=True) as srv:
        alice = await join(srv, "alice")
        slow = await join(srv, "slow")
        bob = await join(srv, "bob")
        await alice.expect("JOIN slow", "JOIN bob")
        # slow has not read "JOIN bob" and never will.
        text = "z" * 90
        seen: list[str] = []
        for i in range(100):  # 10 KB at most: slow's bound is 4 KiB
            await alice.send_line(f"{i} {text}")
            line = await bob.receive_line()
            assert line is not None
            seen.append(line)
            if line.startswith("LEAVE"):
                break
        # bob got every message, in order, while slow was stalled, then the LEAVE.
        assert seen[-1] == "LEAVE slow slow-consumer"
        assert seen[:-1] == [f"MSG alice {i} {text}" for i in range(len(seen) - 1)]
        assert 30 < len(seen) < 60
        await bob.expect(f"MSG alice {len(seen) - 1} {text}")
        await alice.expect("LEAVE slow slow-consumer")
        await alice.send_line("/who")
        await alice.expect("WHO alice bob")
        await slow.aclose()


async def test_burst_from_many_members_evicts_nobody() -> None:
    async with open_memory_server(ChatService()) as srv:
        clients = [await join(srv, f"m{i}") for i in range(30)]
        for i, c in enumerate(clients):  # everyone's JOIN lines, read later
            await c.send(b"".join(b"from m%d n%d\n" % (i, k) for k in range(10)))
        for i, c in enumerate(clients):
            got = []
            while len(got) < 29 * 10:
                line = await c.receive_line()
                assert line is not None and "LEAVE" not in line, line
                if line.startswith("MSG"):
                    got.append(line)
            senders = {line.split()[1] for line in got}
            assert senders == {f"m{j}" for j in range(30)} - {f"m{i}"}


async def test_shutdown_says_bye_to_everyone(transport: str) -> None:
    async with open_chat(transport, ChatService(), grace=1) as srv:
        alice = await join(srv, "alice")
        bob = await join(srv, "bob")
        await alice.expect("JOIN bob")
        lurker = await srv.connect()
        await lurker.expect(WELCOME)
        srv.shutdown()
        for c in (alice, bob, lurker):
            await c.expect("BYE shutdown")  # and no LEAVE lines before it
            await c.expect_closed()


@pytest.mark.parametrize("seed", range(4))
async def test_join_leave_invariant_random_clients(transport: str, seed: int) -> None:
    """Random joins, renames, messages, quits and drops over the real handler.

    The watcher joins first and stays: every MSG it receives must come from
    a nick it was told about, and once everyone else is gone every JOIN it
    saw must have been matched by a LEAVE.
    """
    rng = random.Random(seed)
    async with open_chat(transport, ChatService(rate=0)) as srv:
        watcher = await join(srv, "watcher")
        live: list[Client] = []
        async with trio.open_nursery() as nursery:

            async def act(c: Client, step: int) -> None:
                op = rng.random()
                if op < 0.5:
                    await c.send_line(f"msg {step}")
                elif op < 0.7:
                    await c.send_line(f"/nick r{rng.randrange(20)}")
                elif op < 0.85:
                    await c.send_line("/quit")
                    live.remove(c)
                else:
                    live.remove(c)
                    await c.aclose()

            async def drain(c: Client) -> None:
                # Members read what they get (so none is a slow consumer).
                try:
                    while await c.conn.receive_some():
                        pass
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass

            for step in range(120):
                if rng.random() < 0.3 or not live:
                    c = await srv.connect()
                    await c.send_line(f"/nick r{rng.randrange(20)}")
                    live.append(c)
                    nursery.start_soon(drain, c)
                else:
                    await act(rng.choice(live), step)
                for _ in range(rng.randrange(3)):
                    await trio.lowlevel.checkpoint()
            for c in list(live):
                await c.aclose()
        with trio.fail_after(5):
            # The runner offers no event for "connections closed": poll.
            while srv.server.connection_count > 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        # The watcher's queue is FIFO: every LEAVE comes before this reply.
        await watcher.send_line("/who")
        known: set[str] = set()
        joins = 0
        while (line := await watcher.receive_line()) != "WHO watcher":
            assert line is not None
            word, *args = line.split(" ")
            if word == "JOIN":
                assert args[0] not in known
                known.add(args[0])
                joins += 1
            elif word == "LEAVE":
                known.remove(args[0])
            elif word == "NICK":
                known.remove(args[0])
                known.add(args[1])
            else:
                assert word == "MSG" and args[0] in known, line
        assert known == set()
        assert joins > 5  # the schedule really exercised the room


def test_command_line_options() -> None:
    (svc,) = trionet.build_services(
        ["chat", "--rate", "2.5", "--burst", "3", "--sendq", "2048", "--history", "7"]
    )
    assert isinstance(svc, ChatService)
    assert (svc.rate, svc.burst, svc.sendq, svc.history) == (2.5, 3, 2048, 7)
    defaults = ChatService()
    assert (defaults.sendq, defaults.history) == (8 << 20, 100)
    assert svc.effective_idle_timeout == 3600
    assert svc.effective_port == 7003
    help_text = build_parser({"chat": ChatService})[0].format_help()
    for option in ("--rate", "--burst", "--sendq", "--history"):
        assert option in help_text
    with pytest.raises(ValueError):
        ChatService(sendq=0)
    with pytest.raises(ValueError):
        ChatService(burst=0.5)
    with pytest.raises(ValueError):
        ChatService(rate=-1)
    with pytest.raises(ValueError):
        ChatService(history=-1)


class CountingStream(PlainStream):
    """Wraps a stream and counts ``send_all`` calls (one per system call on TCP)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await self.inner.send_all(data)


async def stream_pair(transport: str, opened: Opened) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(client end, server end), in memory or a TCP connection over 127.0.0.1.

    ``opened`` closes both ends at the end of the test.
    """
    if transport == "memory":
        return trio.testing.memory_stream_pair()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client = opened.add(await trio.testing.open_stream_to_socket_listener(listener))
        return client, opened.add(await listener.accept())


async def test_writer_coalesces_a_burst_into_one_send(transport: str, opened: Opened) -> None:
    service = ChatService(rate=0)
    ends = [await stream_pair(transport, opened) for _ in range(2)]
    counted = [CountingStream(server) for _, server in ends]
    alice, bob = (Client(client) for client, _ in ends)
    async with trio.open_nursery() as nursery:
        for stream in counted:
            nursery.start_soon(service.handle, trionet.Connection(stream))
        for c, nick in ((alice, "alice"), (bob, "bob")):
            await c.expect(WELCOME)
            await c.send_line(f"/nick {nick}")
            await c.expect(f"OK nick {nick}")
        await alice.expect("JOIN bob")
        before = counted[0].sends
        await bob.send(b"".join(b"line %d\n" % i for i in range(50)))
        await alice.expect(*(f"MSG bob line {i}" for i in range(50)))
        assert counted[0].sends - before == 1  # 50 lines, one send_all
        nursery.cancel_scope.cancel()
