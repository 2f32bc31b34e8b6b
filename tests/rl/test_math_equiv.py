"""Math answer equivalence: LaTeX normalisation, exactness, bounds and the per-call deadline."""
import json
import sys
import threading
import time

import pytest
import sympy

from openvlthinker.rl import math_equiv, math_parse


@pytest.mark.parametrize("pred, truth", [
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "1/2"), ("\\tfrac{3}{6}", ".5"),
    ("$\\frac{\\sqrt{3}}{2}$", "sqrt(3)/2"), ("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}"),
    ("(x+2)(x+3)", "x^2+5x+6"), ("\\left(x+1\\right)^{2}", "x^2 + 2x + 1"),
    ("9\\pi", "9*pi"), ("9π", "9pi"), ("\\boxed{7/2}", "3.5"), ("x = 5", "5"),
    ("1,000", "1000"), ("2, 3", "2,3"), ("2\\cdot 3", "6"), ("2 \\times 3", "6"), ("6÷4", "1.5"),
    ("90^\\circ", "90"), ("15\\text{ cm}", "15"), ("\\sqrt[3]{8}", "2"), ("2^{-1}", "0.5"),
    ("sin(x)^2+cos(x)^2", "1"), ("e^{0}", "1"),
    ("x^2y", "y x x"), ("2\\pi r", "2 r pi"), ("−3", "-3"), ("1e3", "1000"),
    ("1/2 + 1/3", "5/6"), ("7 - 1/2", "13/2"),  # exact rational arithmetic
    ("x^{2} = \\boxed{7}", "7"),  # the box's braces, not an earlier pair
])
def test_equivalent(pred, truth):
  assert math_equiv.equivalent(pred, truth)
  assert math_equiv.equivalent(truth, pred)


@pytest.mark.parametrize("pred, truth", [
    ("0.51", "1/2"), ("28.27", "9*pi"), ("x^2+5x+7", "(x+2)(x+3)"), ("3, 2", "2, 3"),
    ("2", "2, 3"), ("x", "y"), ("1/3", "0.333"), ("1/0", "1"), ("\\infty", "1"), ("", "1"),
])
def test_not_equivalent(pred, truth):
  assert not math_equiv.equivalent(pred, truth)


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo hi')", "lambda: 1", "9^9^9^9", "2^{2^{2^{2^{2}}}}",
    "(" * 60 + "1" + ")" * 60, "1" * 40, "x" * 400, "\\unknown{1}", "1!", "|x|",
    # Undefined at every point, so they reach the sympy fallback, which must refuse them: sympy
    # would compute 2^(10^100) as an exact integer, one C call that never returns.
    "\\sin(2^{10^{100}})", "x^{10^{100}}/(x-x)", "2^{2^{2^{2^{2}}}}/(x-x)",
    # Found by the fuzz test: an inexact constant exponent (91.59^91.51) that overflows at every
    # point, and exponents that each pass the bound but multiply past it when nested.
    "9^91.59^91.51.5", "((x^{90})^{90})^{90}/(x-x)",
])
def test_hostile_input_is_rejected_quickly(text):
  start = time.perf_counter()
  same, reason = math_equiv.check(text, "1")
  assert not same and reason in ("unparsable", "timeout", "")
  assert time.perf_counter() - start < 0.5


def test_deadline_interrupts_sympy_work_in_a_worker_thread():
  outcome = {}
  x = sympy.Symbol("x")

  def spin():
    start = time.perf_counter()
    try:
      with math_equiv.deadline(0.05):
        k = 0
        while True:
          k += 1
          sympy.expand((x + k) ** 2)
    except BaseException as e:  # noqa: BLE001 - _Timeout is private on purpose
      outcome["type"] = type(e).__name__
    outcome["seconds"] = time.perf_counter() - start

  for _ in range(20):  # sympy runs generators and assumption caches: hit many kinds of frame
    outcome.clear()
    thread = threading.Thread(target=spin, daemon=True)  # daemon: a regression cannot hang pytest
    thread.start()
    thread.join(5)
    assert outcome.get("type") == "_Timeout" and outcome["seconds"] < 1.0, outcome


