"""The math-verify grader: the forms it reads, its guards, its deadline, and the default's split
between math_equiv and math-verify."""
import itertools
import threading
import time

import pytest
import sympy

from openvlthinker.rl import math_equiv
from openvlthinker.rl import math_verify_grader as mvg

_FRESH = itertools.count(1000)  # distinct numbers, so that no cache answers for a call
# What a grader reads is tested with time to spare: under make test's coverage tracer, on two
# loaded cores, math-verify's simplify can pass the 0.5 s production deadline (the deadline
# itself has its own tests below).
AMPLE_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _warm():
  mvg.warm_up()


@pytest.mark.parametrize("pred, truth", [
    ("The answer is 5.", "5"), ("Final answer: 2.5", "5/2"), (r"\boxed{(1, 2)}", "(1,2)"),
    ("(3, -1)", "(3,-1)"), ("[1, 2)", "[1,2)"), (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\{3, 2, 1\}", r"\{1,2,3\}"), ("1, 2", r"\{1, 2\}"), ("1 < x < 5", "(1, 5)"),
    ("x > 2", r"(2, \infty)"), ("15 cm", "15"), ("50%", "0.5"), ("75 percent", "75"),
    (r"\$25", "25"),
    (r"2\frac{1}{2}", "5/2"), ("5!", "120"), (r"\log_2 8", "3"), (r"\sin^2 x + \cos^2 x", "1"),
    (r"x=-1 \text{ or } x=1", r"\{-1, 1\}"), ("(x, y) = (2, 3)", "(2, 3)"),
])
def test_reads_what_math_equiv_cannot(pred, truth):
  assert not math_equiv.equivalent(pred, truth, AMPLE_S)
  assert mvg.check_math_verify(pred, truth, AMPLE_S) == (True, "")
  assert mvg.check(pred, truth, AMPLE_S) == (True, "")
  assert mvg.equivalent(pred, truth, AMPLE_S)


@pytest.mark.parametrize("pred, truth", [
    ("(2, 1)", "(1,2)"), ("[1, 2]", "[1,2)"), (r"\{1, 2\}", r"\{1,2,3\}"), ("2 < x < 5", "(1, 5)"),
    ("The answer is 6", "5"), ("0.3", "1/3"), ("3.14", r"\pi"), ("x^2+5x+7", "(x+2)(x+3)"),
    ("16 cm", "15"), ("40%", "0.5"), ("y^2+5y+6", "x^2+5x+6"), ("15 m", "15 cm"),
])
def test_tells_apart(pred, truth):
  assert not mvg.check(pred, truth)[0]
  assert not mvg.equivalent(pred, truth)


@pytest.mark.parametrize("pred, truth, reason", [
    ("2^{", "1/2", "unparsable"),  # cut-off LaTeX, which latex2sympy would read as 2
    ("x" * (mvg.MAX_CHARS + 1), "1", "unparsable"),
    ("5", "(" * 10 + "1" + ")" * 10, "unparsable ground truth"),
    ("abc", "1/2", "unparsable"),
    ("7", "8", ""),
])
def test_reasons(pred, truth, reason):
  assert mvg.check_math_verify(pred, truth) == (False, reason)


@pytest.mark.parametrize("text", [
    "x" * (mvg.MAX_CHARS + 1), "1" * (mvg.MAX_DIGITS + 1), "(" * (mvg.MAX_DEPTH + 1),
    "2^{2^{2^{2^{2}}}}", "9^9^9^9^9", r"\binom{999999}{499999}", r"\Gamma(99999)",
    r"\operatorname{zeros}(999, 999)", "2^{", "}{",
])
def test_text_guard_rejects(text):
  assert not mvg.text_ok(text)


@pytest.mark.parametrize("text", [
    r"\binom{50}{25}", "9^9^9", "(1, 2]", r"\{1, 2\}", r"\frac{\sqrt{2}}{3}", "x^2+x^3+x^4+x^5",
    "The answer is 5.", "1" * mvg.MAX_DIGITS,
])
def test_text_guard_accepts(text):
  assert mvg.text_ok(text)


@pytest.mark.parametrize("text", [
    "9^{9^{9}}", "x^{10^{100}}", "(10^{100})!", "1000000!", r"\sqrt[99999]{2}", "e^{e^{e^{100}}}",
    "2^{30000}", "((x^{90})^{90})^{90}", "(9^9)!",
])
def test_tree_guard_rejects(text):
  with math_equiv.deadline(5.0, mvg._DEADLINE_MODULES):
    values = [v for v in mvg.read(text) if isinstance(v, sympy.Basic)]
    assert values and not any(mvg.tree_ok(v) for v in values)


@pytest.mark.parametrize("text", ["9^9^9", "2^{10}", r"6.02 \times 10^{23}", "5!", "x^{100}",
                                  "e^{2x}", r"\sqrt[3]{8}", "(x+1)^{20}", "2^{-1000}"])
def test_tree_guard_accepts(text):  # 9^9^9 reads as (9^9)^9 = 9^81
  with math_equiv.deadline(5.0, mvg._DEADLINE_MODULES):
    assert all(mvg.tree_ok(v) for v in mvg.read(text))


@pytest.mark.parametrize("text", [
    r"\binom{999999}{499999}", r"\Gamma(999999)", r"\operatorname{zeros}(999, 999)", "9^9^9^9",
    "2^{2^{2^{2}}}", "x^{10^{100}}", "(10^{100})!", "((1000)!)!", r"\sum_{k=1}^{10^{9}} k^2",
    r"\int_0^{10^{9}} x^{9} dx", "e^{e^{e^{100}}}", r"\sin(10^{100})", r"\left(" * 5 + "1",
    "$" * 300, r"\boxed{" * 50, "x=" * 150, "answer " * 50, "1/0", r"\infty - \infty",
    r"\lim_{x\to 0} 1/x", r"\tan(\pi/2)", r"\zeta(10^{100})", "(1," * 100,
    r"\frac{d}{dx} x^{999}", "10^{-10^{10}}", r"\prod_{k=1}^{99999} k",
])
def test_hostile_input_ends_within_the_deadline(text):
  for pred, truth in [(text, "1"), ("1", text), (text, "(1, 2)"), ("(1, 2)", text),
                      (text, r"\frac{x^2+1}{2}")]:
    start = time.perf_counter()
    same, reason = mvg.check(pred, truth, timeout_s=0.1)
    # The deadline plus what the last sympy call before it has left to run.
    assert time.perf_counter() - start < 1.0, (pred, truth)
    assert not same and not reason.startswith("error"), (pred, truth, reason)


def test_deadline_interrupts_in_a_worker_thread():
  outcome = {}

  def work(timeout_s):
    k = next(_FRESH)
    outcome[timeout_s] = mvg.check_math_verify(f"({k}, {k + 1})", f"({k},{k + 1})", timeout_s)

  for timeout_s in (1e-9, 5.0):
    thread = threading.Thread(target=work, args=(timeout_s,), daemon=True)
    thread.start()
    thread.join(10)
  assert outcome == {1e-9: (False, "timeout"), 5.0: (True, "")}


def test_results_agree_across_threads():
  pairs = [(f"({k}, {k + 1})", f"({k},{k + 1})") for k in range(6)]
  pairs += [(f"The answer is {k}.", f"{k + 1}") for k in range(6)]
  pairs += [(f"x = {k}", f"{k}") for k in range(6)]
  serial = [mvg.check_math_verify(*p, 5.0) for p in pairs]
  mvg.read.cache_clear()
  got = [None] * len(pairs)

  def work(i):
    got[i] = mvg.check_math_verify(*pairs[i], 5.0)

  threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert got == serial and [s for s, _ in serial] == [True] * 6 + [False] * 6 + [True] * 6


@pytest.mark.parametrize("gold, pred, different", [
    ("x^2-1", "(x-1)(x+1)", False), (r"\frac{x^2-1}{x-1}", "x+1", False), ("x^2+1", "x^2+2", True),
    ("2", "3", True), (r"\pi", "3.14", True), ("1", r"\infty", True), (r"\infty", r"\infty", False),
    ("0.5", "50\\%", False),  # percentages are math-verify's to compare
    ("e", "2.718281828459045", False), ("x", "y", False),  # symbols matched by name
    (r"\sin^2 x + \cos^2 x", "1", False), ("0.3333333", "1/3", False),
])
def test_surely_different_is_only_said_of_different_values(gold, pred, different):
  with math_equiv.deadline(5.0, mvg._DEADLINE_MODULES):
    g, p = mvg.read(gold)[0], mvg.read(pred)[0]
    assert mvg.surely_different(g, p) is different


def test_math_equiv_decides_what_it_reads(monkeypatch):
  def fail(*args):
    raise AssertionError("math-verify should not be consulted")

  monkeypatch.setattr(mvg, "check_math_verify", fail)
  for pred, truth, same in [("0.5", "1/2", True), ("0.5", "1/3", False),
                            ("x^2+1", "(x+1)^2", False), ("15 m", "15 cm", False),
                            (r"\frac{9}{4}", "2.25", True)]:
    assert mvg.check(pred, truth) == (same, "")


def test_math_verify_reads_what_math_equiv_may_misread(monkeypatch):
  calls = []
  real = mvg.check_math_verify

  def spy(*args):
    calls.append(args[:2])
    return real(*args)

  monkeypatch.setattr(mvg, "check_math_verify", spy)
  mvg.check.cache_clear()
  # A unit the truth lacks, a percent sign, \text, a mixed number, an interval, free text.
  pairs = [("15 cm", "15"), ("0.3", r"30\%"), (r"12\text{ m}^2", "12"), (r"2\frac{1}{2}", "5/2"),
           ("[1, 2)", "[1,2)"), ("The answer is 5", "5")]
  for pred, truth in pairs:
    mvg.check(pred, truth)
  assert calls == pairs


def test_warm_up_runs_once():
  start = time.perf_counter()
  mvg.warm_up()
  assert time.perf_counter() - start < 0.01


def test_equivalent_grades_under_the_callers_deadline():
  """`equivalent` is `check` under the caller's deadline, not the default one: a pair only
  math-verify reads is refused at a deadline of 1e-9 s and accepted with time to spare."""
  k = next(_FRESH)
  pred, truth = f"({k}, {k + 1})", f"({k},{k + 1})"
  assert not mvg.equivalent(pred, truth, timeout_s=1e-9)
  assert mvg.equivalent(pred, truth, timeout_s=AMPLE_S)
