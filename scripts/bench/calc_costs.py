#!/usr/bin/env python3
"""calc's cost model beside the clock: units charged against nanoseconds taken.

For each kind of operation the evaluator charges (``*``, ``//`` and ``%``,
``/``, ``**``, ``gcd``, ``factorial``, ``round(x, -n)``) and a range of
operand sizes up to the largest a value may have, prints the units the model
charges (trionet/services/calc/evaluator.py, "the cost model"), the CPU time
the operation takes here (the fastest of --repeat runs of a loop, from
``time.process_time_ns``) and their ratio. The model is meant to be at or
above the clock (ratio >= 1, one unit being about a nanosecond); refit it
where a row says otherwise.

Usage: .venv/bin/python scripts/bench/calc_costs.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trionet.services.calc import evaluator as ev  # noqa: E402

#: Operand sizes: from just past the evaluator's _CHEAP (300 bits) to the largest.
BITS = [400, 1000, 3000, 7000, 14000]


def clock_ns(op: Callable[[], object], repeat: int) -> float:
    """Fastest time per call of ``op`` over ``repeat`` loops, in ns of CPU
    (an operation that overflows a float counts too: the evaluator charges
    for it before it raises)."""
    loops = 20
    best = math.inf
    for _ in range(repeat):
        start = time.process_time_ns()
        for _ in range(loops):
            with contextlib.suppress(OverflowError):
                op()
        best = min(best, (time.process_time_ns() - start) / loops)
    return best


def number(bits: int, rng: random.Random) -> int:
    return rng.getrandbits(bits) | (1 << (bits - 1))


def rows(rng: random.Random) -> list[tuple[str, int, Callable[[], object]]]:
    """(label, units charged, the operation) for every case."""
    out: list[tuple[str, int, Callable[[], object]]] = []
    lim = ev._limbs
    for abits in BITS:
        a = number(abits, rng)
        for bbits in sorted({30, 1000, abits}):
            if bbits > abits:
                continue
            b = number(bbits, rng)
            la, lb = lim(a), lim(b)
            out.append((f"{abits}b * {bbits}b", ev.mul_cost(la, lb), lambda a=a, b=b: a * b))
            out.append((f"{abits}b // {bbits}b", ev.div_cost(la, lb), lambda a=a, b=b: a // b))
            out.append((f"{abits}b / {bbits}b", ev.true_div_cost(la, lb), lambda a=a, b=b: a / b))
            gcd = ev.gcd_cost(la, lb)
            out.append((f"gcd({abits}b, {bbits}b)", gcd, lambda a=a, b=b: math.gcd(a, b)))
    for base in [2, 3, 10, 12345, 2**61 + 1]:
        for rbits in [400, 2000, 7000, 14200]:
            exp = int(rbits / math.log2(base))
            limbs = int(exp * math.log2(base)) // 30 + 1
            out.append((f"{base}**{exp}", ev.pow_cost(limbs), lambda b=base, e=exp: b**e))
    for n in [30, 300, 1000, 1558]:
        out.append((f"factorial({n})", ev.factorial_cost(n), lambda n=n: math.factorial(n)))
    for xbits in [2000, 14000]:
        x = number(xbits, rng)
        for nd in [10, 100, 1000, 4300]:
            cost = ev.round_cost(lim(x), nd)
            out.append((f"round({xbits}b, -{nd})", cost, lambda x=x, nd=nd: round(x, -nd)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="loops timed per case")
    args = parser.parse_args()
    print(f"{'operation':<24} {'units':>9} {'ns':>9} {'units/ns':>9}")
    ratios = []
    for label, units, op in rows(random.Random(19)):
        ns = clock_ns(op, args.repeat)
        ratios.append(units / ns)
        flag = "  <- under the clock" if units < ns else ""
        print(f"{label:<24} {units:>9,} {ns:>9,.0f} {units / ns:>9.2f}{flag}")
    print(f"units/ns: lowest {min(ratios):.2f}, highest {max(ratios):.2f}")


if __name__ == "__main__":
    main()
