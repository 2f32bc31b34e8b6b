"""math_reasoning: a rendered arithmetic or algebra problem, or a geometry figure with labelled
lengths. Answers are numbers or expressions, scored by symbolic equivalence.

Problem kinds by difficulty: 0 sums and rectangles; 1 adds two-operation arithmetic and right
triangles; 2 adds linear equations; 3 adds fractional solutions, expanding (x+a)(x+b) and circles
(answers in pi). `meta["problem"]` holds the structured parameters.
"""
from fractions import Fraction

import numpy as np

from openvlthinker.tasks import answers, render, registry
from openvlthinker.tasks.base import Example

_POOLS = (
    ("sum", "rect"),
    ("sum", "two_ops", "rect", "triangle"),
    ("two_ops", "linear", "rect", "triangle"),
    ("two_ops", "linear", "expand", "triangle", "circle"),
)
_FILL = (205, 225, 255)


def _num(value: Fraction) -> str:
  """A rational as the answer text: integer, one-decimal half, or a reduced fraction."""
  if value.denominator == 1:
    return str(value.numerator)
  if value.denominator == 2:
    return f"{float(value):.1f}"
  return f"{value.numerator}/{value.denominator}"


def _poly(c1: int, c0: int) -> str:
  """x^2 + c1 x + c0 written compactly."""
  text = "x^2"
  if c1:
    text += "+x" if c1 == 1 else "-x" if c1 == -1 else f"{c1:+d}x"
  if c0:
    text += f"{c0:+d}"
  return text


def _sum(rng, difficulty):
  hi = 15 if difficulty == 0 else 30
  a, b = (int(v) for v in rng.integers(1, hi + 1, size=2))
  if rng.random() < 0.5:
    return {"kind": "sum", "text": f"{a}+{b}"}, f"{a} + {b} = {a + b}.", str(a + b)
  a, b = max(a, b), min(a, b)
  return {"kind": "sum", "text": f"{a}-{b}"}, f"{a} - {b} = {a - b}.", str(a - b)


def _two_ops(rng, difficulty):
  a = int(rng.integers(1, 13))
  b, c = (int(v) for v in rng.integers(2, 10, size=2))
  p, q = b * c, a + b
  forms = (
      (f"{a}+{b}×{c}", f"{b}*{c} = {p}; {a} + {p} = {a + p}.", a + p),
      (f"{b}×{c}+{a}", f"{b}*{c} = {p}; {p} + {a} = {p + a}.", p + a),
      (f"{b}×{c}-{a}", f"{b}*{c} = {p}; {p} - {a} = {p - a}.", p - a),
      (f"({a}+{b})×{c}", f"{a}+{b} = {q}; {q}*{c} = {q * c}.", q * c),
  )
  text, steps, value = forms[int(rng.integers(len(forms)))]
  return {"kind": "two_ops", "text": text}, steps, str(value)


def _linear(rng, difficulty):
  a = int(rng.integers(2, 10))
  b = int(rng.integers(1, 16)) * (1 if difficulty < 3 or rng.random() < 0.5 else -1)
  if difficulty < 3:
    c = a * int(rng.integers(1, 10)) + b
  else:
    c = int(rng.integers(b + 1, b + 30))
  x = Fraction(c - b, a)
  text = f"{a}x{b:+d}={c}"
  undo = f"{c} - {b}" if b > 0 else f"{c} + {-b}"
  ratio = f"{c - b}/{a}"
  solved = ratio if _num(x) == ratio else f"{ratio} = {_num(x)}"
  steps = f"{a}x = {undo} = {c - b}, so x = {solved}."
  return {"kind": "linear", "text": text}, steps, _num(x)


def _expand(rng, difficulty):
  a, b = (int(v) for v in rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5], size=2))
  text = f"(x{a:+d})(x{b:+d})"
  answer = _poly(a + b, a * b)
  steps = f"x^2 + ({a}{b:+d})x + ({a})({b}) = {answer}."
  return {"kind": "expand", "text": text}, steps, answer


def _rect(rng, difficulty):
  w, h = (int(v) for v in rng.integers(2, 10, size=2))
  if rng.random() < 0.5:
    return {"kind": "rect", "ask": "area", "w": w, "h": h}, f"Area = {w}*{h} = {w * h}.", \
        str(w * h)
  return ({"kind": "rect", "ask": "perimeter", "w": w, "h": h},
          f"Perimeter = 2*({w}+{h}) = {2 * (w + h)}.", str(2 * (w + h)))


