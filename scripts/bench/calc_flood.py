#!/usr/bin/env python3
"""A flood of the costliest calc lines against another client's round trips.

Issue 19's probe: eight connections pipelining 40 costly lines each raised
another client's round trip in the same server process from 1.4 ms to 900 ms.
This script:

  (1) measures the CPU time (``time.process_time``) of every line of the
      hostile corpus (tests/calc_hostile.py), evaluated as the server does
      it (``answer_line``, with the largest ``ans``): median of --repeat
      runs per line; prints the costliest and the median over the corpus;
  (2) starts a trionet calc server in its own process and measures a
      client's round trip for a short line (``1+1``, one at a time, a few
      ms apart) with nothing else running: the baseline;
  (3) starts --conns flooding connections (in a process of their own),
      each sending batches of --batch lines taken in turn from the --worst
      costliest lines of (1), reading the replies and sending the next
      batch, and measures the same round trip again for --seconds; against
      that server, then against one whose costly lines never take turns
      (calc's costly lane off: the comparison), --rounds times, alternating.

Printed: p50, p99 and the worst round trip with and without the flood, and
the flood's replies per second. Target (issue 19): p99 under 50 ms.

Usage: .venv/bin/python scripts/bench/calc_flood.py [--seconds 8] [--rounds 2]
       [--conns 8] [--batch 40] [--worst 6] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import os
import selectors
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness import Server  # noqa: E402  (scripts/bench/harness.py)

#: Sets ``ans`` to the largest value, before each batch (some lines use it).
SET_ANS = "10**4299+12345"


def corpus_costs(repeat: int) -> list[tuple[float, str, str]]:
    """``(median CPU ms, name, line)`` per hostile line, costliest first."""
    from calc_hostile import ANS, HOSTILE

    from trionet.services.calc.server import answer_line

    costs = []
    for name, line in HOSTILE.items():
        times = []
        for _ in range(repeat):
            start = time.process_time()
            answer_line(line, ANS)
            times.append(time.process_time() - start)
        costs.append((statistics.median(times) * 1000, name, line))
    return sorted(costs, reverse=True)


def flood(port: int, conns: int, batch: int, lines: list[str]) -> None:
    """Until stdin closes: every connection sends a batch, reads its replies, repeats."""
    sel = selectors.DefaultSelector()
    payloads = []
    for i in range(conns):
        chosen = [lines[(i + k) % len(lines)] for k in range(batch)]
        payloads.append(("\n".join([SET_ANS, *chosen]) + "\n").encode())
    for payload in payloads:
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE, [payload, memoryview(payload), 0])
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    replies = 0
    start = time.perf_counter()
    while True:
        for key, events in sel.select():
            if key.data is None:  # stdin closed: report and stop
                elapsed = time.perf_counter() - start
                print(f"{replies / elapsed:.1f}", flush=True)
                return
            s, state = key.fileobj, key.data
            assert isinstance(s, socket.socket)
            if events & selectors.EVENT_WRITE:
                try:
                    sent = s.send(state[1][:65536])
                except BlockingIOError:
                    sent = 0
                state[1] = state[1][sent:]
                if not state[1]:
                    state[2] = batch + 1
                    sel.modify(s, selectors.EVENT_READ, state)
            elif events & selectors.EVENT_READ:
                data = s.recv(1 << 20)
                if not data:
                    raise SystemExit("flood: the server closed a connection")
                got = data.count(b"\n")
                replies += got
                state[2] -= got
                if state[2] <= 0:
                    state[1] = memoryview(state[0])
                    sel.modify(s, selectors.EVENT_WRITE, state)


def round_trips(port: int, seconds: float) -> list[float]:
    """Round trips of ``1+1`` in ms, one at a time, 5 ms apart, for ``seconds``."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(30)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            s.sendall(b"1+1\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise SystemExit("probe: the server closed the connection")
                reply += chunk
            times.append((time.perf_counter() - start) * 1000)
            if reply != b"OK 2\n":
                raise SystemExit(f"probe: unexpected reply {reply!r}")
            time.sleep(0.005)
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered):7.2f} ms   p99 {p99:7.2f} ms   "
        f"worst {ordered[-1]:7.2f} ms   ({len(ordered)} round trips)"
    )


def start_server(lane: bool) -> Server:
    """A calc server process; its port is read from its ``listening on`` line."""
    return Server([sys.executable, __file__, "--serve"] + ([] if lane else ["--no-lane"]))


def flooded(port: int, names: list[str], args: argparse.Namespace) -> tuple[list[float], str]:
    """Round trips while --conns connections flood ``port`` with the lines ``names``."""
    argv = [sys.executable, __file__, "--flood", str(port), "--conns", str(args.conns)]
    argv += ["--batch", str(args.batch), "--lines", *names]
    flooder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert flooder.stdin is not None and flooder.stdout is not None
    time.sleep(1.0)  # every connection is busy
    under = round_trips(port, args.seconds)
    flooder.stdin.close()
    rate = flooder.stdout.readline().strip()
    flooder.wait(30)
    return under, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per phase")
    parser.add_argument("--rounds", type=int, default=2, help="flood phases per server")
    parser.add_argument("--conns", type=int, default=8, help="flooding connections")
    parser.add_argument("--batch", type=int, default=40, help="lines per pipelined batch")
    parser.add_argument("--worst", type=int, default=6, help="costliest lines flooded")
    parser.add_argument("--repeat", type=int, default=5, help="runs per line in (1)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-lane", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flood", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--lines", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.no_lane:  # the comparison: costly lines never wait for their turn
            from trionet.services.calc import server as calc_server

            calc_server.COSTLY = math.inf  # type: ignore[misc]
        from calc import serve_trionet  # this folder's calc benchmark

        return serve_trionet()
    if args.flood is not None:
        from calc_hostile import HOSTILE

        return flood(args.flood, args.conns, args.batch, [HOSTILE[n] for n in args.lines])

    costs = corpus_costs(args.repeat)
    names = [name for _, name, _ in costs[: args.worst]]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"(1) CPU per line, median of {args.repeat} runs ({len(costs)} hostile lines):")
    for ms, name, _ in costs[: args.worst]:
        print(f"    {ms:6.2f} ms  {name}")
    print(
        f"    costliest {costs[0][0]:.2f} ms, median over the corpus "
        f"{statistics.median(c for c, _, _ in costs):.2f} ms"
    )
    servers = {"lane": start_server(True), "no lane": start_server(False)}
    try:
        port = servers["lane"].port
        print(f"(2) no flood:             {summary(round_trips(port, args.seconds / 2))}")
        for i in range(args.rounds):
            for label, server in servers.items():
                under, rate = flooded(server.port, names, args)
                print(
                    f"(3) flood, {label + ',':<8} round {i + 1}: {summary(under)}   "
                    f"flood {rate} replies/s"
                )
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
