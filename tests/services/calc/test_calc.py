"""The calc service over memory streams and real sockets, and its client."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from conftest import Opened

import trionet
from trionet.services.calc.client import client_main, describe_error
from trionet.services.calc.server import CalcService, answer_line, is_quit
from trionet.testing import open_memory_server

KINDS = ["memory", "tcp"]


@asynccontextmanager
async def calc_server(kind: str, **options: Any) -> AsyncIterator[Any]:
    """Yield an async ``connect()`` returning a :class:`Client` to a calc server."""
    if kind == "memory":
        async with open_memory_server(CalcService(**options)) as srv:
            yield srv.connect
        return
    # The clients are closed on the way out (conftest's Opened), not left to
    # the garbage collector.
    async with Opened() as opened, trio.open_nursery() as nursery:
        addrs = await nursery.start(trionet.serve, [CalcService(port=0, **options)])
        host, port = addrs["calc"][0]
        yield partial(opened.client, port, host, timeout=30)
        nursery.cancel_scope.cancel()


# -- pure helpers ----------------------------------------------------------------


def test_answer_line_keeps_ans_on_error() -> None:
    assert answer_line("6 * 7", 0) == ("OK 42", 42)
    assert answer_line("1/0", 42) == ("ERR zero-division division by zero", 42)
    assert answer_line("ans / 4", 42) == ("OK 10.5", 10.5)


def test_is_quit() -> None:
    assert all(is_quit(w) for w in ["QUIT", "quit", "Quit", " qUiT "])
    assert not any(is_quit(w) for w in ["QUITS", "QUI", "", "qu1t", "quıt"])


def test_describe_error_is_in_words() -> None:
    assert describe_error("ERR zero-division division by zero") == "division by zero"
    assert describe_error("ERR not-allowed unknown name x") == "not allowed: unknown name x"
    assert describe_error("ERR line-too-long 4096") == (
        "expression too long (the server accepts 4096 bytes)"
    )
    assert describe_error("ERR weird") == "error weird"


# -- the protocol, in memory and over TCP ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_protocol_examples(kind: str) -> None:
    async with calc_server(kind) as connect:
        c = await connect()
        for line, want in [
            ("7 / 2", "OK 3.5"),
            ("4 / 2", "OK 2.0"),
            ("0.1 + 0.2", "OK 0.30000000000000004"),
            ("2 ** 64", "OK 18446744073709551616"),
            ("2**3**2", "OK 512"),
            ("-2**2", "OK -4"),
            ("-7 // 2", "OK -4"),
            ("-7 % 3", "OK 2"),
            ("", "ERR syntax empty expression"),
            ("1 +", "ERR syntax invalid syntax"),
            ("__import__('os')", "ERR not-allowed unknown function __import__"),
            ("1/0", "ERR zero-division division by zero"),
            ("sqrt(-1)", "ERR domain sqrt(): math domain error"),
            ("9**9**9", "ERR too-large integer result has more than 4300 digits"),
        ]:
            await c.send_line(line)
            await c.expect(want)
        await c.send(b"1 + 1\r\n")
        await c.expect("OK 2")
        await c.send_line("quit")
        await c.expect("BYE")
        await c.expect_closed()


@pytest.mark.parametrize("kind", KINDS)
async def test_pipelined_lines_answered_in_order(kind: str) -> None:
    lines = [f"{i} * {i}" if i % 7 else f"{i} / 0" for i in range(500)]
    want = [f"OK {i * i}" if i % 7 else "ERR zero-division division by zero" for i in range(500)]
    async with calc_server(kind) as connect:
        c = await connect()
        await c.send("".join(line + "\n" for line in lines).encode())
        await c.expect(*want)


@pytest.mark.parametrize("kind", KINDS)
async def test_ans_is_per_connection(kind: str) -> None:
    async with calc_server(kind) as connect:
        a, b = await connect(), await connect()
        await a.send_line("ans")
        await a.expect("OK 0")
        await a.send_line("6 * 7")
        await a.expect("OK 42")
        await b.send_line("ans + 1")
        await b.expect("OK 1")
        await a.send_line("1/0")  # errors leave ans alone
        await a.expect("ERR zero-division division by zero")
        await a.send_line("ans / 4")
        await a.expect("OK 10.5")
        await b.send_line("ans")
        await b.expect("OK 1")


@pytest.mark.parametrize("kind", KINDS)
async def test_framing_errors_get_one_reply_and_the_connection_carries_on(kind: str) -> None:
    async with calc_server(kind, max_line=64) as connect:
        c = await connect()
        await c.send(b"1" * 100 + b"\n" + b"\xff\xfe\n" + b"2+2\n")
        await c.expect("ERR line-too-long 64", "ERR bad-encoding", "OK 4")


@pytest.mark.parametrize("kind", KINDS)
async def test_hostile_lines_refused_and_the_connection_carries_on(kind: str) -> None:
    hostile = [
        "-" * 4095 + "1",
        "(" * 2000 + "1" + ")" * 2000,
        "9**9**9",
        "10**10**10",
        "factorial(10**6)",
        "1e308 * 10",
        "+".join(["factorial(1500)"] * 200),
        "2**" * 1364 + "2",
    ]
    async with calc_server(kind) as connect:
        c = await connect()
        for line in hostile:
            await c.send_line(line[:4096])
            got = await c.receive_line()
            assert got is not None and got.startswith("ERR too-large"), (line[:20], got)
        await c.send_line("ans + 1")
        await c.expect("OK 1")


@pytest.mark.parametrize("kind", KINDS)
async def test_sandbox_escapes_over_the_wire(kind: str) -> None:
    async with calc_server(kind) as connect:
        c = await connect()
        for line in ["().__class__", "open('x')", "lambda: 1", "f'{1}'", "'{}'.format(1)"]:
            await c.send_line(line)
            got = await c.receive_line()
            assert got is not None and got.startswith("ERR not-allowed "), (line, got)


async def test_idle_timeout_says_bye(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(CalcService()) as srv:
        c = await srv.connect(timeout=1000)
        await c.send_line("1")
        await c.expect("OK 1")
        await c.expect_nothing(for_seconds=299)
        await c.expect("BYE idle-timeout")
        await c.expect_closed()


async def test_shutdown_says_bye() -> None:
    async with open_memory_server(CalcService()) as srv:
        c = await srv.connect()
        await c.send_line("1 + 1")
        await c.expect("OK 2")
        srv.shutdown()
        await c.expect("BYE shutdown")
        await c.expect_closed()


async def test_hostile_client_does_not_stall_another_over_tcp() -> None:
    # Each hostile line does the most work a line may (its budget), and they
    # arrive pipelined, so the handler never waits for input between them.
    # The quiet client's round trips must still be served in between.
    heavy = "+".join(["(ans // 7**2000)"] * 40)
    hostile_lines = 300
    async with calc_server("tcp") as connect:
        bad, good = await connect(), await connect()
        await bad.send_line("10**4299")
        await bad.expect("OK 1" + "0" * 4299)
        hostile_started = trio.Event()
        hostile_done = trio.Event()
        hostile_replies: list[str] = []

        async def hostile() -> None:
            await bad.send((heavy + "\n").encode() * hostile_lines)
            for _ in range(hostile_lines):
                got = await bad.receive_line()
                assert got is not None
                hostile_replies.append(got)
                hostile_started.set()
            hostile_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hostile)
            await hostile_started.wait()  # the flood is being worked on
            for i in range(10):
                await good.send_line(f"{i} + 1")
                await good.expect(f"OK {i + 1}")
            # All ten answers came back while the flood was still in progress.
            assert not hostile_done.is_set()
            assert len(hostile_replies) < hostile_lines
        assert all(r.startswith("ERR too-large") for r in hostile_replies)


# -- the client ------------------------------------------------------------------


@pytest.fixture
def calc_port() -> Iterator[int]:
    """A calc server on 127.0.0.1 in a background thread; yields its port."""
    ready: list[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope]] = []
    started = threading.Event()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(trionet.serve, [CalcService(port=0)])
            port = addrs["calc"][0][1]
            ready.append((port, trio.lowlevel.current_trio_token(), nursery.cancel_scope))
            started.set()

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    assert started.wait(10)
    port, token, scope = ready[0]
    yield port
    trio.from_thread.run_sync(scope.cancel, trio_token=token)
    thread.join(10)
    assert not thread.is_alive()


def test_client_evaluates_arguments(calc_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    status = client_main(["--port", str(calc_port), "6 * 7", "ans / 4", "2 ** 64", "--", "-2**2"])
    out, err = capsys.readouterr()
    assert status == 0
    assert out == "42\n10.5\n18446744073709551616\n-4\n"
    assert err == ""


def test_client_reports_errors_in_words(calc_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    status = client_main(["--port", str(calc_port), "1/0", "1 + 1", "x"])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == "2\n"
    assert err == "1/0: division by zero\nx: not allowed: unknown name x\n"


def test_client_reads_piped_stdin(
    calc_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{i}**2\n" for i in range(300))))
    status = client_main(["--port", str(calc_port)])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    assert out.splitlines() == [str(i**2) for i in range(300)]


def test_client_names_a_blank_piped_line(
    calc_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1\n\n2*3\n"))
    status = client_main(["--port", str(calc_port)])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == "2\n6\n"
    assert err == "(empty line): syntax error: empty expression\n"


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_client_repl_on_a_terminal(
    calc_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _FakeTerminal("2 + 3\nans * 2\nsqrt(-1)\nquit\n1\n"))
    status = client_main(["--port", str(calc_port)])
    out, err = capsys.readouterr()
    assert status == 0
    assert out == "calc> 5\ncalc> 10\ncalc> calc> "
    assert err == "outside the function's domain: sqrt(): math domain error\n"


def test_client_cannot_connect(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = client_main(["--port", str(port), "1"])
    out, err = capsys.readouterr()
    assert status == 3
    assert out == ""
    assert err.count("\n") == 1 and "cannot connect" in err and "Traceback" not in err


def test_client_help_explains_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        client_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option, default in [("--host", "127.0.0.1"), ("--port", "7005"), ("--timeout", "30")]:
        assert option in out and f"default: {default}" in out


def test_client_refuses_an_expression_with_a_line_break(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert client_main(["1\n2"]) == 2
    assert "line break" in capsys.readouterr().err
