#!/usr/bin/env python3
"""Benchmark trionet's calc against simpleeval.

  (a) The evaluator alone: evaluations per second over a fixed mix of
      distinct expressions (seeded, so every run uses the same mix; no
      expression repeats, so no cache could help), parsing included,
      beside ``simpleeval.SimpleEval`` on the same mix in the same process.
      Rounds alternate between the two; medians are compared. Both must
      agree on every value (checked before timing).
  (b) End to end: 50 connections over loopback, each pipelining its lines
      (sending while reading replies), against the trionet calc server and
      against a plain-Trio calc server built on simpleeval that answers each
      received chunk with one write. Each server runs in its own process;
      replies per second, rounds alternating, medians compared.
  (c) The hostile lines of tests/calc_hostile.py: CPU time per reply
      (informational; the bound is 5 ms, see also calc_flood.py).

simpleeval is a baseline only, never a dependency of trionet: it is
installed into this interpreter's environment on first use.

Usage: scripts/bench/calc.py [--rounds 5] [--mix 2000] [--conns 50] [--lines 400]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import math
import os
import random
import selectors
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from harness import ROOT, Server, median
from harness import rounds as harness_rounds  # (bench_* take a parameter "rounds")

sys.path.insert(0, str(ROOT))

FUNCS_1 = ["sqrt", "abs", "floor", "ceil", "sin", "cos", "log10", "exp", "round", "atan"]
# Not round(x, n): simpleeval would compute 10**n for round(int, -n) and
# hang on the mix's round(-419, ceil(58.5 - 39995836326661798 + ...)).
FUNCS_2 = ["max", "min", "hypot", "atan2"]


def ensure_simpleeval() -> Any:
    """Import simpleeval, installing it with pip on first use."""
    try:
        return importlib.import_module("simpleeval")
    except ImportError:
        print("note: installing simpleeval (benchmark baseline only)", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "simpleeval"])
        return importlib.import_module("simpleeval")


def simpleeval_for_calc(simpleeval: Any) -> Any:
    """A SimpleEval with calc's functions and constants."""
    functions = {name: getattr(math, name) for name in FUNCS_1 + FUNCS_2 if hasattr(math, name)}
    functions.update(abs=abs, round=round, max=max, min=min)
    names = {"pi": math.pi, "e": math.e, "tau": math.tau, "ans": 0}
    return simpleeval.SimpleEval(functions=functions, names=names)


# -- the mix ------------------------------------------------------------------------------------


def make_mix(count: int, seed: int = 2026) -> list[str]:
    """``count`` distinct expressions, the same for a given seed."""
    rng = random.Random(seed)

    def number() -> str:
        r = rng.random()
        if r < 0.45:
            return str(rng.randint(0, 1000))
        if r < 0.75:
            return f"{rng.uniform(0, 100):.{rng.randint(1, 4)}f}"
        if r < 0.85:
            return str(rng.randint(10**9, 10**18))
        return rng.choice(["pi", "e", "tau"])

    def expr(depth: int) -> str:
        r = rng.random()
        if depth > 3 or r < 0.25:
            return number()
        if r < 0.65:
            op = rng.choice(["+", "-", "*", "/", "//", "%", "+", "-", "*"])
            return f"{expr(depth + 1)} {op} {expr(depth + 1)}"
        if r < 0.7:  # simpleeval refuses bases over 4,000,000
            return f"{rng.randint(0, 999)} ** {rng.randint(0, 12)}"
        if r < 0.8:
            return f"({expr(depth + 1)})"
        if r < 0.85:
            return f"-{expr(depth + 1)}"
        if r < 0.95:
            return f"{rng.choice(FUNCS_1)}({expr(depth + 1)})"
        return f"{rng.choice(FUNCS_2)}({expr(depth + 1)}, {expr(depth + 1)})"

    seen: dict[str, None] = {}
    while len(seen) < count:
        seen[expr(0)] = None
    return list(seen)


