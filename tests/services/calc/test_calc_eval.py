"""The calculator's evaluator on its own: semantics, sandbox, bounds, and a
differential test against Python's own ``eval`` (the oracle, tests only)."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trionet.services.calc import evaluator as calc_eval
from trionet.services.calc.evaluator import (
    FACTORIAL_MAX,
    INT_LIMIT,
    MAX_DEPTH,
    MAX_DIGITS,
    SAFE_BITS,
    CalcError,
    Number,
    evaluate,
    format_value,
)


def reply(expr: str, ans: Number = 0) -> str:
    """What the service would answer: ``OK value`` or ``ERR code``."""
    try:
        return "OK " + format_value(evaluate(expr, ans))
    except CalcError as exc:
        assert exc.text and "\n" not in exc.text
        return f"ERR {exc.code}"


# -- the examples of PROTOCOL.md and Python's semantics ---------------------------

SEMANTICS = [
    ("7 / 2", "OK 3.5"),
    ("4 / 2", "OK 2.0"),
    ("0.1 + 0.2", "OK 0.30000000000000004"),
    ("2 ** 64", "OK 18446744073709551616"),
    ("2**3**2", "OK 512"),
    ("-2**2", "OK -4"),
    ("(-2)**2", "OK 4"),
    ("2**-1", "OK 0.5"),
    ("2**-2**2", "OK 0.0625"),
    ("-7 // 2", "OK -4"),
    ("-7 % 3", "OK 2"),
    ("7 % -3", "OK -2"),
    ("-7.5 // 2", "OK -4.0"),
    ("-7.5 % 2", "OK 0.5"),
    ("1 - 2 - 3", "OK -4"),
    ("2 * 3 + 4 * 5", "OK 26"),
    ("100 / 10 / 5", "OK 2.0"),
    ("42", "OK 42"),
    ("1_000", "OK 1000"),
    ("0x1F", "OK 31"),
    ("0b101", "OK 5"),
    ("0o17", "OK 15"),
    ("3.5", "OK 3.5"),
    (".5", "OK 0.5"),
    ("1e-3", "OK 0.001"),
    ("1e16", "OK 1e+16"),
    ("-0.0", "OK -0.0"),
    ("+-+3", "OK -3"),
    ("1 + 2.0", "OK 3.0"),
    ("10**20 * 1.0", "OK 1e+20"),
    ("pi", "OK 3.141592653589793"),
    ("e", "OK 2.718281828459045"),
    ("tau", "OK 6.283185307179586"),
    ("abs(-3)", "OK 3"),
    ("round(2.5)", "OK 2"),
    ("round(3.5)", "OK 4"),
    ("round(1234.5678, 2)", "OK 1234.57"),
    ("round(15, -1)", "OK 20"),
    ("round(25, -1)", "OK 20"),
    ("round(7, -10**9)", "OK 0"),
    ("min(3, 1.5, 2)", "OK 1.5"),
    ("max(1, 1.0)", "OK 1"),
    ("sqrt(16)", "OK 4.0"),
    ("exp(0)", "OK 1.0"),
    ("log(e)", "OK 1.0"),
    ("log(8, 2)", "OK 3.0"),
    ("log2(1024)", "OK 10.0"),
    ("log10(1000)", "OK 3.0"),
    ("log10(10**4000)", "OK 4000.0"),
    ("sin(0)", "OK 0.0"),
    ("cos(0)", "OK 1.0"),
    ("tan(0)", "OK 0.0"),
    ("asin(1)", "OK 1.5707963267948966"),
    ("acos(1)", "OK 0.0"),
    ("atan(0)", "OK 0.0"),
    ("atan2(1, 1)", "OK 0.7853981633974483"),
    ("hypot(3, 4)", "OK 5.0"),
    ("hypot()", "OK 0.0"),
    ("floor(-2.5)", "OK -3"),
    ("ceil(-2.5)", "OK -2"),
    ("floor(1e20)", "OK 100000000000000000000"),
    ("factorial(20)", "OK 2432902008176640000"),
    ("gcd(12, 18, 27)", "OK 3"),
    ("gcd()", "OK 0"),
    ("  1 + 1\t", "OK 2"),
    ("1 # a comment", "OK 1"),
    ("((((1))))", "OK 1"),
]


@pytest.mark.parametrize(("expr", "want"), SEMANTICS)
def test_semantics(expr: str, want: str) -> None:
    assert reply(expr) == want


@pytest.mark.parametrize(
    ("expr", "code"),
    [
        ("", "syntax"),
        ("   ", "syntax"),
        ("1 +", "syntax"),
        ("(1", "syntax"),
        ("1 2", "syntax"),
        ("1;2", "syntax"),
        ("01", "syntax"),
        ("1__0", "syntax"),
        ("1if 1else 2", "syntax"),
        ("a\x00b", "syntax"),
        ("1 + \u202e2", "syntax"),
        ("1/0", "zero-division"),
        ("1 % 0", "zero-division"),
        ("1.0 // 0", "zero-division"),
        ("0 ** -1", "zero-division"),
        ("0.0 ** -1.5", "zero-division"),
        ("log(2, 1)", "zero-division"),
        ("sqrt(-1)", "domain"),
        ("log(0)", "domain"),
        ("log(-1, 10)", "domain"),
        ("asin(2)", "domain"),
        ("factorial(2.5)", "domain"),
        ("factorial(2.0)", "domain"),
        ("factorial(-1)", "domain"),
        ("gcd(1.5, 3)", "domain"),
        ("round(1.5, 1.0)", "domain"),
        ("(-8) ** (1/3)", "domain"),
        ("sqrt(1, 2)", "domain"),
        ("sqrt()", "domain"),
        ("min(3)", "domain"),
        ("atan2(1)", "domain"),
        ("1e999", "too-large"),
        ("1e308 * 10", "too-large"),
        ("1e308 + 1e308", "too-large"),
        ("2.0 ** 10000", "too-large"),
        ("exp(1000)", "too-large"),
        ("hypot(1.5e308, 1.5e308)", "too-large"),
        ("sqrt(10**400)", "too-large"),
        ("(10**400) ** -1", "too-large"),
        ("10**400 / 1", "too-large"),
        ("10**400 + 0.5", "too-large"),
        ("1e308 // 1e-308", "too-large"),
    ],
)
def test_errors(expr: str, code: str) -> None:
    assert reply(expr) == f"ERR {code}"


def test_the_tokenizers_warnings_become_syntax_errors(recwarn: pytest.WarningsRecorder) -> None:
    assert reply("1if 1else 2") == "ERR syntax"  # SyntaxWarning: invalid decimal literal
    assert reply("'\\d'") == "ERR syntax"  # DeprecationWarning: invalid escape sequence
    assert len(recwarn) == 0  # nothing left for the server's stderr


def test_other_warnings_during_a_parse_stay_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parser may run the garbage collector, and a finalizer may warn (an
    # unclosed socket's ResourceWarning). Made an error, it would escape the
    # finalizer as "Exception ignored in: <socket...>" (it failed CI so).
    real_parse = calc_eval.ast.parse

    def parse_that_collects_garbage(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("unclosed <socket.socket fd=19>", ResourceWarning, stacklevel=1)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(calc_eval.ast, "parse", parse_that_collects_garbage)
    with pytest.warns(ResourceWarning, match="unclosed"):
        assert calc_eval.evaluate_ast("6 * 7") == 42  # the path that parses


def test_ans_is_the_given_value() -> None:
    assert reply("ans", 0) == "OK 0"
    assert reply("ans * 2", 21) == "OK 42"
    assert reply("ans + 1", 0.5) == "OK 1.5"


def test_error_classes_carry_protocol_codes() -> None:
    codes = {
        cls.code
        for cls in (
            calc_eval.CalcSyntaxError,
            calc_eval.NotAllowed,
            calc_eval.ZeroDivision,
            calc_eval.TooLarge,
            calc_eval.DomainError,
        )
    }
    assert codes == {"syntax", "not-allowed", "zero-division", "too-large", "domain"}


def test_error_text_never_echoes_control_characters() -> None:
    with pytest.raises(CalcError) as info:
        evaluate("x" * 500)
    assert len(info.value.text) < 80 and info.value.text.isprintable()


# -- the bounds: digit limit, factorial limit ------------------------------------


def test_digit_limit_is_pythons_and_is_exact() -> None:
    assert sys.int_info.default_max_str_digits == MAX_DIGITS
    assert reply("10**4299 * 9 + (10**4299 - 1)") == "OK " + "9" * 4300
    assert reply("10**4300") == "ERR too-large"
    assert reply("-(10**4299 * 10)") == "ERR too-large"
    assert reply("2**14284").startswith("OK ")
    assert (1 << SAFE_BITS) < INT_LIMIT <= (1 << (SAFE_BITS + 1))
    assert reply("9**4500") == "OK " + str(9**4500)  # 4295 digits
    assert reply("9**4507") == "ERR too-large"  # 4301 digits


def test_factorial_limit() -> None:
    assert math.factorial(FACTORIAL_MAX) < INT_LIMIT <= math.factorial(FACTORIAL_MAX + 1)
    assert reply(f"factorial({FACTORIAL_MAX})") == "OK " + str(math.factorial(FACTORIAL_MAX))
    assert reply(f"factorial({FACTORIAL_MAX + 1})") == "ERR too-large"


def test_work_budget_stops_a_line_of_big_operations() -> None:
    one = "(ans // 7 ** 2000)"
    # A few big divisions are fine, a line full of them is refused.
    assert reply(" + ".join([one] * 3), ans=10**4299).startswith("OK ")
    assert reply(" + ".join([one] * 200), ans=10**4299) == "ERR too-large"
    assert reply("+".join(["gcd(ans, ans - 1)"] * 200), ans=10**4299) == "ERR too-large"
    assert reply("+".join(["factorial(1500)"] * 200)) == "ERR too-large"
    assert reply("+".join(["9**4000"] * 300)) == "ERR too-large"


# -- the sandbox ---------------------------------------------------------------

ESCAPES = [
    "__import__('os').system('true')",
    "__builtins__",
    "().__class__.__bases__[0].__subclasses__()",
    "(1).__class__",
    "(1).real",
    "1 .real",
    "(1.5).hex()",
    "pi.__class__",
    "sqrt.__self__",
    "abs.__call__(1)",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in (1, 2)]",
    "{x for x in (1,)}",
    "{x: 1 for x in (1,)}",
    "sum(x for x in (1, 2))",
    "f'{1}'",
    "f'{__import__(\"os\")}'",
    "'{}'.format(1)",
    "'a'",
    "b'a'",
    "'%s' % 1",
    "open('/etc/passwd')",
    "eval('1')",
    "exec('1')",
    "getattr(1, 'real')",
    "globals()",
    "vars()",
    "x",
    "True",
    "None",
    "...",
    "1j",
    "(x := 1)",
    "1 if 1 else 2",
    "1 < 2",
    "1 and 2",
    "not 1",
    "~1",
    "1 << 2",
    "1 | 2",
    "1 & 2",
    "1 ^ 2",
    "[1]",
    "(1, 2)",
    "{1: 2}",
    "[1][0]",
    "sqrt",
    "pi(2)",
    "ans()",
    "round(2.5, ndigits=1)",
    "max(*[1, 2])",
    "sin(**{})",
    "math.sqrt(4)",
    "await 1",
    "(yield)",
    "sqrt(__import__('os'))",
    "1 + __import__",
]


@pytest.mark.parametrize("expr", ESCAPES)
def test_sandbox_escapes_are_not_allowed(expr: str) -> None:
    assert reply(expr) == "ERR not-allowed"


def test_disallowed_construct_wins_over_later_arithmetic_errors() -> None:
    # Python's order: the name is looked up before the call's arguments run.
    assert reply("nope(1/0)") == "ERR not-allowed"
    assert reply("1/0 + nope") == "ERR zero-division"


# -- denial of service: all refused (a hang here would stall the suite) -----------

DOS = [
    "9**9**9",
    "10**10**10",
    "2**10**100",
    "(-3)**10**50",
    "factorial(10**6)",
    "factorial(10**100)",
    "10**4000 * 10**4000",
    "2**14285",
    "(10**4000) ** 2",
    "1e308 * 1e308",
    "1.5 ** 10**6",
    "-" * 4094 + "1",
    "+" * 4094 + "1",
    "-(" * 1000 + "1" + ")" * 1000,
    "(" * 300 + "1" + ")" * 300,
    "2**" * 1364 + "2",
    "sqrt(" * 500 + "1" + ")" * 500,
    "0x" + "f" * 4094,
    "1" * 4400,
]


@pytest.mark.parametrize("expr", DOS, ids=lambda e: e[:24])
def test_dos_refused(expr: str) -> None:
    assert reply(expr) == "ERR too-large"


def test_nesting_bound() -> None:
    assert reply("-" * MAX_DEPTH + "1") == "OK 1"
    assert reply("-" * (MAX_DEPTH + 1) + "1") == "ERR too-large"
    # Left-associative chains are long, not deep: a full line of them is fine.
    assert reply("+".join(["1"] * 2048)) == "OK 2048"
    assert reply("-".join(["1"] * 2048)) == "OK -2046"


def test_a_full_line_of_unary_minus_is_refused_before_python_recurses() -> None:
    # Python's parser would raise RecursionError; it must be a clean error.
    assert reply("-" * 4095 + "1") == "ERR too-large"


# -- differential testing against Python's eval ----------------------------------

_FUNCS_1 = ["abs", "sqrt", "exp", "log", "log2", "log10", "sin", "cos", "tan"]
_FUNCS_1 += ["asin", "acos", "atan", "floor", "ceil", "factorial", "round"]
_FUNCS_2 = ["round", "min", "max", "log", "atan2", "hypot", "gcd"]

ORACLE_NAMES: dict[str, Any] = {
    name: getattr(math, name)
    for name in _FUNCS_1 + _FUNCS_2 + ["pi", "e", "tau"]
    if hasattr(math, name)
}


def _oracle_round(x: Any, *ndigits: Any) -> Any:
    """Python's round, except that round(int, -n) for a huge n is not computed.

    Python computes 10**n there (forever, for n = 10**20); for |x| < 10**4300
    and n > 4400 the answer is 0 whatever x is, which is what
    round(x, -4400) computes at once.
    """
    if ndigits and type(x) is int and type(ndigits[0]) is int and ndigits[0] < -4400:
        return round(x, -4400)
    return round(x, *ndigits)


ORACLE_NAMES.update(abs=abs, round=_oracle_round, min=min, max=max)


def _int_literal(n: int) -> str:
    return st.sampled_from([str(n), hex(n), bin(n), oct(n), f"{n:_}"])  # type: ignore[return-value]


def literals() -> st.SearchStrategy[str]:
    ints = st.integers(0, 10**30).flatmap(_int_literal)  # type: ignore[arg-type]
    small = st.integers(0, 12).map(str)
    floats = st.floats(0, 1e30, allow_nan=False, allow_infinity=False).map(repr)
    tiny = st.floats(1e-300, 1e-5).map(repr)
    names = st.sampled_from(["pi", "e", "tau", "ans"])
    return st.one_of(small, small, ints, floats, tiny, names)


def expressions() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        ops = st.sampled_from(["+", "-", "*", "/", "//", "%", "**"])
        binary = st.tuples(inner, ops, inner).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
        unary = st.tuples(st.sampled_from(["-", "+"]), inner).map("".join)
        paren = inner.map(lambda s: f"({s})")
        call1 = st.tuples(st.sampled_from(_FUNCS_1), inner).map(lambda t: f"{t[0]}({t[1]})")
        call2 = st.tuples(st.sampled_from(_FUNCS_2), inner, inner).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"
        )
        return st.one_of(binary, binary, unary, paren, call1, call2)

    return st.recursive(literals(), extend, max_leaves=12)


def oracle(expr: str, ans: Number) -> str:
    """Python's own answer, classified like the service's."""
    try:
        value = eval(expr, {"__builtins__": {}}, {**ORACLE_NAMES, "ans": ans})
    except ZeroDivisionError:
        return "ERR zero-division"
    except OverflowError:
        return "ERR too-large"
    except (ValueError, TypeError):
        return "ERR domain"
    if isinstance(value, complex):
        return "ERR domain"
    if isinstance(value, float) and not math.isfinite(value):
        return "ERR too-large"
    if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        return "ERR too-large"
    return "OK " + repr(value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=expressions(), ans=st.sampled_from([0, 7, -3, 2.5, 10**20]))
@example(expr="round(7, -ans)", ans=10**20)
@example(expr="-2**-2 // 3 % -0.5", ans=0)
def test_differential_against_python_eval(expr: str, ans: Number) -> None:
    ours = reply(expr, ans)
    if ours == "ERR too-large":
        # Refused before computing: Python might take forever, do not ask it.
        return
    assert ours == oracle(expr, ans), expr


# -- the fast path agrees with the AST path (the reference) -----------------------


def reply_ast(expr: str, ans: Number = 0) -> str:
    try:
        return "OK " + format_value(calc_eval.evaluate_ast(expr, ans))
    except CalcError as exc:
        return f"ERR {exc.code}"


def fast_path(expr: str, ans: Number = 0) -> str | None:
    """The fast path's own answer, or None when it falls back."""
    try:
        return "OK " + format_value(
            calc_eval._evaluate_fast(expr, calc_eval._Evaluation(ans, 10**7))
        )
    except CalcError as exc:
        return f"ERR {exc.code}"
    except calc_eval._Fallback:
        return None


