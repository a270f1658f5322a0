"""Benchmark one chat room split over two processes on one Redis, against one process.

100 clients in a room; 10 of them each send 200 messages with at most 16 of
their own in flight (scripts/bench/chat.py's load, from its generator
scripts/bench/chat_load.c, or chat_load.py with ``--generator python``). Two
setups, interleaved round by round:

* one   — ``python -m trionet.serve chat``: all 100 clients on one process,
  no Redis (the baseline);
* redis — two ``python -m trionet.serve chat --redis URL`` processes on one
  redis-server, 50 clients (and 5 senders) on each: every message reaches the
  other process through the room's Redis Stream.

Measured per round: deliveries per second (messages received by all
clients, from the start to the last delivery), p50/p99 delivery latency, the
chat processes' CPU (all of them together, as a share of one core) and the
busiest load generator's. Passes when redis delivers at least 1.0x one's
deliveries/s with a p99 at most 1.5x one's (medians), every message delivered.
``--messages`` sets the length of a round: the default's rounds last a few
tenths of a second, so on a shared machine a longer run (``--messages 1000``)
gives steadier medians.

``--micro`` also measures, on the same Redis, what the design rests on:
appending 20,000 lines to a stream one ``XADD`` per line versus in batches
of 500 (the chat's flush: one Lua script call per batch), the same for
``PUBLISH``, and what a subscriber that reconnects misses with pub/sub
versus a stream reader that continues from its last id.

Usage: python scripts/bench/chat_redis.py [--rounds 5] [--messages 200] [--micro]
       [--before DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from chat import add_load_arguments, run_round  # noqa: E402  (scripts/bench/chat.py)
from harness import free_port, wait_listening  # noqa: E402


def start_redis(tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
    )
    wait_listening(port, proc)
    return proc, port


def start_chat(redis_port: int | None, tree: Path = ROOT) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "trionet.serve", "chat", "--log-level", "WARNING",
        "--rate", "1000000", "--burst", "1000000", "--port", str(port),
    ]  # fmt: skip
    if redis_port is not None:
        cmd += ["--redis", f"redis://127.0.0.1:{redis_port}"]
    # (python -m puts the working directory first on sys.path: ``tree``'s trionet runs)
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc, port


# -- micro: what the design rests on --------------------------------------------------


def micro(redis_port: int, lines: int = 20_000, batch: int = 500) -> None:
    import coredis
    import trio

    from trionet.services.chat.bus import _PUBLISH, _stream_entries

    text = "MSG alice " + "x" * 60

    async def measure() -> None:
        url = f"redis://127.0.0.1:{redis_port}"
        async with coredis.Redis.from_url(url, decode_responses=True) as r:
            publish = r.register_script(_PUBLISH)
            flushes = itertools.count(1)  # (the script skips a number it has seen)
            rows = []

            async def timed(name: str, work: object) -> None:
                await r.delete(["bench:s"])
                t0 = time.perf_counter()
                await work()  # type: ignore[operator]
                rows.append((name, lines / (time.perf_counter() - t0)))

            async def xadd_each() -> None:
                for _ in range(lines):
                    await r.xadd("bench:s", {"p": "P", "e": text})

            async def xadd_batched() -> None:
                for _ in range(0, lines, batch):
                    # (the chat's format: a batch in entries of at most 16 KB)
                    entries = _stream_entries([(f"- - {text}", "", "", "")] * batch)
                    args: list[str | int] = ["P", 10_000, next(flushes), len(entries), *entries]
                    await publish(keys=["bench:s", "bench:n", "bench:f"], args=args)

            async def publish_each() -> None:
                for _ in range(lines):
                    await r.publish("bench:c", text)

            async def publish_batched() -> None:
                for _ in range(0, lines, batch):
                    await r.publish("bench:c", "\n".join([text] * batch))

            # What a call costs this process in CPU, whatever Redis does: through
            # the client's command layer, and as a raw request on one connection.
            await r.xadd("bench:cpu", {"p": "P", "e": text})
            conn = await r.connection_pool.get_connection()
            calls = {
                "PING": lambda: r.ping(),
                "XREAD (no block)": lambda: r.xread({"bench:cpu": "0"}, count=10),
                "script call": lambda: publish(
                    keys=["bench:cpu", "bench:n", "bench:f"], args=["P", 10, next(flushes), 0]
                ),
                "raw XREAD (create_request)": lambda: conn.create_request(
                    b"XREAD", b"COUNT", 10, b"STREAMS", "bench:cpu", "0"
                ),
            }
            cpu_rows = []
            for name, call in calls.items():
                for _ in range(200):  # warm up
                    await call()
                n = 2000
                c0 = time.process_time()
                for _ in range(n):
                    await call()
                cpu_rows.append((name, (time.process_time() - c0) / n * 1e6))
            r.connection_pool.release(conn)

            await timed("XADD, one call per line", xadd_each)
            await timed(f"XADD, one script call per {batch} lines", xadd_batched)
            await timed("PUBLISH, one per line", publish_each)
            await timed(f"PUBLISH, one per {batch} lines", publish_batched)
            print(f"\nmicro: {lines} lines of {len(text)} bytes, one client, awaited in turn")
            for name, rate in rows:
                print(f"  {name:<40} {rate:>10.0f} lines/s")
            print(
                f"  batched / per line: XADD {rows[1][1] / rows[0][1]:.0f}x, "
                f"PUBLISH {rows[3][1] / rows[2][1]:.0f}x"
            )
            print("\ncoredis: this process's CPU per call, awaited in turn")
            for name, us in cpu_rows:
                print(f"  {name:<40} {us:>8.1f} µs")

            # A reader that was away for 1,000 messages: pub/sub has nothing
            # for it; a stream reader continues from its last id.
            last = await r.xadd("bench:s", {"e": "seen"})
            async with r.pubsub(channels=["bench:away"]) as sub:
                await sub.get_message(timeout=1)  # the subscription's confirmation
            for i in range(1000):  # ...while the subscriber is gone
                await r.publish("bench:away", str(i))
                await r.xadd("bench:s", {"e": str(i)})
            async with r.pubsub(channels=["bench:away"]) as sub:
                got = 0
                with trio.move_on_after(0.5):
                    while True:
                        msg = await sub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                        if msg is None:
                            break
                        got += 1
            missed = await r.xread({"bench:s": last}, count=5000)
            resumed = len(missed["bench:s"]) if missed else 0
            print(
                f"  away for 1000 messages: pub/sub delivered {got} after resubscribing; "
                f"XREAD from the last id returned {resumed}"
            )

    trio.run(measure)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    add_load_arguments(p)
    p.add_argument("--micro", action="store_true", help="also run the Redis micro-measurements")
    p.add_argument(
        "--before",
        metavar="DIR",
        type=Path,
        help="also run the redis setup from another checkout (e.g. a git worktree of an "
        "older commit), on its own Redis, interleaved with the others: before vs after",
    )
    a = p.parse_args()
    a.load_procs = 2
    with tempfile.TemporaryDirectory() as tmp:
        redis, redis_port = start_redis(tmp)
        setups = {
            "one": [start_chat(None)],
            "redis": [start_chat(redis_port), start_chat(redis_port)],
        }
        servers = [redis]
        if a.before is not None:
            other, other_port = start_redis(tmp)
            servers.append(other)
            setups["before"] = [start_chat(other_port, a.before), start_chat(other_port, a.before)]
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in setups}
        print(
            f"{a.clients} clients, {a.senders} senders x {a.messages} messages, window "
            f"{a.window}; one: 1 process; redis: 2 processes on one Redis; {os.cpu_count()} CPUs; "
            f"load generator: {a.generator}"
        )
        print(f"{'round':>5} {'setup':<6} {'deliv/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'srv CPU':>7} {'gen CPU':>7} {'srv wait':>8} {'idle':>5} "
              f"{'delivered':>15}")  # fmt: skip
        try:
            names = list(setups)
            for r in range(a.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    for proc, _ in setups[name]:
                        if proc.poll() is not None:
                            raise SystemExit(f"a {name} server died (exit {proc.returncode})")
                    res = run_round(
                        [(proc.pid, port) for proc, port in setups[name]],
                        a,
                        tmp,
                        settle=1.0,  # (across processes too)
                        after=0.5,  # the leaves are published too
                        local=True,
                    )
                    rows[name].append(res)
                    print(
                        f"{r + 1:>5} {name:<6} {res['rate']:>9.0f} {res['p50_ms']:>7.1f} "
                        f"{res['p99_ms']:>7.1f} {res['server_cpu']:>6.0%} {res['load_cpu']:>6.0%} "
                        f"{res['server_wait']:>7.0%} {res['idle']:>4.0%} "
                        f"{int(res['received']):>7}/{int(res['expected'])}",
                        flush=True,
                    )
            if a.micro:
                micro(redis_port)
        finally:
            for procs in setups.values():
                for proc, _ in procs:
                    proc.terminate()
                    proc.wait(10)
            for server in servers:
                server.terminate()
                server.wait(10)
    keys = (
        "rate", "p50_ms", "p99_ms", "other_p50_ms", "other_p99_ms", "server_cpu", "load_cpu",
        "server_wait", "idle", "own_p50_ms", "own_p99_ms",
    )  # fmt: skip
    med = {n: {k: statistics.median(row[k] for row in rows[n]) for k in keys} for n in rows}
    crossed = {"redis": " (across Redis)", "before": " (across Redis)"}
    print("\nmedian over rounds:")
    for n, m in med.items():
        print(
            f"  {n:<6} {m['rate']:>9.0f} deliveries/s  p50 {m['p50_ms']:.1f} ms  "
            f"p99 {m['p99_ms']:.1f} ms  servers' CPU {m['server_cpu']:.0%}  "
            f"busiest generator's CPU {m['load_cpu']:.0%}"
        )
        print(
            f"         servers ready but waiting for a core {m['server_wait']:.0%} of one; "
            f"machine idle {m['idle']:.0%}"
        )
        print(
            f"         messages from the other generator's clients{crossed.get(n, '')}: "
            f"p50 {m['other_p50_ms']:.1f} ms  p99 {m['other_p99_ms']:.1f} ms"
        )
        local = " (local)" if n in crossed else ""
        print(
            f"         messages from the same generator's clients{local}: "
            f"p50 {m['own_p50_ms']:.1f} ms  p99 {m['own_p99_ms']:.1f} ms"
        )
    if "before" in med:
        print(
            f"  redis / before: {med['redis']['rate'] / med['before']['rate']:.2f}x "
            f"deliveries/s, {med['redis']['p99_ms'] / med['before']['p99_ms']:.2f}x p99"
        )
    ratio = med["redis"]["rate"] / med["one"]["rate"]
    p99 = med["redis"]["p99_ms"] / med["one"]["p99_ms"]
    complete = all(row["received"] == row["expected"] for rs in rows.values() for row in rs)
    print(f"  redis / one: {ratio:.2f}x deliveries/s, {p99:.2f}x p99")
    print(f"  all delivered: {'yes' if complete else 'NO'}")
    ok = complete and ratio >= 1.0 and p99 <= 1.5
    print(f"  redis >= 1.0x one with p99 <= 1.5x: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
