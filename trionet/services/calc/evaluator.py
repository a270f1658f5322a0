"""The calculator's evaluator: pure, bounded, and Python-exact.

No I/O and no Trio here: :func:`evaluate` takes the text of one line and the
connection's ``ans`` and returns an ``int`` or a ``float``, or raises a
:class:`CalcError` whose ``code`` is one of PROTOCOL.md's error codes.

How it stays safe
-----------------
* The line is parsed with :func:`ast.parse` in ``eval`` mode and the tree is
  walked against a whitelist: number literals, the seven binary operators,
  unary ``+``/``-``, the names ``pi e tau ans`` and calls of the listed
  functions by plain name with positional arguments. Any other node (names,
  attributes, subscripts, strings, lambdas, comprehensions, f-strings,
  keyword or starred arguments, comparisons, ...) is ``not-allowed``. Nothing
  from the line is ever handed to ``eval``/``compile`` to *run*, and no
  Python object other than ``int`` and ``float`` ever becomes a value.
* Every operation whose cost or size depends on its operands is bounded
  *before* it runs: ``a * b`` and ``a ** b`` from bit lengths and
  logarithms, ``factorial(n)`` from ``n``, ``round(x, -n)`` from ``n``.
  Every result is checked: an integer may have at most 4,300 decimal digits
  (what Python can print, ``sys.int_info.default_max_str_digits``), a float
  must be finite. Breaking either is ``too-large``.
* Work on big numbers is charged, *before* it is done, to a per-line budget
  by a cost model (see "the cost model" below): each multiplication,
  division, remainder, power, ``factorial``, ``gcd`` and ``round(x, -n)`` on
  integers past a few hundred bits costs about what CPython takes for it, in
  nanoseconds, from the operands' bit lengths. A line that would need more
  than :data:`WORK_BUDGET` (about half a millisecond) stops with
  ``too-large``; what is left (the parse, operations on small numbers,
  linear ones such as ``+``) is bounded by the line's length, so no line,
  hostile or not, costs more than a few milliseconds.
* Nesting is bounded (``MAX_DEPTH``), and the parser's own failures on
  hostile input (``RecursionError``, ``MemoryError``, too many parentheses,
  warnings) become clean errors.

How it stays fast
-----------------
``ast.parse`` alone costs more than evaluating a typical line, so plain
arithmetic is first tried by a small precedence-climbing parser that
evaluates as it parses, over a conservative subset of the syntax (see "the
fast path" below). It never decides an error and gives up on anything
unusual; the AST path is the reference, and the tests check that the two
never disagree. The AST path walks the tree once, evaluating as it goes, in
a single method dispatching with ``type(node) is ...`` tests ordered by
frequency. Chains of left-associative operators (``1+2+3+...``) are walked
iteratively in both, so a full line of them costs no recursion depth.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Callable
from typing import ClassVar, Final

__all__ = [
    "FACTORIAL_MAX",
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_DIGITS",
    "WORK_BUDGET",
    "CalcError",
    "CalcSyntaxError",
    "DomainError",
    "NotAllowed",
    "Number",
    "TooLarge",
    "ZeroDivision",
    "evaluate",
    "evaluate_ast",
    "format_value",
]

Number = int | float

#: The most decimal digits an integer value may have: Python's own limit for
#: int -> str conversion (3.11's ``sys.int_info.default_max_str_digits``),
#: fixed here so a process-wide ``sys.set_int_max_str_digits`` cannot move it.
MAX_DIGITS: Final = 4300
#: Values must satisfy ``-INT_LIMIT < v < INT_LIMIT``.
INT_LIMIT: Final = 10**MAX_DIGITS
#: 2**SAFE_BITS < 10**4300, so an int of at most this many bits is always fine
#: and the exact (slower) comparison with INT_LIMIT is needed only above it.
SAFE_BITS: Final = 14284
#: log2(INT_LIMIT), used to estimate result sizes from logarithms.
LIMIT_LOG2: Final = MAX_DIGITS * math.log2(10)
#: The largest n with factorial(n) < 10**4300 (checked by the tests).
FACTORIAL_MAX: Final = 1558
#: Deepest nesting of operators and calls (left-associative chains excepted).
MAX_DEPTH: Final = 100
#: Big-number work allowed per line, in units of the cost model (about a
#: nanosecond of CPU each): half a millisecond. A power, product or quotient
#: of 4,300-digit numbers costs 20,000 to 300,000 units, so a line may hold
#: a handful; numbers below :data:`_CHEAP` cost nothing. Work the fast path
#: did before handing the line to the AST path counts against the same
#: budget (a line cannot make the server do it twice).
WORK_BUDGET: Final = 500_000
#: Below this magnitude integer operations are cheap enough (well under a
#: microsecond, like the interpreter's own work per operator) not to charge.
_CHEAP: Final = 1 << 300
_CHEAP_BITS: Final = 300
#: Longest piece of the expression quoted back in an error message.
_QUOTE_MAX: Final = 40


class CalcError(Exception):
    """An expression that has no value; ``code`` is PROTOCOL.md's error code."""

    code: ClassVar[str] = "error"

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class CalcSyntaxError(CalcError):
    """The line does not parse (a blank line included)."""

    code = "syntax"


