"""The room on Redis through faults: restarts, a paused Redis, a cut link.

Real ``python -m trionet.serve chat --redis`` processes on a real
redis-server (tests/conftest.py), with a short ``--redis-liveness`` so the
same rules run in seconds. Every member records every line it receives; a
member who did not leave must never be announced leaving or joining again,
a member who left during the fault is announced exactly once after it, and
``/who`` everywhere tells the truth soon after Redis is back. Each process's
log must say an outage in two lines, whatever coredis went through.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from typing import Any

import trio
from conftest import Opened

from trionet.services.chat.server import WELCOME
from trionet.testing import Client

#: The liveness period the processes run with here (6 s in production).
LIVENESS = "2"
#: "/who everywhere equals the truth within this long of Redis being back".
TRUTH_WITHIN = 10.0


class Member:
    """A chat client whose every received line is kept, read in the background."""

    def __init__(self, nick: str, client: Client) -> None:
        self.nick = nick
        self.client = client
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def read(self) -> None:
        while (line := await self.client.receive_line(timeout=3600)) is not None:
            self.lines.append(line)
            self._changed.set()
            self._changed = trio.Event()

    def joins_and_leaves(self) -> list[str]:
        """Every JOIN and LEAVE this member was told of, in order."""
        return [x for x in self.lines if x.startswith(("JOIN ", "LEAVE "))]

    async def who(self) -> str:
        """Ask /who; the answer."""
        seen = len(self.lines)
        await self.client.send_line("/who")
        while True:
            for line in self.lines[seen:]:
                if line.startswith("WHO "):
                    return line
            await self._changed.wait()

    async def quit(self) -> None:
        """``/quit``, until ``BYE``."""
        await self.client.send_line("/quit")
        while "BYE" not in self.lines:
            await self._changed.wait()

    async def wait_for(self, line: str, within: float = 10) -> None:
        """Until ``line`` has been received."""
        with trio.fail_after(within):
            while line not in self.lines:
                await self._changed.wait()

    async def who_becomes(self, expected: str, within: float) -> None:
        """Ask /who until it answers ``expected``; fail after ``within`` seconds."""
        answer = ""
        with trio.move_on_after(within):
            for _ in range(1000):  # (bounded by the deadline too)
                if (answer := await self.who()) == expected:
                    break
                await trio.sleep(0.2)
        assert answer == expected, (self.nick, answer, expected, self.lines[-10:])


async def _join(nursery: trio.Nursery, opened: Opened, port: int, nick: str) -> Member:
    client = await opened.client(port, timeout=20)
    await client.expect(WELCOME)
    await client.send_line(f"/nick {nick}")
    await client.expect(f"OK nick {nick}")
    member = Member(nick, client)
    nursery.start_soon(member.read)
    return member


def _chat(serve: Callable[..., Any], url: str) -> tuple[Any, int]:
    process = serve("chat", "--port", "0", "--redis", url, "--redis-liveness", LIVENESS)
    return process, process.port("chat")


async def _settled(members: list[Member], truth: str) -> None:
    for member in members:
        await member.who_becomes(truth, TRUTH_WITHIN)


def _check_log(process: Any, outages: int) -> None:
    """The outages said in two lines each; nothing from coredis, no traceback."""
    assert process.count(r"Redis at .* unreachable \(") == outages, process.lines
    back = r"Redis at .* reachable again after [\d.]+s; \d+ message\(s\) .* not relayed"
    assert process.count(back) == outages, process.lines
    assert process.count(r"coredis|NoneType|Traceback|Retry attempt") == 0, process.lines
    noisy = [x for x in process.lines if re.search(r" (WARNING|ERROR) ", x)]
    assert len(noisy) == outages, noisy  # the "unreachable" lines, nothing else


async def test_five_restarts_announce_nobody_falsely(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    """Redis killed and restarted empty five times; one member quits during the third."""
    a, pa = _chat(serve, redis_server.url)
    b, pb = _chat(serve, redis_server.url)
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            alice = await _join(nursery, opened, pa, "alice")
            carol = await _join(nursery, opened, pa, "carol")
            bob = await _join(nursery, opened, pb, "bob")
            dan = await _join(nursery, opened, pb, "dan")
            everyone = [alice, carol, bob, dan]
            await _settled(everyone, "WHO alice bob carol dan")
            before = {m.nick: len(m.joins_and_leaves()) for m in everyone}
            for round_ in range(1, 6):
                redis_server.kill()
                for process in (a, b):
                    await trio.to_thread.run_sync(
                        lambda p=process, n=round_: p.wait_for(r"unreachable \(", count=n)
                    )
                if round_ == 3:
                    await dan.quit()
                    everyone.remove(dan)
                await carol.client.send_line(f"during outage {round_}")
                await trio.sleep(0.5)
                redis_server.start()
                back = time.monotonic()
                for process in (a, b):
                    await trio.to_thread.run_sync(
                        lambda p=process, n=round_: p.wait_for(
                            "reachable again", count=n, timeout=20
                        )
                    )
                truth = "WHO alice bob carol" if round_ >= 3 else "WHO alice bob carol dan"
                await _settled(everyone, truth)
                assert time.monotonic() - back < TRUTH_WITHIN + 2
                # Messages flow again both ways.
                await alice.client.send_line(f"after {round_}")
                await bob.client.send_line(f"back {round_}")
                for m in everyone:
                    for sender, text in ((alice, f"after {round_}"), (bob, f"back {round_}")):
                        if m is not sender:
                            await m.wait_for(f"MSG {sender.nick} {text}")
            # Some periods later (all kept ghosts settled): nobody was
            # announced as leaving or joining; dan left once.
            await trio.sleep(2 * float(LIVENESS))
            await _settled(everyone, "WHO alice bob carol")
            for m in (alice, carol, bob):
                news = m.joins_and_leaves()[before[m.nick] :]
                assert news == ["LEAVE dan"], (m.nick, news)
            nursery.cancel_scope.cancel()
    # carol's line of each outage was not relayed, and a's log counted it.
    assert not [x for x in bob.lines if "during outage" in x]
    # (On failure, each process's outage lines: what it counted in which outage.)
    assert a.count(r"reachable again .*; 1 message\(s\)") == 5, a.matching("reachable")
    assert b.count(r"reachable again .*; 0 message\(s\)") == 5, b.matching("reachable")
    for process in (a, b):
        _check_log(process, 5)
        assert process.stop() == 0


async def test_a_paused_redis_announces_nobody_falsely(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    """SIGSTOP on Redis longer than the liveness period and a call's deadline."""
    a, pa = _chat(serve, redis_server.url)
    b, pb = _chat(serve, redis_server.url)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            alice = await _join(nursery, opened, pa, "alice")
            bob = await _join(nursery, opened, pb, "bob")
            dan = await _join(nursery, opened, pb, "dan")
            await _settled([alice, bob, dan], "WHO alice bob dan")
            before = len(alice.joins_and_leaves())
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                await trio.sleep(2)
                await dan.quit()
                await trio.sleep(5)  # 7 s: the processes' calls time out
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            back = time.monotonic()
            await _settled([alice, bob], "WHO alice bob")
            assert time.monotonic() - back < TRUTH_WITHIN
            # Some more periods: the fresh stamps expire again, still nobody leaves.
            await trio.sleep(2 * float(LIVENESS))
            await _settled([alice, bob], "WHO alice bob")
            assert alice.joins_and_leaves()[before:] == ["LEAVE dan"]
            nursery.cancel_scope.cancel()
    for process in (a, b):
        _check_log(process, 1)
        assert process.stop() == 0