def same_answer(line: str, se: Any) -> bool:
    """Whether calc and simpleeval agree on ``line``: the same value, or both an error."""
    from trionet.services.calc.evaluator import CalcError, evaluate

    try:
        ours: object = evaluate(line)
    except CalcError:
        ours = None
    try:
        theirs: object = se.eval(line)
    except Exception:  # any failure of the baseline is "an error"
        theirs = None
    if isinstance(theirs, float) and not math.isfinite(theirs):
        theirs = None  # simpleeval returns inf where calc says too-large
    return repr(ours) == repr(theirs)


def agreed_mix(count: int, se: Any) -> tuple[list[str], int]:
    """The first ``count`` expressions of the mix both evaluators agree on.

    The semantics differ at the edges (simpleeval refuses ``big ** n`` for a
    base over 4,000,000, returns ``inf`` where calc refuses), so those few
    are left out: both sides must do the same work. Returns the mix and how
    many candidates were left out.
    """
    candidates = make_mix(count * 2)
    kept = [line for line in candidates if same_answer(line, se)]
    if len(kept) < count:
        raise SystemExit(f"only {len(kept)} agreed expressions")
    return kept[:count], candidates.index(kept[count - 1]) + 1 - count


# -- (a) the evaluator alone --------------------------------------------------------------------


def bench_evaluator(mix: list[str], se: Any, rounds: int) -> tuple[float, float]:
    from trionet.services.calc.evaluator import CalcError, evaluate

    def ours() -> None:
        for line in mix:
            with contextlib.suppress(CalcError):
                evaluate(line)

    def theirs() -> None:
        for line in mix:
            with contextlib.suppress(Exception):  # errors count as evaluations
                se.eval(line)

    ours()  # warm up both
    theirs()
    rates: dict[str, list[float]] = {"ours": [], "theirs": []}
    for i in range(rounds):
        order = [("ours", ours), ("theirs", theirs)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            rates[name].append(len(mix) / (time.perf_counter() - start))
    return statistics.median(rates["ours"]), statistics.median(rates["theirs"])


# -- (b) end to end -----------------------------------------------------------------------------


def serve_trionet() -> None:
    import trio

    import trionet
    from trionet.services.calc.server import CalcService

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(trionet.serve, [CalcService(port=0)])
            port = addrs["calc"][0][1]
            print(f"trionet listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)

    trio.run(main)


def serve_baseline() -> None:
    """A plain Trio calc server on simpleeval: one write per received chunk."""
    import trio

    simpleeval = ensure_simpleeval()

    async def handle(stream: trio.SocketStream) -> None:
        se = simpleeval_for_calc(simpleeval)
        pending = b""
        try:
            while data := await stream.receive_some(65536):
                *lines, pending = (pending + data).split(b"\n")
                replies = []
                for raw in lines:
                    try:
                        value = se.eval(raw.decode().rstrip("\r"))
                    except ZeroDivisionError:
                        replies.append("ERR zero-division division by zero")
                    except Exception as exc:
                        replies.append(f"ERR syntax {type(exc).__name__}")
                    else:
                        se.names["ans"] = value
                        replies.append(f"OK {value!r}")
                if replies:
                    await stream.send_all(("\n".join(replies) + "\n").encode())
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, host="127.0.0.1"), handle, 0
            )
            port = listeners[0].socket.getsockname()[1]
            print(f"baseline listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)

    trio.run(main)


def load(port: int, payloads: list[bytes], expected: int, timeout: float = 120.0) -> float:
    """Pipeline every payload on its own connection; replies per second."""
    sel = selectors.DefaultSelector()
    socks = []
    for payload in payloads:
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, [memoryview(payload), 0])
    replies = 0
    start = time.perf_counter()
    deadline = start + timeout
    while replies < expected:
        if time.perf_counter() > deadline:
            raise SystemExit(f"load: only {replies}/{expected} replies in {timeout}s")
        for key, events in sel.select(timeout=1.0):
            s, state = key.fileobj, key.data
            assert isinstance(s, socket.socket)
            if events & selectors.EVENT_WRITE and state[0]:
                try:
                    sent = s.send(state[0][:65536])
                except BlockingIOError:
                    sent = 0
                state[0] = state[0][sent:]
                if not state[0]:
                    sel.modify(s, selectors.EVENT_READ, state)
            if events & selectors.EVENT_READ:
                try:
                    data = s.recv(262144)
                except BlockingIOError:
                    continue
                if not data:
                    raise SystemExit("load: server closed a connection")
                replies += data.count(b"\n")
    elapsed = time.perf_counter() - start
    for s in socks:
        sel.unregister(s)
        s.close()
    return expected / elapsed


