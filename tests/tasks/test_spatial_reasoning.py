"""spatial_reasoning: every answer recomputed from the shapes found in the rendered pixels."""
import math
import re

import pytest

from openvlthinker.tasks import registry


def _expected(question, blobs):
  """(kind, value) the question asks for, computed from pixel blobs by this test's own rules."""
  by_name = {b.name: b for b in blobs}
  assert len(by_name) == len(blobs), "shape names must be unique"
  if m := re.fullmatch(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?", question):
    (ax, ay), (bx, by) = by_name[m[1]].center, by_name[m[2]].center
    dx, dy = ax - bx, ay - by
    assert max(abs(dx), abs(dy)) >= 2 * min(abs(dx), abs(dy))  # unambiguous
    if abs(dx) > abs(dy):
      return "option", "left" if dx < 0 else "right"
    return "option", "above" if dy < 0 else "below"
  if m := re.fullmatch(r"Which shape is nearest to the (\w+ \w+)\?", question):
    ref = by_name[m[1]]
    dist = sorted((math.dist(ref.center, b.center), b.name) for b in blobs if b is not ref)
    assert dist[1][0] - dist[0][0] >= 2  # a clear winner
    return "option", dist[0][1]
  if m := re.fullmatch(r"Which is bigger, the (\w+ \w+) or the (\w+ \w+)\?", question):
    a, b = by_name[m[1]], by_name[m[2]]
    return "option", a.name if a.width > b.width else b.name
  if m := re.fullmatch(r"How many shapes are in the (\w+) half\?", question):
    mid = 32
    axis = 0 if m[1] in ("left", "right") else 1
    lo = m[1] in ("left", "top")
    for b in blobs:  # no shape straddles the middle line
      assert (b.box[axis] < mid) == (b.box[axis + 2] <= mid)
    return "count", sum((b.center[axis] < mid) == lo for b in blobs)
  if m := re.fullmatch(r"About how many pixels apart are the centres of the (\w+ \w+) and the "
                       r"(\w+ \w+)\?", question):
    return "distance", math.dist(by_name[m[1]].center, by_name[m[2]].center)
  if m := re.fullmatch(r"How many times wider is the (\w+ \w+) than the (\w+ \w+)\?", question):
    return "ratio", by_name[m[1]].width / by_name[m[2]].width
  raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_answers_follow_from_the_pixels(difficulty, read_blobs, option_text):
  kinds = set()
  for index in range(60):
    ex = registry.generate("spatial_reasoning", "train", index, difficulty)
    kind, value = _expected(ex.question, read_blobs(ex.images[0]))
    kinds.add(kind)
    if kind == "option":
      assert ex.problem_type == "multiple choice"
      assert option_text(ex) == value, ex.uid
    elif kind == "count":
      assert ex.problem_type == "numerical" and ex.answer == str(value), ex.uid
    elif kind == "distance":
      assert ex.problem_type == "regression" and abs(int(ex.answer) - value) <= 0.5, ex.uid
    else:
      assert ex.problem_type == "regression" and abs(float(ex.answer) - value) <= 0.05, ex.uid
      assert value >= 1
  assert kinds == {"option", "count", "distance", "ratio"}


def test_options_keep_their_order_at_difficulty_zero():
  seen = set()
  for index in range(60):
    ex = registry.generate("spatial_reasoning", "train", index, 0)
    if ex.question.startswith("Where is"):
      seen.add(ex.options)
  assert seen == {("A. left", "B. right", "C. above", "D. below")}
