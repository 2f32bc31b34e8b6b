"""math_reasoning: answers recomputed with sympy from the strings actually drawn in the image."""
import re

import pytest
import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                        parse_expr, standard_transformations)

from openvlthinker.tasks import registry

_T = standard_transformations + (implicit_multiplication_application, convert_xor)
x = sympy.Symbol("x")


def _sym(text: str) -> sympy.Expr:
  return sympy.nsimplify(parse_expr(text.replace("×", "*"), transformations=_T))


def _expected(question: str, drawn: list[str]) -> sympy.Expr:
  if question == "What is the value of the expression?":
    (text,) = drawn
    return _sym(text)
  if question == "Solve the equation for x.":
    lhs, rhs = drawn[0].split("=")
    (root,) = sympy.solve(sympy.Eq(_sym(lhs), _sym(rhs)), x)
    return root
  if question == "Expand the product.":
    return sympy.expand(_sym(drawn[0]))
  m = re.fullmatch(r"What is the (\w+) of the (rectangle|right triangle|circle)\?", question)
  sides = [sympy.Integer(int(t)) for t in drawn]
  if m[2] == "rectangle":
    w, h = sides
    return w * h if m[1] == "area" else 2 * (w + h)
  if m[2] == "right triangle":
    a, b = sides
    return a * b / 2
  (r,) = sides
  return sympy.pi * r**2 if m[1] == "area" else 2 * sympy.pi * r


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_answer_equals_sympy_on_the_drawn_problem(difficulty, drawn_text, sample_directly):
  questions = set()
  for seed in range(50):
    drawn_text.clear()
    ex = sample_directly("math_reasoning", seed, difficulty)
    expected = _expected(ex.question, list(drawn_text))
    assert sympy.simplify(_sym(ex.answer) - expected) == 0, (seed, drawn_text, ex.answer)
    assert ex.problem_type == "math"
    questions.add(ex.question)
  assert len(questions) >= 3


def test_expansions_are_in_standard_form():
  for index in range(40):
    ex = registry.generate("math_reasoning", "train", index, 3)
    if ex.question == "Expand the product.":
      assert re.fullmatch(r"x\^2([+-]\d*x)?([+-]\d+)?", ex.answer), ex.answer


def test_figures_are_drawn_to_scale(drawn_text, sample_directly):
  fill = (205, 225, 255)
  for seed in range(40):
    drawn_text.clear()
    ex = sample_directly("math_reasoning", seed, 1)
    if "rectangle" not in ex.question:
      continue
    ys, xs = (ex.images[0] == fill).all(-1).nonzero()
    ratio = (xs.max() - xs.min() + 3) / (ys.max() - ys.min() + 3)  # + the 1.5 px outline sides
    w, h = (int(t) for t in drawn_text)
    assert abs(ratio - w / h) < 0.15 * max(w / h, 1), (seed, ratio, w, h)
