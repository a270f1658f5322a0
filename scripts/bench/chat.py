"""Benchmark the chat service against two baselines, interleaved.

100 clients in a room; 10 of them each send 200 messages with at most 16 of
their own in flight. Measured per round and server: deliveries per second
(messages received by all clients, over the time from the start to the last
delivery) and p50/p99 delivery latency (the send time travels in the text).

Servers, each in its own process, all speaking the same protocol subset:

* trionet — ``python -m trionet.serve chat`` (flood control raised for the run):
  the room as a shared log, a cursor per member,
* fanout  — scripts/bench/chat_fanout.py: trionet's chat before the log, a
  queue per member holding its own copy of every line (same flood settings),
* naive   — scripts/bench/chat_naive.py: Trio, one ``send_all`` per message,
* twisted — scripts/bench/chat_twisted.py: ``LineReceiver.sendLine`` per recipient
  (Twisted is installed on demand into this interpreter's environment).

Passes when trionet delivers at least as fast as fanout and as twisted
(medians), with every message delivered; p50/p99 are reported beside.

The load comes from ``--load-procs`` processes of scripts/bench/chat_load.c
(``--generator c``, the default where there is a C compiler) or of its Python
original chat_load.py (``--generator python``): the same load and protocol,
but the Python one spends most of a core per million deliveries, on a machine
whose two cores it shares with the servers. To show the generator is not the
bottleneck, each row reports the server's CPU use during the run (from /proc)
next to the busiest generator's: a server near 100% of one core while the
generators have CPU to spare is server-bound.

Usage: python scripts/bench/chat.py [--rounds 5] [--servers trionet fanout twisted] [--before TREE]
"""

from __future__ import annotations

import argparse
import array
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from harness import (
    HERE,
    ROOT,
    add_before_argument,
    build_c,
    cpu_seconds,
    free_port,
    machine_idle,
    median,
    rounds,
    run_delay,
    wait_listening,
)


