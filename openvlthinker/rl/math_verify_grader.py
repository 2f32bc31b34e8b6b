"""Math answer equivalence: math_equiv, then math-verify (HF's LaTeX/sympy grader), in bounded time.

`check` is the default grader (rewards.MATH_CHECK): math_equiv's exact verdict where its reading
is sound, math-verify for the rest (free text such as "The answer is 5", `\\boxed{}`, tuples,
intervals, sets, units, percentages). Around math-verify: a text guard (length, nesting, towers
of `^`, digit runs, what latex2sympy evaluates while parsing) before its regexes and antlr
parser, a sympy-tree guard (exponent and factorial sizes) before anything evaluates, and one
`math_equiv.deadline` per call in place of its SIGALRM timeouts, which only work on the main
thread. Nothing here raises on any answer.
"""
import cmath
import functools
import logging
import math
import re
import threading
import time

import sympy
from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

from openvlthinker.rl import math_equiv
from openvlthinker.rl import math_parse

MAX_CHARS = 400  # of an answer; longer ones only match verbatim
MAX_LATEX_CHARS = 160  # of text read whole as one LaTeX expression (antlr's cost grows fast)
MAX_DEPTH = 5  # bracket nesting (antlr's cost grows steeply with it: ~0.4 s at 5 parentheses)
MAX_POWER_NESTING = 3  # exponents within exponents: 2^{2^{2^2}} and 2^2^2^2 have 3
MAX_DIGITS = 60  # of one digit run
MAX_NODES = 400  # of a parsed sympy tree
MAX_EXPONENT = 1000  # |exponent|, and the product of exponents along nested powers
MAX_BITS = 20_000  # log2 of a constant power
MAX_INT_ARG = 1000  # argument of factorial, binomial and other integer-valued functions
DEFAULT_TIMEOUT_S = math_equiv.DEFAULT_TIMEOUT_S
# The deadline interrupts these modules' Python frames: antlr's parser included, so that a slow
# parse stops too (an interrupted parse only drops DFA states it had not yet cached).
_DEADLINE_MODULES = ("sympy", "mpmath", "antlr4", "latex2sympy2_extended", "math_verify")

# Its only warnings are "timeout disabled" (we enforce our own) and timeouts we report ourselves.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
# A word of 3+ letters that is not a LaTeX command nor a function name marks prose: let
# math-verify's extraction find the answer in it instead of reading letters as symbols.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_MATH_WORDS = frozenset(
    "sqrt sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh log exp and inf infty "
    "pi".split())
_SCIENTIFIC = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d{1,4})(?![\w.])")
_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_CARET_CHAIN = re.compile(r"(?:\^\s*[\w.]+\s*){%d}\^" % MAX_POWER_NESTING)  # 9^9^9^9
# Where math_equiv's reading differs from the answer's meaning (see _old_decides).
_CUES = re.compile(r"%|percent|\\text|\\math|\\mbox|\\operatorname|(?<![\w.])\d+\s*\\[dt]?frac")
_DIGIT_RUN = re.compile(r"\d{%d}" % (MAX_DIGITS + 1))
# latex2sympy evaluates these while parsing, before any tree guard or deadline can look:
# binomial(999999, 499999) is one C computation of minutes, zeros(999, 999) a million entries.
_EAGER = re.compile(r"\\(?:[dt]?binom|choose|Gamma|gamma|det)(?![A-Za-z])")
_MATRIX_BUILDERS = re.compile(r"\\operatorname\s*\{\s*(?:zeros|ones|diag|hstack|vstack|orth)")
_SHORT_INT = re.compile(r"\d{4}")
_INT_FUNCS = (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial,
              sympy.RisingFactorial, sympy.FallingFactorial, sympy.gamma, sympy.fibonacci,
              sympy.lucas, sympy.catalan, sympy.bell, sympy.bernoulli, sympy.euler,
              sympy.harmonic, sympy.primepi)


class _Unsafe(ValueError):
  """Input outside the guard's bounds."""


# ------------------------------------------------------------------------------------ guards


def text_ok(text: str) -> bool:
  """Whether `text` is within the bounds math-verify's regexes and parser handle quickly and
  latex2sympy's eager evaluations stay small. The sympy-tree guard (tree_ok) does the rest."""
  if len(text) > MAX_CHARS or _DIGIT_RUN.search(text) or _CARET_CHAIN.search(text):
    return False
  if _MATRIX_BUILDERS.search(text) or (_EAGER.search(text) and _SHORT_INT.search(text)):
    return False
  stack, braces = [], 0  # stack: open brackets, True for a `{` that opens an exponent
  for i, ch in enumerate(text):
    if ch in "([{":
      stack.append(ch == "{" and text[:i].rstrip().endswith("^"))
      if len(stack) > MAX_DEPTH or sum(stack) > MAX_POWER_NESTING:
        return False
    elif ch in ")]}" and stack:
      stack.pop()
    braces += {"{": 1, "}": -1}.get(ch, 0)
    if braces < 0:
      return False
  # Unbalanced braces are cut-off LaTeX ("2^{"), which latex2sympy would still read (as 2).
  return braces == 0