def bench_end_to_end(mix: list[str], conns: int, lines: int, rounds: int) -> tuple[float, float]:
    payloads = []
    for c in range(conns):
        picked = [mix[(c * lines + i) % len(mix)] for i in range(lines)]
        payloads.append("".join(line + "\n" for line in picked).encode())
    rates: dict[str, list[float]] = {"trionet": [], "baseline": []}
    argv = [sys.executable, __file__, "--serve"]
    with Server([*argv, "trionet"]) as ours, Server([*argv, "baseline"]) as theirs:
        servers = {"trionet": ours, "baseline": theirs}
        for server in servers.values():  # warm up
            load(server.port, payloads[:5], 5 * lines)
        for _, order in harness_rounds(rounds, list(servers)):
            for kind in order:
                rates[kind].append(load(servers[kind].port, payloads, conns * lines))
    return median(rates["trionet"]), median(rates["baseline"])


# -- (c) hostile lines --------------------------------------------------------------------------


def bench_hostile() -> list[tuple[str, str, float, float]]:
    """The hostile corpus of tests/calc_hostile.py, as the server answers it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from calc_hostile import ANS, HOSTILE

    from trionet.services.calc.server import answer_line

    results = []
    for name, line in HOSTILE.items():
        times = []
        for _ in range(5):
            start = time.process_time()
            reply, _ = answer_line(line, ANS)
            times.append(time.process_time() - start)
        results.append((name, reply[:40], statistics.median(times) * 1000, max(times) * 1000))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side (default: 5)")
    parser.add_argument(
        "--mix", type=int, default=2000, help="expressions in the mix (default: 2000)"
    )
    parser.add_argument("--conns", type=int, default=50, help="connections in (b) (default: 50)")
    parser.add_argument(
        "--lines", type=int, default=400, help="lines per connection (default: 400)"
    )
    parser.add_argument("--serve", choices=["trionet", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "trionet":
        return serve_trionet()
    if args.serve == "baseline":
        return serve_baseline()

    from trionet.services.calc import evaluator as calc_eval

    simpleeval = ensure_simpleeval()
    se = simpleeval_for_calc(simpleeval)
    mix, left_out = agreed_mix(args.mix, se)
    fast = 0
    errors = 0
    for line in mix:
        try:
            calc_eval._evaluate_fast(line, calc_eval._Evaluation(0, calc_eval.WORK_BUDGET))
            fast += 1
        except calc_eval.CalcError:  # decided by the fast path too
            fast += 1
        except calc_eval._Fallback:
            pass
        try:
            calc_eval.evaluate(line)
        except calc_eval.CalcError:
            errors += 1
    version = importlib.metadata.version("simpleeval")
    print(
        f"python {sys.version.split()[0]}, simpleeval {version}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"mix: {len(mix)} distinct expressions, mean {sum(map(len, mix)) / len(mix):.1f} chars, "
        f"{errors} of them errors; {left_out} candidates left out where the evaluators "
        f"disagree; {fast} answered by calc's fast path"
    )

    ours, theirs = bench_evaluator(mix, se, args.rounds)
    print(
        f"(a) evaluator   trionet {ours:>9,.0f} evals/s   simpleeval {theirs:>9,.0f} evals/s"
        f"   ratio {ours / theirs:.2f}x  (target >= 1.5x)"
    )

    tri, base = bench_end_to_end(mix, args.conns, args.lines, args.rounds)
    print(
        f"(b) end to end  trionet {tri:>9,.0f} replies/s  plain Trio+simpleeval {base:>9,.0f}"
        f" replies/s   ratio {tri / base:.2f}x  (target >= 1.2x; {args.conns} connections x "
        f"{args.lines} pipelined lines)"
    )

    print("(c) hostile lines, CPU time per reply, median and worst of 5:")
    for name, reply, typical, worst in bench_hostile():
        print(f"    {name:<36} {typical:6.2f} ms {worst:6.2f} ms  {reply}")


if __name__ == "__main__":
    main()
