"""general_vqa: every answer recomputed from the shapes found in the rendered pixels."""
import collections
import re

import pytest

from openvlthinker.tasks import registry


def _expected(question, blobs):
  if m := re.fullmatch(r"What colour is the (\w+)\?", question):
    (hit,) = [b for b in blobs if b.kind == m[1]]
    return "color", hit.color
  if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
    (hit,) = [b for b in blobs if b.color == m[1]]
    return "shape", hit.kind
  if m := re.fullmatch(r"How many (\w+)s are there\?", question):
    return "count", str(sum(b.kind == m[1] for b in blobs))
  if question == "Which shape is different from the others?":
    groups = collections.Counter(b.name for b in blobs)
    (odd,) = [name for name, n in groups.items() if n == 1]
    assert len(groups) == 2
    return "odd", odd
  raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_answers_follow_from_the_pixels(difficulty, read_blobs, option_text):
  kinds = set()
  for index in range(60):
    ex = registry.generate("general_vqa", "train", index, difficulty)
    assert ex.problem_type == "multiple choice" and len(ex.options) == 4
    kind, value = _expected(ex.question, read_blobs(ex.images[0]))
    assert option_text(ex) == value, ex.uid
    kinds.add(kind)
  assert kinds == {"color", "shape", "count", "odd"}


def test_options_are_shuffled_only_above_difficulty_zero():
  def orders(difficulty):
    return {ex.options for ex in (registry.generate("general_vqa", "train", i, difficulty)
                                  for i in range(80)) if ex.question.startswith("What shape")}

  assert orders(0) == {("A. circle", "B. square", "C. triangle", "D. diamond")}
  assert len(orders(2)) > 3
