"""Rule-based rewards of REFERENCE §2: format, accuracy by problem type, structure bonus, overall.

`score(response, answer, problem_type, **example_fields)` scores one response; it never raises on
any response text (an unknown problem_type is a caller bug and raises ValueError). Each problem type
registers, with `@register_reward(problem_type, read_truth)`, its accuracy function and the reader
of its ground truth; the reader is the one parse of the truth, used both by `score` and by
`check_ground_truth`, which data sources call at load time to reject a truth that no answer could
ever match. An empty answer never scores. Scoring is linear in the response length: the format
check and answer extraction are written without backtracking regexes, and answers too long to be
plausible are rejected before parsing.

Answer normalisation decisions (REFERENCE §2 leaves them open):
- multiple choice: "C", "c", "C.", "C:", "C)", "(C)", "[C]", "C. text", "(C) text" all mean C; an
  answer that is exactly the text of one option (case and spacing ignored) means that option.
  "C text" without punctuation is read as text. The letter wins over any text after it.
- numerical / regression: optional sign, digits, decimals, exponent; thousands commas removed; one
  trailing "%" ignored. NaN / inf / overflow are not numbers.
- ocr: case-insensitive, whitespace-separated words; punctuation is part of a word.
- spatial grounding: JSON {"boxes": [x1, y1, x2, y2]} (or one nested box [[...]]); finite numbers,
  booleans rejected, NaN / Infinity rejected; IoU is 0 unless x2 > x1 and y2 > y1.
- open-ended: unigram F1 of lower-cased word tokens.
- math: MATH_CHECK (math_verify_grader.check: math_equiv's exact check, then math-verify for free
  text, tuples, intervals, sets, units and percentages); a truth neither reads still matches a
  verbatim answer, so any truth with content is usable.
"""
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from openvlthinker import taxonomy
from openvlthinker.rl import math_parse
from openvlthinker.rl import math_verify_grader

W_FMT = 0.1
STRUCTURE_BONUS = 0.5
MAX_REWARD = 1.0 + STRUCTURE_BONUS  # a = f = 1, s = 0.5, w_len = 0
FORMAT_PATTERN = r"^\s*<thinking>.*?</thinking>\s*<answer>.*?</answer>\s*$"  # the spec; DOTALL
_MIDDLE = re.compile(r"</thinking>\s*<answer>")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_MC_HEAD = re.compile(r"\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])(?![A-Za-z0-9])")
_MAX_NUMBER_CHARS = 64
_MAX_BOX_CHARS = 1024
_MAX_OCR_WORDS = 4096
_UNPARSABLE = ("no answer tag", "empty answer", "unparsable answer")
_REGRESSION_TOLERANCES = tuple(round(0.50 - 0.05 * k, 2) for k in range(10))  # 1 - θ


class UnusableTruth(ValueError):
  """A ground truth that no answer could match; the message says why, as "expected ..., got ..."."""


# A truth reader: (ground-truth text, options) -> the value the accuracy function compares with;
# raises UnusableTruth. An accuracy function: (non-empty predicted answer, that value, example
# fields) -> (accuracy, error).
TruthReader = Callable[[str, Sequence[str]], Any]
Accuracy = Callable[[str, Any, dict], tuple[float, str]]
REWARDS: dict[str, Accuracy] = {}
TRUTH_READERS: dict[str, TruthReader] = {}


def register_reward(problem_type: str,
                    read_truth: TruthReader) -> Callable[[Accuracy], Accuracy]:
  """Decorator registering the accuracy function of a problem type and its truth reader."""
  key = taxonomy.canonical_problem_type(problem_type)

  def decorate(fn: Accuracy) -> Accuracy:
    if key in REWARDS:
      raise ValueError(f"problem_type: {key!r} already has a reward")
    REWARDS[key], TRUTH_READERS[key] = fn, read_truth
    return fn

  return decorate


# ----------------------------------------------------------------------------- response parsing


def format_ok(response: str) -> bool:
  """Whether the whole response matches FORMAT_PATTERN (DOTALL), in linear time.

  The pattern matches iff, after stripping surrounding whitespace, the text starts with
  <thinking>, ends with </answer>, and "</thinking>\\s*<answer>" occurs strictly between them.
  """
  text = response.strip()
  if not (text.startswith("<thinking>") and text.endswith("</answer>")):
    return False
  return _MIDDLE.search(text, len("<thinking>"), len(text) - len("</answer>")) is not None


