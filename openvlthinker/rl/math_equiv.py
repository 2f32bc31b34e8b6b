"""Equivalence of math answers (`1/2`, `0.5`, `\\frac{1}{2}` agree), offline and bounded in time.

Answers are parsed into a tuple AST by `math_parse` (no eval; sympy's parse_latex would need
antlr). Two answers agree when
  1. both are rational constants and equal exactly (fractions.Fraction), or
  2. they agree to 1e-9 (relative) at three fixed points of their free symbols, in 96-bit mpmath
     arithmetic (identity testing: distinct expressions of this size do not agree by chance), or
  3. when some point leaves a side undefined (a pole, an overflow) and no point tells them apart,
     sympy.simplify proves their difference zero.
Steps 1-2 are bounded by the parser's limits (characters, tokens, depth, digits, exponents) and
magnitude guards. Step 3 runs under a per-call deadline enforced by a trace hook in the calling
thread (it works in worker threads, unlike SIGALRM; tracing slows Python ~2x, so it is kept to
this rare step). Results are cached.
"""
import contextlib
import functools
import inspect
import sys
import time
from fractions import Fraction

import mpmath
import sympy

from openvlthinker.rl.math_parse import Unparsable, parse

MAX_EXPONENT = 100
MAX_BITS = 4096  # of an exact rational power
MAX_MAGNITUDE = 1e4  # log2 bound of any numeric value
DEFAULT_TIMEOUT_S = 0.5

# Fixed evaluation points for free symbols, positive so sqrt and log stay real.
POINTS = ((0.6173, 1.3391, 2.0713, 0.8461, 1.7117, 2.4903),
          (1.2909, 0.7457, 1.5521, 2.2687, 0.5381, 1.9013),
          (2.1139, 1.6097, 0.9283, 1.4443, 2.6011, 0.7069))


_RESUMABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class _Timeout(BaseException):
  # BaseException so that sympy's own `except Exception` blocks do not swallow it.
  pass


Timeout = _Timeout  # the public name, for graders that catch it (math_verify_grader)


@contextlib.contextmanager
def deadline(seconds: float, modules: tuple[str, ...] = ("sympy", "mpmath")):
  """Raises _Timeout in the calling thread at the first call of a function of `modules` (module
  name prefixes) after `seconds`.

  A trace hook is per thread, so this works in worker threads. It cannot interrupt a single long
  C call, which is why only size-checked expressions reach sympy. An exception raised where Python
  ignores it (a gc callback, a finalizer, a generator being closed) would be swallowed, and Python
  then drops the hook, leaving the rest of the call without a deadline; so it raises only in plain
  functions of `modules`, never in generator frames or __del__. A tracer already installed (a
  coverage tool) keeps receiving every event, so code run under a deadline is still measured.
  """
  end = time.perf_counter() + seconds
  previous = sys.gettrace()

  def trace(frame, event, arg):
    code = frame.f_code
    if (time.perf_counter() > end and not code.co_flags & _RESUMABLE
        and code.co_name != "__del__"
        and frame.f_globals.get("__name__", "").startswith(modules)):
      raise _Timeout()
    # Only "call" events reach a global hook; the previous tracer's answer is the frame's local
    # tracer (None without one: no per-line events, so the hook costs one call per call).
    if previous is None:
      return None
    local = previous(frame, event, arg)
    if sys.gettrace() is not trace:  # coverage's C tracer reinstalls itself on every call
      sys.settrace(trace)
    return local

  sys.settrace(trace)
  try:
    yield
  finally:
    sys.settrace(previous)


# --------------------------------------------------------------------------------- evaluation


def exact(node: tuple) -> Fraction | None:
  """The exact rational value of a constant rational expression, else None."""
  op = node[0]
  if op == "num":
    return node[1]
  if op in ("sym", "const", "fn"):
    return None
  args = [exact(a) for a in node[1:]]
  if any(a is None for a in args):
    return None
  if op == "neg":
    return -args[0]
  a, b = args
  if op == "add":
    return a + b
  if op == "sub":
    return a - b
  if op == "mul":
    return a * b
  if op == "div":
    return a / b if b else None
  if b.denominator != 1 or (a == 0 and b < 0):
    return None
  bits = max(abs(a.numerator).bit_length(), a.denominator.bit_length()) * abs(b.numerator)
  if abs(b.numerator) > MAX_EXPONENT or bits > MAX_BITS:
    raise Unparsable("power too large")
  return a ** b.numerator


# A private mpmath context: 96-bit floats with unbounded exponents, and no global precision
# changes that could race with other threads.
_MP = mpmath.MPContext()
_MP.prec = 96
_MP_FUNCS = {"sqrt": _MP.sqrt, "sin": _MP.sin, "cos": _MP.cos, "tan": _MP.tan, "ln": _MP.log,
             "log": _MP.log, "exp": _MP.exp}


def _bounded(value):
  if _MP.isnan(value) or _MP.isinf(value) or (value != 0 and _MP.mag(value) > MAX_MAGNITUDE):
    raise OverflowError("value out of range")
  return value


