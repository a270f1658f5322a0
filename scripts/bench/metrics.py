#!/usr/bin/env python3
"""What --metrics-port costs: trionet's echo with metrics on against the same echo without.

Two servers in their own processes, ``python -m trionet.serve echo`` with
and without ``--metrics-port 0``; with metrics on, this script also scrapes
``/metrics`` once a second while it measures (a busy Prometheus scrapes
every 15 s). Rounds are interleaved (the order alternates each round) so
machine noise hits both alike; medians and the on/off ratio are printed,
of the rate and of the server's CPU time per operation (user + system, from
/proc: on a shared, noisy machine the steadier of the two; the load
generators' half-second warm-up is assumed to run at the measured rate):

  (a) ping-pong: 100 connections, one 64-byte message in flight each;
      round trips per second (echo.py's load generator). Metrics are
      recorded when a connection ends, so this is the per-message path.
  (b) churn: one connection per round trip (connect, 64 bytes there and
      back, close), 4 clients at once; connections per second. Every
      connection is counted here: the per-connection cost.
  (c) ping-pong, finely interleaved: both servers run at once, 100
      connections to each, and one load generator drives them in turn,
      0.2 s each, for the whole measurement: a burst of load from other
      programs on the machine then hits both alike, which (a)'s separate
      runs cannot promise on a busy machine.

Usage: scripts/bench/metrics.py [--rounds 5] [--seconds 3] [--tests abc]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from echo import (  # noqa: E402  (scripts/bench/echo.py)
    MESSAGE,
    gen_pingpong,
    raise_fd_limit,
)
from harness import Server as _Server  # noqa: E402  (scripts/bench/harness.py)


def gen_churn(port: int, seconds: float, clients: int = 4) -> dict[str, float]:
    counts = [0] * clients
    stop = time.monotonic() + 0.5 + seconds
    warm = time.monotonic() + 0.5

    def client(i: int) -> None:
        while (now := time.monotonic()) < stop:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    got += len(s.recv(4096))
            if now >= warm:
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"value": sum(counts) / seconds}


class _PingPong:
    """100 connections to one server, driven only while :meth:`drive` runs."""

    def __init__(self, port: int, conns: int = 100) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
        self.ep = select.epoll()
        self.by_fd = {}
        for s in self.socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            self.by_fd[s.fileno()] = s
            self.ep.register(s.fileno(), select.EPOLLIN)
        self.count = 0
        self.busy = 0.0

    def drive(self, seconds: float) -> None:
        """One message in flight per connection for ``seconds``, then let them land."""
        pending = dict.fromkeys(self.by_fd, len(MESSAGE))
        for s in self.socks:
            s.send(MESSAGE)
        start = time.monotonic()
        end = start + seconds
        while pending:
            sending = time.monotonic() < end
            for fd, _ in self.ep.poll(0.2):
                data = self.by_fd[fd].recv(4096)
                if not data:
                    raise SystemExit("server closed")
                pending[fd] -= len(data)
                if pending[fd] == 0:
                    self.count += 1
                    if sending:
                        self.by_fd[fd].send(MESSAGE)
                        pending[fd] = len(MESSAGE)
                    else:
                        del pending[fd]
        self.busy += time.monotonic() - start


def gen_alternating(port_on: int, port_off: int, seconds: float) -> dict[str, float]:
    on, off = _PingPong(port_on), _PingPong(port_off)
    on.drive(0.3)  # warm both up
    off.drive(0.3)
    on.count = off.count = 0
    on.busy = off.busy = 0.0
    for i in range(max(1, round(seconds / 0.4))):
        first, second = (on, off) if i % 2 == 0 else (off, on)
        first.drive(0.2)
        second.drive(0.2)
    return {"on": on.count / on.busy, "off": off.count / off.busy}


_ECHO_PORT = re.compile(r"echo listening on [\d.]+:(\d+)")
_METRICS_PORT = re.compile(r"metrics listening on [\d.]+:(\d+)")


class Server(_Server):
    """trionet's echo, with ``--metrics-port 0`` when ``metrics``."""

    def __init__(self, metrics: bool) -> None:
        limits = ["--max-connections", "20000", "--max-per-address", "20000"]
        extra = ["--metrics-port", "0"] if metrics else []
        argv = [sys.executable, "-m", "trionet.serve", "echo", "--port", "0", *limits, *extra]
        super().__init__(
            argv,
            preexec_fn=raise_fd_limit,
            ready=lambda text: (
                bool(_ECHO_PORT.search(text)) and (not metrics or bool(_METRICS_PORT.search(text)))
            ),
        )
        # Both lines are there (ready said so): read each port by its name.
        text = self.log_text()
        self.port = int(_ECHO_PORT.search(text)[1])  # type: ignore[index]
        found = _METRICS_PORT.search(text)
        self.metrics_port = int(found[1]) if metrics and found else None


