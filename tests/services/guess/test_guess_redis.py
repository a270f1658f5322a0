"""guess's STATS shared through Redis (``--redis``): one set of numbers for every process.

With ``--range 1 1`` the secret is always 1, so a round is won in one guess
and the numbers are known in advance. A real redis-server comes from
tests/conftest.py; every wait is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import Opened

from trionet.services.guess.rules import Stats
from trionet.services.guess.server import GuessService
from trionet.testing import Client, open_memory_server


async def _play(client: Client, *, wins: int = 0, give_ups: int = 0) -> None:
    for _ in range(wins):
        await client.send_line("1")
        await client.expect("CORRECT 1", "NEW 1 1")
    for _ in range(give_ups):
        await client.send_line("GIVEUP")
        await client.expect("ANSWER 1", "NEW 1 1")


async def _stats_until(client: Client, want: str) -> None:
    """Ask STATS until it answers ``want``: another process's round is applied
    within one flush of it, not at once."""
    for _ in range(50):
        await client.send_line("STATS")
        got = await client.receive_line()
        if got == want:
            return
        await trio.sleep(0.1)
    assert got == want


def test_stats_add_up() -> None:
    total = Stats()
    one, two = Stats(), Stats()
    one.record_win(5)
    two.record_win(3)
    two.record_give_up()
    total.add(one)
    total.add(two)
    assert (total.played, total.won, total.best, total.total_attempts) == (3, 2, 3, 8)
    total.add(Stats())
    assert total.best == 3


async def test_two_services_share_stats_in_memory(redis_server: Any) -> None:
    one = GuessService(lo=1, hi=1, redis=redis_server.url)
    two = GuessService(lo=1, hi=1, redis=redis_server.url)
    with trio.fail_after(30):
        async with open_memory_server(one) as s1, open_memory_server(two) as s2:
            a: Client = await s1.connect()
            b: Client = await s2.connect()
            await a.expect("NEW 1 1")
            await b.expect("NEW 1 1")
            await _play(a, wins=2)
            await _play(b, give_ups=1)
            await _stats_until(b, "STATS 3 2 1 1.00")
            await a.send_line("stats")
            await a.expect("STATS 3 2 1 1.00")
            await _play(a, wins=1)  # and the servers stop at once:
    assert one.stats.played == 3 and two.stats.played == 1  # each process's own
    # the last round was applied on the way out
    assert redis_server.command("HGET", "trionet:guess:stats", "played") == b"$1\r\n4\r\n"


async def test_stats_are_local_while_redis_is_down_and_nothing_is_lost(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trionet")
    service = GuessService(lo=1, hi=1, redis=redis_server.url)
    with trio.fail_after(40):
        async with open_memory_server(service) as server:
            client: Client = await server.connect()
            await client.expect("NEW 1 1")
            await _play(client, wins=1)
            await client.send_line("STATS")
            await client.expect("STATS 1 1 1 1.00")
            redis_server.kill()
            await _play(client, wins=1, give_ups=1)
            for _ in range(2):  # the note is logged once
                await client.send_line("STATS")
                await client.expect("STATS 3 2 1 1.00")  # this process's numbers
            redis_server.start()  # empty: it lost the first win
            assert service.shared is not None
            for _ in range(400):
                if service.shared.link.up:
                    break
                await trio.sleep(0.05)
            await client.send_line("STATS")
            # The rounds played during the outage were kept and applied.
            await client.expect("STATS 2 1 1 1.00")
    notes = [r.getMessage() for r in caplog.records if "this process's numbers" in r.getMessage()]
    assert len(notes) == 1


async def test_two_processes_and_two_workers_share_stats(
    redis_server: Any, serve: Callable[..., Any], opened: Opened
) -> None:
    common = ("--range", "1", "1", "--redis", redis_server.url)
    a = serve("guess", "--port", "0", *common)
    b = serve("guess", "--port", "0", "--workers", "2", *common)
    pa, pb = a.port("guess"), b.port("guess")
    with trio.fail_after(60):
        clients = []
        for port in (pa, pb, pb, pb):
            c = await opened.client(port, timeout=15)
            await c.expect("NEW 1 1")
            clients.append(c)
        for c in clients:
            await _play(c, wins=1)
        await _play(clients[0], give_ups=1)
        for c in clients:
            await _stats_until(c, "STATS 5 4 1 1.00")
    for p in (a, b):
        assert p.stop() == 0
        assert p.count("Traceback") == 0