class NotAllowed(CalcError):
    """A name, attribute, call, literal or construct outside the language."""

    code = "not-allowed"


class ZeroDivision(CalcError):
    """Division or modulo by zero, or ``0 ** -1``."""

    code = "zero-division"


class TooLarge(CalcError):
    """A result over 4,300 digits or not a finite float, nesting or work too large."""

    code = "too-large"


class DomainError(CalcError):
    """Arguments outside a function's domain (``sqrt(-1)``, ``factorial(2.5)``)."""

    code = "domain"


#: The functions of the language, with the argument counts they accept
#: (``None``: no upper bound). Python's ``min``/``max`` need at least two
#: plain arguments (one would have to be an iterable).
FUNCTIONS: Final[dict[str, tuple[int, int | None]]] = {
    "abs": (1, 1),
    "round": (1, 2),
    "min": (2, None),
    "max": (2, None),
    "sqrt": (1, 1),
    "exp": (1, 1),
    "log": (1, 2),
    "log2": (1, 1),
    "log10": (1, 1),
    "sin": (1, 1),
    "cos": (1, 1),
    "tan": (1, 1),
    "asin": (1, 1),
    "acos": (1, 1),
    "atan": (1, 1),
    "atan2": (2, 2),
    "hypot": (0, None),
    "floor": (1, 1),
    "ceil": (1, 1),
    "factorial": (1, 1),
    "gcd": (0, None),
}

_CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e, "tau": math.tau}

# Plain functions of floats: no size to bound beyond "the result is finite".
_MATH: Final[dict[str, Callable[..., Number]]] = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "hypot": math.hypot,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
}

_isfinite = math.isfinite

# Node and operator classes bound once, for the identity tests of the walk.
_BinOp = ast.BinOp
_UnaryOp = ast.UnaryOp
_Constant = ast.Constant
_Name = ast.Name
_Call = ast.Call
_Add = ast.Add
_Sub = ast.Sub
_Mult = ast.Mult
_Div = ast.Div
_FloorDiv = ast.FloorDiv
_Mod = ast.Mod
_Pow = ast.Pow
_USub = ast.USub
_UAdd = ast.UAdd


def _quote(text: str) -> str:
    """``text`` made safe to echo in a reply: printable, short, one line."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[: _QUOTE_MAX + 1])
    return clean if len(clean) <= _QUOTE_MAX else clean[: _QUOTE_MAX - 3] + "..."


def _too_big_int() -> TooLarge:
    return TooLarge(f"integer result has more than {MAX_DIGITS} digits")


def _check_int(v: int) -> int:
    """``v`` if it has at most MAX_DIGITS digits, else raise :class:`TooLarge`."""
    if v.bit_length() > SAFE_BITS and not -INT_LIMIT < v < INT_LIMIT:
        raise _too_big_int()
    return v


def _check(v: object) -> Number:
    """A result of Python arithmetic made a calculator value, or an error."""
    t = type(v)
    if t is float:
        if not _isfinite(v):  # type: ignore[arg-type]
            raise TooLarge("float result overflows")
        return v  # type: ignore[return-value]
    if t is int:
        return _check_int(v)  # type: ignore[arg-type]
    if t is complex:
        # A negative number to a fractional power: Python answers with a
        # complex number, which the calculator does not have.
        raise DomainError("result is not a real number")
    raise DomainError(f"unexpected result type {t.__name__}")  # pragma: no cover


# -- the cost model ----------------------------------------------------------------
#
# What CPython 3.11 takes for the operations whose cost grows faster than the
# size of their operands, in units of about a nanosecond of CPU, from sizes in
# 30-bit limbs (CPython's digits). Fitted on the 2-core machine the tests run
# on, while busy, then rounded up: each formula is at or above the measured
# time from 1 to 480 limbs (the largest a value may have), by up to 2-3x for
# the largest sizes (where Karatsuba and Lehmer do better than the formula
# says). scripts/bench/calc_costs.py prints the model beside the clock, to
# refit it for another machine or Python. Each is computed from bit lengths
# only, before the operation runs.


def _limbs(v: int) -> int:
    """Size of ``v`` in CPython's 30-bit digits (at least 1)."""
    return v.bit_length() // 30 + 1


