#!/usr/bin/env python3
"""Benchmark: games/s of the trionet guess server against a plain-Trio baseline.

Run from the repository root with the project's venv::

    python scripts/bench/guess.py [--players 100] [--seconds 1] [--rounds 11] [--pin]

Three kinds of process, all on 127.0.0.1:

* the trionet server: ``python -m trionet.serve guess --port 0``;
* the baseline: a guess server written the obvious way on plain Trio
  (``trio.serve_tcp`` and one loop per connection), in this file
  (``baseline-server``);
* the load generator (``loadgen``), a separate process: ``--players``
  concurrent players, each playing by bisection with the same
  :class:`~trionet.services.guess.rules.Bisector` the ``--auto`` client
  uses, one guess in flight per player, for ``--seconds`` after a short
  warm-up. It is a plain ``epoll`` loop rather than Trio so that the
  load generator costs as little CPU as possible and the servers, not the
  generator, are what is measured.

Both servers run for the whole benchmark; the load is pointed at one, then
the other, alternating which goes first each round, and the medians of the
per-round games/s are printed with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, Server, cpu_seconds, median, rounds

# Run from a checkout: import this tree's trionet even if it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trionet.services.guess.rules import (
    Bisector,
    NewRound,
    optimal_worst_case,
    parse_reply,
)

# -- the baseline: a plain-Trio guess server, written the obvious way -------------


def baseline_server(port: int, lo: int, hi: int) -> None:
    """Serve the guess protocol (no STATS, no limits) with plain Trio."""
    import trio

    rng = random.Random(0)

    def reply_to(text: str, state: dict[str, int]) -> str:
        text = text.strip()
        if not text:
            return ""
        if text.upper() == "QUIT":
            return "BYE\n"
        if text.upper() == "GIVEUP":
            answer = state["secret"]
            state["secret"], state["attempts"] = rng.randint(lo, hi), 0
            return f"ANSWER {answer}\nNEW {lo} {hi}\n"
        if not re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII):
            return "ERR not-a-number\n"
        guess = int(text)
        if not lo <= guess <= hi:
            return f"ERR out-of-range {lo} {hi}\n"
        state["attempts"] += 1
        if guess < state["secret"]:
            return "HIGHER\n"
        if guess > state["secret"]:
            return "LOWER\n"
        attempts = state["attempts"]
        state["secret"], state["attempts"] = rng.randint(lo, hi), 0
        return f"CORRECT {attempts}\nNEW {lo} {hi}\n"

    async def handler(stream: trio.SocketStream) -> None:
        state = {"secret": rng.randint(lo, hi), "attempts": 0}
        try:
            await stream.send_all(f"NEW {lo} {hi}\n".encode())
            buffer = b""
            async for chunk in stream:
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    reply = reply_to(raw.decode(errors="replace"), state)
                    if reply:
                        await stream.send_all(reply.encode())
                    if reply == "BYE\n":
                        return
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        bound = listeners[0].socket.getsockname()[1]
        print(f"baseline listening on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    trio.run(main)


def trionet_server(port: int, lo: int, hi: int) -> None:
    """Serve the trionet guess service with the runner, as ``trionet.serve`` does.

    Started through :class:`trionet.Server` directly rather than the CLI so
    that a sibling service module being edited cannot break the benchmark;
    the code serving the connections is the same. SIGINT shuts down
    gracefully.
    """
    import trio

    from trionet import Server
    from trionet.services.guess.server import GuessService

    service = GuessService(port=port, idle_timeout=0, lo=lo, hi=hi, rng=random.Random(0))
    server = Server([service])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            bound = addresses["guess"][0][1]
            print(f"trionet listening on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    server.shutdown()
                    break

    trio.run(main)


# -- the load generator -----------------------------------------------------------


class Player:
    """One bisecting player on a non-blocking socket.

    The common replies are recognised as bytes and the rest goes through
    :func:`~trionet.services.guess.rules.parse_reply`: the load generator
    must cost less CPU per game than the servers it measures, or games/s
    would measure the generator.
    """

    __slots__ = ("buffer", "n", "player", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.player = Bisector(0, 0)
        #: Candidates at the start of the current round.
        self.n = 0

    def on_line(self, line: bytes) -> tuple[bytes | None, int | None]:
        """Handle one server line: (the guess to send, guesses of a won round)."""
        if line == b"HIGHER" or line == b"LOWER":
            self.player.hint(line == b"HIGHER")
            return b"%d\n" % self.player.next_guess(), None
        if line.startswith(b"CORRECT "):
            return None, int(line[8:])
        reply = parse_reply(line.decode())
        if isinstance(reply, NewRound):
            self.player = Bisector(reply.lo, reply.hi)
            self.n = reply.hi - reply.lo + 1
            return b"%d\n" % self.player.next_guess(), None
        raise RuntimeError(f"unexpected reply {line!r}")


def loadgen(port: int, players: int, seconds: float, warmup: float) -> dict[str, float]:
    """Run ``players`` bisecting players against ``port``; games/s over ``seconds``."""
    poller = select.epoll()
    by_fd: dict[int, Player] = {}
    socks = []
    for _ in range(players):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        by_fd[sock.fileno()] = Player(sock)
        poller.register(sock.fileno(), select.EPOLLIN)
        socks.append(sock)
    start = time.perf_counter()
    cpu_start = time.process_time()
    measure_from = start + warmup
    stop = measure_from + seconds
    games = 0
    total_games = 0  # warm-up included, to relate to the server's CPU time
    over_bound = 0
    while (now := time.perf_counter()) < stop:
        measuring = now >= measure_from
        for fd, _ in poller.poll(min(0.5, stop - now)):
            p = by_fd[fd]
            data = p.sock.recv(65536)
            if not data:
                raise RuntimeError("the server closed a connection")
            *lines, p.buffer = (p.buffer + data).split(b"\n")
            out = []
            for line in lines:
                guess, won_in = p.on_line(line)
                if guess is not None:
                    out.append(guess)
                if won_in is not None:
                    # A sanity check on the player, not on speed.
                    over_bound += won_in > optimal_worst_case(p.n)
                    total_games += 1
                    games += measuring
            if out:
                p.sock.sendall(b"".join(out))
    elapsed = time.perf_counter() - measure_from
    for sock in socks:
        sock.close()
    return {
        "games": games,
        "seconds": elapsed,
        "games_per_s": games / elapsed,
        "total_games": total_games,
        "loadgen_cpu_us_per_game": 1e6 * (time.process_time() - cpu_start) / max(1, total_games),
        "over_bound": over_bound,
    }


# -- the driver -------------------------------------------------------------------


def _start_server(role: str, lo: int, hi: int, pin: bool) -> Server:
    argv = [sys.executable, __file__, role, "--range", str(lo), str(hi)]
    return Server(argv + (["--pin"] if pin else []))


def _run_load(port: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "loadgen", "--port", str(port)]
    cmd += ["--players", str(args.players), "--seconds", str(args.seconds)]
    cmd += ["--warmup", str(args.warmup)] + (["--pin"] if args.pin else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=args.seconds + 60, check=False)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed:\n{out.stderr.decode()}")
    result = json.loads(out.stdout)
    if result["over_bound"]:
        raise SystemExit(f"a player needed more guesses than bisection allows: {result}")
    return dict(result)


def drive(args: argparse.Namespace) -> None:
    """Start both servers, alternate the load between them, print medians and ratio."""
    lo, hi = args.range
    print(
        f"guess benchmark: {args.players} concurrent bisecting players, range {lo}..{hi}, "
        f"{args.seconds}s per measurement, {args.rounds} interleaved rounds, "
        f"{os.cpu_count()} CPUs, {'' if args.pin else 'not '}pinned"
    )
    servers = {
        "trionet": _start_server("trionet-server", lo, hi, args.pin),
        "baseline": _start_server("baseline-server", lo, hi, args.pin),
    }
    results: dict[str, list[float]] = {"trionet": [], "baseline": []}
    cpu: dict[str, list[float]] = {"trionet": [], "baseline": []}
    try:
        for i, order in rounds(args.rounds, list(servers)):
            for name in order:
                before = sum(cpu_seconds(servers[name].pid))
                result = _run_load(servers[name].port, args)
                # The server's CPU time over the whole load run (warm-up and
                # connection setup included) per game played in it: a
                # secondary figure that other processes on the machine
                # disturb far less than games/s.
                used = sum(cpu_seconds(servers[name].pid)) - before
                rate = result["games_per_s"]
                results[name].append(rate)
                cpu[name].append(1e6 * used / max(1, result["total_games"]))
                print(
                    f"round {i + 1:2d} {name:<8} {rate:9.1f} games/s  "
                    f"server CPU {cpu[name][-1]:4.0f} us/game  "
                    f"(load generator {result['loadgen_cpu_us_per_game']:4.0f} us/game)",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop(signal.SIGINT, timeout=10)
    med = {name: median(rates) for name, rates in results.items()}
    mcpu = {name: median(v) for name, v in cpu.items()}
    print(
        f"median trionet  {med['trionet']:9.1f} games/s  server CPU {mcpu['trionet']:.0f} us/game"
    )
    print(
        f"median baseline {med['baseline']:9.1f} games/s  server CPU {mcpu['baseline']:.0f} us/game"
        "  (plain Trio, serve_tcp)"
    )
    print(f"ratio trionet/baseline {med['trionet'] / med['baseline']:.2f}x")
    paired = [t / b for t, b in zip(results["trionet"], results["baseline"], strict=True)]
    print(f"median of per-round ratios {median(paired):.2f}x")
    print(
        f"server CPU per game, baseline/trionet {mcpu['baseline'] / mcpu['trionet']:.2f}x "
        "(higher: trionet does a game with less CPU)"
    )


def _pin(role: str, enabled: bool) -> None:
    """Keep the server and the load generator off each other's CPU (Linux only).

    With 2 CPUs and the two processes free to migrate, the scheduler now and
    then stacks both on one CPU for a while, which shows up as noise in
    games/s; pinning removes that source of noise for both servers alike.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled or len(cpus) < 2 or role == "drive":
        return
    os.sched_setaffinity(0, {cpus[1] if role == "loadgen" else cpus[0]})


