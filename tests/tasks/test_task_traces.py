"""Reasoning traces: each sample's own trace earns the maximum reward, a perturbed answer less,
and traces stay short enough for the CPU demo's decode budget."""
import json
import re

import pytest

from openvlthinker import taxonomy
from openvlthinker.rl import rewards
from openvlthinker.tasks import registry


def _perturb(ex) -> str:
  """A wrong answer of the same form."""
  kind, answer = ex.problem_type, ex.answer
  if kind == "multiple choice":
    letters = [o[0] for o in ex.options]
    return letters[(letters.index(answer) + 1) % len(letters)]
  if kind in ("numerical", "regression"):
    return str(float(answer) * 3 + 1)
  if kind == "math":
    return f"({answer})+1"
  if kind == "spatial grounding":
    x1, y1, x2, y2 = json.loads(answer)["boxes"]
    return json.dumps({"boxes": [x2 + 1, y1, x2 + 1 + (x2 - x1), y2]})
  if kind == "ocr":
    return " ".join(["zzz"] + answer.split()[1:])
  raise AssertionError(kind)


@pytest.mark.parametrize("task_type", taxonomy.TASK_TYPES)
def test_own_trace_scores_the_maximum_and_a_perturbed_answer_less(task_type):
  for index in range(200):
    ex = registry.generate(task_type, "train", index, index % 4)
    got = rewards.score(ex.reasoning, ex.answer, ex.problem_type, options=ex.options)
    assert got["overall"] == rewards.MAX_REWARD == 1.5, (ex.uid, ex.reasoning, got)
    wrong = ex.reasoning.replace(f"<answer>{ex.answer}</answer>",
                                 f"<answer>{_perturb(ex)}</answer>")
    worse = rewards.score(wrong, ex.answer, ex.problem_type, options=ex.options)
    assert worse["overall"] < 1.5 and worse["format"] == 1.0, (ex.uid, wrong, worse)


@pytest.mark.parametrize("task_type", taxonomy.TASK_TYPES)
def test_traces_are_short_and_state_the_answer(task_type):
  for index in range(100):
    ex = registry.generate(task_type, "train", index, index % 4)
    thinking = re.fullmatch(r"<thinking>(.*)</thinking><answer>.*</answer>", ex.reasoning)[1]
    assert len(thinking.split()) <= 40 and len(thinking) <= 200, (ex.uid, thinking)
    # The trace ends by naming the answer (or its option text), not by filler.
    if ex.problem_type == "multiple choice":
      assert f"({ex.answer})" in thinking, thinking
    elif ex.problem_type == "spatial grounding":
      x1, y1, x2, y2 = json.loads(ex.answer)["boxes"]
      assert f"x {x1}-{x2}, y {y1}-{y2}" in thinking
    else:
      assert ex.answer.split()[-1] in thinking, thinking
