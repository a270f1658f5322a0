"""What the benchmarks here share: server processes, interleaved rounds, medians.

A benchmark is then its load and its baseline: it starts each side with
:class:`Server` (a process whose port is read from its ``listening on
HOST:PORT`` line, or one told a port), runs its load in turn against each
in the orders :func:`rounds` gives (rotated every round, so the machine's
noise hits every side alike), and prints :func:`median` figures and ratios.

``--before TREE`` (:func:`add_before_argument`): the benchmarks that take it
add a row ``before``, the same trionet server run from another checkout
(e.g. ``/work/main``, or ``git worktree add /tmp/before HEAD~3``), so a
change is measured against the code it replaces in the same interleaved run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_T = TypeVar("_T")
_S = TypeVar("_S", bound=socket.socket)
_LISTENING = re.compile(r"listening on [^\s:]+:(\d+)")


def raise_fd_limit() -> None:
    """Let this process open as many descriptors as the hard limit allows."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of process ``pid`` in KiB (Linux /proc/PID/status):
    ``VmRSS`` resident now, ``VmHWM`` its peak."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} for process {pid}")
    return int(match.group(1))


def run_delay(pid: int) -> float:
    """Seconds process ``pid``'s threads have spent runnable but waiting for a CPU
    (Linux /proc/PID/task/*/schedstat, second field): on a busy machine, the time a
    process is ready and the kernel has no core for it."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def machine_idle() -> tuple[float, float]:
    """(idle, total) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[3] + fields[4]) / tick, sum(fields[:8]) / tick


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Return once something accepts on ``port``; exit if ``proc`` dies or never gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


class Server:
    """A server process for one side of a benchmark.

    ``argv`` is run from the project's root (``tree``: another checkout's
    trionet instead, see :func:`add_before_argument`), its standard error
    kept in a temporary log. With ``port`` the server was told its port and
    is ready once it accepts; without, the port is read from its first
    ``listening on HOST:PORT`` line, and ``ready(log_text)`` may ask for
    more before it counts as started (workers up...).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int | None = None,
        tree: str | None = None,
        ready: Callable[[str], bool] | None = None,
        preexec_fn: Callable[[], Any] | None = None,
        timeout: float = 30,
    ) -> None:
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=tree or ROOT,
            env=env,
            stderr=self.log,
            stdout=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
        )
        try:
            if port is not None:
                wait_listening(port, self.proc, timeout)
                self.port = port
            else:
                self.port = self._wait_port(ready, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        """What the server wrote to standard error so far."""
        self.log.seek(0)
        return self.log.read()

    def _wait_port(self, ready: Callable[[str], bool] | None, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            m = _LISTENING.search(text)
            if m and (ready is None or ready(text)):
                return int(m[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop the process (``sig``, then a kill after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_pingpong(
    socks: Sequence[_S], message: bytes
) -> tuple[select.epoll, dict[int, _S], dict[int, int]]:
    """Send ``message`` on every socket of a ping-pong load: (epoll, sockets by descriptor,
    bytes of the echo still awaited by descriptor). The load's loop is its own."""
    by_fd = {s.fileno(): s for s in socks}
    pending = dict.fromkeys(by_fd, len(message))
    ep = select.epoll()
    for fd, s in by_fd.items():
        ep.register(fd, select.EPOLLIN)
        s.send(message)
    return ep, by_fd, pending


def rounds(count: int, names: Sequence[_T]) -> Iterator[tuple[int, list[_T]]]:
    """``(round, order)`` for each round: every name once, the order rotated each round."""
    for r in range(count):
        shift = r % len(names)
        yield r, [*names[shift:], *names[:shift]]


def build_c(name: str) -> str | None:
    """Build ``scripts/bench/NAME.c`` (once per version, in the temp folder); its path,
    or None when the machine has no C compiler (the caller then says so and falls back)."""
    source = HERE / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = Path(tempfile.gettempdir()) / f"trionet-{name}-{digest}"
    if not binary.exists():
        try:
            subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
    return str(binary)


def build_pingpong() -> str | None:
    """``pingpong.c``, built (see :func:`build_c`)."""
    return build_c("pingpong")


def median(values: Sequence[float]) -> float:
    """The median of one side's rounds (what the benchmarks report)."""
    return statistics.median(values)


def add_before_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--before TREE``: also measure trionet as found in another checkout."""
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="another checkout of the project: adds a row 'before', its trionet, "
        "interleaved with the others (e.g. /work/main)",
    )


def sides(args: argparse.Namespace, names: Sequence[str] = ("trionet", "baseline")) -> list[str]:
    """The sides to measure: ``names``, plus ``before`` with ``--before``."""
    return [*names, "before"] if getattr(args, "before", None) else list(names)


def describe_machine() -> str:
    """Python version and core count, for the heading of a result."""
    return f"python {sys.version.split()[0]}, {os.cpu_count()} cores"