def _magnitude(node: sympy.Basic) -> float:
  """|value| of a constant, already-checked subtree, as a float (inf when it has none)."""
  try:
    value = complex(node.evalf(15))
  except (TypeError, ValueError, ArithmeticError):
    return math.inf
  return abs(value) if math.isfinite(abs(value)) else math.inf


def _check_tree(node, budget: int, count: list) -> None:
  """Raises _Unsafe when evaluating or simplifying `node` could run one huge C computation
  (an exact power or factorial of a big integer, which no deadline interrupts). Children are
  checked before a parent evaluates them; along a chain of nested powers the exponents multiply
  to at most MAX_EXPONENT."""
  count[0] += 1
  if count[0] > MAX_NODES:
    raise _Unsafe("expression too large")
  if isinstance(node, sympy.Rational):
    if max(abs(node.p).bit_length(), node.q.bit_length()) > 4 * MAX_DIGITS:
      raise _Unsafe("number too large")
    return
  args = getattr(node, "args", ())
  if not isinstance(args, tuple):
    return
  if isinstance(node, sympy.Pow):
    base, exponent = node.args
    _check_tree(exponent, MAX_EXPONENT, count)
    if exponent.free_symbols:
      factor = 1
    else:
      size = _magnitude(exponent)
      if isinstance(exponent, sympy.Rational):
        size = max(size, exponent.q)
      if not size <= min(budget, MAX_EXPONENT):
        raise _Unsafe("exponent too large")
      factor = max(1, math.ceil(size))
    _check_tree(base, budget // factor, count)
    if not exponent.free_symbols and not base.free_symbols:
      if size * max(1.0, abs(math.log2(max(_magnitude(base), 1e-300)))) > MAX_BITS:
        raise _Unsafe("power too large")
    return
  for arg in args:
    _check_tree(arg, budget, count)
  if isinstance(node, sympy.exp) and not node.free_symbols:
    if not _magnitude(args[0]) <= MAX_BITS / 1.45:  # e^a has about 1.44·a bits
      raise _Unsafe("power too large")
  if isinstance(node, _INT_FUNCS):
    for arg in args:
      if not arg.free_symbols and not _magnitude(arg) <= MAX_INT_ARG:
        raise _Unsafe("argument too large")


def tree_ok(expr) -> bool:
  """Whether a parsed value (sympy object or fallback string) is safe to compare."""
  if isinstance(expr, str):
    return True
  try:
    _check_tree(expr, MAX_EXPONENT, [0])
  except (_Unsafe, RecursionError):
    return False
  return True


# ------------------------------------------------------------------------------------ reading


def _as_latex(text: str) -> str:
  """Plain-text spellings math-verify's LaTeX parser misreads: 1e3 (as 1·e·3) and pi (p·i)."""
  text = _SCIENTIFIC.sub(lambda m: f"{m.group(1)}\\times 10^{{{m.group(2)}}}", text)
  return _PI.sub(r"\\pi ", text)


def _parse(text: str) -> list:
  return mv_parse(text, parsing_timeout=None)


@functools.lru_cache(maxsize=1 << 14)
def read(text: str) -> tuple:
  """The values math-verify reads from an answer (sympy objects, then a fallback string); empty
  when it finds none. A bare formula is read whole as LaTeX ($...$), prose and delimited text by
  math-verify's extraction. Call under a deadline."""
  text = text.strip()
  if _DELIMITED.search(text):
    return tuple(_parse(text))
  prose = any(w.lower() not in _MATH_WORDS for w in _WORD.findall(text))
  if prose or len(text) > MAX_LATEX_CHARS:
    return tuple(_parse(text))
  return tuple(_parse(f"${_as_latex(text)}$"))


# ------------------------------------------------------------------------------------ comparison


def _value(expr: sympy.Expr, env: dict) -> complex | None:
  try:
    return complex(expr.evalf(15, subs=env))  # inf or nan where it is infinite or undefined
  except (TypeError, ValueError, ArithmeticError):
    return None  # not a number there


def surely_different(gold, pred) -> bool:
  """Whether two parsed values differ at one of math_equiv's sample points (relative 1e-6, or
  one finite and the other not), so that math-verify would not equate them either: this skips
  its simplify, tens of milliseconds on the unequal pairs that are most of RL's. Only for plain
  expressions; percentages, lone symbols (matched by name) and `e` (matched to Euler's number)
  are left to math-verify."""
  if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
    return False
  if any(isinstance(v, sympy.Symbol) or v.has(sympy.UnevaluatedExpr) for v in (gold, pred)):
    return False
  names = sorted(gold.free_symbols | pred.free_symbols, key=str)
  if len(names) > len(math_equiv.POINTS[0]) or any(s.name.lower() == "e" for s in names):
    return False
  for point in math_equiv.POINTS if names else math_equiv.POINTS[:1]:
    env = dict(zip(names, point))
    a, b = _value(gold, env), _value(pred, env)
    if a is None or b is None:
      continue
    finite_a, finite_b = cmath.isfinite(a), cmath.isfinite(b)
    if finite_a != finite_b or (finite_a and abs(a - b) > 1e-6 * max(1.0, abs(a), abs(b))):
      return True
  return False


# One pair of each form: the first calls in a process load sympy's lazy modules and fill antlr's
# prediction cache, and would otherwise spend a correct answer's deadline on that.
_WARM_UP = (
    ("1/2", "0.5"), ("(1, 2)", "(1,2)"), ("[1, 2)", "(1, 2]"), ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("x = 3", "3"), ("The answer is 5.", "5"), ("\\boxed{\\frac{\\sqrt{2}}{3}}", "\\sqrt{2}/3"),
    ("50\\%", "0.5"), ("(x+2)(x+3)", "x^2+5x+6"), ("90^\\circ", "90"), ("15\\text{ cm}", "15"),
    ("1 < x < 5", "(1, 5)"), ("2\\pi r", "r \\cdot 2\\pi"), ("-\\infty", "\\infty"),
    ("\\sin^2 x", "1-\\cos^2 x"), ("5!", "120"), ("\\log_2 8", "3"), ("e^{2x}", "(e^x)^2"))
_warm_lock = threading.Lock()
_warm = []


def warm_up() -> None:
  """Runs _WARM_UP once per process (about a second); later calls return at once."""
  if _warm:
    return
  with _warm_lock:
    if not _warm:
      for pred, truth in _WARM_UP:
        _check_math_verify(pred, truth, 10.0)
      _warm.append(True)


def check_math_verify(pred: str, truth: str,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
  """math-verify alone: (equivalent, reason), reason "" or why it failed; never raises.

  Reasons: "unparsable", "unparsable ground truth", "timeout", "error: <type>".
  """
  warm_up()
  return _check_math_verify(pred, truth, timeout_s)


def _check_math_verify(pred: str, truth: str, timeout_s: float) -> tuple[bool, str]:
  if " ".join(pred.split()) == " ".join(truth.split()):
    return True, ""  # identical, even where the guard or the parser refuses them
  if not text_ok(truth):
    return False, "unparsable ground truth"
  if not text_ok(pred):
    return False, "unparsable"
  try:
    with math_equiv.deadline(timeout_s, _DEADLINE_MODULES):
      gold = [g for g in read(truth) if tree_ok(g)]
      got = [p for p in read(pred) if tree_ok(p)]
      pairs = [(g, p) for g in gold for p in got if not surely_different(g, p)]
      # A relation may match a set either way round: "1 < x < 5" and (1, 5).
      if any(mv_verify(g, p, timeout_seconds=None, allow_set_relation_comp=True)
             for g, p in pairs):
        return True, ""
  except math_equiv.Timeout:
    return False, "timeout"
  except Exception as e:  # noqa: BLE001 - a scorer must never raise
    return False, f"error: {type(e).__name__}"
  # Besides values, math-verify returns the text it extracted, compared verbatim: an answer
  # with only that was not read.
  if not any(isinstance(g, sympy.Basic) for g in gold):
    return False, "unparsable ground truth"
  if not any(isinstance(p, sympy.Basic) for p in got):
    return False, "unparsable"
  return False, ""


def _symbols(text: str) -> set[str]:
  return set().union(*(math_equiv.symbols(item) for item in math_parse.parse(text)))


def _old_decides(pred: str, truth: str) -> bool:
  """Whether math_equiv's "not equivalent" stands for two answers it parsed: it does unless its
  normalisation dropped something meaningful (text, a percent sign, a mixed number's reading) or
  the prediction has letters the truth lacks (units: "15 cm" parses as 15·c·m)."""
  if _CUES.search(pred) or _CUES.search(truth):
    return False
  try:
    return _symbols(pred) <= _symbols(truth)
  except math_parse.Unparsable:
    return False


@functools.lru_cache(maxsize=1 << 16)
def check(pred: str, truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
  """The default grader: (equivalent, reason); never raises (reasons as check_math_verify's).

  math_equiv first (about 0.1 ms, exact, no false positive on the labelled set): its "equal" is
  final, and so is its "not equal" where _old_decides; math-verify reads everything else (free
  text, tuples, intervals, sets, units, percentages) within what is left of `timeout_s`.
  """
  start = time.perf_counter()
  same, reason = math_equiv.check(pred, truth, timeout_s)
  if same or (not reason and _old_decides(pred, truth)):
    return same, reason
  left = max(0.0, timeout_s - (time.perf_counter() - start))
  same, mv_reason = check_math_verify(pred, truth, left)
  if mv_reason.startswith("unparsable") and not reason:
    return same, ""  # math_equiv read both answers: neither is unparsable
  return same, mv_reason


def equivalent(pred: str, truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  """Whether two answers denote the same value(s); never raises."""
  return check(pred, truth, timeout_s)[0]
