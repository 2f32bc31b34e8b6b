"""The task and problem types of the method (REFERENCE §1), with the public data's spellings.

Task ids are indices into TASK_TYPES; every module that keys statistics by task uses this order.
"""

TASK_TYPES = (
    "spatial_grounding",
    "spatial_reasoning",
    "general_vqa",
    "math_reasoning",
    "chart_figure_qa",
    "ocr",
)
NUM_TASKS = len(TASK_TYPES)

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
_TASK_ALIASES = {"general_vqa_science_stem": "general_vqa"}
_PROBLEM_ALIASES = {"OCR": "ocr", "multiple-choice": "multiple choice", "open ended": "open-ended"}


def canonical_task_type(name: str) -> str:
  """Returns the canonical task type for `name`, or raises ValueError naming the choices."""
  key = _TASK_ALIASES.get(name, name)
  if key not in TASK_TYPES:
    raise ValueError(f"task_type: got {name!r}, expected one of {TASK_TYPES} "
                     f"(or an alias in {sorted(_TASK_ALIASES)})")
  return key


def canonical_problem_type(name: str) -> str:
  """Returns the canonical problem type for `name` (case-insensitive), or raises ValueError."""
  key = _PROBLEM_ALIASES.get(name, name.strip().lower())
  if key not in PROBLEM_TYPES:
    raise ValueError(f"problem_type: got {name!r}, expected one of {PROBLEM_TYPES}")
  return key


def task_id(name: str) -> int:
  return TASK_TYPES.index(canonical_task_type(name))
