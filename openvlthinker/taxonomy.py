"""The task and problem types of the method (REFERENCE §1), with the public data's spellings.

Nothing here is listed by hand: the task types are the task modules of
`tasks.registry.TASK_MODULES`, in that order, each declaring its name, problem types, aliases and
shaping defaults where it is defined; the problem types (answer formats) are `tasks.base`'s.
Task ids are indices into TASK_TYPES; every module that keys statistics by task uses this order.
Importing this module imports every task module (numpy and PIL, about 0.15 s).
"""
import types

from openvlthinker.tasks import registry
from openvlthinker.tasks.base import PROBLEM_TYPES, canonical_problem_type

__all__ = ["TASK_TYPES", "NUM_TASKS", "PROBLEM_TYPES", "LENGTH_THRESHOLDS", "ENTROPY_BOUNDS",
           "canonical_task_type", "canonical_problem_type", "task_id"]

_SPECS = registry.task_specs()

TASK_TYPES: tuple[str, ...] = tuple(spec.name for spec in _SPECS)
NUM_TASKS = len(TASK_TYPES)

# Per-task shaping defaults as the task modules declare them, keyed by task type in task-id order
# (read-only: a run changes them through its config, not by editing these).
LENGTH_THRESHOLDS = types.MappingProxyType({s.name: s.length_thresholds for s in _SPECS})
ENTROPY_BOUNDS = types.MappingProxyType({s.name: s.entropy_bounds for s in _SPECS})


def canonical_task_type(name: str) -> str:
  """Returns the canonical task type for `name`, or raises ValueError naming the choices."""
  return registry.canonical_task_type(name)


def task_id(name: str) -> int:
  """The task id of `name` (aliases accepted): its index in TASK_TYPES."""
  return TASK_TYPES.index(canonical_task_type(name))
