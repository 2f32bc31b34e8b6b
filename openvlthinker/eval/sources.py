"""Where evaluation problems come from: a source is a sequence of `tasks.base.Example` records.

`suite_heldout` is the built-in suite's held-out split: the first `num_per_task` records of each
task's `eval` split (disjoint from training by construction), so every evaluation of every run sees
the same problems.
"""
from __future__ import annotations

from typing import Sequence

from openvlthinker import taxonomy
from openvlthinker.data.sources import SuiteTaskSource
from openvlthinker.tasks.base import Example


def suite_heldout(num_per_task: int, image_size: int, difficulty: dict[str, int] | None = None,
                  tasks: Sequence[str] | None = None) -> list[Example]:
  """`num_per_task` held-out problems of each task type (taxonomy order), rendered at
  `image_size` px with the given per-task difficulty (default 0)."""
  out = []
  for task in tuple(tasks or taxonomy.TASK_TYPES):
    source = SuiteTaskSource(task, "eval", (difficulty or {}).get(task, 0), image_size)
    out.extend(source[i] for i in range(num_per_task))
  return out
