"""The record every task generator yields and every data source produces: `Example`."""
import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  """One multimodal problem.

  images: uint8[H, W, 3] arrays, one per `<image>` placeholder of the prompt.
  question: the question text. It may contain `<image>` placeholders (public data does); when it has
    none, the prompt builder puts one per image before the question.
  options: multiple-choice options spelled "A. text" (empty tuple otherwise).
  answer: the ground truth as plain text, without `<answer>` tags.
  problem_type / task_type: canonical names from `openvlthinker.taxonomy`.
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
