"""spatial_reasoning: relations between named shapes.

Question kinds: relative position (left / right / above / below), nearest shape and bigger shape
(multiple choice); how many shapes lie in one half of the image (numerical); the distance between
two centres in pixels and a width ratio (regression). Scenes are redrawn until the answer is
unambiguous by a clear margin. Difficulty adds shapes, shrinks them and shuffles the options.
"""
import math

import numpy as np

from openvlthinker.tasks import answers, render, registry
from openvlthinker.tasks.base import Example

_SIZES = ((14, 22), (12, 20), (10, 18), (10, 16))  # pixel range at 64 px, per difficulty
_RELATIONS = ("left", "right", "above", "below")
_HALVES = {"left": "x <", "right": "x >", "top": "y <", "bottom": "y >"}
_KINDS = ("relation", "nearest", "bigger", "count", "distance", "ratio")


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _xy(shape: render.Shape) -> str:
  return f"({shape.center[0]},{shape.center[1]})"


def _shapes(rng, n, difficulty, image_size, same_kind_pair=False, **place):
  """n shapes with distinct names, or None when they do not fit. With same_kind_pair the first two
  share their kind (so their sizes compare as widths)."""
  lo, hi = (render.scale(image_size, v) for v in _SIZES[difficulty])
  combos = [(k, c) for k in render.SHAPES for c in render.COLOR_NAMES]
  attrs = answers.pick(rng, combos, n)
  if same_kind_pair:
    colors = [c for c in render.COLOR_NAMES if c != attrs[0][1]]
    attrs[1] = (attrs[0][0], answers.pick(rng, colors))
    if attrs[1] in attrs[2:]:
      return None
  sizes = [render.even_size(rng, lo, hi) for _ in range(n)]
  boxes = render.place_boxes(rng, sizes, image_size, gap=render.scale(image_size, 2), **place)
  if boxes is None:
    return None
  return [render.Shape(k, c, b) for (k, c), b in zip(attrs, boxes)]


def _relation(rng, difficulty, size):
  shapes = _shapes(rng, 2 + difficulty, difficulty, size)
  if shapes is None:
    return None
  a, b = shapes[0], shapes[1]
  dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
  big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
  if big < render.scale(size, 10) or big < 2 * small:
    return None
  if abs(dx) > abs(dy):
    rel = "left" if dx < 0 else "right"
  else:
    rel = "above" if dy < 0 else "below"
  options, letter = answers.choices(rng, _RELATIONS, rel, shuffle=difficulty >= 1)
  question = f"Where is the {a.name} relative to the {b.name}?"
  thinking = (f"{_cap(a.name)} at {_xy(a)}, {b.name} at {_xy(b)}: dx {dx}, dy {dy}, "
              f"so {rel} ({letter}).")
  return shapes, question, options, letter, thinking, "multiple choice"


def _nearest(rng, difficulty, size):
  shapes = _shapes(rng, min(5, 3 + difficulty), difficulty, size)
  if shapes is None:
    return None
  ref, others = shapes[0], shapes[1:]
  dists = [round(math.dist(ref.center, s.center)) for s in others]
  ranked = sorted(dists)
  if ranked[1] - ranked[0] < render.scale(size, 3):
    return None
  best = others[int(np.argmin(dists))]
  options, letter = answers.choices(rng, [s.name for s in others], best.name,
                                    shuffle=difficulty >= 1)
  question = f"Which shape is nearest to the {ref.name}?"
  listed = ", ".join(f"{s.name} {d}" for s, d in zip(others, dists))
  thinking = f"Distances from the {ref.name}: {listed}. Nearest: {best.name} ({letter})."
  return shapes, question, options, letter, thinking, "multiple choice"


def _bigger(rng, difficulty, size):
  shapes = _shapes(rng, 2 + difficulty, difficulty, size, same_kind_pair=True)
  if shapes is None:
    return None
  a, b = shapes[0], shapes[1]
  if abs(a.size - b.size) < render.scale(size, 4):
    return None
  best = a if a.size > b.size else b
  options, letter = answers.choices(rng, [a.name, b.name], best.name, shuffle=difficulty >= 1)
  question = f"Which is bigger, the {a.name} or the {b.name}?"
  sign = ">" if a.size > b.size else "<"
  thinking = (f"{_cap(a.name)} width {a.size}, {b.name} width {b.size}; "
              f"{a.size} {sign} {b.size}, so {best.name} ({letter}).")
  return shapes, question, options, letter, thinking, "multiple choice"


def _count(rng, difficulty, size):
  half = answers.pick(rng, tuple(_HALVES))
  mid = size // 2
  place = {"avoid_x": mid} if half in ("left", "right") else {"avoid_y": mid}
  shapes = _shapes(rng, min(5, 3 + difficulty), difficulty, size, **place)
  if shapes is None:
    return None
  axis = 0 if half in ("left", "right") else 1
  below = half in ("left", "top")
  inside = [s for s in shapes if (s.center[axis] < mid) == below]
  question = f"How many shapes are in the {half} half?"
  rule = f"{_HALVES[half]} {mid}"
  if inside:
    thinking = f"Centres with {rule}: {', '.join(s.name for s in inside)}. Count {len(inside)}."
  else:
    thinking = f"No centre has {rule}. Count 0."
  return shapes, question, (), str(len(inside)), thinking, "numerical"


def _distance(rng, difficulty, size):
  shapes = _shapes(rng, 2 + difficulty, difficulty, size)
  if shapes is None:
    return None
  a, b = shapes[0], shapes[1]
  dx, dy = abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])
  dist = math.hypot(dx, dy)
  value = int(math.floor(dist + 0.5))
  question = f"About how many pixels apart are the centres of the {a.name} and the {b.name}?"
  thinking = (f"{_cap(a.name)} at {_xy(a)}, {b.name} at {_xy(b)}: "
              f"sqrt({dx}^2+{dy}^2) = {dist:.1f}, about {value}.")
  return shapes, question, (), str(value), thinking, "regression"


def _ratio(rng, difficulty, size):
  shapes = _shapes(rng, 2 + difficulty, difficulty, size, same_kind_pair=True)
  if shapes is None:
    return None
  a, b = shapes[0], shapes[1]
  if a.size < b.size:
    a, b = b, a
  if a.size - b.size < render.scale(size, 4) or (20 * a.size) % b.size == 0 and (
      10 * a.size) % b.size != 0:
    return None  # too close, or a ratio like 1.25 whose one-decimal rounding is a coin flip
  ratio = f"{a.size / b.size:.1f}"
  question = f"How many times wider is the {a.name} than the {b.name}?"
  thinking = f"{_cap(a.name)} width {a.size}, {b.name} width {b.size}; {a.size}/{b.size} = {ratio}."
  return shapes, question, (), ratio, thinking, "regression"


_BUILDERS = {"relation": _relation, "nearest": _nearest, "bigger": _bigger, "count": _count,
             "distance": _distance, "ratio": _ratio}


# Length: the paper saw 300-600 tokens of reasoning.
@registry.register_task("spatial_reasoning", ("multiple choice", "numerical", "regression"),
                        length_thresholds=(150, 300, 600, 900))
def sample(rng: np.random.Generator, difficulty: int = 0, image_size: int = 64) -> Example:
  """One relation question about a scene of named shapes."""
  kind = answers.pick(rng, _KINDS)
  shapes, question, options, answer, thinking, problem_type = answers.build_scene(
      _BUILDERS, kind, rng, difficulty, image_size, "spatial_reasoning")
  return answers.shape_scene_example("spatial_reasoning", kind, image_size, shapes, question,
                                     options, answer, thinking, problem_type)
