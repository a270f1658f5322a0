"""What a calc line may cost: CPU per hostile line, and costly lines taking turns.

Issue 19: ``"+".join(["2**14000%(2**1000-1)"]*195)`` cost 40 ms of CPU and
eight connections pipelining it held up everyone else. Every line, hostile
or not, must now cost at most 5 ms of CPU (scripts/bench/calc_flood.py and
scripts/bench/calc_costs.py print the figures; this test allows twice that,
or more when the machine is slower at the moment: see the test).
"""

from __future__ import annotations

import gc
import time

import pytest
import trio
from calc_hostile import ANS, HOSTILE, LINE_LIMIT

from trionet.services.calc import server as calc_server
from trionet.services.calc.evaluator import WORK_BUDGET, CalcError, evaluate
from trionet.services.calc.server import COSTLY, CalcService, answer_line
from trionet.testing import open_memory_server

#: The bound issue 19 sets, in seconds of CPU per line (on a quiet machine).
TARGET = 0.005
RUNS = 7
#: A harmless line of the longest length: parsing and walking it is the fixed
#: cost any line may pay, and its CPU time says how fast this machine is now.
CALIBRATION = "+".join(["1"] * (LINE_LIMIT // 2 - 1))


def cpu_seconds(line: str, against: str = CALIBRATION) -> tuple[float, float]:
    """The fastest of RUNS evaluations of ``line`` and of ``against``, taken in
    turn, as the server answers them.

    The fastest, because noise only ever adds; in turn, so that both see the
    machine as it is at that moment (a busy machine makes CPU time grow too:
    shared caches, a core shared with another process); with the collector
    off, as timeit does, so a collection triggered by earlier tests is not
    charged here.
    """
    best = best_against = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(RUNS):
            start = time.process_time()
            answer_line(against, ANS)
            middle = time.process_time()
            answer_line(line, ANS)
            end = time.process_time()
            best_against = min(best_against, middle - start)
            best = min(best, end - middle)
    finally:
        if enabled:
            gc.enable()
    return best, best_against


#: Measurements of a line before it is judged too costly: noise only ever
#: adds, so one within the bound settles it.
ATTEMPTS = 3


@pytest.mark.parametrize("name", list(HOSTILE))
def test_no_line_costs_more_than_a_few_ms_of_cpu(name: str) -> None:
    """At most twice the target, or eight times the harmless longest line
    measured in turn with it when the machine is slower now.

    On a quiet machine the worst hostile line costs 3.4 times that line (so
    the bound is 10 ms); beside ``burn 2`` and a parallel test run, lines that
    do big-number work slowed more than the harmless one: 5.6 times it was
    seen. The probe's lines cost 20-40 ms here before the cost model, 18 to
    36 times the harmless line: far over either bound, on any machine.
    """
    line = HOSTILE[name]
    assert len(line.encode()) <= LINE_LIMIT
    for _ in range(ATTEMPTS):
        spent, calibration = cpu_seconds(line)
        allowed = max(2 * TARGET, 8 * calibration)
        if spent < allowed:
            return
    pytest.fail(f"{name}: {spent * 1000:.2f} ms of CPU (allowed {allowed * 1000:.2f})")


def test_the_probes_lines_are_refused_before_the_work_is_done() -> None:
    for name in ["probe: 2**14000%(2**1000-1) x 195", "probe: 2**14000%3 x 372"]:
        assert answer_line(HOSTILE[name], 0)[0] == "ERR too-large expression needs too much work"
    # A few of those operations are still fine: the budget is about volume.
    assert answer_line("+".join(["2**14000%(2**1000-1)"] * 3), 0)[0].startswith("OK ")
    assert answer_line("2**14000%3", 0) == ("OK 1", 1)


def test_charges_come_before_the_operation() -> None:
    # With no budget at all, the first big operation is refused: nothing
    # big is computed and then charged.
    for line in ["ans * 7", "ans // 7", "ans / 7", "ans % 3", "2**14000", "factorial(500)"]:
        with pytest.raises(CalcError, match="too much work"):
            evaluate(line, ANS, budget=0)
    # Small numbers cost nothing.
    assert evaluate("2**100 * 3 // 7 % 5 + factorial(20)", budget=0) == 2**100 * 3 // 7 % 5 + (
        2432902008176640000
    )


def test_the_work_of_a_fast_path_that_gives_up_counts_once() -> None:
    # The fast path does the big work, then falls back on the hex literal;
    # the AST path continues on what is left of the same budget.
    term = "2**14000%3"
    fits = WORK_BUDGET // 40_000  # pow_cost of 2**14000 is about 40,000 units
    line = "+".join([term] * (fits // 2 + 1)) + "+0x1"
    assert answer_line(line, 0)[0] == "ERR too-large expression needs too much work"
    assert answer_line("+".join([term] * (fits // 3)) + "+0x1", 0)[0].startswith("OK ")


# -- costly lines take turns ---------------------------------------------------------


async def test_costly_lines_take_turns(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """Six clients pipelining costly lines, then one cheap line from a seventh:
    the cheap line waits for a costly line or a few, not for each flooder's
    run budget (without the lane: about five lines from each)."""
    evaluated: list[str] = []

    def answer(line: str, ans: float) -> tuple[str, float]:
        evaluated.append(line)
        if line.startswith("costly"):
            # Real time, as the server measures it: the clock is mocked,
            # perf_counter is not.
            end = time.perf_counter() + 2 * COSTLY
            while time.perf_counter() < end:
                pass
        return "OK 0", ans

    monkeypatch.setattr(calc_server, "answer_line", answer)
    async with open_memory_server(CalcService()) as srv:
        flooders = [await srv.connect() for _ in range(6)]
        quiet = await srv.connect()
        for i, flooder in enumerate(flooders):
            await flooder.send(f"costly {i}\n".encode() * 60)
        # Every flooder is past its first costly line (the one that shows
        # it is costly). A checkpoint, not a sleep: the mocked clock stands
        # still while the server computes.
        while any(evaluated.count(f"costly {i}") < 2 for i in range(6)):
            await trio.lowlevel.checkpoint()
        sent_at = len(evaluated)
        await quiet.send_line("cheap")
        await quiet.expect("OK 0")
        position = evaluated.index("cheap")
        before = evaluated[:position]
        assert all(before.count(f"costly {i}") < 60 for i in range(6)), "the flood was over"
        waited_for = sum(line.startswith("costly") for line in evaluated[sent_at:position])
        assert waited_for <= 6, f"the cheap line waited for {waited_for} costly lines"
