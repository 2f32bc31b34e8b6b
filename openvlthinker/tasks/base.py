"""The record every task generator yields and every data source produces (`Example`), and the
vocabulary of its `problem_type` field.

Problem types are answer formats (REFERENCE §1), which the rewards score by; they are a fixed
list, unlike task types, which the task modules declare (`tasks.registry`). They live here, in a
module without imports of the package, so that the registry can check them without importing
`taxonomy` (which is derived from the registry).
"""
import dataclasses
from typing import Any

import numpy as np

PROBLEM_TYPES = (
    "multiple choice",
    "numerical",
    "regression",
    "ocr",
    "math",
    "spatial grounding",
    "open-ended",
)

# Spellings found in the public OpenVLThinkerV2 data that map onto the canonical names above.
_PROBLEM_ALIASES = {"OCR": "ocr", "multiple-choice": "multiple choice", "open ended": "open-ended"}


def canonical_problem_type(name: str) -> str:
  """Returns the canonical problem type for `name` (case-insensitive), or raises ValueError."""
  key = _PROBLEM_ALIASES.get(name, name.strip().lower())
  if key not in PROBLEM_TYPES:
    raise ValueError(f"problem_type: got {name!r}, expected one of {PROBLEM_TYPES}")
  return key


@dataclasses.dataclass(frozen=True)
class Example:
  """One multimodal problem.

  images: uint8[H, W, 3] arrays, one per `<image>` placeholder of the prompt.
  question: the question text. It may contain `<image>` placeholders (public data does); when it has
    none, the prompt builder puts one per image before the question.
  options: multiple-choice options spelled "A. text" (empty tuple otherwise).
  answer: the ground truth as plain text, without `<answer>` tags.
  problem_type / task_type: canonical names (PROBLEM_TYPES above; `taxonomy.TASK_TYPES`).
  reasoning: a full response `<thinking>…</thinking><answer>…</answer>` that is correct for this
    sample (cold-start SFT target); empty for data that has none.
  uid: a stable identifier (task, split and seed for the suite; problem_id for public data).
  meta: scoring extras and generator details (e.g. image size, difficulty).
  """
  images: tuple[np.ndarray, ...]
  question: str
  answer: str
  problem_type: str
  task_type: str
  options: tuple[str, ...] = ()
  reasoning: str = ""
  uid: str = ""
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