def mul_cost(la: int, lb: int) -> int:
    """``a * b`` for ``la``- and ``lb``-limb integers (schoolbook: limb products)."""
    return 2 * la * lb // 3 + 150


def div_cost(la: int, lb: int) -> int:
    """``a // b`` or ``a % b``: quotient limbs times divisor limbs, and a pass over ``a``."""
    if la < lb:
        return la + 50
    return 4 * (la - lb + 1) * lb // 3 + 4 * la + 50


def true_div_cost(la: int, lb: int) -> int:
    """``a / b`` on integers: linear (CPython keeps only the quotient's top bits)."""
    return 5 * (la + lb) + 50


def pow_cost(limbs: int) -> int:
    """``a ** b`` by repeated squaring, from the size of the result."""
    return limbs * limbs // 7 + 20 * limbs + 100


def gcd_cost(la: int, lb: int) -> int:
    """``gcd(a, b)`` with ``la >= lb``: ``a % b``, then Lehmer's algorithm on ``lb`` limbs."""
    return div_cost(la, lb) + lb * lb + 120 * lb + 500


def factorial_cost(n: int) -> int:
    """``factorial(n)``, from the size of the result (log2 n! = lgamma(n + 1) / ln 2)."""
    limbs = int(math.lgamma(n + 1) / math.log(2)) // 30 + 1
    return limbs * limbs // 4 + 5 * n + 200


def round_cost(lx: int, ndigits: int) -> int:
    """``round(x, -ndigits)`` on an ``lx``-limb integer: 10**ndigits, then two divisions."""
    limbs = int(ndigits * math.log2(10)) // 30 + 1
    return pow_cost(limbs) + 2 * div_cost(lx, limbs) + 200


def _pow_result_log2(base: int, exp: int) -> float:
    """log2(|base| ** exp) for |base| >= 2 and exp >= 0, without computing it."""
    return exp * math.log2(abs(base))


def parse(source: str) -> ast.expr:
    """Parse one line into its expression tree, or raise :class:`CalcError`.

    Leading and trailing blanks are ignored (Python's own ``eval`` ignores
    them too; ``compile`` would call a leading blank an indentation error).
    """
    text = source.strip(" \t\f\v")
    if not text:
        raise CalcSyntaxError("empty expression")
    try:
        # Warnings the tokenizer raises for odd input (e.g. "invalid
        # decimal literal" in 3.12, an invalid escape in 3.11) would
        # otherwise go to the server's stderr; as errors they become a clean
        # syntax error instead. Only those two kinds: the filter is the
        # whole process's while it is on, and the parser allocates enough to
        # run the garbage collector, whose finalizers may warn too (an
        # unclosed socket's ResourceWarning). Made an error here, such a
        # warning would escape from the finalizer as "Exception ignored".
        with warnings.catch_warnings():
            warnings.simplefilter("error", SyntaxWarning)
            warnings.simplefilter("error", DeprecationWarning)
            tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        msg = exc.msg or "invalid syntax"
        if "too many nested" in msg:
            raise TooLarge("nesting too deep") from None
        if "Exceeds the limit" in msg:
            raise TooLarge(f"integer literal has more than {MAX_DIGITS} digits") from None
        raise CalcSyntaxError(_quote(msg)) from None
    except (RecursionError, MemoryError):
        # CPython's parser gives up on very deep nesting this way.
        raise TooLarge("nesting too deep") from None
    except (ValueError, Warning) as exc:  # NUL bytes; warnings turned errors
        raise CalcSyntaxError(_quote(str(exc) or "invalid syntax")) from None
    return tree.body


