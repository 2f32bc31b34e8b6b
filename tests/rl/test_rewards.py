"""Rewards of REFERENCE §2, checked against hand-computed values and plain reference code."""
import re

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from openvlthinker.rl import rewards

SPEC = re.compile(rewards.FORMAT_PATTERN, re.DOTALL)


def wrap(answer: str, thinking: str = "because") -> str:
  return f"<thinking>{thinking}</thinking><answer>{answer}</answer>"


# ------------------------------------------------------------------------------------ format


@pytest.mark.parametrize("text, ok", [
    ("<thinking>a</thinking><answer>b</answer>", True),
    ("  \n<thinking>\na\n</thinking>\n\n<answer> b </answer>\n ", True),
    ("<thinking></thinking><answer></answer>", True),
    ("<thinking>a</thinking>x<answer>b</answer>", False),
    ("<thinking>a</thinking><answer>b</answer>x", False),
    ("x<thinking>a</thinking><answer>b</answer>", False),
    ("<thinking>a<answer>b</answer>", False),
    ("<thinking>a</thinking><answer>b", False),
    ("<thinking>a</thinking></thinking><answer>b</answer></answer>", True),
    ("<thinking></answer>", False),
    ("< thinking>a</thinking><answer>b</answer>", False),
])
def test_format_cases(text, ok):
  assert rewards.format_ok(text) is ok
  assert bool(SPEC.match(text)) is ok


_PIECES = st.sampled_from(["<thinking>", "</thinking>", "<answer>", "</answer>", " ", "\n",
                           "\u00a0", "\u2003", "\u2028", "\x1c", "\x85", "x", "<", ">", "/",
                           "answer", "thinking", ""])


@hypothesis.settings(max_examples=3000, deadline=None, database=None)
@hypothesis.given(st.lists(_PIECES, max_size=12).map("".join))
def test_linear_format_check_agrees_with_the_spec_regex(text):
  assert rewards.format_ok(text) == bool(SPEC.match(text))


def test_answer_is_the_first_tag_stripped_and_spaces_are_kept():
  assert rewards.extract_answer("<answer> a < b / c </answer><answer>2</answer>") == "a < b / c"
  assert rewards.extract_answer("<answer>1") is None
  assert rewards.extract_answer("no tags") is None
  assert rewards.extract_answer("<answer><answer>5</answer></answer>") == "<answer>5"


# ----------------------------------------------------------------------------- combination


def test_overall_weights_and_structure_rules():
  full = rewards.score(wrap("B"), "B", "multiple choice")
  assert (full["format"], full["accuracy"], full["structure"], full["overall"]) == (1, 1, .5, 1.5)
  wrong = rewards.score(wrap("A"), "B", "multiple choice")
  assert wrong["overall"] == pytest.approx(0.1 + 0.5)
  unformatted = rewards.score("<answer>B</answer>", "B", "multiple choice")
  assert (unformatted["structure"], unformatted["overall"]) == (0.0, pytest.approx(0.9))
  # Strict: the whole response is never read as the answer.
  bare = rewards.score("B", "B", "multiple choice")
  assert bare["accuracy"] == 0.0 and bare["error"] == "no answer tag"


def test_combine_adds_the_length_term():
  a, f, s, r_len = np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.array([0.5, 0.5]), .25
  got = rewards.combine(a, f, s, r_len, w_len=0.1)
  assert np.allclose(got, 0.8 * a + 0.1 * f + s + 0.1 * r_len)
  assert rewards.combine(1.0, 1.0, 0.5) == pytest.approx(1.5)


def test_grounding_structure_needs_a_json_box():
  truth = '{"boxes": [0, 0, 10, 10]}'
  assert rewards.score(wrap('{"boxes": [20, 20, 30, 30]}'), truth,
                       "spatial grounding")["structure"] == 0.5
  for bad in ("[0, 0, 10, 10]", '{"boxes": [0, 0, 10]}', '{"boxes": [0, 0, NaN, 1]}', "box"):
    got = rewards.score(wrap(bad), truth, "spatial grounding")
    assert got["structure"] == 0.0 and got["accuracy"] == 0.0, bad


def test_problem_type_spellings_and_unknown_types():
  assert rewards.score(wrap("a b"), "a b", "OCR")["accuracy"] == 1.0
  with pytest.raises(ValueError, match="problem_type"):
    rewards.score(wrap("1"), "1", "poetry")
  assert set(rewards.REWARDS) == set(
      ("multiple choice", "numerical", "regression", "ocr", "math", "spatial grounding",
       "open-ended"))


