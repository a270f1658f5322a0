"""The guess service: the handler in memory and over real sockets, and its client."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from conftest import Opened

import trionet
from trionet.services.guess.client import ServerSession, play_auto, play_interactive
from trionet.services.guess.rules import Bisector, optimal_worst_case
from trionet.services.guess.server import GuessService
from trionet.testing import Client, open_memory_server

Connect = Callable[[], Awaitable[Client]]


def draws(seed: int, lo: int, hi: int, n: int) -> list[int]:
    """The first ``n`` secrets a server seeded with ``seed`` will draw."""
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


@asynccontextmanager
async def running(service: GuessService, transport: str) -> AsyncIterator[Connect]:
    """Run ``service`` in memory or on a real 127.0.0.1 socket; yield a connect function."""
    if transport == "memory":
        async with open_memory_server(service) as srv:
            yield srv.connect
        return
    service.port = 0
    async with Opened() as opened, trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [service])
        host, port = addresses["guess"][0]

        async def connect() -> Client:
            return await opened.client(port, host, timeout=30)

        yield connect
        nursery.cancel_scope.cancel()


both = pytest.mark.parametrize("transport", ["memory", "tcp"])


@both
async def test_a_whole_game(transport: str) -> None:
    (secret, second) = draws(11, 1, 100, 2)
    async with running(GuessService(rng=random.Random(11)), transport) as connect:
        c = await connect()
        await c.expect("NEW 1 100")
        player = Bisector(1, 100)
        while True:
            guess = player.next_guess()
            await c.send_line(str(guess))
            if guess == secret:
                break
            await c.expect("HIGHER" if secret > guess else "LOWER")
            player.hint(secret > guess)
        await c.expect(f"CORRECT {player.guesses}", "NEW 1 100")
        # The next round has its own secret and its own count.
        await c.send_line(str(second))
        await c.expect("CORRECT 1", "NEW 1 100")


@both
async def test_every_error_and_invalid_guesses_do_not_count(transport: str) -> None:
    (secret,) = draws(5, 10, 20, 1)
    service = GuessService(lo=10, hi=20, rng=random.Random(5), max_line=32)
    async with running(service, transport) as connect:
        c = await connect()
        await c.expect("NEW 10 20")
        for bad in ["abc", "1_0", "0x10", "1e2", "1.5", "+-3", "QUITE"]:
            await c.send_line(bad)
            await c.expect("ERR not-a-number")
        for outside in ["9", "21", "-15", "9" * 30]:
            await c.send_line(outside)
            await c.expect("ERR out-of-range 10 20")
        await c.send(b"\xff\xfe\n")
        await c.expect("ERR bad-encoding")
        await c.send(b"1" * 40 + b"\n")
        await c.expect("ERR line-too-long 32")
        # None of those counted: the first valid guess wins in one.
        await c.send_line(f"  +{secret} ")
        await c.expect("CORRECT 1", "NEW 10 20")


@both
async def test_crlf_blank_lines_and_pipelining(transport: str) -> None:
    s1, s2 = draws(3, 1, 100, 2)
    async with running(GuessService(rng=random.Random(3)), transport) as connect:
        c = await connect()
        await c.expect("NEW 1 100")
        # One segment: CRLF, blank and all-space lines (ignored), two wins.
        await c.send(f"\r\n\n   \r\n{s1}\r\n\n{s2}\n".encode())
        await c.expect("CORRECT 1", "NEW 1 100", "CORRECT 1", "NEW 1 100")
        await c.expect_nothing(for_seconds=0.2)


@both
async def test_giveup_stats_and_quit(transport: str) -> None:
    s1, s2 = draws(8, 1, 100, 2)
    async with running(GuessService(rng=random.Random(8)), transport) as connect:
        c = await connect()
        await c.expect("NEW 1 100")
        await c.send_line("stats")
        await c.expect("STATS 0 0 - -")
        await c.send_line("GIVEUP")
        await c.expect(f"ANSWER {s1}", "NEW 1 100")
        wrong = 1 if s2 != 1 else 2
        await c.send_line(str(wrong))
        await c.expect("HIGHER" if s2 > wrong else "LOWER")
        await c.send_line(str(s2))
        await c.expect("CORRECT 2", "NEW 1 100")
        await c.send_line("STATS")
        await c.expect("STATS 2 1 2 2.00")
        await c.send_line("Quit")
        await c.expect("BYE")
        await c.expect_closed()


@both
async def test_last_line_without_lf_before_eof_is_answered(transport: str) -> None:
    async with running(GuessService(rng=random.Random(1)), transport) as connect:
        c = await connect()
        await c.expect("NEW 1 100")
        await c.send(b"nope")
        await c.send_eof()
        await c.expect("ERR not-a-number")
        await c.expect_closed()


@both
async def test_one_number_range(transport: str) -> None:
    async with running(GuessService(lo=7, hi=7), transport) as connect:
        c = await connect()
        await c.expect("NEW 7 7")
        await c.send_line("8")
        await c.expect("ERR out-of-range 7 7")
        await c.send_line("7")
        await c.expect("CORRECT 1", "NEW 7 7")


async def test_idle_timeout_in_memory(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(GuessService()) as srv:
        c = await srv.connect()
        await c.expect("NEW 1 100")
        await c.expect_nothing(for_seconds=250)
        await c.send_line("stats")  # activity restarts the clock
        await c.expect("STATS 0 0 - -")
        await c.expect_nothing(for_seconds=299)
        await c.expect("BYE idle-timeout")
        await c.expect_closed()


async def test_idle_timeout_on_the_socket_fast_path() -> None:
    with trio.fail_after(30):
        async with running(GuessService(idle_timeout=0.2), "tcp") as connect:
            c = await connect()
            await c.expect("NEW 1 100")
            await c.expect("BYE idle-timeout")
            await c.expect_closed()


@both
async def test_graceful_shutdown_says_bye(transport: str, opened: Opened) -> None:
    with trio.fail_after(5):
        service = GuessService(port=0)
        if transport == "memory":
            async with open_memory_server(service) as srv:
                c = await srv.connect()
                await c.expect("NEW 1 100")
                srv.shutdown()
                await c.expect("BYE shutdown")
                await c.expect_closed()
            return
        server = trionet.Server([service])
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            host, port = addresses["guess"][0]
            c = await opened.client(port, host, timeout=30)
            await c.expect("NEW 1 100")
            server.shutdown()
            await c.expect("BYE shutdown")
            await c.expect_closed()


async def test_connection_limit_says_busy(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(GuessService(max_connections=1)) as srv:
        first = await srv.connect()
        await first.expect("NEW 1 100")
        second = await srv.connect()
        await second.expect("BYE busy")
        await second.expect_closed()
        await first.send_line("stats")  # the established client is untouched
        await first.expect("STATS 0 0 - -")


async def test_fifty_concurrent_games_over_real_sockets() -> None:
    players = 50
    service = GuessService(lo=1, hi=1000, rng=random.Random(99))
    with trio.fail_after(15):
        async with running(service, "tcp") as connect:
            clients = [await connect() for _ in range(players)]
            for c in clients:
                await c.expect("NEW 1 1000")
            secrets: list[int] = []
            start = trio.Event()

            async def play(c: Client) -> None:
                await start.wait()  # every game is open before any is played
                player = Bisector(1, 1000)
                while True:
                    guess = player.next_guess()
                    await c.send_line(str(guess))
                    reply = await c.receive_line()
                    if reply == f"CORRECT {player.guesses}":
                        break
                    assert reply in ("HIGHER", "LOWER"), reply
                    player.hint(reply == "HIGHER")
                assert player.guesses <= optimal_worst_case(1000)
                secrets.append(guess)
                await c.expect("NEW 1 1000")
                await c.send_line("QUIT")
                await c.expect("BYE")

            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(play, c)
                start.set()
            # Each connection drew its own secret from the shared source.
            assert sorted(secrets) == sorted(draws(99, 1, 1000, players))
            assert service.stats.played == service.stats.won == players
            c = await connect()
            await c.expect("NEW 1 1000")
            await c.send_line("STATS")
            line = await c.receive_line()
            assert line is not None and line.startswith(f"STATS {players} {players} ")


def test_range_and_seed_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    GuessService.add_arguments(parser.add_argument_group("guess"))
    svc = GuessService.from_args(parser.parse_args(["--range", "5", "5", "--seed", "4"]))
    assert (svc.lo, svc.hi) == (5, 5)
    assert svc.rng.random() == random.Random(4).random()
    default = GuessService.from_args(parser.parse_args([]))
    assert (default.lo, default.hi) == (1, 100)
    with pytest.raises(ValueError, match="LO <= HI"):
        GuessService.from_args(parser.parse_args(["--range", "6", "5"]))


# -- the client, in memory -------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(1, 100), (5, 5), (1, 2), (-50, 13), (0, 1023)])
async def test_auto_client_bound(lo: int, hi: int) -> None:
    rounds = 40
    async with open_memory_server(GuessService(lo=lo, hi=hi, rng=random.Random(lo))) as srv:
        session = ServerSession(await srv.open_stream(), timeout=5)
        transcript: list[str] = []
        counts = await play_auto(session, rounds, transcript.append)
    assert len(counts) == rounds
    assert max(counts) <= optimal_worst_case(hi - lo + 1)
    assert transcript[0] == f"S: NEW {lo} {hi}"
    assert transcript[-2:] == ["C: QUIT", "S: BYE"]
    assert sum(line.startswith("S: CORRECT") for line in transcript) == rounds


async def test_interactive_client() -> None:
    s1, s2 = draws(21, 1, 100, 2)
    low, high = (s1 - 1, s1 + 1) if 1 < s1 < 100 else (s1, s1)
    typed = iter(["", "abc", "500", "stats", str(low), str(high), str(s1), "y", "giveup", "n"])
    prompts: list[str] = []
    said: list[str] = []

    async def ask(prompt: str) -> str | None:
        prompts.append(prompt)
        return next(typed, None)

    async with open_memory_server(GuessService(rng=random.Random(21))) as srv:
        session = ServerSession(await srv.open_stream(), timeout=5)
        await play_interactive(session, ask, said.append)
    text = "\n".join(said)
    assert "from 1 to 100" in said[0]
    assert "That is not a whole number" in text
    assert "Out of range: pick a number from 1 to 100" in text
    assert "Server stats: 0 games played, none won yet." in text
    if low != s1:
        assert f"higher than {low}" in said
        assert f"lower than {high}" in said
        assert prompts.count("guess #3> ") == 1  # two hints counted, not the errors
    assert any(line.startswith(f"Correct! {s1} it is, in ") for line in said)
    assert f"You gave up: the number was {s2}." in said
    assert prompts.count("Play again? [Y/n] ") == 2
    assert said[-1] == "Bye!"


async def test_interactive_client_quits_at_end_of_input() -> None:
    async def ask(prompt: str) -> str | None:
        return None

    said: list[str] = []
    async with open_memory_server(GuessService()) as srv:
        session = ServerSession(await srv.open_stream(), timeout=5)
        await play_interactive(session, ask, said.append)
    assert said[-1] == "Bye!"


async def test_interactive_client_survives_a_refused_line() -> None:
    typed = iter(["9" * 40, "quit"])
    said: list[str] = []

    async def ask(prompt: str) -> str | None:
        return next(typed)

    async with open_memory_server(GuessService(max_line=16)) as srv:
        session = ServerSession(await srv.open_stream(), timeout=5)
        await play_interactive(session, ask, said.append)
    assert "The server refused that line (line-too-long); it did not count." in said
    assert said[-1] == "Bye!"