class CutProxy:
    """A TCP relay to Redis whose link can be cut: nothing passes, nothing is closed.

    While cut, bytes are held (as a network that drops them does, from
    each end's point of view), connections accepted meanwhile are not
    relayed yet, and a side that closes is not told to the other: Redis
    keeps the connection as it would until TCP keepalive. Healing lets the
    held bytes through.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self._open = trio.Event()
        self._open.set()

    def cut(self) -> None:
        self._open = trio.Event()

    def heal(self) -> None:
        self._open.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, down: trio.SocketStream) -> None:
        async with down:  # (also when cancelled while the link is cut)
            await self._open.wait()
            up = await trio.open_tcp_stream("127.0.0.1", self.upstream)
            async with up, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, down, up)
                nursery.start_soon(self._pump, up, down)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while True:
                data = await src.receive_some(1 << 16)
                cut = not self._open.is_set()
                await self._open.wait()
                if not data:
                    if cut:  # closed during the cut: the other side never hears of it
                        await trio.sleep_forever()
                    await dst.send_eof()
                    return
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def test_a_cut_link_announces_nobody_falsely(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    """One process cut off from Redis: members who quit meanwhile are announced
    once after it, nobody else; then its ``kill -9`` is still announced in time."""
    proxy = CutProxy(redis_server.port)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.run)
            a, pa = _chat(serve, f"redis://127.0.0.1:{port}")
            b, pb = _chat(serve, redis_server.url)
            alice = await _join(nursery, opened, pa, "alice")
            amy = await _join(nursery, opened, pa, "amy")
            bob = await _join(nursery, opened, pb, "bob")
            dan = await _join(nursery, opened, pb, "dan")
            truth = "WHO alice amy bob dan"
            await _settled([alice, amy, bob, dan], truth)
            before = {m.nick: len(m.joins_and_leaves()) for m in (alice, bob)}
            proxy.cut()
            await trio.sleep(1)
            await dan.quit()  # on the side still linked
            await amy.quit()  # on the side cut off
            await trio.sleep(6.5)  # several periods, and past a call's deadline (5 s)
            await trio.to_thread.run_sync(lambda: a.wait_for(r"unreachable \("))
            assert b.count("unreachable") == 0
            proxy.heal()
            await trio.to_thread.run_sync(lambda: a.wait_for("reachable again", timeout=20))
            await _settled([alice, bob], "WHO alice bob")
            await trio.sleep(2 * float(LIVENESS))
            await _settled([alice, bob], "WHO alice bob")
            for m in (alice, bob):  # each heard of both, once
                news = m.joins_and_leaves()[before[m.nick] :]
                assert sorted(news) == ["LEAVE amy", "LEAVE dan"], m.lines
            # The connections Redis kept from before the cut were closed by
            # the process itself: a kill -9 now is seen as one.
            a.signal(signal.SIGKILL)
            killed = time.monotonic()
            await bob.wait_for("LEAVE alice", within=15)
            assert time.monotonic() - killed < 15
            nursery.cancel_scope.cancel()
    _check_log(a, 1)
    assert b.count("unreachable") == 0 and b.count("Traceback") == 0
    assert b.stop() == 0