def scrape_every_second(port: int, done: threading.Event) -> None:
    while not done.wait(1.0):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        if conn.getresponse().read().count(b"trionet_connections_total") < 1:
            raise SystemExit("scrape without trionet_connections_total")
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(metrics: bool, test: str, seconds: float) -> tuple[float, float]:
    """The rate, and the server's CPU microseconds per operation."""
    server = Server(metrics)
    done = threading.Event()
    scraper = None
    if server.metrics_port is not None:
        scraper = threading.Thread(target=scrape_every_second, args=(server.metrics_port, done))
        scraper.start()
    try:
        cpu_before = cpu_seconds(server.proc.pid)
        out = subprocess.run(
            [sys.executable, __file__, "_gen", test, str(server.port), str(seconds)]
            + ([str(server.proc.pid)] if test == "pingpong" else []),
            capture_output=True,
            text=True,
            timeout=seconds * 4 + 120,
            preexec_fn=raise_fd_limit,
            check=True,
        )
        cpu = cpu_seconds(server.proc.pid) - cpu_before
        rate = float(json.loads(out.stdout)["value"])
        return rate, cpu / (rate * (seconds + 0.5)) * 1e6
    finally:
        done.set()
        if scraper is not None:
            scraper.join()
        server.stop()


def measure_together(seconds: float) -> tuple[float, float]:
    """(c): both servers at once, driven in turn; (rate on, rate off)."""
    servers = [Server(True), Server(False)]
    done = threading.Event()
    port = servers[0].metrics_port
    scraper = threading.Thread(target=scrape_every_second, args=(port, done))
    scraper.start()
    try:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "_gen",
                "together",
                f"{servers[0].port},{servers[1].port}",
                str(seconds * 2),
            ],
            capture_output=True,
            text=True,
            timeout=seconds * 8 + 120,
            preexec_fn=raise_fd_limit,
            check=True,
        )
        rates = json.loads(out.stdout)
        return float(rates["on"]), float(rates["off"])
    finally:
        done.set()
        scraper.join()
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--tests", default="abc", help="which of (a), (b), (c) to run")
    args = parser.parse_args()

    tests = {"a": ("pingpong", "round trips/s"), "b": ("churn", "connections/s")}
    tests = {key: test for key, test in tests.items() if key in args.tests}
    together: list[tuple[float, float]] = []
    results: dict[tuple[str, bool], list[float]] = {}
    cpu: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        for key, (test, unit) in tests.items():
            for metrics in order:
                value, micros = measure(metrics, test, args.seconds)
                results.setdefault((key, metrics), []).append(value)
                cpu.setdefault((key, metrics), []).append(micros)
                kind = "on" if metrics else "off"
                print(
                    f"round {r + 1} ({key}) {test:8} metrics {kind:3} {value:10.1f} {unit}, "
                    f"server CPU {micros:6.1f} us each",
                    flush=True,
                )
        if "c" in args.tests:
            on, off = measure_together(args.seconds)
            together.append((on, off))
            print(
                f"round {r + 1} (c) together metrics on {on:10.1f} off {off:10.1f} "
                f"round trips/s, ratio {on / off:.3f}",
                flush=True,
            )

    print(
        f"\nmedians over {args.rounds} interleaved rounds (python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores):"
    )
    for key, (test, unit) in tests.items():
        on = statistics.median(results[key, True])
        off = statistics.median(results[key, False])
        cpu_on = statistics.median(cpu[key, True])
        cpu_off = statistics.median(cpu[key, False])
        print(
            f"  ({key}) {test:8} metrics on {on:10.1f}  off {off:10.1f}  {unit:14} "
            f"ratio on/off {on / off:.3f};  server CPU us each: on {cpu_on:.1f} "
            f"off {cpu_off:.1f}, ratio off/on {cpu_off / cpu_on:.3f} (higher is better)"
        )
    if together:
        on = statistics.median(t[0] for t in together)
        off = statistics.median(t[1] for t in together)
        ratio = statistics.median(t[0] / t[1] for t in together)
        print(
            f"  (c) together metrics on {on:10.1f}  off {off:10.1f}  round trips/s  "
            f"median of the rounds' ratios on/off {ratio:.3f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_gen":
        _, _, test, port, seconds, *pid = sys.argv
        if test == "together":
            port_on, port_off = port.split(",")
            print(json.dumps(gen_alternating(int(port_on), int(port_off), float(seconds))))
        elif test == "pingpong":  # (echo.py's load: it also reads the server's CPU)
            print(json.dumps(gen_pingpong(int(port), int(pid[0]), float(seconds))))
        else:
            print(json.dumps(gen_churn(int(port), float(seconds))))
    else:
        main()
