"""One chat room over several processes through Redis (``--redis``).

The room's side first, in memory on the autojump clock (ghosts: members of
other processes, fed by hand as the bus would), then real processes
(``python -m trionet.serve chat --redis ...``) on a real redis-server from
tests/conftest.py: talking across processes, nick clashes, a process killed
with ``kill -9``, Redis killed and restarted, a process stopped while the
room goes on, ``--workers 2``. Every wait is bounded.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import Opened

from trionet import StartupError
from trionet._redis import check_redis_url
from trionet._runner import build_services
from trionet.services.chat.bus import IN_FLIGHT, RoomBus, _events, rename_candidate
from trionet.services.chat.room import Ghost, RoomEvent
from trionet.services.chat.server import WELCOME, ChatService
from trionet.testing import Client, open_memory_server

# -- the room's side, in memory --------------------------------------------------


async def _joined(server: Any, nick: str) -> Client:
    client: Client = await server.connect()
    await client.expect(WELCOME)
    await client.send_line(f"/nick {nick}")
    await client.expect(f"OK nick {nick}")
    return client


async def test_ghosts_take_part_in_every_rule(autojump_clock: trio.testing.MockClock) -> None:
    """Another process's members: in /who, their nicks taken, their lines relayed."""
    service = ChatService()
    events: list[RoomEvent] = []
    service.room.on_event = events.append
    async with open_memory_server(service) as server:
        alice = await _joined(server, "alice")
        room = service.room
        room.remote_join("P2", "bob")
        room.remote_join("P2", "bob")  # news may come twice: announced once
        await alice.expect("JOIN bob")
        await alice.send_line("/who")
        await alice.expect("WHO alice bob")
        carol = await server.connect()
        await carol.expect(WELCOME)
        await carol.send_line("/nick BOB")
        await carol.expect("ERR nick-taken BOB")
        # A speaker never announced is announced before its first line.
        room.remote_relay("P3", "MSG", "dave", "hi\x1b all", 1_000)
        await alice.expect("JOIN dave", "MSG dave hi all")
        # A line claiming to be bob but from another process is not bob's.
        room.remote_relay("P3", "MSG", "bob", "I am bob", 2_000)
        room.remote_nick("P2", "bob", "robert")
        await alice.expect("NICK bob robert")
        await alice.send_line("/msg ROBERT psst")
        await alice.send_line("/history")
        await alice.expect("HIST 1000 MSG dave hi all", "OK history 1")
        assert RoomEvent("PRIV", "alice", "psst", target="robert", origin="P2") in events
        room.remote_whisper("robert", "alice", "back")
        await alice.expect("PRIV robert back")
        room.remote_leave("P3", "robert")  # not P3's: ignored
        room.remote_leave("P2", "robert", "bye")
        await alice.expect("LEAVE robert bye")
        room.remote_leave("P2", "robert")  # gone already: nothing
        await alice.expect_nothing(for_seconds=5)
    kinds = [e.kind for e in events]
    assert kinds[:1] == ["JOIN"] and "LEAVE" in kinds  # alice's own, for the others


async def test_snapshot_and_forced_rename(autojump_clock: trio.testing.MockClock) -> None:
    """A fresh picture of the others is announced as differences; a clash renames."""
    service = ChatService()
    async with open_memory_server(service) as server:
        alice = await _joined(server, "alice")
        room = service.room
        room.set_ghosts({"bob": Ghost("bob", "P2"), "carol": Ghost("carol", "P2")})
        await alice.expect("JOIN bob", "JOIN carol")
        room.set_ghosts({"carol": Ghost("carol", "P2"), "dave": Ghost("dave", "P3")})
        await alice.expect("LEAVE bob", "JOIN dave")
        # A ghost claiming alice's nick is left out until the clash is resolved.
        room.set_ghosts({"alice": Ghost("alice", "P3")})
        await alice.expect("LEAVE carol", "LEAVE dave")
        member = room.member("alice")
        assert member is not None
        room.force_rename(member, "alice-2")
        room.remote_join("P3", "alice")
        await alice.expect("NICK alice alice-2", "JOIN alice")
        await alice.send_line("/who")
        await alice.expect("WHO alice alice-2")


def test_rename_candidates_stay_valid() -> None:
    assert rename_candidate("alice", 2) == "alice-2"
    assert rename_candidate("x" * 32, 10) == "x" * 29 + "-10"


