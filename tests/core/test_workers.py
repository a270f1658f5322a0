"""Worker processes, as real processes over loopback: ``--workers N`` serves from
sockets the parent opened once; a killed worker loses no connection that was
waiting to be accepted and is replaced; signals shut every worker down
gracefully; no worker outlives its parent; shared state refuses to be split.

Every wait is bounded; the parent's log says which worker has which pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import Opened, Serve

from trionet.testing import Client

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_two_workers_serve_200_concurrent_calc_clients(
    serve: Callable[..., Serve], opened: Opened
) -> None:
    p = serve("calc", "--port", "0", "--workers", "2")
    port = p.port("calc")
    p.worker_pids(2)
    answers: dict[int, list[str]] = {}

    async def one(i: int) -> None:
        client = await opened.client(port, timeout=20)
        await client.send(f"{i} * 3\n{i} + 1\nQUIT\n".encode())
        answers[i] = await _lines(client)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert answers == {i: [f"OK {i * 3}", f"OK {i + 1}", "BYE"] for i in range(200)}
    assert p.stop() == 0
    # Each worker logged its own access lines.
    assert (
        len([line for line in p.lines if "calc 127.0.0.1:" in line and "end=quit" in line]) == 200
    )
    assert all("[worker " in line for line in p.lines if "end=quit" in line)


async def _lines(client: Client) -> list[str]:
    out = []
    while (line := await client.receive_line()) is not None:
        out.append(line)
    return out


async def test_a_killed_worker_loses_no_waiting_connection_and_is_replaced(
    serve: Callable[..., Serve], opened: Opened
) -> None:
    """Connections queued on the shared socket survive the death of a worker.

    Both workers are stopped (SIGSTOP) so nothing is accepted; 50 clients connect
    (the kernel queues them) and send a request; one worker is killed with -9 and
    the other resumed. Every client is answered: none was tied to the dead worker.
    """
    p = serve("calc", "--port", "0", "--workers", "2")
    port = p.port("calc")
    a, b = p.worker_pids(2)
    # Let both finish starting up (they log at DEBUG only; a request proves it).
    for _ in range(4):
        with trio.fail_after(20):
            client = await opened.client(port)
            await client.send(b"1+1\nQUIT\n")
            assert await _lines(client) == ["OK 2", "BYE"]
    os.kill(a, signal.SIGSTOP)
    os.kill(b, signal.SIGSTOP)
    clients = []
    try:
        for i in range(50):
            client = await opened.client(port, timeout=30)
            await client.send(f"{i} ** 2\nQUIT\n".encode())
            clients.append(client)
        os.kill(a, signal.SIGKILL)
    finally:
        os.kill(b, signal.SIGCONT)
    with trio.fail_after(30):
        got = [await _lines(c) for c in clients]
    assert got == [[f"OK {i**2}", "BYE"] for i in range(50)]
    # The dead worker is replaced.
    p.wait_for(rf"worker \d+ \(pid {a}\) died \(signal SIGKILL\); restarting")
    (new,) = [pid for pid in p.worker_pids(3) if pid not in (a, b)]
    assert alive(new)
    assert p.stop() == 0


async def test_sigterm_gives_every_client_bye_shutdown_and_exits_0(
    serve: Callable[..., Serve], opened: Opened
) -> None:
    p = serve("calc", "--port", "0", "--workers", "2", "--grace", "2")
    port = p.port("calc")
    pids = p.worker_pids(2)
    clients = []
    with trio.fail_after(30):
        for i in range(20):
            client = await opened.client(port, timeout=20)
            await client.send_line(f"{i}+1")
            await client.expect(f"OK {i + 1}")
            clients.append(client)
        p.proc.send_signal(signal.SIGTERM)
        for client in clients:
            await client.expect("BYE shutdown")
            await client.expect_closed()
    assert p.proc.wait(30) == 0
    assert not any(alive(pid) for pid in pids)


def test_no_worker_outlives_a_killed_parent(serve: Callable[..., Serve]) -> None:
    p = serve("calc", "--port", "0", "--workers", "2")
    pids = p.worker_pids(2)
    p.port("calc")
    p.proc.kill()  # kill -9: no chance to clean up
    p.proc.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("service", ["chat", "guess"])
def test_shared_state_refuses_several_workers(service: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trionet.serve", service, "--port", "0", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert f"{service} cannot run in 2 worker processes on 127.0.0.1:0: " in done.stderr
    assert "--redis" in done.stderr and "Traceback" not in done.stderr


def test_workers_auto_is_one_per_core() -> None:
    import trionet

    assert trionet._runner._workers("auto") == (os.cpu_count() or 1)