def main() -> None:
    """Command line: the driver by default; ``baseline-server`` and ``loadgen`` are its helpers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "role",
        nargs="?",
        default="drive",
        choices=["drive", "trionet-server", "baseline-server", "loadgen"],
    )
    parser.add_argument(
        "--players", type=int, default=100, help="concurrent players (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="measured seconds per run (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.3, help="unmeasured seconds first (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=11,
        help="interleaved rounds, at least 5; many short rounds sample the same "
        "machine conditions for both servers (default: %(default)s)",
    )
    parser.add_argument(
        "--range",
        type=int,
        nargs=2,
        default=[1, 100],
        metavar=("LO", "HI"),
        help="secret range (default: 1 100)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="loadgen: server port; baseline-server: port to bind (default: 0)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the servers to the first CPU and the load generator to the second; "
        "steadier on an otherwise idle machine, worse on a busy one (default: off)",
    )
    args = parser.parse_args()
    _pin(args.role, args.pin)
    if args.role == "trionet-server":
        trionet_server(args.port, *args.range)
    elif args.role == "baseline-server":
        baseline_server(args.port, *args.range)
    elif args.role == "loadgen":
        print(json.dumps(loadgen(args.port, args.players, args.seconds, args.warmup)))
    else:
        if args.rounds < 5:
            parser.error("--rounds must be at least 5")
        drive(args)


if __name__ == "__main__":
    main()