def numeric(node: tuple, env: dict):
  """The value of an AST with symbols from env, in _MP arithmetic; raises if it is undefined or
  its magnitude passes 2**MAX_MAGNITUDE (guards keep every mpmath call cheap)."""
  op = node[0]
  if op == "num":
    return _MP.mpf(node[1].numerator) / node[1].denominator
  if op == "sym":
    return env[node[1]]
  if op == "const":
    return _MP.pi if node[1] == "pi" else _MP.e
  args = [numeric(a, env) for a in node[2 if op == "fn" else 1:]]
  if op == "neg":
    return -args[0]
  if op == "fn":
    (x,) = args
    if node[1] in ("sin", "cos", "tan", "exp") and abs(x) > MAX_MAGNITUDE:
      raise OverflowError(f"{node[1]} of a huge argument")
    return _bounded(_MP_FUNCS[node[1]](x))
  a, b = args
  if op == "add":
    return _bounded(a + b)
  if op == "sub":
    return _bounded(a - b)
  if op == "mul":
    return _bounded(a * b)
  if op == "div":
    return _bounded(a / b)  # ZeroDivisionError for b == 0
  if a == 0:
    return _bounded(_MP.power(a, b))
  if abs(b) * max(1, abs(_MP.log(abs(a)))) > MAX_MAGNITUDE:
    raise OverflowError("power too large")
  return _bounded(_MP.power(a, b))


def symbols(node: tuple) -> set[str]:
  """The names of the free symbols of an AST."""
  return _symbols(node, set())


def _symbols(node: tuple, out: set) -> set:
  if node[0] == "sym":
    out.add(node[1])
  elif node[0] not in ("num", "const"):
    for arg in node[2 if node[0] == "fn" else 1:]:
      _symbols(arg, out)
  return out


def to_sympy(node: tuple) -> sympy.Expr:
  """The AST as a sympy expression."""
  op = node[0]
  if op == "num":
    return sympy.Rational(node[1].numerator, node[1].denominator)
  if op == "sym":
    return sympy.Symbol(node[1])
  if op == "const":
    return sympy.pi if node[1] == "pi" else sympy.E
  if op == "fn":
    fn = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
          "ln": sympy.log, "log": sympy.log, "exp": sympy.exp}[node[1]]
    return fn(to_sympy(node[2]))
  args = [to_sympy(a) for a in node[1:]]
  if op == "neg":
    return -args[0]
  a, b = args
  return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
          "div": lambda: a / b, "pow": lambda: sympy.Pow(a, b)}[op]()


def _size(node: tuple) -> int:
  return 1 + sum(_size(a) for a in node[1:] if isinstance(a, tuple))


def _sympy_safe(node: tuple, budget: int = MAX_EXPONENT) -> bool:
  """Whether sympy can build and simplify `node` without one huge C computation: literals are
  small, and along every chain of nested powers the exponents multiply to at most MAX_EXPONENT
  (simplify folds (a^p)^q into a^(p·q), and a power of a big integer is a single C call that no
  deadline interrupts). A constant exponent counts as max(|numerator|, denominator), or its
  magnitude when it is not rational (e.g. 91.59^91.51); an exponent with symbols counts as 1."""
  op = node[0]
  if op == "num":
    return abs(node[1].numerator) < 10**6 and node[1].denominator < 10**6
  if op == "pow":
    try:
      exponent = exact(node[2])
    except Unparsable:
      return False
    if exponent is not None:
      factor = max(abs(exponent.numerator), exponent.denominator)
    elif _symbols(node[2], set()):
      factor = 1
    else:
      try:
        magnitude = abs(numeric(node[2], {}))
      except (OverflowError, ZeroDivisionError, ValueError, KeyError):
        return False
      if not magnitude <= budget:  # also NaN
        return False
      factor = max(1, int(magnitude) + 1)
    return factor <= budget and _sympy_safe(node[1], budget // factor) and _sympy_safe(node[2])
  return all(_sympy_safe(a, budget) for a in node[1:] if isinstance(a, tuple))


# --------------------------------------------------------------------------------- comparison


def _close(x, y, tol: float = 1e-9) -> bool:
  return bool(abs(x - y) <= tol * max(1, abs(x), abs(y)))


def _same(a: tuple, b: tuple, timeout_s: float) -> bool:
  try:
    ea, eb = exact(a), exact(b)
  except Unparsable:
    return False
  if ea is not None and eb is not None:
    return ea == eb
  symbols = sorted(_symbols(a, set()) | _symbols(b, set()))
  if len(symbols) > len(POINTS[0]):
    return False
  undecided = False
  for point in POINTS if symbols else POINTS[:1]:
    env = {s: _MP.mpf(v) for s, v in zip(symbols, point)}
    try:
      x, y = numeric(a, env), numeric(b, env)
    except (OverflowError, ZeroDivisionError, ValueError, KeyError):
      undecided = True
      continue
    if not _close(x, y):
      return False
  if not undecided:
    return True
  # No point gave finite values on both sides: ask sympy, for small, safe expressions only.
  if _size(a) + _size(b) > 80 or not (_sympy_safe(a) and _sympy_safe(b)):
    return False
  with deadline(timeout_s):
    return sympy.simplify(to_sympy(a) - to_sympy(b)) == 0


@functools.lru_cache(maxsize=1 << 16)
def check(pred: str, truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
  """(equivalent, reason) for a predicted and a true answer; reason is "" or why it failed.

  Never raises. Reasons: "unparsable", "unparsable ground truth", "timeout", "error: <type>".
  """
  if " ".join(pred.split()) == " ".join(truth.split()):
    return True, ""  # identical, even where the parser cannot read them (e.g. intervals)
  try:
    try:
      truth_items = parse(truth)
    except Unparsable:
      return False, "unparsable ground truth"
    try:
      pred_items = parse(pred)
    except Unparsable:
      return False, "unparsable"
    if len(pred_items) != len(truth_items):
      return False, ""
    return all(_same(p, t, timeout_s) for p, t in zip(pred_items, truth_items)), ""
  except _Timeout:
    return False, "timeout"
  except Exception as e:  # noqa: BLE001 - a scorer must never raise
    return False, f"error: {type(e).__name__}"


def equivalent(pred: str, truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  """Whether two answers denote the same value(s); never raises."""
  return check(pred, truth, timeout_s)[0]
