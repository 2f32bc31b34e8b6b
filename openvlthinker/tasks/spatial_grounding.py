"""spatial_grounding: find the one shape named by colour and kind; the answer is its pixel box.

Difficulty raises the number of shapes (2 to 5), shrinks them, and adds confusers that share the
target's colour (d >= 1) and its kind (d >= 2), so both words of the name matter.
"""
import numpy as np

from openvlthinker.tasks import answers, render, registry
from openvlthinker.tasks.base import Example

_NUM_SHAPES = (2, 3, 4, 5)
_SIZES = ((16, 24), (14, 22), (12, 20), (10, 16))  # pixel range at 64 px, per difficulty


def _attributes(rng: np.random.Generator, n: int, difficulty: int) -> list[tuple[str, str]]:
  """(kind, colour) of n shapes; index 0 is the target, the only one with its combination."""
  kind, color = answers.pick(rng, render.SHAPES), answers.pick(rng, render.COLOR_NAMES)
  other_kinds = [k for k in render.SHAPES if k != kind]
  other_colors = [c for c in render.COLOR_NAMES if c != color]
  attrs = [(kind, color)]
  if difficulty >= 1:
    attrs.append((answers.pick(rng, other_kinds), color))
  if difficulty >= 2:
    attrs.append((kind, answers.pick(rng, other_colors)))
  while len(attrs) < n:
    # Plain distractors differ from the target in both words.
    attrs.append((answers.pick(rng, other_kinds), answers.pick(rng, other_colors)))
  return attrs


# Length: a short answer after a short look; the paper saw about 65 tokens (taken as 50-80).
@registry.register_task("spatial_grounding", ("spatial grounding",),
                        length_thresholds=(25, 50, 80, 120))
def sample(rng: np.random.Generator, difficulty: int = 0, image_size: int = 64) -> Example:
  """A scene of shapes and the question "Where is the <colour> <kind>?"; answer its box."""
  n = _NUM_SHAPES[difficulty]
  lo, hi = (render.scale(image_size, v) for v in _SIZES[difficulty])
  while True:
    attrs = _attributes(rng, n, difficulty)
    sizes = [render.even_size(rng, lo, hi) for _ in attrs]
    boxes = render.place_boxes(rng, sizes, image_size, gap=render.scale(image_size, 2))
    if boxes is not None:
      break
  shapes = [render.Shape(k, c, b) for (k, c), b in zip(attrs, boxes)]
  order = rng.permutation(n)  # the target is not always drawn first
  shapes = [shapes[i] for i in order]
  target = shapes[int(np.argmin(order))]
  x1, y1, x2, y2 = target.box
  return Example(
      images=(render.render_shapes(image_size, shapes),),
      question=f"Where is the {target.name}?",
      answer=answers.box_json(target.box),
      problem_type="spatial grounding",
      task_type="spatial_grounding",
      reasoning=answers.respond(f"The {target.name} spans x {x1}-{x2}, y {y1}-{y2}.",
                                answers.box_json(target.box)),
      meta={
          "scene": repr([(s.kind, s.color, s.box) for s in shapes] + [target.name]),
          "box": list(target.box),
          "shapes": [(s.kind, s.color, list(s.box)) for s in shapes],
      },
  )
