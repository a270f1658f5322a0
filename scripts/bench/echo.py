#!/usr/bin/env python3
"""Benchmark trionet's echo against the plain Trio tutorial echo server.

Both servers run in their own processes; one load generator process drives
whichever is measured. For (a) it is ``pingpong.c`` (built here with the
system's C compiler): a Python generator costs about as much per round trip
as the servers it measures, so on 2 cores it, not the server, set the rate
and squeezed every ratio towards 1.0 (42,510 vs 39,368 round trips/s, 1.08x,
with server CPU per round trip 1.37x apart). Its own CPU share is printed.
Without a C compiler (a) falls back to a Python epoll loop, and says so.
Rounds are interleaved (the order alternates each round) so machine noise
hits both sides alike, and medians plus the trionet/baseline ratio are
printed:

  (a) ping-pong: 100 connections, one 64-byte message in flight each;
      round trips per second (and the server's CPU time per round trip).
  (b) streaming: one connection sending continuously while reading the
      echo back; MB/s echoed.
  (c) idle: 5,000 connections, each after one round trip; the server's RSS
      growth per connection, in KiB.

Usage: scripts/bench/echo.py [--rounds 5] [--seconds 3] [--idle 5000] [--before TREE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time

from harness import (
    Server,
    add_before_argument,
    build_pingpong,
    cpu_seconds,
    describe_machine,
    median,
    raise_fd_limit,
    rounds,
    sides,
    start_pingpong,
    status_kib,
)

MESSAGE = b"m" * 64


# -- the baseline: Trio's tutorial echo server --------------------------------------------------


def baseline_server() -> None:
    import trio

    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, echo, 0)
            port = listeners[0].socket.getsockname()[1]
            print(f"baseline listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)

    trio.run(main)


# -- load generators (run in their own process) -------------------------------------------------


def gen_pingpong(port: int, pid: int, seconds: float, conns: int = 100) -> dict[str, float]:
    binary = build_pingpong()
    if binary is None:
        print("no C compiler: (a) uses the Python load generator", file=sys.stderr)
        return gen_pingpong_python(port, pid, seconds, conns)
    warmup = 0.5
    load = subprocess.Popen(
        [binary, str(port), str(conns), str(len(MESSAGE)), str(seconds), str(warmup)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(warmup)
    cpu = sum(cpu_seconds(pid))
    out, _ = load.communicate(timeout=seconds + 60)
    cpu = sum(cpu_seconds(pid)) - cpu
    if load.returncode != 0:
        raise SystemExit(f"pingpong failed with status {load.returncode}")
    rate, load_cpu = map(float, out.split())
    return {
        "value": rate,
        "cpu_us": cpu / max(rate * seconds, 1) * 1e6,
        "load_share": load_cpu / seconds,
    }


def gen_pingpong_python(port: int, pid: int, seconds: float, conns: int = 100) -> dict[str, float]:
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    ep, by_fd, pending = start_pingpong(socks, MESSAGE)
    count = 0
    warm_until = time.monotonic() + 0.5
    end = warm_until + seconds
    counting = False
    cpu = 0.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if not counting and now >= warm_until:
            counting, count, cpu = True, 0, sum(cpu_seconds(pid))
        for fd, _ in ep.poll(0.2):
            s = by_fd[fd]
            data = s.recv(4096)
            if not data:
                raise SystemExit("server closed")
            pending[fd] -= len(data)
            if pending[fd] == 0:
                count += 1
                s.send(MESSAGE)
                pending[fd] = len(MESSAGE)
    cpu = sum(cpu_seconds(pid)) - cpu
    for s in socks:
        s.close()
    # The server's CPU per round trip: this shared machine's noise moves it
    # far less than the rate.
    return {"value": count / seconds, "cpu_us": cpu / max(count, 1) * 1e6}


def gen_stream(port: int, seconds: float) -> dict[str, float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    chunk = os.urandom(256 * 1024)
    view = memoryview(chunk)
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
    received = 0
    offset = 0
    warm_until = time.monotonic() + 0.5
    end = warm_until + seconds
    counting = False
    while time.monotonic() < end:
        if not counting and time.monotonic() >= warm_until:
            counting, received = True, 0
        for _, ev in ep.poll(0.2):
            if ev & select.EPOLLIN:
                received += len(s.recv(1 << 20))
            if ev & select.EPOLLOUT:
                with contextlib.suppress(BlockingIOError):
                    offset = (offset + s.send(view[offset:])) % len(chunk)
    s.close()
    return {"value": received / seconds / 1e6}


def gen_idle(port: int, pid: int, conns: int) -> dict[str, float]:
    raise_fd_limit()
    before = status_kib(pid)
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"x")
        socks.append(s)
    # One round trip each: proves every connection was accepted and its
    # handler ran, then everything is idle.
    for s in socks:
        s.settimeout(10)
        if s.recv(1) != b"x":
            raise SystemExit("bad echo")
    time.sleep(0.5)
    after = status_kib(pid)
    for s in socks:
        s.close()
    return {"value": (after - before) / conns}


# -- orchestration ------------------------------------------------------------------------------


def start(kind: str, tree: str | None) -> Server:
    if kind == "baseline":
        argv = [sys.executable, __file__, "_baseline"]
    else:
        limits = ["--max-connections", "20000", "--max-per-address", "20000"]
        argv = [sys.executable, "-m", "trionet.serve", "echo", "--port", "0", *limits]
    return Server(argv, tree=tree if kind == "before" else None, preexec_fn=raise_fd_limit)


def measure(kind: str, test: str, seconds: float, idle: int, tree: str | None) -> dict[str, float]:
    with start(kind, tree) as server:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "_gen",
                test,
                *map(str, [server.port, seconds, server.pid, idle]),
            ],
            capture_output=True,
            text=True,
            timeout=seconds * 4 + 120,
            preexec_fn=raise_fd_limit,
            check=True,
        )
        return dict(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--idle", type=int, default=5000, help="connections for (c)")
    add_before_argument(parser)
    args = parser.parse_args()

    tests = {
        "a": ("pingpong", "round trips/s", "higher"),
        "b": ("stream", "MB/s", "higher"),
        "c": ("idle", "KiB RSS per idle connection", "lower"),
    }
    kinds = sides(args)
    results: dict[tuple[str, str], list[float]] = {}
    for r, order in rounds(args.rounds, kinds):
        for key, (test, unit, _) in tests.items():
            for kind in order:
                result = measure(kind, test, args.seconds, args.idle, args.before)
                value = result["value"]
                results.setdefault((key, kind), []).append(value)
                if "cpu_us" in result:
                    results.setdefault(("cpu", kind), []).append(result["cpu_us"])
                if "load_share" in result:
                    results.setdefault(("load", kind), []).append(result["load_share"])
                print(f"round {r + 1} ({key}) {test:8} {kind:8} {value:12.1f} {unit}", flush=True)

    print(f"\nmedians over {args.rounds} interleaved rounds ({describe_machine()}):")
    for key, (test, unit, better) in tests.items():
        t = median(results[key, "trionet"])
        b = median(results[key, "baseline"])
        print(
            f"  ({key}) {test:8} trionet {t:10.1f}  baseline {b:10.1f}  {unit:28} "
            f"ratio trionet/baseline {t / b:.2f} ({better} is better)"
        )
        if "before" in kinds:
            was = median(results[key, "before"])
            print(f"  ({key}) {test:8} before  {was:10.1f}  ratio trionet/before {t / was:.2f}")
        if key == "a":
            cpu = {kind: median(results["cpu", kind]) for kind in kinds}
            print(
                "      server CPU per round trip: "
                + ", ".join(f"{k} {v:.1f} us" for k, v in cpu.items())
            )
            if ("load", "trionet") in results:
                share = {kind: median(results["load", kind]) for kind in kinds}
                print(
                    "      load generator's share of a core: "
                    + ", ".join(f"{k} {v:.0%}" for k, v in share.items())
                )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline":
        baseline_server()
    elif len(sys.argv) > 1 and sys.argv[1] == "_gen":
        _, _, test, port, seconds, pid, idle = sys.argv
        if test == "pingpong":
            result = gen_pingpong(int(port), int(pid), float(seconds))
        elif test == "stream":
            result = gen_stream(int(port), float(seconds))
        else:
            result = gen_idle(int(port), int(pid), int(idle))
        print(json.dumps(result))
    else:
        main()
