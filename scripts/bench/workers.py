#!/usr/bin/env python3
"""Benchmark ``--workers 2`` against ``--workers 1`` on this machine, in one run.

Two measurements, each alternating the two configurations round by round
(the order flips every round) so the machine's noise hits both alike:

  (a) calc: 50 connections pipelining expressions (a window of 64 lines in
      flight on each); replies per second.
  (b) echo: ping-pong, 100 connections with one 64-byte message in flight
      each; round trips per second.

Every server is ``python -m trionet.serve NAME --port 0 --workers N``, a fresh
process per measurement. The load generators are as lean as possible because
they share the machine's cores with the servers they measure: (a) is a
Python epoll loop that only counts reply lines, (b) is ``pingpong.c`` (built
here with the system's C compiler). Their own CPU share is printed: it is the
part of the machine the servers could not use.

Usage: python scripts/bench/workers.py [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
import time

from harness import Server, build_pingpong, describe_machine, median, rounds

EXPRESSIONS = [b"1 + 2 * 3", b"2 ** 64", b"sqrt(2) * ans", b"(7 - 3) / 4", b"max(1, 2, 3) // 2"]


def start(service: str, workers: int) -> Server:
    options = ["--workers", str(workers), "--idle-timeout", "0", "--max-per-address", "1000"]
    argv = [sys.executable, "-m", "trionet.serve", service, "--port", "0", *options]
    server = Server(argv, ready=lambda log: workers == 1 or log.count("worker ") >= workers)
    time.sleep(0.5 if workers > 1 else 0.1)  # let the workers reach accept()
    return server


def calc_load(port: int, conns: int, seconds: float, window: int = 64) -> dict[str, float]:
    """Run in its own process: replies/s and this process's CPU share."""
    lines = b"".join(e + b"\n" for e in EXPRESSIONS)
    per_batch = len(EXPRESSIONS)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    ep = select.epoll()
    outstanding = {}
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        outstanding[s.fileno()] = 0
    by_fd = {s.fileno(): s for s in socks}

    def top_up(fd: int) -> None:
        s = by_fd[fd]
        while outstanding[fd] + per_batch <= window:
            s.sendall(lines)  # tiny; the kernel takes it
            outstanding[fd] += per_batch

    for fd in by_fd:
        top_up(fd)
    count = 0
    warm_until = time.monotonic() + 0.5
    end = warm_until + seconds
    counting = False
    cpu0 = 0.0
    while (now := time.monotonic()) < end:
        if not counting and now >= warm_until:
            counting, count, cpu0 = True, 0, time.process_time()
        for fd, _ in ep.poll(0.2):
            data = by_fd[fd].recv(1 << 16)
            if not data:
                raise SystemExit("server closed a connection")
            n = data.count(b"\n")
            count += n
            outstanding[fd] -= n
            top_up(fd)
    return {"rate": count / seconds, "cpu": (time.process_time() - cpu0) / seconds}


def measure(service: str, workers: int, seconds: float, pingpong: str) -> tuple[float, float]:
    with start(service, workers) as server:
        if service == "calc":
            out = subprocess.run(
                [sys.executable, __file__, "_calc", str(server.port), "50", str(seconds)],
                capture_output=True,
                text=True,
                check=True,
                timeout=seconds + 60,
            )
            result = json.loads(out.stdout)
            return result["rate"], result["cpu"]
        out = subprocess.run(
            [pingpong, str(server.port), "100", "64", str(seconds), "0.5"],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
        rate, cpu = out.stdout.split()
        return float(rate), float(cpu) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    pingpong = build_pingpong()
    if pingpong is None:
        raise SystemExit("workers.py needs a C compiler (cc) for its echo load")
    print(describe_machine())
    for service, unit in (("calc", "replies/s"), ("echo", "round trips/s")):
        rates: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        for r, order in rounds(args.rounds, [1, 2]):
            for workers in order:
                rate, cpu = measure(service, workers, args.seconds, pingpong)
                rates[workers].append(rate)
                cpus[workers].append(cpu)
                print(
                    f"round {r + 1} {service} --workers {workers}: {rate:10.0f} {unit}"
                    f"  (load generator {cpu * 100:3.0f}% of a core)",
                    flush=True,
                )
        one, two = median(rates[1]), median(rates[2])
        print(
            f"{service}: median --workers 1 {one:.0f}, --workers 2 {two:.0f} {unit}; "
            f"ratio {two / one:.2f}x; load generator "
            f"{median(cpus[1]) * 100:.0f}% / {median(cpus[2]) * 100:.0f}% "
            "of a core",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_calc":
        port, conns, seconds = sys.argv[2:5]
        print(json.dumps(calc_load(int(port), int(conns), float(seconds))))
    else:
        main()