class _Evaluation:
    """One evaluation: ``ans`` and the remaining work budget."""

    __slots__ = ("ans", "budget")

    def __init__(self, ans: Number, budget: int) -> None:
        self.ans = ans
        self.budget = budget

    def charge(self, units: int) -> None:
        """Spend ``units`` of the work budget; :class:`TooLarge` when it runs out."""
        self.budget -= units
        if self.budget < 0:
            raise TooLarge("expression needs too much work")

    def value(self, node: ast.expr, depth: int) -> Number:
        """Evaluate ``node`` (Python's order: left to right, operands first)."""
        if depth > MAX_DEPTH:
            raise TooLarge("nesting too deep")
        t = type(node)
        if t is _BinOp:
            # Walk down the left spine iteratively: 1+2+3+... is left-nested,
            # and its length must not turn into recursion depth.
            spine = []
            while type(node) is _BinOp:
                spine.append(node)
                node = node.left
            acc = self.value(node, depth + 1)
            for b in reversed(spine):
                acc = self.binop(type(b.op), acc, self.value(b.right, depth + 1))
            return acc
        if t is _Constant:
            v = node.value  # type: ignore[attr-defined]
            tv = type(v)
            if tv is int:
                return _check_int(v)
            if tv is float:
                if not _isfinite(v):
                    raise TooLarge("float literal overflows")
                return v  # type: ignore[no-any-return]
            if tv is complex:
                raise NotAllowed("complex numbers are not allowed")
            raise NotAllowed(f"{tv.__name__} literals are not allowed")
        if t is _UnaryOp:
            op = type(node.op)  # type: ignore[attr-defined]
            if op is _USub:
                return -self.value(node.operand, depth + 1)  # type: ignore[attr-defined]
            if op is _UAdd:
                return +self.value(node.operand, depth + 1)  # type: ignore[attr-defined]
            raise NotAllowed(f"operator {_op_symbol(op)} is not allowed")
        if t is _Name:
            name = node.id  # type: ignore[attr-defined]
            if name == "ans":
                return self.ans
            c = _CONSTANTS.get(name)
            if c is not None:
                return c
            if name in FUNCTIONS:
                raise NotAllowed(f"{name} is a function: call it as {name}(...)")
            raise NotAllowed(f"unknown name {_quote(name)}")
        if t is _Call:
            return self.call(node, depth)  # type: ignore[arg-type]
        raise NotAllowed(f"{_describe(node)} is not allowed")

    def binop(self, t: type[ast.operator], a: Number, b: Number) -> Number:
        """``a op b`` (``t`` is the operator's AST class), bounded before it runs."""
        try:
            if t is _Add:
                r = a + b
            elif t is _Sub:
                r = a - b
            elif t is _Mult:
                if (
                    type(a) is int
                    and type(b) is int
                    and not (-_CHEAP < a < _CHEAP and -_CHEAP < b < _CHEAP)
                ):
                    # The product has bit_length(a) + bit_length(b) bits, or
                    # one less: refuse before multiplying when even the
                    # smaller is over the limit.
                    if a.bit_length() + b.bit_length() - 1 > SAFE_BITS + 1:
                        raise _too_big_int()
                    self.charge(mul_cost(_limbs(a), _limbs(b)))
                r = a * b
            elif t is _Div:
                if (
                    type(a) is int
                    and type(b) is int
                    and not (-_CHEAP < a < _CHEAP and -_CHEAP < b < _CHEAP)
                ):
                    self.charge(true_div_cost(_limbs(a), _limbs(b)))
                r = a / b
            elif t is _FloorDiv or t is _Mod:
                if type(a) is int and type(b) is int and not -_CHEAP < a < _CHEAP:
                    self.charge(div_cost(_limbs(a), _limbs(b)))
                r = a // b if t is _FloorDiv else a % b
            elif t is _Pow:
                r = self.power(a, b)
            else:
                raise NotAllowed(f"operator {_op_symbol(t)} is not allowed")
        except ZeroDivisionError:
            raise ZeroDivision("division by zero") from None
        except OverflowError:
            raise TooLarge("result too large for a float") from None
        if type(r) is float and r - r == 0.0:  # finite: inf - inf is nan
            return r
        return _check(r)

    def power(self, a: Number, b: Number) -> Number:
        """``a ** b``, refused as too large from logarithms before computing."""
        if type(a) is int and type(b) is int and b > 1 and not -1 <= a <= 1:
            # |a| >= 2, so |a| ** b >= 2 ** b: a huge b is refused before
            # math.log2 is even asked (it would be exact anyway).
            if b > SAFE_BITS + 1:
                raise _too_big_int()
            bits = _pow_result_log2(a, b)
            if bits > LIMIT_LOG2 + 1:
                raise _too_big_int()
            if bits > _CHEAP_BITS:
                # 2 ** 14000 is no shift in CPython: squarings, like 3 ** 8800.
                self.charge(pow_cost(int(bits) // 30 + 1))
        # Remaining cases are cheap: small results, exponents 0 and 1, bases
        # 0, 1 and -1 with any exponent, negative int exponents and floats,
        # which CPython computes in floating point (raising OverflowError or
        # returning complex, both handled by the caller).
        return a**b

    def call(self, node: ast.Call, depth: int) -> Number:
        """A call of one of :data:`FUNCTIONS`, arguments evaluated left to right."""
        func = node.func
        if type(func) is not _Name:
            raise NotAllowed(f"{_describe(func)} is not allowed")
        name = func.id
        arity = FUNCTIONS.get(name)
        if arity is None:
            if name in _CONSTANTS or name == "ans":
                raise NotAllowed(f"{name} is not a function")
            raise NotAllowed(f"unknown function {_quote(name)}")
        if node.keywords:
            raise NotAllowed("keyword arguments are not allowed")
        return self.apply(name, [self.value(arg, depth + 1) for arg in node.args])

    def apply(self, name: str, args: list[Number]) -> Number:
        """Call function ``name`` (one of :data:`FUNCTIONS`) on evaluated ``args``."""
        lo, hi = FUNCTIONS[name]
        if len(args) < lo or (hi is not None and len(args) > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi else f"at least {lo}"
            plural = "" if want == "1" else "s"
            raise DomainError(f"{name}() takes {want} argument{plural}, got {len(args)}")
        try:
            fn = _MATH.get(name)
            if fn is not None:
                r = fn(*args)
            elif name == "round":
                r = self.round(*args)
            elif name == "log":
                r = math.log(*args)
            elif name == "min":
                r = min(args)
            elif name == "max":
                r = max(args)
            elif name == "factorial":
                r = self.factorial(args[0])
            else:  # gcd
                r = self.gcd(args)
        except ZeroDivisionError:
            raise ZeroDivision("division by zero") from None
        except OverflowError:
            raise TooLarge(f"{name}() result too large") from None
        except (ValueError, TypeError) as exc:
            raise DomainError(f"{name}(): {_quote(str(exc))}") from None
        return _check(r)

    def round(self, x: Number, ndigits: Number | None = None) -> Number:
        """Python's ``round``; ``round(int, -n)`` bounded (it computes 10**n)."""
        if ndigits is None:
            return round(x)
        if type(ndigits) is not int:
            raise DomainError("round(): ndigits must be an integer")
        if type(x) is int and ndigits < 0:
            if -ndigits > MAX_DIGITS + 1:
                # |x| < 10**4300 <= 10**n / 2: rounds to 0 whatever x is.
                return 0
            self.charge(round_cost(_limbs(x), -ndigits))
        return round(x, ndigits)

    def factorial(self, n: Number) -> int:
        """``factorial(n)`` for an int 0 <= n <= FACTORIAL_MAX."""
        if type(n) is not int:
            raise DomainError("factorial() only accepts integers")
        if n < 0:
            raise DomainError("factorial() not defined for negative values")
        if n > FACTORIAL_MAX:
            raise _too_big_int()
        if n > 20:
            self.charge(factorial_cost(n))
        return math.factorial(n)

    def gcd(self, args: list[Number]) -> int:
        """``gcd`` of integers (floats are outside its domain, as in Python)."""
        ints = [a for a in args if type(a) is int]
        if len(ints) != len(args):
            raise DomainError("gcd() only accepts integers")
        if any(not -_CHEAP < a < _CHEAP for a in ints):
            # Each step is a gcd of the running result (at most the largest
            # argument) with the next argument.
            largest = max(_limbs(a) for a in ints)
            self.charge(sum(gcd_cost(largest, _limbs(a)) for a in ints))
        return math.gcd(*ints)


_OP_SYMBOLS: Final = {
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
}


def _op_symbol(op: type[ast.AST]) -> str:
    return _OP_SYMBOLS.get(op, op.__name__)


_DESCRIPTIONS: Final = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.Lambda: "lambda",
    ast.JoinedStr: "f-string",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator",
    ast.IfExp: "conditional expression",
    ast.NamedExpr: "assignment expression",
    ast.Starred: "starred argument",
    ast.List: "list",
    ast.Tuple: "tuple",
    ast.Set: "set",
    ast.Dict: "dict",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slice",
}


def _describe(node: ast.AST) -> str:
    """A short human name for a construct the calculator refuses."""
    if isinstance(node, ast.Name):
        return f"name {_quote(node.id)}"
    return _DESCRIPTIONS.get(type(node), type(node).__name__)


# -- the fast path -----------------------------------------------------------------
#
# ast.parse costs more than evaluating a typical line (it builds a Python
# object, with positions, for every node). Most lines are plain arithmetic,
# so they are first tried by a small precedence-climbing parser that
# evaluates as it parses, over a *conservative subset* of the grammar:
# decimal literals without underscores, ASCII names, the operators, parens,
# commas, spaces and tabs. The subset is chosen so that whatever it accepts,
# Python's parser accepts too and builds the same tree; the arithmetic goes
# through the same bounded :class:`_Evaluation` methods as the AST walk.
#
# On anything outside the subset, and on nesting deeper than _FAST_DEPTH, it
# gives up (_Fallback) and the line goes to the AST path, which is the
# reference (ast.parse, the whitelist, Python's error precedence). An
# evaluation error (zero-division, too-large, domain) it decides itself, but
# only once a second pass has found the *whole* line inside the subset: then
# Python builds the same tree, every node of it is allowed, and the AST walk
# would run the same operations in the same order and stop at the same one.
# (Deciding it without the AST path matters: a line that spends its work
# budget and then needs ast.parse of 2,000 nodes costs twice.) The second
# pass is the same parser with an evaluation that computes nothing
# (:class:`_Recognizer`). _FAST_DEPTH is
# chosen so a line the fast path accepts is never too deep for the AST walk:
# each level the fast path counts (parentheses, unary operator, call
# arguments, exponent) adds at most 4 levels of AST (additive, multiplicative
# and power groups, then the call), so 4 * 24 + 3 < MAX_DEPTH.

_FAST_DEPTH: Final = 24
_FLOAT_RE: Final = (
    r"[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?"
    r"|\.[0-9]+(?:[eE][-+]?[0-9]+)?"
    r"|[0-9]+[eE][-+]?[0-9]+"
)
#: One token per match, blanks before it skipped; ``.`` catches any other
#: character (a token no rule accepts, so the line falls back).
_tokenize: Final = re.compile(
    rf"[ \t]*({_FLOAT_RE}|0|[1-9][0-9]*|[A-Za-z_][A-Za-z0-9_]*|\*\*|//|.)", re.DOTALL
).findall
_ADDITIVE: Final[dict[str, type[ast.operator]]] = {"+": _Add, "-": _Sub}
_MULTIPLICATIVE: Final[dict[str, type[ast.operator]]] = {
    "*": _Mult,
    "/": _Div,
    "//": _FloorDiv,
    "%": _Mod,
}
_DIGITS: Final = frozenset("0123456789.")


class _Fallback(Exception):
    """The fast path cannot decide this line: use the AST path."""


def _fast_sum(toks: list[str], ev: _Evaluation, depth: int) -> Number:
    """sum: term (('+'|'-') term)*, term: factor (('*'|'/'|'//'|'%') factor)*.

    Both levels in one function (one call per operand, not two), consuming
    tokens from the end of ``toks``; the order of operations is Python's.
    """
    acc = _fast_factor(toks, ev, depth)
    tok = toks[-1]
    while (mul := _MULTIPLICATIVE.get(tok)) is not None:
        toks.pop()
        acc = ev.binop(mul, acc, _fast_factor(toks, ev, depth))
        tok = toks[-1]
    while (add := _ADDITIVE.get(tok)) is not None:
        toks.pop()
        term = _fast_factor(toks, ev, depth)
        tok = toks[-1]
        while (mul := _MULTIPLICATIVE.get(tok)) is not None:
            toks.pop()
            term = ev.binop(mul, term, _fast_factor(toks, ev, depth))
            tok = toks[-1]
        acc = ev.binop(add, acc, term)
    return acc


def _fast_factor(toks: list[str], ev: _Evaluation, depth: int) -> Number:
    """factor: ('+'|'-') factor | primary ['**' factor]  (Python's grammar)."""
    if depth > _FAST_DEPTH:
        raise _Fallback
    tok = toks.pop()
    if tok[:1] in _DIGITS and tok != ".":
        if "." in tok or "e" in tok or "E" in tok:
            value: Number = float(tok)
            if not _isfinite(value):
                raise _Fallback
        elif len(tok) > MAX_DIGITS:
            raise _Fallback
        else:
            value = int(tok)
    elif tok == "(":
        value = _fast_sum(toks, ev, depth + 1)
        if toks.pop() != ")":
            raise _Fallback
    elif tok == "-":
        return -_fast_factor(toks, ev, depth + 1)
    elif tok == "+":
        return +_fast_factor(toks, ev, depth + 1)
    elif tok in FUNCTIONS:
        if toks.pop() != "(":
            raise _Fallback
        args: list[Number] = []
        if toks[-1] == ")":
            toks.pop()
        else:
            while True:
                args.append(_fast_sum(toks, ev, depth + 1))
                sep = toks.pop()
                if sep == ")":
                    break
                if sep != ",":
                    raise _Fallback
        value = ev.apply(tok, args)
    elif tok == "ans":
        value = ev.ans
    else:
        constant = _CONSTANTS.get(tok)
        if constant is None:
            raise _Fallback
        value = constant
    if toks[-1] == "**":
        toks.pop()
        value = ev.binop(_Pow, value, _fast_factor(toks, ev, depth + 1))
    return value


class _Recognizer(_Evaluation):
    """An evaluation that computes nothing: the fast parser run as a recognizer."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0, 0)

    def binop(self, t: type[ast.operator], a: Number, b: Number) -> Number:
        return 0

    def apply(self, name: str, args: list[Number]) -> Number:
        return 0


def _fast_parse(text: str, ev: _Evaluation) -> Number:
    toks = _tokenize(text.strip(" \t"))
    toks.append("")  # the end: no rule accepts it, so nothing reads past it
    toks.reverse()
    try:
        value = _fast_sum(toks, ev, 0)
    except IndexError:
        # Cannot happen (the end token is never read past) but would only
        # mean "fall back".
        raise _Fallback from None
    if len(toks) != 1:
        raise _Fallback
    return value


def _evaluate_fast(text: str, ev: _Evaluation) -> Number:
    """The fast path: the value, a :class:`CalcError` for a line wholly inside
    its subset, or :class:`_Fallback`."""
    try:
        return _fast_parse(text, ev)
    except CalcError:
        _fast_parse(text, _Recognizer())  # _Fallback unless the whole line is ours
        raise


def evaluate(source: str, ans: Number = 0, *, budget: int = WORK_BUDGET) -> Number:
    """Evaluate one calculator line; ``ans`` is the previous result.

    Returns an ``int`` (at most :data:`MAX_DIGITS` digits) or a finite
    ``float``; raises a :class:`CalcError` subclass otherwise. Pure: no I/O,
    no global state, and bounded work whatever ``source`` holds.
    """
    evaluation = _Evaluation(ans, budget)
    try:
        return _evaluate_fast(source, evaluation)
    except _Fallback:
        pass
    # The AST path redoes what the fast path computed before it gave up, on
    # what is left of the same budget: a line that makes the fast path work
    # hard and then fall back cannot get twice the budget.
    return evaluation.value(parse(source), 0)


def evaluate_ast(source: str, ans: Number = 0, *, budget: int = WORK_BUDGET) -> Number:
    """:func:`evaluate` by the reference path alone: ast.parse and the tree walk."""
    tree = parse(source)
    return _Evaluation(ans, budget).value(tree, 0)


def format_value(value: Number) -> str:
    """A value as Python prints it (``repr``: ``3.5``, ``2.0``, ``1e+16``)."""
    return repr(value)
