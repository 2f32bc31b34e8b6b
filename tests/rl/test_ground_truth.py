"""Ground truths: `check_ground_truth` rejects exactly the truths no answer can match, an empty
answer never scores, and the suite's own tasks only produce usable truths."""
import json
import re

import hypothesis
import pytest
from hypothesis import strategies as st

from openvlthinker import taxonomy
from openvlthinker.rl import rewards
from openvlthinker.tasks import registry

OPTIONS = ("A. chair", "B. table", "C. bedding", "D. sofa bed")
# A usable truth of each type, with the example fields the scorer needs.
VALID = {
    "multiple choice": ("C", {"options": OPTIONS}),
    "numerical": ("12.5", {}),
    "regression": ("-40", {}),
    "ocr": ("red cat sat", {}),
    "math": ("\\frac{x^2+1}{2}", {}),
    "spatial grounding": ('{"boxes": [10, 12, 30, 40]}', {}),
    "open-ended": ("a red cat sat", {}),
}


def wrap(answer: str) -> str:
  return f"<thinking>t</thinking><answer>{answer}</answer>"


def test_every_problem_type_has_a_truth_reader():
  assert set(rewards.TRUTH_READERS) == set(rewards.REWARDS) == set(taxonomy.PROBLEM_TYPES)


@pytest.mark.parametrize("problem_type", taxonomy.PROBLEM_TYPES)
@pytest.mark.parametrize("empty", ["", " ", "\n\t "])
def test_an_empty_answer_never_scores_and_counts_as_unparsable(problem_type, empty):
  truth, fields = VALID[problem_type]
  for answer in (truth, f"<answer>{truth}</answer>", "", "<answer></answer>", empty):
    got = rewards.score(wrap(empty), answer, problem_type, **fields)
    assert (got["accuracy"], got["error"]) == (0.0, "empty answer"), (answer, got)
    assert got["format"] == 1.0
  batch = rewards.score_batch([wrap(empty)], [{"answer": truth, "problem_type": problem_type,
                                               **fields}])
  assert batch["unparsable"].tolist() == [1] and batch["accuracy"].tolist() == [0.0]


@pytest.mark.parametrize("answer, problem_type, options, pattern", [
    ("<answer>3", "numerical", (), r"closing </answer> is missing"),
    ("3</answer>", "numerical", (), r"opening <answer> is missing"),
    ("</answer>3<answer>", "numerical", (), r"</answer> comes before <answer>"),
    ("<answer>1</answer><answer>2</answer>", "numerical", (), r"one <answer>…</answer> pair"),
    ("so <answer>1</answer>", "numerical", (), r"nothing around it"),
    ("<answer></answer>", "ocr", (), r"expected a non-empty ocr answer"),
    ("   ", "math", (), r"expected a non-empty math answer"),
    ("$ $", "math", (), r"expected a math expression"),
    ("<answer>  </answer>", "open-ended", (), r"non-empty"),
    ("?!", "open-ended", (), r"expected at least one word"),
    ("E", "multiple choice", OPTIONS, r"expected an option letter \(A, B, C, D\), got 'E'"),
    ("the third", "multiple choice", OPTIONS, r"expected an option letter"),
    ("the third", "multiple choice", (), r"^expected an option letter, got 'the third'$"),
    ("three", "numerical", (), r"expected a finite number, got 'three'"),
    ("nan", "regression", (), r"finite number"),
    ("1e999", "numerical", (), r"finite number"),
    ('{"boxes": [10, 10, 0, 0]}', "spatial grounding", (), r"x2 > x1 and y2 > y1"),
    ('{"boxes": [10, 0, 0, 10]}', "spatial grounding", (), r"x2 > x1 and y2 > y1"),
    ('{"boxes": [0, 10, 10, 0]}', "spatial grounding", (), r"x2 > x1 and y2 > y1"),
    ('{"boxes": [0, 0, NaN, 1]}', "spatial grounding", (), r"expected a box"),
    ('{"boxes": [0, 0, 1]}', "spatial grounding", (), r"expected a box"),
    ("w " * 5000, "ocr", (), r"at most 4096 words, got 5000"),
])
def test_unusable_truths_say_why(answer, problem_type, options, pattern):
  reason = rewards.check_ground_truth(answer, problem_type, options)
  assert reason is not None and "\n" not in reason
  assert re.search(pattern, reason), reason


@pytest.mark.parametrize("answer, problem_type, options", [
    ("C", "multiple choice", OPTIONS), ("(C)", "multiple choice", OPTIONS),
    ("bedding", "multiple choice", OPTIONS), ("F", "multiple choice", ()),
    ("<answer>B</answer>", "multiple choice", ("A. x", "B. y")),
    (" <answer>1,234.5</answer>\n", "numerical", ()), ("45%", "regression", ()),
    ("[0, 0, 10, 10]", "spatial grounding", ()), ('{"boxes": [[0, 0, 1, 1]]}', "OCR", ()),
    ("(0, 1]", "math", ()), ("$\\frac{\\sqrt{2}}{3}$", "math", ()), ("x", "open-ended", ()),
])
def test_usable_truths_pass(answer, problem_type, options):
  assert rewards.check_ground_truth(answer, problem_type, options) is None


def test_unknown_problem_type_is_a_caller_error():
  with pytest.raises(ValueError, match="problem_type"):
    rewards.check_ground_truth("1", "poetry")


def _best_answers(truth: str, problem_type: str) -> list[str]:
  """Answers that would match `truth` if anything could: its text, and for a box its JSON."""
  try:
    text = rewards.truth_text(truth)
  except rewards.UnusableTruth:
    return [truth]
  answers = [text]
  box = rewards.parse_box(text, strict=False)
  if problem_type == "spatial grounding" and box is not None:
    answers.append(json.dumps({"boxes": box}))
  return answers


_TRUTHS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["A", "(B)", "c.", "E", "chair", "sofa bed", "3", "-0", "1e5", "12.5%", "1,5",
                     "nan", "inf", "[1, 2, 3, 4]", '{"boxes": [1, 2, 3, 4]}', "[4, 3, 2, 1]",
                     '{"boxes": [0, 0, 0, 0]}', "\\frac{1}{2}", "$$", "(0, 1]", "x^2", "..",
                     "<answer>7</answer>", "<answer>", "</answer>", "<answer></answer>", " "]),
    st.lists(st.sampled_from(["red", "cat", "1", "(", "]", "$", " ", "?", "<answer>"]),
             max_size=5).map(" ".join),
)


@pytest.mark.parametrize("problem_type", taxonomy.PROBLEM_TYPES)
def test_check_agrees_with_the_scorer(problem_type):
  """A truth passes iff some answer earns full accuracy against it."""

  @hypothesis.settings(max_examples=400, deadline=None, database=None)
  @hypothesis.given(_TRUTHS)
  def run(truth):
    usable = rewards.check_ground_truth(truth, problem_type, OPTIONS) is None
    best = max(rewards.score(wrap(a), truth, problem_type, options=OPTIONS)["accuracy"]
               for a in _best_answers(truth, problem_type))
    assert (best == 1.0) == usable, (truth, best)

  run()


@pytest.mark.parametrize("task_type", taxonomy.TASK_TYPES)
def test_the_suite_makes_usable_ground_truth(task_type):
  for index in range(50):
    ex = registry.generate(task_type, "train", index, index % 4)
    assert rewards.check_ground_truth(ex.answer, ex.problem_type, ex.options) is None, ex.uid