def test_public_ground_truth_wrapped_in_answer_tags():
  assert rewards.score(wrap("C"), "<answer>C</answer>", "multiple choice")["accuracy"] == 1.0


# ------------------------------------------------------------------------ accuracy by type


@pytest.mark.parametrize("pred, want", [
    ("C", "C"), ("c", "C"), ("C.", "C"), ("C:", "C"), ("C)", "C"), ("(C)", "C"), ("[C]", "C"),
    ("C. bedding", "C"), ("(C) bedding", "C"), ("bedding", "C"), (" Bedding. ", "C"),
    ("C bedding", None), ("Cat", None), ("The answer is C", None), ("", None), ("CD", None),
    ("(C", None), ("sofa", None),
])
def test_multiple_choice_normalisation(pred, want):
  options = ("A. chair", "B. table", "C. bedding", "D. sofa bed")
  assert rewards.option_letter(pred, options) == want


def test_option_text_must_match_exactly_one_option_and_letters_win():
  assert rewards.option_letter("cat", ("A. cat", "B. cat")) is None
  assert rewards.option_letter("b", ("A. b", "B. a")) == "B"
  # "Apple" is not spelled "A. text": it names no letter (its "ple" is no option's text).
  assert rewards.option_letter("ple", ("Apple", "B. pear")) is None
  assert rewards.option_letter("pear", ("Apple", "B. pear")) == "B"


@pytest.mark.parametrize("pred, truth, acc", [
    ("1,234.5", "1234.50", 1.0), ("3.14159", "3.14", 1.0), ("3.146", "3.14", 0.0),
    ("45%", "45", 1.0), ("-2", "-2.0", 1.0), ("1e2", "100", 1.0), ("nan", "1", 0.0),
    ("inf", "1", 0.0), ("1e999", "1", 0.0), ("twelve", "12", 0.0), ("1/2", "0.5", 0.0),
])
def test_numerical(pred, truth, acc):
  assert rewards.score(wrap(pred), truth, "numerical")["accuracy"] == acc


@pytest.mark.parametrize("pred, truth", [("10", "10"), ("13", "10"), ("7.4", "10"),
                                         ("10.9", "10"), ("0", "10"), ("1", "0"), ("0", "0"),
                                         ("-12", "10"), ("24", "25")])
def test_regression_mean_relative_accuracy(pred, truth):
  p, g = float(pred), float(truth)
  hits = [abs(p - g) / (abs(g) + 1e-8) < 1 - theta for theta in np.linspace(0.5, 0.95, 10)]
  got = rewards.score(wrap(pred), truth, "regression")["accuracy"]
  assert got == pytest.approx(np.mean(hits))


def _levenshtein(a, b):
  """Plain dynamic programming, the textbook way."""
  d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
  return d[-1][-1]


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(st.lists(st.sampled_from("abcd"), max_size=9),
                  st.lists(st.sampled_from("abcd"), max_size=9))
def test_word_error_rate_matches_textbook_levenshtein(hyp, ref):
  want = _levenshtein(hyp, ref) / max(1, len(ref))
  assert rewards.word_error_rate(hyp, ref) == pytest.approx(want)
  got = rewards.score(wrap(" ".join(hyp)), " ".join(ref), "ocr")["accuracy"]
  # An empty answer never scores, and an empty truth is unusable.
  assert got == pytest.approx(min(1.0, max(0.0, 1 - want)) if hyp and ref else 0.0)


