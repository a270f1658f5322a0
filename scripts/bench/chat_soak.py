"""Soak the chat room on Redis: many rounds in a row, watching the processes' memory.

Two ``python -m trionet.serve chat --redis URL`` processes on one
redis-server, and ``--rounds`` runs of scripts/bench/chat_redis.py's load one
after the other: each round, 100 clients join (half on each process), 10 of
them send ``--messages`` messages each, and all leave. After every round it
prints the rate, the p99 and the resident memory (VmRSS) of both chat
processes and of Redis.

What it is for: a room that runs for months must not grow with the members
who came and went or the messages that passed. Passes when neither chat
process grew by more than ``--max-growth`` KiB over the second half of the
run (the first half lets the allocator and the room's buffers reach their
working size) and every message was delivered.

Usage: python scripts/bench/chat_soak.py [--rounds 40] [--messages 1000] [--max-growth 2048]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chat import add_load_arguments, run_round  # noqa: E402  (scripts/bench/chat.py)
from chat_redis import start_chat, start_redis  # noqa: E402
from harness import status_kib  # noqa: E402


def soak_parser(doc: str | None, rounds: int, max_growth: int) -> argparse.ArgumentParser:
    """The soaks' common options: ``--rounds`` and ``--max-growth`` (check with
    :func:`check_rounds` once parsed)."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=rounds, help="rounds (default: %(default)s)")
    p.add_argument(
        "--max-growth",
        type=int,
        default=max_growth,
        metavar="KIB",
        help="most a chat process may grow over the second half, in KiB (default: %(default)s)",
    )
    return p


def check_rounds(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Two rounds at least: the second half must have a start."""
    if a.rounds < 2:
        p.error("--rounds must be at least 2")


def main() -> int:
    p = soak_parser(__doc__, rounds=40, max_growth=2048)
    add_load_arguments(p, messages=1000)
    a = p.parse_args()
    check_rounds(p, a)
    a.load_procs = 2
    complete = True
    history: list[list[int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis, redis_port = start_redis(tmp)
        chats = [start_chat(redis_port), start_chat(redis_port)]
        print(
            f"{a.clients} clients per round, {a.senders} senders x {a.messages} messages; "
            f"2 chat processes on one Redis; {os.cpu_count()} CPUs; load generator: {a.generator}"
        )
        print(f"{'round':>5} {'deliv/s':>9} {'p99 ms':>7} {'chat RSS KiB':>17} {'Redis KiB':>9}")
        try:
            for r in range(a.rounds):
                for proc, _ in chats:
                    if proc.poll() is not None:
                        raise SystemExit(f"a chat process died (exit {proc.returncode})")
                res = run_round(
                    [(proc.pid, port) for proc, port in chats], a, tmp, settle=1.0, after=0.5
                )
                complete &= res["received"] == res["expected"]
                rss = [status_kib(proc.pid) for proc, _ in chats]
                history.append(rss)
                print(
                    f"{r + 1:>5} {res['rate']:>9.0f} {res['p99_ms']:>7.1f} "
                    f"{rss[0]:>8} {rss[1]:>8} {status_kib(redis.pid):>9}",
                    flush=True,
                )
        finally:
            for proc, _ in chats:
                proc.terminate()
                proc.wait(10)
            redis.terminate()
            redis.wait(10)
    half = len(history) // 2
    growth = [history[-1][i] - history[half - 1][i] for i in range(2)]
    members = a.rounds * a.clients
    print(
        f"\n{members} members came and went, {a.rounds * a.senders * a.messages} messages; "
        f"growth over rounds {half}-{len(history)}: {growth[0]} and {growth[1]} KiB "
        f"(since round 1: {history[-1][0] - history[0][0]} and "
        f"{history[-1][1] - history[0][1]} KiB)"
    )
    print(f"  all delivered: {'yes' if complete else 'NO'}")
    ok = complete and max(growth) <= a.max_growth
    print(f"  no chat process grew by more than {a.max_growth} KiB: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