def test_deadline_spares_frames_outside_sympy_and_mpmath():
  # A gc callback or finalizer of another library may run inside the block: raising there would
  # be swallowed and would drop the hook. Only sympy / mpmath frames are interrupted.
  calls = []
  before = sys.gettrace()  # None, or a coverage tracer when the suite measures coverage
  with pytest.raises(BaseException) as info:
    with math_equiv.deadline(0.0):
      (lambda: calls.append(1))()
      sympy.Integer(2) + sympy.Symbol("y")
  assert calls == [1] and type(info.value).__name__ == "_Timeout"
  assert sys.gettrace() is before  # the previous hook is restored


def test_sympy_fallback_runs_under_the_deadline():
  # Undefined at every evaluation point, so the comparison falls back to sympy.simplify.
  pred, truth = "1/(x-x) + 1", "1/(y-y)"
  assert math_equiv.check(pred, truth, timeout_s=1e-9) == (False, "timeout")
  assert math_equiv.check(pred, truth, timeout_s=5.0)[1] != "timeout"


def test_equivalent_passes_its_deadline_to_the_sympy_fallback():
  # Too large for the numeric check at every point: only sympy can say these are one value.
  # (The deadline case first: sympy caches what it has simplified once.)
  pred, truth = "\\exp(10^{5} x)", "\\exp(100000 x)"
  assert not math_equiv.equivalent(pred, truth, timeout_s=1e-9)
  assert math_equiv.equivalent(pred, truth, timeout_s=5.0)


@pytest.mark.parametrize("text", ["(1]", "[1)", "{1)", "(1}", "[1}", "{1]"])
def test_a_bracket_closes_only_its_own_kind(text):
  assert math_equiv.check(text, "1") == (False, "unparsable")
  assert math_equiv.check(text.replace(text[-1], {"(": ")", "[": "]", "{": "}"}[text[0]]),
                          "1") == (True, "")


def test_an_exact_power_past_the_bound_is_refused_by_name():
  with pytest.raises(math_parse.Unparsable, match="^power too large$"):
    math_equiv.exact(math_parse.parse("2^{100000}")[0])


def test_numeric_agreement_decides_without_sympy():
  # Identity testing at fixed points: equal to 1e-9 relative counts as equal, less does not.
  assert math_equiv.equivalent("28.274333882308138", "9\\pi")
  assert not math_equiv.equivalent("28.2743", "9\\pi")
  assert not math_equiv.equivalent("0.3333333333", "1/3")  # rationals compare exactly


def test_results_agree_across_threads():
  pairs = [(f"(x+{k})^2", f"x^2+{2 * k}x+{k * k}") for k in range(1, 9)]
  pairs += [(f"{k}/4", f"{k / 4}") for k in range(8)] + [("x+1", "x+2")] * 4
  serial = [math_equiv.check(p, t, 2.0)[0] for p, t in pairs]
  math_equiv.check.cache_clear()
  got = [None] * len(pairs)

  def work(i):
    got[i] = math_equiv.check(*pairs[i], 2.0)[0]

  threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert got == serial and serial.count(False) == 4


def test_deadline_passes_events_on_to_a_previous_tracer():
  # A coverage tool's tracer stays in charge inside the block, so code under a deadline (all
  # of math-verify's) is still measured.
  events = []

  def target():
    value = 1
    return value + 1

  def local(frame, event, arg):
    if frame.f_code is target.__code__:
      events.append(event)
    return local

  before = sys.gettrace()
  sys.settrace(local)
  try:
    with math_equiv.deadline(10.0):
      target()
  finally:
    sys.settrace(before)
  assert events[0] == "call" and "line" in events and events[-1] == "return", events


