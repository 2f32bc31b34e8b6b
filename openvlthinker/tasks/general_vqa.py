"""general_vqa: attribute questions as 4-option multiple choice.

Question kinds: the colour of the only shape of a kind, the kind of the only shape of a colour,
how many shapes of a kind there are, and which shape differs from the others. Difficulty adds
shapes, shrinks them and shuffles the options (at difficulty 0 each letter keeps one meaning).
"""
import numpy as np

from openvlthinker.tasks import answers, render, registry
from openvlthinker.tasks.base import Example

_SIZES = ((16, 24), (14, 22), (12, 20), (10, 16))  # pixel range at 64 px, per difficulty
_KINDS = ("color", "shape", "count", "odd")
_LOOKS = {"circle": "round", "square": "four equal sides", "triangle": "three corners",
          "diamond": "a square on its corner"}


def _place(rng, attrs, difficulty, size):
  lo, hi = (render.scale(size, v) for v in _SIZES[difficulty])
  sizes = [render.even_size(rng, lo, hi) for _ in attrs]
  boxes = render.place_boxes(rng, sizes, size, gap=render.scale(size, 2))
  if boxes is None:
    return None
  return [render.Shape(k, c, b) for (k, c), b in zip(attrs, boxes)]


def _in_order(canonical, chosen):
  return [x for x in canonical if x in chosen]


def _color(rng, difficulty, size):
  n = min(len(render.SHAPES), 1 + difficulty)
  kinds = answers.pick(rng, render.SHAPES, n)
  shapes = _place(rng, [(k, answers.pick(rng, render.COLOR_NAMES)) for k in kinds],
                  difficulty, size)
  if shapes is None:
    return None
  target = shapes[0]
  wrong = answers.pick(rng, [c for c in render.COLOR_NAMES if c != target.color], 3)
  items = _in_order(render.COLOR_NAMES, wrong + [target.color])
  options, letter = answers.choices(rng, items, target.color, shuffle=difficulty >= 1)
  question = f"What colour is the {target.kind}?"
  thinking = f"The {target.kind} is {target.color} ({letter})."
  return shapes, question, options, letter, thinking


def _shape(rng, difficulty, size):
  n = min(len(render.COLOR_NAMES), 1 + difficulty)
  colors = answers.pick(rng, render.COLOR_NAMES, n)
  shapes = _place(rng, [(answers.pick(rng, render.SHAPES), c) for c in colors], difficulty, size)
  if shapes is None:
    return None
  target = shapes[0]
  options, letter = answers.choices(rng, render.SHAPES, target.kind, shuffle=difficulty >= 1)
  question = f"What shape is the {target.color} object?"
  thinking = f"The {target.color} object has {_LOOKS[target.kind]}: a {target.kind} ({letter})."
  return shapes, question, options, letter, thinking


def _count(rng, difficulty, size):
  kind = answers.pick(rng, render.SHAPES)
  count = int(rng.integers(1, 5))
  others = int(rng.integers(0, 2 + min(difficulty, 1)))  # at most 6 shapes
  colors = answers.pick(rng, render.COLOR_NAMES, count)
  other_kinds = [k for k in render.SHAPES if k != kind]
  attrs = [(kind, c) for c in colors] + [
      (answers.pick(rng, other_kinds), answers.pick(rng, render.COLOR_NAMES))
      for _ in range(others)]
  shapes = _place(rng, attrs, difficulty, size)
  if shapes is None:
    return None
  first = max(0, count - int(rng.integers(0, 4)))
  items = [str(v) for v in range(first, first + 4)]
  options, letter = answers.choices(rng, items, str(count), shuffle=difficulty >= 1)
  question = f"How many {kind}s are there?"
  thinking = f"{kind.capitalize()}s: {', '.join(colors)}. Count {count} ({letter})."
  return shapes, question, options, letter, thinking


def _odd(rng, difficulty, size):
  kind, color = answers.pick(rng, render.SHAPES), answers.pick(rng, render.COLOR_NAMES)
  if rng.random() < 0.5:
    odd = (kind, answers.pick(rng, [c for c in render.COLOR_NAMES if c != color]))
  else:
    odd = (answers.pick(rng, [k for k in render.SHAPES if k != kind]), color)
  n_same = 2 + min(2, difficulty)
  shapes = _place(rng, [(kind, color)] * n_same + [odd], difficulty, size)
  if shapes is None:
    return None
  common, different = shapes[0], shapes[-1]
  names = [f"{c} {k}" for k in render.SHAPES for c in render.COLOR_NAMES]
  wrong = answers.pick(rng, [x for x in names if x not in (common.name, different.name)], 2)
  items = _in_order(names, wrong + [common.name, different.name])
  options, letter = answers.choices(rng, items, different.name, shuffle=difficulty >= 1)
  question = "Which shape is different from the others?"
  thinking = f"{n_same} are {common.name}s; the {different.name} differs ({letter})."
  order = rng.permutation(len(shapes))  # the odd one is not always drawn last
  return [shapes[i] for i in order], question, options, letter, thinking


_BUILDERS = {"color": _color, "shape": _shape, "count": _count, "odd": _odd}


# Length: science and STEM questions take the longest chains, 1000-1400 tokens in the paper.
@registry.register_task("general_vqa", ("multiple choice",), aliases=("general_vqa_science_stem",),
                        length_thresholds=(500, 1000, 1400, 2100))
def sample(rng: np.random.Generator, difficulty: int = 0, image_size: int = 64) -> Example:
  """One attribute question (colour, shape, count or odd one out) with 4 options."""
  kind = answers.pick(rng, _KINDS)
  shapes, question, options, letter, thinking = answers.build_scene(
      _BUILDERS, kind, rng, difficulty, image_size, "general_vqa")
  return answers.shape_scene_example("general_vqa", kind, image_size, shapes, question, options,
                                     letter, thinking, "multiple choice")
