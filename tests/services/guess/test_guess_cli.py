"""The guess server and client as programs: real processes over 127.0.0.1."""

from __future__ import annotations

import math
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CLIENT = [sys.executable, "-m", "trionet.client", "guess"]
TIMEOUT = 20  # seconds for any one process; they take well under one


@contextmanager
def guess_server(*options: str) -> Iterator[tuple[int, list[str]]]:
    """Run ``python -m trionet.serve guess --port 0 ...``; yield its port and log lines.

    On exit the server gets SIGINT and must stop gracefully with status 0.
    """
    cmd = [sys.executable, "-m", "trionet.serve", "guess", "--port", "0", *options]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stderr = proc.stderr
    log: list[str] = []
    ports: list[int] = []
    started = threading.Event()

    def read_log() -> None:
        # A thread, so reading the log never blocks the test itself.
        for line in stderr:
            log.append(line.rstrip("\n"))
            if m := re.search(r"guess listening on 127\.0\.0\.1:(\d+)", line):
                ports.append(int(m.group(1)))
                started.set()
        started.set()  # the server exited

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert started.wait(TIMEOUT) and ports, f"server did not start: {log}"
        yield ports[0], log
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0, log
        reader.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(TIMEOUT)
        if not reader.is_alive():  # (never closed under the reader's feet)
            stderr.close()


def run_client(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIENT, *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_auto_client_against_a_server_process() -> None:
    with guess_server("--range", "1", "1000", "--seed", "5") as (port, log):
        done = run_client("--port", str(port), "--auto", "--rounds", "3")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "S: NEW 1 1000"
        assert lines[-2:] == ["C: QUIT", "S: BYE"]
        counts = [int(line.split()[2]) for line in lines if line.startswith("S: CORRECT")]
        assert len(counts) == 3
        assert max(counts) <= math.ceil(math.log2(1000))
        # The transcript's guesses per round match the server's count.
        guesses = sum(bool(re.fullmatch(r"C: \d+", line)) for line in lines)
        assert guesses == sum(counts)

        interactive = run_client("--port", str(port), stdin="0\n500\nstats\nquit\n")
        assert interactive.returncode == 0, interactive.stderr
        out = interactive.stdout
        assert "from 1 to 1000" in out
        assert "Out of range" in out
        assert re.search(r"(higher|lower) than 500|Correct! 500", out)
        assert "Server stats: 3 games played, 3 won" in out
        assert out.rstrip().endswith("Bye!")
    assert any("end=quit" in line for line in log)


def test_one_number_range_server_process() -> None:
    with guess_server("--range", "4", "4") as (port, _):
        done = run_client("--port", str(port), "--auto", "--rounds", "2")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[:4] == ["S: NEW 4 4", "C: 4", "S: CORRECT 1", "S: NEW 4 4"]


def test_bad_range_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trionet.serve", "guess", "--range", "6", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1  # PROTOCOL.md: a service that cannot start exits 1
    assert "cannot start guess on 127.0.0.1:7002: --range needs LO <= HI" in done.stderr
    assert "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_is_one_line() -> None:
    done = run_client("--port", str(_free_port()), "--auto")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1
    assert "cannot connect" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("auto", [True, False])
def test_dropped_connection_is_one_line(auto: bool) -> None:
    """A server that answers one guess's worth of nothing and hangs up."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(TIMEOUT)

        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"NEW 1 100\n")
                conn.settimeout(TIMEOUT)
                conn.recv(100)  # the first guess; then drop the connection

        thread = threading.Thread(target=serve_once)
        thread.start()
        port = str(listener.getsockname()[1])
        done = run_client("--port", port, *(["--auto"] if auto else []), stdin="50\n")
        thread.join(TIMEOUT)
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("\n") == 1
    assert "connection lost" in done.stderr
    assert "Traceback" not in done.stderr


def test_client_help_explains_options() -> None:
    done = run_client("--help")
    assert done.returncode == 0
    for option in ("--host", "--port", "--auto", "--rounds", "--timeout"):
        assert option in done.stdout
    assert done.stdout.count("default") >= 5


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--timeout", "0"], ["--timeout", "nan"]])
def test_client_rejects_bad_options(bad: list[str]) -> None:
    done = run_client("--auto", *bad)
    assert done.returncode == 2
    assert "must be" in done.stderr
    assert "Traceback" not in done.stderr
