"""Lines built to make calc work hard, for the CPU test and the benchmarks.

Shared by tests/services/calc/test_calc_cost.py (every line at most a few
milliseconds of CPU), scripts/bench/calc.py (c) and scripts/bench/calc_flood.py.
Each is at most 4,096 bytes, the default line limit, and is evaluated with
:data:`ANS` as ``ans`` (a 4,300-digit number: the worst a client can leave there).
"""

from __future__ import annotations

from typing import Final

LINE_LIMIT: Final = 4096
#: The ``ans`` the lines run with: as large as a value may be.
ANS: Final = 10**4299 + 12345


def fill(term: str, sep: str = "+", tail: str = "") -> str:
    """As many ``term``s joined by ``sep`` as fit in a line, then ``tail``."""
    count = (LINE_LIMIT - len(tail) + len(sep)) // (len(term) + len(sep))
    return sep.join([term] * count) + tail


#: name -> line. The first two are the outside probe's (issue 19).
HOSTILE: Final[dict[str, str]] = {
    "probe: 2**14000%(2**1000-1) x 195": "+".join(["2**14000%(2**1000-1)"] * 195),
    "probe: 2**14000%3 x 372": "+".join(["2**14000%3"] * 372),
    # Big powers, products and quotients.
    "9**9**9": "9**9**9",
    "9**4500 x 400": fill("9**4500"),
    "2**14000 filling a line": fill("2**14000"),
    "2**2000*2**2000 filling a line": fill("2**2000*2**2000"),
    "2**299*2**299 filling a line": fill("2**299*2**299"),
    "10**4299*9 filling a line": fill("10**4299*9"),
    "big // x 100": fill("(ans // 7**2000)"),
    "ans % 3 filling a line": fill("ans%3"),
    "ans % 2**1000 filling a line": fill("ans%(2**1000-1)"),
    "ans // ans filling a line": fill("ans//ans"),
    "ans / ans filling a line": fill("ans/ans"),
    "ans - ans filling a line": fill("ans-ans", sep="+"),
    "-ans filling a line": fill("-ans", sep="+-"),
    "min of ans filling a line": "min(" + fill("ans", sep=",", tail=")")[: LINE_LIMIT - 4],
    "round(ans, -1000) filling a line": fill("round(ans,-1000)"),
    "round(ans, -4300) filling a line": fill("round(ans,-4300)"),
    "factorial(1500) x 200": fill("factorial(1500)"),
    "factorial(300) filling a line": fill("factorial(300)"),
    "gcd of 4300-digit ans x 200": fill("gcd(ans, ans - 1)"),
    "gcd(ans, 2**1000) filling a line": fill("gcd(ans,2**1000+1)"),
    "0x literal of 14000 bits": "0x" + "f" * 3500,
    "4096-digit literal": "1" * 4096,
    # Deep and long: the parser's own work.
    "unary chain, 4095 '-'": "-" * 4095 + "1",
    "parens, 2000 deep": "(" * 2000 + "1" + ")" * 2000,
    "'**' chain, full line": "2**" * 1364 + "2",
    "'1+' chain, full line": fill("1"),
    "sin(1) filling a line": fill("sin(1)"),
    # A long line the fast path evaluates, then hands to the AST path.
    "'1+' chain, then 0x1": fill("1", tail="+0x1"),
    "'1+' chain, then sqrt": fill("1", tail="+sqrt"),
    "'1+' chain, then 1/0": fill("1", tail="+1/0"),
    "'1+' chain, then a syntax error": fill("1", tail=" 1"),
    "big work, then 0x1": fill("2**14000%3", tail="+0x1"),
    "big work, then sqrt": fill("2**14000%3", tail="+sqrt"),
}