@pytest.mark.parametrize(
    "url",
    ["redis://", "http://h:1", "redis://h:notaport", "redis://h:1/x", "redis://h:1/0?a=b", "h:1"],
)
def test_bad_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="needs a URL like redis://"):
        check_redis_url(url)


def test_redis_option_on_chat_and_guess_and_workers() -> None:
    assert check_redis_url("redis://10.0.0.5:6380/2") == "redis://10.0.0.5:6380/2"
    chat, guess = build_services(["chat", "guess", "--redis", "redis://127.0.0.1:1"])
    assert isinstance(chat, ChatService) and chat.redis == "redis://127.0.0.1:1"
    assert chat.bus is not None and getattr(guess, "redis", None) == "redis://127.0.0.1:1"
    assert chat.workers_problem(2) is None and guess.workers_problem(2) is None
    (alone,) = build_services(["chat"])
    assert alone.workers_problem(2) is not None
    with pytest.raises(StartupError, match="needs a URL like redis://"):
        build_services(["chat", "--redis", "localhost:6379"])


# -- in one process, real Redis ---------------------------------------------------


async def _until(client: Client, want: Callable[[str], bool], timeout: float = 15) -> list[str]:
    """Lines received until one satisfies ``want`` (it included); fails after ``timeout``."""
    seen: list[str] = []
    with trio.fail_after(timeout):
        while True:
            line = await client.receive_line(timeout=timeout)
            assert line is not None, ("closed", seen)
            seen.append(line)
            if want(line):
                return seen


async def _who(client: Client, expected: str, timeout: float = 20) -> list[str]:
    """Ask /who until it answers ``expected`` (the room settles after an outage).

    Returns every line received meanwhile.
    """
    seen: list[str] = []
    with trio.fail_after(timeout):
        while True:
            await client.send_line("/who")
            seen += await _until(client, lambda line: line.startswith("WHO "))
            if seen[-1] == expected:
                return seen
            await trio.sleep(0.3)


async def test_two_services_in_one_trio_run_share_a_room(redis_server: Any) -> None:
    """Two ChatService instances on memory listeners, one Redis: one room."""
    one, two = ChatService(redis=redis_server.url), ChatService(redis=redis_server.url)
    with trio.fail_after(30):
        async with open_memory_server(one) as s1, open_memory_server(two) as s2:
            alice = await _joined(s1, "alice")
            # Once the other process knows alice (its reader applied her JOIN),
            # bob finds her there on joining; joining sooner he would be told
            # "JOIN alice" a moment later, as the protocol says (that raced).
            for _ in range(2000):
                if "alice" in two.room.nicks():
                    break
                await trio.sleep(0.01)
            bob = await _joined(s2, "bob")
            await alice.expect("JOIN bob")
            await bob.send_line("hello alice")
            await alice.expect("MSG bob hello alice")
            await alice.send_line("/msg bob psst")
            await bob.expect("PRIV alice psst")
            assert one.bus is not None and two.bus is not None
            assert one.bus.process != two.bus.process
            await bob.send_line("/quit")
            await bob.expect("BYE")
            await alice.expect("LEAVE bob")


def _published_lines(entries: Any, process: str) -> list[str]:
    """The event lines ``process`` published, in stream order (the bus's batches)."""
    return [
        line
        for entry in entries
        if entry.field_values.get("p") == process and "b" in entry.field_values
        for _, _, line in _events(entry.field_values)
    ]


async def _say_in_bursts(bus: RoomBus, sent: list[str]) -> None:
    """alice says 1200 lines in 4 bursts (the flusher sends a call after each)."""
    for i in range(1200):
        bus._on_event(RoomEvent("MSG", "alice", f"m{i}", ms=1))
        sent.append(f"MSG alice m{i}")
        if i % 300 == 299:
            await trio.sleep(0.01)