@pytest.mark.parametrize(
    "expr",
    [
        "1 + 2 * 3",
        "-2**2",
        "2**3**2",
        "sqrt(2) * (3.5 - 1) / 7",
        "max(1, 2, 3) // 2",
        "ans % 7",
        "hypot()",
        "1.e5 + .5e-3 + 2E+3",
        "round(2.675, 2)",
        "\t1\t+ 2 ",
        "pi * e - tau",
    ],
)
def test_fast_path_takes_plain_arithmetic(expr: str) -> None:
    assert fast_path(expr, 5) == reply_ast(expr, 5) == reply(expr, 5)


@pytest.mark.parametrize(
    "expr",
    [
        "0x1F",
        "1_000",
        "01",
        "1__0",
        "1if 1else 2",
        "2pi",
        "1e",
        "1..2",
        "(1).real",
        "1 2",
        "f(1)",
        "pi(1)",
        "ans(1)",
        "sqrt",
        "sqrt(1,)",
        "max(*a)",
        "round(1, x=2)",
        "1 # c",
        "",
        "1/0 + 1 2",
        "sqrt(-1) + x",
        "9**9**9 + 0x1",
        "1e999",
        "1" * 4400,
        "-" * 30 + "1",
        "()",
        "(1",
        "1)",
        "1 +",
        "True",
        "x",
        "é",
        "1\f+1",
        "1\v+1",
        "1\x00",
        "1\\\n",
    ],
)
def test_fast_path_falls_back_on_anything_else(expr: str) -> None:
    assert fast_path(expr) is None


@pytest.mark.parametrize(
    ("expr", "code"),
    [
        ("1/0", "zero-division"),
        ("sqrt(-1)", "domain"),
        ("9**9**9", "too-large"),
        ("+".join(["1"] * 100) + "+1/0", "zero-division"),
        ("+".join(["2**14000%3"] * 300), "too-large"),
    ],
)
def test_fast_path_decides_errors_in_a_line_wholly_its_own(expr: str, code: str) -> None:
    # ... without the AST path, which would cost the line twice; the AST
    # path agrees.
    assert fast_path(expr) == reply_ast(expr) == f"ERR {code}"


TRICKY = st.text(alphabet="0123456789._eExXbBjJ+-*/%(), \tpiansqrtmxl#'", max_size=24)


@settings(max_examples=1500, deadline=None)
@given(expr=st.one_of(TRICKY, expressions()), ans=st.sampled_from([0, -3, 2.5]))
def test_fast_path_never_disagrees_with_the_ast_path(expr: str, ans: Number) -> None:
    fast = fast_path(expr, ans)
    reference = reply_ast(expr, ans)
    if fast is not None:
        assert fast == reference, expr
    assert reply(expr, ans) == reference, expr