def ensure_twisted() -> None:
    if importlib.util.find_spec("twisted") is None:
        print("note: installing Twisted for the baseline (benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "twisted"], check=True)


def start_servers(
    names: list[str], before: str | None = None
) -> dict[str, tuple[subprocess.Popen[bytes], int]]:
    """Start ``names``; ``before``: also trionet from that checkout, as "before"."""
    servers = {}
    commands = {
        "trionet": [
            sys.executable, "-m", "trionet.serve", "chat", "--log-level", "WARNING",
            "--rate", "1000000", "--burst", "1000000", "--port",
        ],
        "fanout": [sys.executable, str(HERE / "chat_fanout.py")],
        "naive": [sys.executable, str(HERE / "chat_naive.py")],
        "twisted": [sys.executable, str(HERE / "chat_twisted.py")],
        "twisted-nd": [sys.executable, str(HERE / "chat_twisted.py"), "--nodelay"],
    }  # fmt: skip
    commands["before"] = commands["trionet"]
    for name in [*names, "before"] if before else names:
        cmd = commands[name]
        port = free_port()
        # (python -m puts the working directory first on sys.path: that tree's trionet runs)
        cwd = before if name == "before" else ROOT
        proc = subprocess.Popen([*cmd, str(port)], cwd=cwd, stdout=subprocess.DEVNULL)
        servers[name] = (proc, port)
    for proc, port in servers.values():
        wait_listening(port, proc)
    return servers


def load_command(generator: str) -> list[str]:
    """How to start one load process: ``generator`` is "c" or "python" (see the docstring)."""
    if generator == "c":
        binary = build_c("chat_load")
        if binary is not None:
            return [binary]
        print("note: no C compiler: the Python load generator is used", flush=True)
    return [sys.executable, str(HERE / "chat_load.py")]


def add_load_arguments(parser: argparse.ArgumentParser, *, messages: int = 200) -> None:
    """The load's options, shared by the chat benchmarks (``run_round`` reads them),
    the generator's included."""
    parser.add_argument(
        "--clients", type=int, default=100, help="clients in the room (default: %(default)s)"
    )
    parser.add_argument(
        "--senders", type=int, default=10, help="clients that send (default: %(default)s)"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=messages,
        help="messages per sender (default: %(default)s)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=16,
        help="own messages in flight per sender (default: %(default)s)",
    )
    add_generator_argument(parser)


def add_generator_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--generator {c,python}`` (read by :func:`run_round` from the parsed args)."""
    parser.add_argument(
        "--generator",
        choices=["c", "python"],
        default="c",
        help="the load generator: chat_load.c (built with cc; Python if there is no "
        "compiler) or chat_load.py (default: %(default)s)",
    )


def run_round(
    servers: list[tuple[int, int]],
    a: argparse.Namespace,
    tmp: str,
    *,
    settle: float = 0.5,
    after: float = 0.3,
    local: bool = False,
) -> dict[str, float]:
    """One run of the load against ``servers`` (pid, port): load process k talks to
    server k (modulo their number). ``settle``: seconds for the JOINs to spread
    before the clock starts; ``after``: for the leaves, before the next run;
    ``local``: also the latencies of the messages from each generator's own
    clients (``own_p50_ms``, ``own_p99_ms``: a second or so per million)."""
    per = a.clients // a.load_procs
    senders_per = a.senders // a.load_procs
    procs = []
    for k in range(a.load_procs):
        first = k * per
        count = per if k < a.load_procs - 1 else a.clients - first
        senders = [first + j for j in range(senders_per)]
        if k == a.load_procs - 1:
            senders = [first + j for j in range(a.senders - senders_per * k)]
        port = servers[k % len(servers)][1]
        cmd = [
            *load_command(a.generator), "--port", str(port),
            "--first", str(first), "--count", str(count), "--all-senders", str(a.senders),
            "--messages", str(a.messages), "--window", str(a.window),
            "--latencies", f"{tmp}/lat{k}", "--senders", *map(str, senders),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise SystemExit("a load process failed to join")
    time.sleep(settle)  # let the JOIN announcements settle
    cpu0 = sum(sum(cpu_seconds(pid)) for pid, _ in servers)
    wait0 = sum(run_delay(pid) for pid, _ in servers)
    idle0, total0 = machine_idle()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        assert p.stdout is not None
        results.append(json.loads(p.stdout.readline()))
        p.wait()
    cpu = sum(sum(cpu_seconds(pid)) for pid, _ in servers) - cpu0
    wait = sum(run_delay(pid) for pid, _ in servers) - wait0
    idle1, total1 = machine_idle()
    lat, other = array.array("q"), array.array("q")
    for k in range(a.load_procs):
        with open(f"{tmp}/lat{k}", "rb") as f:
            lat.frombytes(f.read())
        with open(f"{tmp}/lat{k}.other", "rb") as f:
            other.frombytes(f.read())
    received = sum(r["received"] for r in results)
    expected = sum(r["expected"] for r in results)
    duration = (max(r["last_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0.0] * 99
    # Messages from the other generator's clients: on two servers, the ones that crossed.
    qo = statistics.quantiles(other, n=100) if len(other) > 1 else [0.0] * 99
    # ...and the others, from clients of the same generator: on two servers, local.
    qs = [0.0] * 99
    if local:
        own = collections.Counter(lat)
        own.subtract(other)
        own_lat = list(own.elements())
        qs = statistics.quantiles(own_lat, n=100) if len(own_lat) > 1 else qs
    time.sleep(after)  # let the disconnects settle before the next run
    return {
        "received": received,
        "expected": expected,
        "duration": duration,
        "rate": received / duration,
        "p50_ms": q[49] / 1e6,
        "p99_ms": q[98] / 1e6,
        "other_p50_ms": qo[49] / 1e6,
        "other_p99_ms": qo[98] / 1e6,
        **({"own_p50_ms": qs[49] / 1e6, "own_p99_ms": qs[98] / 1e6} if local else {}),
        "server_cpu": cpu / duration,
        "load_cpu": max(r["cpu_s"] for r in results) / duration,
        # Servers' time ready to run but without a core (all their threads, as a
        # share of one core), and the machine's idle share over the same span.
        "server_wait": wait / duration,
        "idle": (idle1 - idle0) / max(total1 - total0, 1e-9),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="rounds, interleaved (default: %(default)s)"
    )
    add_load_arguments(p)
    p.add_argument(
        "--load-procs", type=int, default=2, help="load generator processes (default: %(default)s)"
    )
    p.add_argument(
        "--servers",
        nargs="+",
        choices=["trionet", "fanout", "naive", "twisted", "twisted-nd"],
        default=["trionet", "fanout", "twisted"],
        help="servers to compare (default: %(default)s)",
    )
    add_before_argument(p)
    a = p.parse_args()
    if any(n.startswith("twisted") for n in a.servers):
        ensure_twisted()
    servers = start_servers(a.servers, a.before)
    names = list(servers)
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    print(
        f"{a.clients} clients, {a.senders} senders x {a.messages} messages, window {a.window}, "
        f"{a.load_procs} load processes ({a.generator}), {os.cpu_count()} CPUs"
    )
    print(f"{'round':>5} {'server':<10} {'deliv/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'srv CPU':>7} {'gen CPU':>7} {'delivered':>15}")  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r, order in rounds(a.rounds, names):
                for name in order:
                    proc, port = servers[name]
                    if proc.poll() is not None:
                        raise SystemExit(f"the {name} server died (exit {proc.returncode})")
                    res = run_round([(proc.pid, port)], a, tmp)
                    rows[name].append(res)
                    print(
                        f"{r + 1:>5} {name:<10} {res['rate']:>9.0f} {res['p50_ms']:>7.1f} "
                        f"{res['p99_ms']:>7.1f} {res['server_cpu']:>6.0%} {res['load_cpu']:>6.0%} "
                        f"{int(res['received']):>7}/{int(res['expected'])}",
                        flush=True,
                    )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(10)
    print("\nmedian over rounds:")
    med = {
        n: {
            k: median([row[k] for row in rows[n]])
            for k in ("rate", "p50_ms", "p99_ms", "server_cpu")
        }
        for n in names
    }
    for n in names:
        m = med[n]
        # CPU per delivery: what a change to the server's work per message shows best.
        print(
            f"  {n:<10} {m['rate']:>9.0f} deliveries/s  "
            f"p50 {m['p50_ms']:.1f} ms  p99 {m['p99_ms']:.1f} ms  server CPU {m['server_cpu']:.0%}"
            f" ({m['server_cpu'] / m['rate'] * 1e6:.3f} core-seconds per million deliveries)"
        )
    if "before" in med and "trionet" in med:
        t, b = med["trionet"], med["before"]
        print(
            f"  trionet / before: {t['rate'] / b['rate']:.2f}x deliveries/s, CPU per delivery "
            f"{(t['server_cpu'] / t['rate']) / (b['server_cpu'] / b['rate']):.2f}x"
        )
    complete = all(row["received"] == row["expected"] for rs in rows.values() for row in rs)
    t = med.get("trionet")
    ok = complete
    for base in ("fanout", "twisted", "naive"):
        if t is not None and base in med:
            b = med[base]
            ratio = t["rate"] / b["rate"]
            print(
                f"  trionet / {base}: {ratio:.2f}x deliveries/s; "
                f"p99 {t['p99_ms']:.1f} vs {b['p99_ms']:.1f} ms"
            )
            if base != "naive":
                ok = ok and ratio >= 1.0
    print(f"  all delivered: {'yes' if complete else 'NO'}")
    if t is not None and {"fanout", "twisted"} & set(med):
        print(f"  trionet >= 1.0x fanout and twisted deliveries/s: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