def _triangle(rng, difficulty):
  a, b = (int(v) for v in rng.integers(2, 10, size=2))
  area = _num(Fraction(a * b, 2))
  return {"kind": "triangle", "ask": "area", "a": a, "b": b}, f"Area = {a}*{b}/2 = {area}.", area


def _circle(rng, difficulty):
  r = int(rng.integers(1, 10))
  if rng.random() < 0.5:
    return ({"kind": "circle", "ask": "area", "r": r}, f"Area = pi*{r}^2 = {r * r}*pi.",
            f"{r * r}*pi")
  return ({"kind": "circle", "ask": "circumference", "r": r},
          f"Circumference = 2*pi*{r} = {2 * r}*pi.", f"{2 * r}*pi")


_BUILDERS = {"sum": _sum, "two_ops": _two_ops, "linear": _linear, "expand": _expand,
             "rect": _rect, "triangle": _triangle, "circle": _circle}
_QUESTIONS = {
    "sum": "What is the value of the expression?",
    "two_ops": "What is the value of the expression?",
    "linear": "Solve the equation for x.",
    "expand": "Expand the product.",
}


def _draw_text(draw, size, text):
  font_size = render.fit_font_size([text], size - render.scale(size, 6), size // 2,
                                   start=render.scale(size, 24), smallest=render.scale(size, 9))
  render.draw_centered(draw, (size / 2, size / 2), text, font_size)


def _draw_figure(draw, size, problem):
  s = lambda v: render.scale(size, v)  # noqa: E731 - 64 px units
  line, label = s(2), s(14)
  if problem["kind"] == "rect":
    w, h = problem["w"], problem["h"]
    unit = min((size - s(26)) / w, (size - s(26)) / h)
    x0, y0 = s(6), s(6)
    x1, y1 = x0 + round(w * unit), y0 + round(h * unit)
    draw.rectangle([x0, y0, x1, y1], fill=_FILL, outline=render.BLACK, width=line)
    render.draw_centered(draw, ((x0 + x1) / 2, y1 + s(9)), str(w), label)
    render.draw_centered(draw, (x1 + s(9), (y0 + y1) / 2), str(h), label)
  elif problem["kind"] == "triangle":
    a, b = problem["a"], problem["b"]
    unit = min((size - s(26)) / a, (size - s(26)) / b)
    x0, y1 = s(20), size - s(20)
    x1, y0 = x0 + round(a * unit), y1 - round(b * unit)
    draw.polygon([(x0, y1), (x1, y1), (x0, y0)], fill=_FILL, outline=render.BLACK, width=line)
    draw.rectangle([x0, y1 - s(5), x0 + s(5), y1], outline=render.BLACK, width=1)
    render.draw_centered(draw, ((x0 + x1) / 2, y1 + s(9)), str(a), label)
    render.draw_centered(draw, (x0 - s(9), (y0 + y1) / 2), str(b), label)
  else:
    c, radius = size / 2, size * 0.4
    draw.ellipse([c - radius, c - radius, c + radius, c + radius], fill=_FILL,
                 outline=render.BLACK, width=line)
    draw.line([(c, c), (c + radius, c)], fill=render.BLACK, width=line)
    render.draw_centered(draw, (c + radius / 2, c - s(8)), str(problem["r"]), label)


# Length: the paper saw 600-1100 tokens of reasoning.
@registry.register_task("math_reasoning", ("math",), length_thresholds=(300, 600, 1100, 1650))
def sample(rng: np.random.Generator, difficulty: int = 0, image_size: int = 64) -> Example:
  """One arithmetic, algebra or geometry problem, drawn in the image."""
  kind = answers.pick(rng, _POOLS[difficulty])
  problem, steps, answer = _BUILDERS[kind](rng, difficulty)
  img, draw = render.canvas(image_size)
  if "text" in problem:
    _draw_text(draw, image_size, problem["text"])
    question = _QUESTIONS[kind]
  else:
    _draw_figure(draw, image_size, problem)
    shape = {"rect": "rectangle", "triangle": "right triangle", "circle": "circle"}[kind]
    question = f"What is the {problem['ask']} of the {shape}?"
  return Example(
      images=(render.to_array(img),),
      question=question,
      answer=answer,
      problem_type="math",
      task_type="math_reasoning",
      reasoning=answers.respond(steps, answer),
      meta={"scene": repr(sorted(problem.items())), "problem": problem},
  )