async def test_flushes_in_flight_reach_the_stream_in_order(redis_server: Any) -> None:
    """Flushes sent before the previous one's reply (up to IN_FLIGHT at once, held
    back by a paused Redis) reach the stream in the order the events happened."""
    import coredis
    from coredis.tokens import PureToken

    bus = RoomBus(ChatService().room, redis_server.url)
    sent, most = [], 0
    with trio.fail_after(30):
        async with (
            coredis.Redis.from_url(redis_server.url, decode_responses=True) as r,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(bus.run)
            bus._on_event(RoomEvent("JOIN", "alice"))
            for round in range(2):  # writes held back, then not
                if round == 0:
                    await r.client_pause(500, PureToken.WRITE)
                for i in range(300):
                    text = f"{round}:{i}"
                    bus._on_event(RoomEvent("MSG", "alice", text, ms=1))
                    sent.append(f"MSG alice {text}")
                    if i % 5 == 0:
                        await trio.sleep(0.001)  # the flusher sends what is queued
                    most = max(most, bus._in_flight)
                for _ in range(1000):  # (all published: nothing left queued)
                    if not bus._queue:
                        break
                    await trio.sleep(0.01)
            assert most == IN_FLIGHT
            entries = await r.xrange(bus._stream)
            nursery.cancel_scope.cancel()
    lines = _published_lines(entries, bus.process)
    assert lines == ["JOIN alice", *sent]


async def test_starts_degraded_without_redis_and_joins_when_it_appears(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down at start: the service serves its own members, logs it once, recovers."""
    caplog.set_level(logging.INFO, "trionet")
    redis_server.kill()
    service = ChatService(redis=redis_server.url)
    with trio.fail_after(40):
        async with open_memory_server(service) as server:
            alice = await _joined(server, "alice")
            bob = await _joined(server, "bob")
            await alice.expect("JOIN bob")
            await bob.send_line("local still works")
            await alice.expect("MSG bob local still works")
            await trio.sleep(1)  # several reconnection attempts fail meanwhile
            redis_server.start()
            assert service.bus is not None
            for _ in range(400):  # (bounded by fail_after above too)
                if service.bus.link.up:
                    break
                await trio.sleep(0.05)
            await bob.send_line("and now through Redis")
            await alice.expect("MSG bob and now through Redis")
            # alice and bob, who joined during the outage, are claimed in Redis now
            nicks = redis_server.command("HGETALL", "trionet:chat:nicks")
            assert b" alice\r\n" in nicks and b" bob\r\n" in nicks
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
    # Their leaves were published on the way out: no claim is left behind.
    assert redis_server.command("HGETALL", "trionet:chat:nicks") == b"*0\r\n"


# -- real processes ----------------------------------------------------------------


async def _connect(opened: Opened, port: int, nick: str) -> Client:
    client = await opened.client(port, timeout=15)
    await client.expect(WELCOME)
    await client.send_line(f"/nick {nick}")
    await client.expect(f"OK nick {nick}")
    return client


async def _connect_eventually(opened: Opened, port: int, nick: str) -> Client:
    """Join as ``nick`` as soon as another process has released it."""
    for _ in range(50):
        client = await opened.client(port, timeout=15)
        await client.expect(WELCOME)
        await client.send_line(f"/nick {nick}")
        if await client.receive_line() == f"OK nick {nick}":
            return client
        await client.aclose()
        await trio.sleep(0.1)
    raise AssertionError(f"{nick} was never released")


def _chat(serve: Callable[..., Any], redis_url: str, *extra: str) -> tuple[Any, int]:
    process = serve("chat", "--port", "0", "--redis", redis_url, *extra)
    return process, process.port("chat")


async def test_two_processes_one_room(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    a, pa = _chat(serve, redis_server.url)
    b, pb = _chat(serve, redis_server.url)
    with trio.fail_after(60):
        alice = await _connect(opened, pa, "alice")
        carol = await _connect(opened, pa, "carol")  # on alice's process
        await alice.expect("JOIN carol")
        bob = await _connect(opened, pb, "bob")
        await alice.expect("JOIN bob")
        await carol.expect("JOIN bob")
        # (bob's process may hear of carol a moment after bob has joined)
        await _who(bob, "WHO alice bob carol")
        await alice.send(b"hello bob\n/me waves\n/msg bob psst\n")
        await bob.expect("MSG alice hello bob", "ACTION alice waves", "PRIV alice psst")
        await carol.expect("MSG alice hello bob", "ACTION alice waves")
        await bob.send_line("/msg ALICE back")
        await alice.expect("PRIV bob back")
        await bob.send_line("/history")
        lines = await _until(bob, lambda line: line.startswith("OK history"))
        assert [re.sub(r"^HIST \d+ ", "", x) for x in lines] == [
            "MSG alice hello bob",
            "ACTION alice waves",
            "OK history 2",
        ]
        await bob.send_line("/nick robert")
        await bob.expect("OK nick robert")
        await alice.expect("NICK bob robert")
        await bob.send_line("/quit gotta go")
        await bob.expect("BYE")
        await alice.expect("LEAVE robert gotta go")
        await carol.expect("NICK bob robert", "LEAVE robert gotta go")
        # A process started later sees the room as it is, and its history.
        c, pc = _chat(serve, redis_server.url)
        dave = await _connect(opened, pc, "dave")
        await _who(dave, "WHO alice carol dave")
        await dave.send_line("/history 1")
        await _until(dave, lambda line: line.endswith("ACTION alice waves"))
    for process in (a, b, c):
        assert process.stop() == 0
        assert process.count("Traceback") == 0


async def test_nicks_are_unique_across_processes(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    _, pa = _chat(serve, redis_server.url)
    _, pb = _chat(serve, redis_server.url)
    with trio.fail_after(60):
        alice = await _connect(opened, pa, "alice")
        other = await opened.client(pb, timeout=15)
        await other.expect(WELCOME)
        await other.send_line("/nick ALICE")
        await other.expect("ERR nick-taken ALICE")
        # Two processes claiming one nick at the same moment: exactly one wins.
        for round_ in range(5):
            nick = f"dave{round_}"
            one = await opened.client(pa, timeout=15)
            two = await opened.client(pb, timeout=15)
            await one.expect(WELCOME)
            await two.expect(WELCOME)
            await one.send_line(f"/nick {nick}")
            await two.send_line(f"/nick {nick}")
            answers = sorted([await one.receive_line(), await two.receive_line()])
            assert answers == [f"ERR nick-taken {nick}", f"OK nick {nick}"]
        # A nick given up is free again, on the other process too.
        await other.send_line("/nick bob")
        await other.expect("OK nick bob")
        await other.send_line("/nick robert")
        await _until(other, lambda line: line == "OK nick robert")
        again = await _connect_eventually(opened, pa, "bob")  # once the release is published
        await again.send_line("/who")
        who = await _until(again, lambda line: line.startswith("WHO "))
        assert {"alice", "bob", "robert"} <= set(who[-1].split())
        await alice.aclose()


async def test_killed_process_members_leave_once_within_15s(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    a, pa = _chat(serve, redis_server.url)
    _, pb = _chat(serve, redis_server.url)
    _, pc = _chat(serve, redis_server.url)
    with trio.fail_after(60):
        bob = await _connect(opened, pb, "bob")
        carol = await _connect(opened, pc, "carol")
        await bob.expect("JOIN carol")
        doomed = [await _connect(opened, pa, "alice"), await _connect(opened, pa, "alan")]
        for c in (bob, carol):
            await _until(c, lambda line: line == "JOIN alan")
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        for c in (bob, carol):
            leaves: set[str] = set()

            def both(line: str, leaves: set[str] = leaves) -> bool:
                if line.startswith("LEAVE "):
                    leaves.add(line)
                return len(leaves) == 2

            await _until(c, both, 15)
            assert leaves == {"LEAVE alice", "LEAVE alan"}
        assert time.monotonic() - killed < 15
        # Announced by exactly one process: nobody hears it twice.
        for c in (bob, carol):
            await c.expect_nothing(for_seconds=3)
        for c in doomed:
            await c.aclose()
        alice = await _connect(opened, pb, "alice")  # the nick is free again
        await carol.expect("JOIN alice")
        await alice.send_line("/who")
        await alice.expect("WHO alice bob carol")


async def test_redis_restart_mid_conversation(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    a, pa = _chat(serve, redis_server.url)
    b, pb = _chat(serve, redis_server.url)
    with trio.fail_after(90):
        alice = await _connect(opened, pa, "alice")
        carol = await _connect(opened, pa, "carol")
        bob = await _connect(opened, pb, "bob")
        await alice.expect("JOIN carol", "JOIN bob")
        await bob.send_line("before")
        await alice.expect("MSG bob before")
        redis_server.kill()
        # Each process keeps serving its own members.
        for process in (a, b):
            process.wait_for("Redis at .* unreachable")
        await carol.send_line("during")
        await _until(alice, lambda line: line == "MSG carol during")
        dan = await _connect(opened, pb, "dan")  # joins while Redis is down: local only
        await _until(bob, lambda line: line == "JOIN dan")
        # Both processes let a member take "zed": a clash to resolve on recovery.
        zeds = [await _connect(opened, pa, "zed"), await _connect(opened, pb, "zed")]
        await trio.sleep(1)
        redis_server.start()
        for process in (a, b):
            process.wait_for("Redis at .* reachable again", timeout=30)
        # The room is whole again: the same /who everywhere, messages flow across.
        whole = "WHO alice bob carol dan zed zed-2"
        for client in (alice, bob, dan):
            await _who(client, whole)
        # One zed kept the nick; the other was renamed, and told so like everyone.
        renamed = ["NICK zed zed-2" in await _who(zed, whole) for zed in zeds]
        assert sorted(renamed) == [False, True]
        await alice.send_line("after")
        await _until(bob, lambda line: line == "MSG alice after")
        await _until(dan, lambda line: line == "MSG alice after")
        await dan.send_line("hi from dan")
        await _until(carol, lambda line: line == "MSG dan hi from dan")
    for process in (a, b):
        assert process.count("unreachable") == 1
        assert process.count("Traceback") == 0
        assert process.stop() == 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read())[1])  # type: ignore[index]


async def test_a_stopped_process_costs_bounded_memory(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    """A process that stops reading (SIGSTOP) while another sends a lot.

    The stream stays capped (MAXLEN ~), the sender's memory does not grow
    with what the stopped one has not read, and once resumed the stopped one
    skips what it missed and its member follows the room again.
    """
    a, pa = _chat(serve, redis_server.url, "--rate", "0")
    b, pb = _chat(serve, redis_server.url)
    with trio.fail_after(120):
        sender = await _connect(opened, pa, "sender")
        reader = await _connect(opened, pb, "reader")
        await sender.expect("JOIN reader")
        b.signal(signal.SIGSTOP)
        try:
            before = _rss_kib(a.proc.pid)
            text = "x" * 1000
            sent = 30_000
            for start in range(0, sent, 1000):
                await sender.send(
                    "".join(f"{i} {text}\n" for i in range(start, start + 1000)).encode()
                )
                await sender.send_line("/who")  # paced by its replies
                await _until(sender, lambda line: line.startswith("WHO"))
            xlen = int(redis_server.command("XLEN", "trionet:chat:stream")[1:].split(b"\r")[0])
            grown = _rss_kib(a.proc.pid) - before
        finally:
            b.signal(signal.SIGCONT)
        assert 1_000 <= xlen <= 1_100, (xlen, a.lines[-5:])  # entries: batches of <= 16 KB
        assert grown < 40_000, f"the sender's process grew by {grown} KiB"
        # (stopped longer than its read's deadline, it reconnects instead: the
        # same resync, under another name)
        b.wait_for("fell more than 1000 stream entries behind|moved past this process", timeout=30)
        async with trio.open_nursery() as nursery:
            # What is said while it skips ahead is skipped too: say it again
            # until it gets through.
            async def repeat() -> None:
                while True:
                    await sender.send_line("marker")
                    await trio.sleep(0.5)

            nursery.start_soon(repeat)
            got = await _until(reader, lambda line: line == "MSG sender marker", 30)
            nursery.cancel_scope.cancel()
        assert len(got) < sent / 2
        await reader.send_line("/who")
        await _until(reader, lambda line: line == "WHO reader sender")
    assert b.count("Traceback") == 0


async def test_workers_share_the_room(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    """``--workers 2 --redis``: members on different workers chat.

    Which worker accepts a connection is the kernel's choice, so the test
    makes it: while one worker is stopped (SIGSTOP) only the other can take
    the next connection from the shared socket. Each member's nick claim in
    Redis names the process that holds it, which proves where it landed.
    """
    p = serve("chat", "--port", "0", "--workers", "2", "--redis", redis_server.url)
    port = p.port("chat")
    pids = {int(m[1]): int(m[2]) for m in p.wait_for(r"worker (\d+) started \(pid (\d+)\)", 2)}
    first, second = sorted(pids)
    # Each worker names its Redis identity once connected: "[worker N] ... as ID".
    ids = {
        int(m[1]): m[2]
        for m in p.wait_for(r"\[worker (\d+)\] chat: sharing the room .* as (\w+)$", 2)
    }
    assert len(set(ids.values())) == 2, ids
    clients: dict[int, Client] = {}
    with trio.fail_after(90):
        for index, other_index in ((first, second), (second, first)):
            other = pids[other_index]
            os.kill(other, signal.SIGSTOP)
            try:
                clients[index] = await _connect(opened, port, f"m{index}")
            finally:
                os.kill(other, signal.SIGCONT)
            raw = redis_server.command("HGET", "trionet:chat:nicks", f"m{index}").decode()
            owner = re.search(rf"(\w+)/\d+ m{index}", raw)
            assert owner is not None and owner[1] == ids[index], (raw, ids)
        await clients[second].send_line("across workers")
        await _until(clients[first], lambda line: line == f"MSG m{second} across workers")
        await clients[first].send_line("and back")
        await _until(clients[second], lambda line: line == f"MSG m{first} and back")
    assert p.stop() == 0


def test_bus_keys_do_not_clash_between_rooms() -> None:
    """Two rooms on one Redis: different prefixes, different keys."""
    one = RoomBus(ChatService().room, "redis://127.0.0.1:1", prefix="a")
    two = RoomBus(ChatService().room, "redis://127.0.0.1:1", prefix="b")
    assert one._stream != two._stream and one.process != two.process


async def test_workers_serve_the_web_page_too(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    """``--workers 2 --web-port 0 --redis``: the parent opens the web port, every
    worker serves it, and a browser member talks with a TCP member on another worker."""
    from trio_websocket import connect_websocket_url

    p = serve(
        "chat", "--port", "0", "--web-port", "0", "--workers", "2", "--redis", redis_server.url
    )
    port = p.port("chat")
    web_port = int(p.wait_for(r"chat web listening on 127\.0\.0\.1:(\d+)")[0][1])

    def owner(nick: str) -> str:
        raw = redis_server.command("HGET", "trionet:chat:nicks", nick).decode()
        return re.search(r"(\w+)/\d+ " + nick, raw)[1]  # type: ignore[index]

    with trio.fail_after(90):
        async with trio.open_nursery() as keep:  # the WebSockets' own tasks
            pages: dict[str, Any] = {}  # worker -> a browser member it serves
            p.wait_for("sharing the room through Redis", count=2)  # both workers are up
            pids = [int(m[1]) for m in p.wait_for(r"worker \d started \(pid (\d+)\)", count=2)]
            # One worker stopped while the other takes a browser member, in
            # turn: each worker must serve the web port.
            for i, stopped in enumerate(pids):
                os.kill(stopped, signal.SIGSTOP)
                try:
                    ws = opened.add(
                        await connect_websocket_url(keep, f"ws://127.0.0.1:{web_port}/ws")
                    )
                    assert await ws.get_message() == WELCOME
                    await ws.send_message(f"/nick w{i}")
                    assert await ws.get_message() == f"OK nick w{i}"
                finally:
                    os.kill(stopped, signal.SIGCONT)
                pages[owner(f"w{i}")] = (f"w{i}", ws)
            assert len(pages) == 2, "one worker did not serve the web port"
            # A TCP member, and the browser member of the other worker.
            tcp = await _connect(opened, port, "tcpmember")
            nick, ws = next(v for k, v in pages.items() if k != owner("tcpmember"))
            await tcp.send_line("hello browser")
            while (got := await ws.get_message()) != "MSG tcpmember hello browser":
                assert got.startswith(("JOIN ", "LEAVE ")), got
            await ws.send_message("hello tcp")
            await _until(tcp, lambda line: line == f"MSG {nick} hello tcp")
            keep.cancel_scope.cancel()
    assert p.stop() == 0
    assert p.count("Traceback") == 0


def test_the_web_port_is_an_extra_port_for_the_parent_to_open() -> None:
    """What run_workers opens besides a service's own port (none without --web-port)."""
    (chat,) = build_services(["chat", "--web-port", "0", "--redis", "redis://h:1"])
    assert chat.extra_ports() == {"web": 0}
    (chat,) = build_services(["chat", "--redis", "redis://h:1"])
    assert chat.extra_ports() == {}


async def test_a_flush_sent_again_is_not_run_twice(redis_server: Any) -> None:
    """A flush whose reply was lost goes out again at the last flush with its own
    number: the script skips it, so nobody sees its lines twice."""
    import coredis

    from trionet.services.chat.bus import _PUBLISH, _stream_entries

    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as r:
        publish = r.register_script(_PUBLISH)
        keys = ["t:stream", "t:nicks", "t:flushed:p1"]

        async def flush(number: int, text: str) -> int:
            entries = _stream_entries([(f"- - MSG alice {text}", "", "", "")])
            return int(await publish(keys=keys, args=["p1", 100, number, len(entries), *entries]))

        assert await flush(1, "one") == 1
        assert await flush(2, "two") == 1
        assert await flush(2, "two") == 0  # sent again: skipped
        assert await flush(1, "one") == 0
        assert await flush(3, "three") == 1
        lines = [
            line
            for entry in await r.xrange("t:stream")
            for _, _, line in _events(entry.field_values)
        ]
        assert lines == ["MSG alice one", "MSG alice two", "MSG alice three"]


@pytest.mark.parametrize("fault", ["held", "replies-lost"])
async def test_stopping_with_flushes_in_flight_publishes_each_line_once(
    redis_server: Any, fault: str
) -> None:
    """Stopped with flushes in flight, the last flush sends them again with their
    numbers, and every line is in the stream exactly once: "held", Redis holds
    the calls (a write pause) and never runs them; "replies-lost", Redis ran
    them but the replies never arrived (the connection died on the way back),
    so the script skips them."""
    import coredis
    from coredis.tokens import PureToken

    bus = RoomBus(ChatService().room, redis_server.url)

    async def replies_lost(*_: object) -> None:
        await trio.sleep_forever()

    if fault == "replies-lost":
        bus._replies = replies_lost  # type: ignore[method-assign]
    sent = ["JOIN alice"]
    with trio.fail_after(30):
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as r:
            async with trio.open_nursery() as nursery:
                await nursery.start(bus.run)
                bus._on_event(RoomEvent("JOIN", "alice"))
                if fault == "held":
                    await r.client_pause(300, PureToken.WRITE)
                await _say_in_bursts(bus, sent)
                if fault == "replies-lost":
                    for _ in range(1000):  # until Redis ran them: the first entry + 3 calls
                        if len(await r.xrange(bus._stream)) >= 4:
                            break
                        await trio.sleep(0.01)
                    assert len(bus._queue) == len(sent)  # no reply: nothing left the queue
                assert bus._in_flight >= 2
                nursery.cancel_scope.cancel()  # stops: the last flush
            entries = await r.xrange(bus._stream)
    lines = _published_lines(entries, bus.process)
    assert lines == sent


async def test_a_link_lost_with_flushes_in_flight_counts_them_apart(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The link fails while calls are sent and unanswered (Redis ran them, the
    replies never came back): the "reachable again" line does not count them
    as not relayed, but says they may or may not have been, apart from the
    messages that never left (none here)."""
    import coredis

    caplog.set_level(logging.INFO, "trionet")
    bus = RoomBus(ChatService().room, redis_server.url, liveness=0.5)
    replies_seen = trio.Event()

    async def replies_lost(*_: object) -> None:
        replies_seen.set()
        await trio.sleep_forever()

    bus._replies = replies_lost  # type: ignore[method-assign]
    sent: list[str] = []
    with trio.fail_after(30):
        async with (
            coredis.Redis.from_url(redis_server.url, decode_responses=True) as r,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(bus.run)
            await replies_seen.wait()
            await _say_in_bursts(bus, sent)
            for _ in range(1000):  # until Redis ran them all: 1,200 lines
                if len(_published_lines(await r.xrange(bus._stream), bus.process)) == 1200:
                    break
                await trio.sleep(0.01)
            assert bus._sent == len(sent) == 1200  # sent, none answered
            for client in await r.client_list():
                if str(client.get("name", "")).startswith(f"trionet-chat-{bus.process}"):
                    await r.client_kill(identifier=int(client["id"]))
            for _ in range(1000):
                if any("reachable again" in m.getMessage() for m in caplog.records):
                    break
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    (back,) = [m.getMessage() for m in caplog.records if "reachable again" in m.getMessage()]
    assert "; 0 message(s) of this process's members not relayed" in back, back
    assert "(and 1200 more sent just as the link failed: relayed or not" in back, back