def extract_answer(response: str) -> str | None:
  """The stripped text inside the first <answer>...</answer>, or None without one."""
  start = response.find("<answer>")
  if start < 0:
    return None
  end = response.find("</answer>", start + len("<answer>"))
  if end < 0:
    return None
  return response[start + len("<answer>"):end].strip()


def parse_number(text: str) -> float | None:
  """A finite float, or None (see the module docstring for the accepted syntax)."""
  text = text.strip()
  if len(text) > _MAX_NUMBER_CHARS:
    return None
  text = text.replace(",", "")
  if text.endswith("%"):
    text = text[:-1].rstrip()
  if not _NUMBER.fullmatch(text):
    return None
  value = float(text)
  return value if math.isfinite(value) else None


def _option_texts(options: Sequence[str]) -> dict[str, str]:
  """{letter: normalised text} of options spelled "A. text"."""
  out = {}
  for option in options or ():
    if isinstance(option, str) and len(option) >= 2 and option[0].isalpha() and option[1] in ".:)":
      out[option[0].upper()] = _norm_text(option[2:])
  return out


def _norm_text(text: str) -> str:
  return " ".join(text.casefold().split()).rstrip(".")


def option_letter(text: str, options: Sequence[str] = ()) -> str | None:
  """The upper-case option letter an answer names, or None."""
  text = text.strip()
  if len(text) > 512:
    return None
  m = _MC_HEAD.match(text)
  if m:
    letter, rest = next(g for g in m.groups() if g), text[m.end():]
    bare = m.group(3) is not None
    if not rest or rest[0] in ".:)" or (not bare and rest[0].isspace()):
      return letter.upper()
  matches = [k for k, v in _option_texts(options).items() if v and v == _norm_text(text)]
  return matches[0] if len(matches) == 1 else None


def parse_box(text: str, strict: bool = True) -> list[float] | None:
  """[x1, y1, x2, y2] from {"boxes": [...]} (or [[...]]); without strict also a bare list."""
  if len(text) > _MAX_BOX_CHARS:
    return None

  def reject(constant):
    raise ValueError(f"non-finite JSON constant {constant}")

  try:
    value = json.loads(text, parse_constant=reject)
  except (ValueError, RecursionError):
    return None
  if isinstance(value, dict):
    value = value.get("boxes")
  elif strict:
    return None
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
    value = value[0]
  if not (isinstance(value, list) and len(value) == 4):
    return None
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    return None
  try:
    box = [float(v) for v in value]
  except OverflowError:  # an integer beyond float range
    return None
  return box if all(math.isfinite(v) for v in box) else None


def iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union of two [x1, y1, x2, y2] boxes; 0 when either is empty.

  An empty box (x2 <= x1 or y2 <= y1) intersects nothing (w or h <= 0), so its IoU is 0 whatever
  sign its "area" has; two empty boxes have no union either.
  """
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  inter = max(0.0, w) * max(0.0, h)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  value = inter / union if union > 0 else 0.0
  return float(min(1.0, max(0.0, value))) if math.isfinite(value) else 0.0


def word_error_rate(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
  """Word-level Levenshtein distance / max(1, len(reference))."""
  n_ref = max(1, len(reference))
  vocab = {}
  hyp = np.array([vocab.setdefault(w, len(vocab)) for w in hypothesis], np.int64)
  ref = np.array([vocab.setdefault(w, len(vocab)) for w in reference], np.int64)
  cols = np.arange(len(ref) + 1)
  row = cols.copy()
  for i, word in enumerate(hyp, start=1):
    # Substitution / deletion in one vector step; insertions along the row are a running min.
    cand = np.minimum(row[:-1] + (ref != word), row[1:] + 1)
    new = np.concatenate([[i], cand])
    row = np.minimum.accumulate(new - cols) + cols
  return float(row[-1]) / n_ref


# ----------------------------------------------------------------------------- ground truth


def truth_text(answer: str) -> str:
  """The ground truth as scored: the text inside its one `<answer>…</answer>` pair (public
  records), or the whole answer without tags (the suite's), stripped.

  Raises UnusableTruth for an unpaired tag, several pairs or text outside the pair.
  """
  opens, closes = answer.count("<answer>"), answer.count("</answer>")
  if not opens and not closes:
    return answer.strip()
  start, end = answer.find("<answer>"), answer.find("</answer>")
  if opens != closes or end < start:
    missing = "a closing </answer>" if opens > closes else "an opening <answer>"
    problem = f"{missing} is missing" if opens != closes else "</answer> comes before <answer>"
    raise UnusableTruth(f"expected the answer inside <answer>…</answer>, got {answer!r:.80} "
                        f"({problem})")
  if opens > 1 or answer[:start].strip() or answer[end + len("</answer>"):].strip():
    raise UnusableTruth(f"expected one <answer>…</answer> pair and nothing around it, got "
                        f"{answer!r:.80}")
  return answer[start + len("<answer>"):end].strip()


def read_truth(answer: str, problem_type: str, options: Sequence[str] = ()) -> Any:
  """The value the accuracy function of `problem_type` compares answers with (a letter, a number,
  a box, words...); raises UnusableTruth when no answer could match `answer`."""
  kind = taxonomy.canonical_problem_type(problem_type)
  truth = truth_text(answer)
  if not truth:
    raise UnusableTruth(f"expected a non-empty {kind} answer, got {answer!r:.80}")
  return TRUTH_READERS[kind](truth, tuple(options or ()))


def check_ground_truth(answer: str, problem_type: str, options: Sequence[str] = ()) -> str | None:
  """Why `answer` is unusable as the ground truth of `problem_type` ("expected ..., got ..."), or
  None when some answer can match it. Uses the reader that `score` uses, so a truth that passes
  here is one the scorer reads."""
  try:
    read_truth(answer, problem_type, options)
  except UnusableTruth as e:
    return str(e)
  return None


def _letter_truth(truth: str, options: Sequence[str]) -> str:
  want = option_letter(truth, options)
  letters = sorted(_option_texts(options))
  if want is None or (letters and want not in letters):
    among = f" ({', '.join(letters)})" if letters else ""
    raise UnusableTruth(f"expected an option letter{among}, got {truth!r:.80}")
  return want


def _number_truth(truth: str, options: Sequence[str]) -> float:
  want = parse_number(truth)
  if want is None:
    raise UnusableTruth(f"expected a finite number, got {truth!r:.80}")
  return want


def _box_truth(truth: str, options: Sequence[str]) -> list[float]:
  box = parse_box(truth, strict=False)
  if box is None or box[2] <= box[0] or box[3] <= box[1]:
    raise UnusableTruth('expected a box {"boxes": [x1, y1, x2, y2]} with x2 > x1 and y2 > y1, '
                        f"got {truth!r:.80}")
  return box


def _word_truth(truth: str, options: Sequence[str]) -> list[str]:
  words = truth.casefold().split()
  if len(words) > _MAX_OCR_WORDS:  # the scorer reads at most this many predicted words
    raise UnusableTruth(f"expected at most {_MAX_OCR_WORDS} words, got {len(words)}")
  return words


def _token_truth(truth: str, options: Sequence[str]) -> Counter:
  tokens = Counter(re.findall(r"\w+", truth.casefold()))
  if not tokens:
    raise UnusableTruth(f"expected at least one word, got {truth!r:.80}")
  return tokens


def _math_truth(truth: str, options: Sequence[str]) -> str:
  try:
    empty = not math_parse.normalize(truth)
  except math_parse.Unparsable:  # too long to parse: it still matches verbatim
    empty = False
  if empty:
    raise UnusableTruth(f"expected a math expression, got {truth!r:.80}")
  return truth


# ----------------------------------------------------------------------------- accuracy by type


@register_reward("multiple choice", _letter_truth)
def _multiple_choice(pred: str, want: str, fields: dict) -> tuple[float, str]:
  got = option_letter(pred, fields.get("options") or ())
  if got is None:
    return 0.0, "unparsable answer"
  return float(got == want), ""


def _number(pred: str) -> float | str:
  got = parse_number(pred)
  return "unparsable answer" if got is None else got


@register_reward("numerical", _number_truth)
def _numerical(pred: str, want: float, fields: dict) -> tuple[float, str]:
  got = _number(pred)
  if isinstance(got, str):
    return 0.0, got
  return float(round(got, 2) == round(want, 2)), ""


@register_reward("regression", _number_truth)
def _regression(pred: str, want: float, fields: dict) -> tuple[float, str]:
  got = _number(pred)
  if isinstance(got, str):
    return 0.0, got
  rel = abs(got - want) / (abs(want) + 1e-8)
  return sum(rel < tol for tol in _REGRESSION_TOLERANCES) / len(_REGRESSION_TOLERANCES), ""


@register_reward("ocr", _word_truth)
def _ocr(pred: str, ref: list[str], fields: dict) -> tuple[float, str]:
  hyp = pred.casefold().split(None, _MAX_OCR_WORDS)[:_MAX_OCR_WORDS + 1]
  if abs(len(hyp) - len(ref)) >= max(1, len(ref)):
    return 0.0, ""  # the distance is at least the length gap, so WER >= 1
  return float(np.clip(1.0 - word_error_rate(hyp, ref), 0.0, 1.0)), ""


# The math grader, chosen here only: (pred, truth) -> (equivalent, reason), never raising. The
# alternatives are math_equiv.check (hand-written) and math_verify_grader.check_math_verify
# (math-verify alone); tests/rl/test_math_labels.py measures all three on a labelled set.
MATH_CHECK: Callable[[str, str], tuple[bool, str]] = math_verify_grader.check


@register_reward("math", _math_truth)
def _math(pred: str, truth: str, fields: dict) -> tuple[float, str]:
  same, reason = MATH_CHECK(pred, truth)
  return float(same), "unparsable answer" if reason == "unparsable" else reason


@register_reward("spatial grounding", _box_truth)
def _grounding(pred: str, want: list[float], fields: dict) -> tuple[float, str]:
  got = parse_box(pred)
  if got is None:
    return 0.0, "unparsable answer"
  return iou(got, want), ""


@register_reward("open-ended", _token_truth)
def _open_ended(pred: str, ref: Counter, fields: dict) -> tuple[float, str]:
  hyp = Counter(re.findall(r"\w+", pred.casefold()[:100_000]))
  common = sum((ref & hyp).values())
  if not common:
    return 0.0, ""
  precision, recall = common / sum(hyp.values()), common / sum(ref.values())
  return 2 * precision * recall / (precision + recall), ""


# ----------------------------------------------------------------------------- the reward


def combine(accuracy, fmt, structure, length_reward=0.0, w_len: float = 0.0,
            w_fmt: float = W_FMT):
  """R = (1 - w_fmt - w_len)·a + w_fmt·f + s + w_len·R_len; floats or arrays (float32[B])."""
  return (1.0 - w_fmt - w_len) * accuracy + w_fmt * fmt + structure + w_len * length_reward


def score(response: str, answer: str, problem_type: str, **example_fields) -> dict:
  """Scores one response against the ground-truth answer (REFERENCE §2).

  Returns floats "format", "accuracy", "structure", "overall" (without the length term; the trainer
  adds it with `combine`), "parsed_answer" (the extracted answer, cut to 200 characters) and
  "error" ("" or why the answer did not score: "no answer tag", "empty answer", "unparsable
  answer", "unparsable ground truth", ...). example_fields: "options" for multiple choice.
  """
  kind = taxonomy.canonical_problem_type(problem_type)
  fmt = acc = struct = 0.0
  parsed, error = "", ""
  try:
    if not isinstance(response, str):
      raise TypeError(f"response: expected str, got {type(response).__name__}")
    fmt = float(format_ok(response))
    pred = extract_answer(response)
    if pred is None:
      error = "no answer tag"
    elif not pred:  # never credit producing nothing, whatever the truth
      error = "empty answer"
    else:
      parsed = pred[:200]
      try:
        want = read_truth(answer, kind, example_fields.get("options") or ())
      except UnusableTruth:
        error = "unparsable ground truth"
      else:
        acc, error = REWARDS[kind](pred, want, example_fields)
        acc = float(acc) if math.isfinite(acc) else 0.0
    if fmt:
      if kind == "spatial grounding":
        struct = STRUCTURE_BONUS if pred is not None and parse_box(pred) is not None else 0.0
      else:
        struct = STRUCTURE_BONUS
  except Exception as e:  # noqa: BLE001 - scoring must never take a training run down
    acc, error = 0.0, f"internal error: {type(e).__name__}: {str(e)[:200]}"
  return {"format": fmt, "accuracy": acc, "structure": struct,
          "overall": float(combine(acc, fmt, struct)), "parsed_answer": parsed, "error": error}


def score_batch(responses: Sequence[str], examples: Sequence[dict]) -> dict[str, np.ndarray]:
  """Scores B responses; examples[i] holds "answer", "problem_type" and optional "options".

  Returns float32[B] arrays "format", "accuracy", "structure", "overall" and int32[B] "unparsable"
  (1 where the response had no answer tag, an empty answer or one that did not parse as its type).
  """
  if len(responses) != len(examples):
    raise ValueError(f"responses: got {len(responses)}, expected one per example "
                     f"({len(examples)})")
  rows = [score(r, ex["answer"], ex["problem_type"], options=ex.get("options", ()))
          for r, ex in zip(responses, examples)]
  out = {k: np.array([row[k] for row in rows], np.float32)
         for k in ("format", "accuracy", "structure", "overall")}
  out["unparsable"] = np.array([row["error"] in _UNPARSABLE for row in rows], np.int32)
  return out