def test_deadline_interrupts_only_the_named_modules():
  calls = []
  with pytest.raises(BaseException) as info:
    with math_equiv.deadline(0.0, modules=("json",)):
      sympy.Integer(2) + sympy.Symbol("y")
      calls.append(1)
      json.JSONEncoder().encode({"a": 1})
  assert calls == [1] and type(info.value).__name__ == "_Timeout"
  assert math_equiv.Timeout is type(info.value)


def _ast(text):
  (node,) = math_parse.parse(text)
  return node


@pytest.mark.parametrize("text, want", [
    ("\\pi", sympy.pi), ("e", sympy.E), ("\\sqrt{x}", sympy.sqrt(sympy.Symbol("x"))),
    ("\\sin(x)", sympy.sin(sympy.Symbol("x"))), ("x+1", sympy.Symbol("x") + 1),
    ("x-y", sympy.Symbol("x") - sympy.Symbol("y")), ("x/y", sympy.Symbol("x") / sympy.Symbol("y")),
    ("x^{3}", sympy.Symbol("x") ** 3), ("-x", -sympy.Symbol("x")), ("3/4", sympy.Rational(3, 4)),
])
def test_to_sympy_builds_each_kind_of_node(text, want):
  """The sympy fallback's translation, node kind by node kind (a wrong child or constant would
  only show where no numeric point decides)."""
  assert sympy.simplify(math_equiv.to_sympy(_ast(text)) - want) == 0


def test_numeric_powers_of_zero_and_big_powers():
  env = {"x": math_equiv._MP.mpf(2)}
  assert math_equiv.numeric(_ast("0^{x}"), env) == 0  # log(0) would make it "too large"
  assert math_equiv.numeric(_ast("1^{x}"), env) == 1
  with pytest.raises(OverflowError):
    math_equiv.numeric(_ast("10^{10^{x+3}}"), env)
  for fn in ("sin", "cos", "tan", "exp"):  # mpmath would reduce a huge argument exactly: slow
    with pytest.raises(OverflowError, match=f"{fn} of a huge argument"):
      math_equiv.numeric(_ast(f"\\{fn}(10^{{5}})"), env)


def test_sympy_is_spared_big_literals_and_towers():
  assert math_equiv._sympy_safe(_ast("999999 x"))
  assert not math_equiv._sympy_safe(_ast("1000000 x"))
  assert not math_equiv._sympy_safe(_ast("x / 1000000"))
  assert not math_equiv._sympy_safe(_ast("(x^{1000})^{1000}"))
  assert math_equiv._sympy_safe(_ast("0.00001 x"))  # denominators below 10^6 only
  assert not math_equiv._sympy_safe(_ast("0.000001 x"))
  bound = math_equiv.MAX_EXPONENT
  assert math_equiv._sympy_safe(_ast(f"x^{{{bound}}}"))  # the bound itself is allowed
  assert not math_equiv._sympy_safe(_ast(f"x^{{{bound + 1}}}"))


def test_the_relative_tolerance_is_of_the_larger_value_whichever_is_the_truth():
  """Numeric agreement is to 1e-9 of the larger magnitude, so the verdict does not depend on
  which answer is the truth: 10^10·π and (10^10 + 10 + 5·10^-9)·π differ by just under 1e-9 of
  the larger (just over 1e-9 of the smaller) and are equal either way round; twice as far apart
  they are different either way round."""
  big, small = "10000000010.000000005\\pi", "10000000000\\pi"
  assert math_equiv.check(big, small) == (True, "")
  assert math_equiv.check(small, big) == (True, "")
  further = "10000000010.00000002\\pi"
  assert math_equiv.check(further, small) == (False, "")
  assert math_equiv.check(small, further) == (False, "")


def test_a_symbolic_exponent_that_overflows_everywhere_is_left_to_sympy():
  """10^(10000x) overflows at every evaluation point, so sympy decides; an exponent with a
  symbol counts as 1 towards the tower bound (it is not a literal power sympy would expand)."""
  assert math_equiv._sympy_safe(_ast("10^{10000x}"))
  assert math_equiv.check("10^{10000x}", "10^{5000x}\\cdot10^{5000x}", 5.0) == (True, "")
