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

Usage: scripts/bench/metrics.py [--rounds 5] [--seconds 3] [--tests ab]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
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
    ServerProcess,
    gen_pingpong,
    raise_fd_limit,
)


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


class Server(ServerProcess):
    """trionet's echo, with ``--metrics-port 0`` when ``metrics``."""

    def __init__(self, metrics: bool) -> None:
        super().__init__("trionet", ("--metrics-port", "0") if metrics else ())
        self.metrics_port = self.wait_port("metrics") if metrics else None


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
            [sys.executable, __file__, "_gen", test, str(server.port), str(seconds)],
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--tests", default="ab", help="which of (a) and (b) to run")
    args = parser.parse_args()

    tests = {"a": ("pingpong", "round trips/s"), "b": ("churn", "connections/s")}
    tests = {key: test for key, test in tests.items() if key in args.tests}
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_gen":
        _, _, test, port, seconds = sys.argv
        gen = gen_pingpong if test == "pingpong" else gen_churn
        print(json.dumps(gen(int(port), float(seconds))))
    else:
        main()