def test_ocr_is_case_insensitive_and_keeps_slashes():
  assert rewards.score(wrap("Red  CAT"), "red cat", "ocr")["accuracy"] == 1.0
  # The public code strips spaces around "/", which would turn "a / b" into "a/b".
  assert rewards.score(wrap("a/b"), "a / b", "ocr")["accuracy"] == pytest.approx(1 - 3 / 3)
  assert rewards.score(wrap("cat sat"), "the cat sat", "ocr")["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("pred, want", [
    ('{"boxes": [0, 0, 10, 10]}', 1.0),
    ('{"boxes": [5, 5, 15, 15]}', 25 / 175),
    ('{"boxes": [[0, 0, 10, 5]]}', 0.5),
    ('{"boxes": [10, 10, 20, 20]}', 0.0),
    ('{"boxes": [10, 10, 0, 0]}', 0.0),
    ('{"boxes": [10, 0, 0, 10]}', 0.0),  # empty in x only: an "area" of -100
    ('{"boxes": [0, 10, 10, 5]}', 0.0),  # empty in y only
    ('{"boxes": [0, 0, 1e999, 10]}', 0.0),
    ('{"boxes": [true, 0, 10, 10]}', 0.0),
    ('{"boxes": [0, 0, 10, Infinity]}', 0.0),
])
def test_grounding_iou(pred, want):
  got = rewards.score(wrap(pred), '{"boxes": [0, 0, 10, 10]}', "spatial grounding")
  assert got["accuracy"] == pytest.approx(want)


@pytest.mark.parametrize("text", ['{"boxes": [0, 0, Infinity, 10]}', '{"boxes": [0, NaN, 5, 10]}',
                                  '{"boxes": [0, 0, 1e999, 10]}'])
def test_a_box_with_a_non_finite_coordinate_is_no_box(text):
  assert rewards.parse_box(text) is None


def test_iou_of_empty_boxes_is_zero():
  assert rewards.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # no union
  assert rewards.iou([5, 5, 5, 5], [0, 0, 10, 10]) == 0.0
  assert rewards.iou([0, 0, -10, 10], [0, 0, 10, 10]) == 0.0  # "areas" -100 and 100: union 0
  assert rewards.iou([0, 0, 10, 10], [2, 2, 4, 6]) == pytest.approx(8 / 100)


def test_math_uses_symbolic_equivalence():
  for pred in ("0.5", "1/2", "\\frac{1}{2}", "\\dfrac12", "$\\boxed{0.50}$"):
    assert rewards.score(wrap(pred), "1/2", "math")["accuracy"] == 1.0, pred
  assert rewards.score(wrap("0.51"), "1/2", "math")["accuracy"] == 0.0
  # The public code would strip the spaces of "1 / 2" too; here they are simply allowed.
  assert rewards.score(wrap("1 / 2"), "\\frac{1}{2}", "math")["accuracy"] == 1.0


def test_open_ended_is_unigram_f1():
  got = rewards.score(wrap("a red cat"), "the red cat sat", "open-ended")["accuracy"]
  p, r = 2 / 3, 2 / 4
  assert got == pytest.approx(2 * p * r / (p + r))


def test_score_batch_arrays():
  examples = [{"answer": "B", "problem_type": "multiple choice", "options": ("A. cat", "B. dog")},
              {"answer": "3", "problem_type": "numerical"}]
  examples += [{"answer": "1/2", "problem_type": "math"}, {"answer": "1/2", "problem_type": "math"}]
  out = rewards.score_batch([wrap("dog"), "3", wrap("2^{"), wrap("3/4")], examples)
  assert out["overall"].dtype == np.float32
  assert out["overall"].tolist() == pytest.approx([1.5, 0.0, 0.6, 0.6])
  assert out["unparsable"].tolist() == [0, 1, 1, 0]
  with pytest.raises(ValueError, match="responses"):
    rewards.score_batch(["x"], examples)


def test_a_registered_reward_and_truth_reader_are_what_scoring_calls(monkeypatch):
  """`@register_reward` for a problem type without one (the built-in one removed here): `score`
  reads the truth with the registered reader and grades with the registered function; a second
  registration of the type is refused."""
  monkeypatch.delitem(rewards.REWARDS, "numerical")
  monkeypatch.delitem(rewards.TRUTH_READERS, "numerical")
  calls = []

  def read_even(truth, options):
    calls.append(("truth", truth, options))
    return int(truth) % 2

  @rewards.register_reward("Numerical", read_even)
  def same_parity(pred, want, fields):
    calls.append(("grade", pred, want))
    return float(int(pred) % 2 == want), ""

  out = rewards.score("<thinking>t</thinking><answer>7</answer>", "<answer>3</answer>", "numerical")
  assert out["accuracy"] == 1.0 and calls == [("truth", "3", ()), ("grade", "7", 1)]
  assert rewards.read_truth("<answer>4</answer>", "numerical") == 0
  with pytest.raises(ValueError, match="^problem_type: 'numerical' already has a reward$"):
    rewards.register_reward("numerical", read_even)(same_parity)
