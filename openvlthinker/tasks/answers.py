"""How a task writes what the model reads and must produce: options, answers, reasoning traces.

Answers use a small regular vocabulary (digits, colour and shape words, option letters) and traces
stay short, because the CPU demo's model is tiny and decodes about 48-96 tokens per response.
"""
from collections.abc import Sequence

import numpy as np

from openvlthinker.tasks import render
from openvlthinker.tasks.base import Example

LETTERS = "ABCDEFGHIJ"
MAX_DIFFICULTY = 3


def respond(thinking: str, answer: str) -> str:
  """The full response in the REFERENCE §2 format."""
  return f"<thinking>{thinking}</thinking><answer>{answer}</answer>"


def box_json(box: Sequence[int]) -> str:
  """The grounding answer text for an integer pixel box [x1, y1, x2, y2]."""
  x1, y1, x2, y2 = (int(v) for v in box)
  return f'{{"boxes": [{x1}, {y1}, {x2}, {y2}]}}'


def choices(rng: np.random.Generator, items: Sequence[str], correct: str,
            shuffle: bool) -> tuple[tuple[str, ...], str]:
  """Options spelled "A. text" and the correct letter.

  items: every option text in a canonical order, `correct` among them. With shuffle=False the
  canonical order is kept (an easier task: each letter always means the same word).
  """
  items = list(items)
  if correct not in items or len(set(items)) != len(items):
    raise ValueError(f"items: expected distinct options containing {correct!r}, got {items}")
  if shuffle:
    items = [items[i] for i in rng.permutation(len(items))]
  options = tuple(f"{LETTERS[i]}. {text}" for i, text in enumerate(items))
  return options, LETTERS[items.index(correct)]


def pick(rng: np.random.Generator, items: Sequence, k: int | None = None):
  """One element of `items` (k=None) or a list of k distinct ones, in random order."""
  if k is None:
    return items[int(rng.integers(len(items)))]
  return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def check_difficulty(difficulty: int) -> int:
  """Returns difficulty as an int or raises ValueError naming the field."""
  if isinstance(difficulty, bool) or not isinstance(difficulty, (int, np.integer)) or not (
      0 <= difficulty <= MAX_DIFFICULTY):
    raise ValueError(f"difficulty: got {difficulty!r}, expected an int in [0, {MAX_DIFFICULTY}]")
  return int(difficulty)


def check_image_size(image_size: int) -> int:
  """Returns image_size as an int or raises ValueError naming the field."""
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not (
      32 <= image_size <= 1024):
    raise ValueError(f"image_size: got {image_size!r}, expected an int in [32, 1024]")
  return int(image_size)


def build_scene(builders: dict, kind: str, rng: np.random.Generator, difficulty: int,
                image_size: int, task: str, tries: int = 1000):
  """The first non-None result of `builders[kind](rng, difficulty, image_size)`: builders return
  None for a draw that is ambiguous or does not fit, and are redrawn; RuntimeError after `tries`."""
  for _ in range(tries):
    built = builders[kind](rng, difficulty, image_size)
    if built is not None:
      return built
  raise RuntimeError(f"{task}/{kind}: no unambiguous scene in {tries} draws "
                     f"(difficulty {difficulty}, image_size {image_size})")


def shape_scene_example(task_type: str, kind: str, image_size: int, shapes, question: str,
                        options: tuple[str, ...], answer: str, thinking: str,
                        problem_type: str) -> Example:
  """The Example of a question about a drawn scene of flat shapes (general VQA, spatial reasoning).

  meta["scene"] spells the whole draw (shapes, question, options): the split hashes it, and equal
  scenes must land in the same split. meta["shapes"] lets tests recover the answer from pixels.
  """
  return Example(
      images=(render.render_shapes(image_size, shapes),),
      question=question,
      answer=answer,
      problem_type=problem_type,
      task_type=task_type,
      options=options,
      reasoning=respond(thinking, answer),
      meta={
          "scene": repr([(s.kind, s.color, s.box) for s in shapes] + [question, options]),
          "kind": kind,
          "shapes": [(s.kind, s.color, list(s.box)) for s in shapes],
      },
  )
