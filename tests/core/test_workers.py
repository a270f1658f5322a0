"""Worker processes, as real processes over loopback: ``--workers N`` serves from
sockets the parent opened once; a killed worker loses no connection that was
waiting to be accepted and is replaced; signals shut every worker down
gracefully; no worker outlives its parent; shared state refuses to be split.

Every wait is bounded; the parent's log says which worker has which pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from trionet.testing import Client

ROOT = Path(__file__).resolve().parents[2]


class Parent:
    """``python -m trionet.serve ... --workers N`` with its log read in a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trionet.serve", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> list[re.Match[str]]:
        """The first ``count`` log lines matching ``pattern`` (waiting for them)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := re.search(pattern, line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                assert left > 0 and "<eof>" not in self.lines, (pattern, self.lines[-20:])
                self._changed.wait(left)

    def port(self, name: str) -> int:
        return int(self.wait_for(rf"{name} listening on 127\.0\.0\.1:(\d+)")[0][1])

    def worker_pids(self, count: int) -> list[int]:
        return [int(m[1]) for m in self.wait_for(r"worker \d+ started \(pid (\d+)\)", count)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@contextmanager
def parent(*args: str) -> Iterator[Parent]:
    p = Parent(*args)
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


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


async def test_two_workers_serve_200_concurrent_calc_clients() -> None:
    with parent("calc", "--port", "0", "--workers", "2") as p:
        port = p.port("calc")
        p.worker_pids(2)
        answers: dict[int, list[str]] = {}

        async def one(i: int) -> None:
            client = Client(await trio.open_tcp_stream("127.0.0.1", port), timeout=20)
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


async def test_a_killed_worker_loses_no_waiting_connection_and_is_replaced() -> None:
    """Connections queued on the shared socket survive the death of a worker.

    Both workers are stopped (SIGSTOP) so nothing is accepted; 50 clients connect
    (the kernel queues them) and send a request; one worker is killed with -9 and
    the other resumed. Every client is answered: none was tied to the dead worker.
    """
    with parent("calc", "--port", "0", "--workers", "2") as p:
        port = p.port("calc")
        a, b = p.worker_pids(2)
        # Let both finish starting up (they log at DEBUG only; a request proves it).
        for _ in range(4):
            with trio.fail_after(20):
                client = Client(await trio.open_tcp_stream("127.0.0.1", port))
                await client.send(b"1+1\nQUIT\n")
                assert await _lines(client) == ["OK 2", "BYE"]
        os.kill(a, signal.SIGSTOP)
        os.kill(b, signal.SIGSTOP)
        clients = []
        try:
            for i in range(50):
                client = Client(await trio.open_tcp_stream("127.0.0.1", port), timeout=30)
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


async def test_sigterm_gives_every_client_bye_shutdown_and_exits_0() -> None:
    with parent("calc", "--port", "0", "--workers", "2", "--grace", "2") as p:
        port = p.port("calc")
        pids = p.worker_pids(2)
        clients = []
        with trio.fail_after(30):
            for i in range(20):
                client = Client(await trio.open_tcp_stream("127.0.0.1", port), timeout=20)
                await client.send_line(f"{i}+1")
                await client.expect(f"OK {i + 1}")
                clients.append(client)
            p.proc.send_signal(signal.SIGTERM)
            for client in clients:
                await client.expect("BYE shutdown")
                await client.expect_closed()
        assert p.proc.wait(30) == 0
        assert not any(alive(pid) for pid in pids)


def test_no_worker_outlives_a_killed_parent() -> None:
    with parent("calc", "--port", "0", "--workers", "2") as p:
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
    assert f"cannot start {service} on 127.0.0.1:0:" in done.stderr
    assert "--redis" in done.stderr and "Traceback" not in done.stderr


def test_workers_auto_is_one_per_core() -> None:
    import trionet

    assert trionet._runner._workers("auto") == (os.cpu_count() or 1)
