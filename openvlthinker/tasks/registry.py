"""Task registry: the one list of task types, and the deterministic (task, split, index,
difficulty, image_size) -> Example map.

A task type is one module listed in TASK_MODULES that registers one generator
`sample(rng, difficulty, image_size) -> Example` with `@register_task(name, problem_types,
length_thresholds=...)`, declaring there its name, problem types, public-data aliases and shaping
defaults. `taxonomy.TASK_TYPES`, the per-task shaping defaults and the config's per-task tables
are all derived from this list, in its order: adding a task type is its module plus its line in
TASK_MODULES, nothing else. The generator must put a `scene` string in `Example.meta`: the full
content it drew (objects, numbers, words, question choice), everything but pixel noise.

Held-out split, disjoint from training by construction: a scene belongs to the eval split when a
hash of (task type, scene) falls in one of EVAL_BUCKETS buckets, else to train. `generate` draws
from a seed stream keyed by the split (numpy SeedSequence entropy [split, task, difficulty,
image_size, index, attempt]) and keeps the first sample whose scene belongs to the requested split,
so no eval scene can ever be produced for train, at any index, and evaluations are comparable
across runs. Eval costs about EVAL_BUCKETS draws per example, train about 1.14.

This module must not import `taxonomy`, which imports it.
"""
import dataclasses
import hashlib
import importlib
from collections.abc import Callable, Sequence

import numpy as np

from openvlthinker.tasks import answers
from openvlthinker.tasks.base import Example, canonical_problem_type

# The task modules, in task-id order. Task ids key checkpoints (length statistics), metrics and
# seed streams, so a new task type goes at the end and existing entries never move.
TASK_MODULES = (
    "openvlthinker.tasks.spatial_grounding",
    "openvlthinker.tasks.spatial_reasoning",
    "openvlthinker.tasks.general_vqa",
    "openvlthinker.tasks.math_reasoning",
    "openvlthinker.tasks.chart_figure_qa",
    "openvlthinker.tasks.ocr",
)

# The public code's entropy bounds, the same for every task (REFERENCE §5); a task whose entropy
# should sit elsewhere declares its own.
DEFAULT_ENTROPY_BOUNDS = (0.2, 0.6)

SPLITS = ("train", "eval")
_SPLIT_KEYS = {"train": 1, "eval": 2}
EVAL_BUCKETS = 8
_MAX_ATTEMPTS = 1000

Sampler = Callable[[np.random.Generator, int, int], Example]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task type.

  name: canonical task type; sample(rng, difficulty, image_size) -> Example; problem_types: the
  problem types its examples use; module: the TASK_MODULES entry that registered it; aliases:
  other spellings of the name (in public data). Shaping defaults: length_thresholds
  (L_min, L_low, L_high, L_max) in tokens at the paper's scale (the static thresholds and the
  adaptive prior, REFERENCE §6); entropy_bounds (H_min, H_max) (REFERENCE §5).
  """
  name: str
  sample: Sampler
  problem_types: tuple[str, ...]
  module: str
  length_thresholds: tuple[float, float, float, float]
  entropy_bounds: tuple[float, float] = DEFAULT_ENTROPY_BOUNDS
  aliases: tuple[str, ...] = ()


TASKS: dict[str, TaskSpec] = {}
_BY_MODULE: dict[str, TaskSpec] = {}
_ALIASES: dict[str, str] = {}


def register_task(name: str, problem_types: Sequence[str], *,
                  length_thresholds: Sequence[float],
                  entropy_bounds: Sequence[float] = DEFAULT_ENTROPY_BOUNDS,
                  aliases: Sequence[str] = ()) -> Callable[[Sampler], Sampler]:
  """Decorator registering `sample` as the generator of task type `name` (see TaskSpec).

  The decorated function's module must be listed in TASK_MODULES, since that list orders the task
  ids; the threshold and bound values are checked where they are used (`rl.shaping`).
  """
  kinds = tuple(canonical_problem_type(p) for p in problem_types)
  thresholds = tuple(float(v) for v in length_thresholds)
  bounds = tuple(float(v) for v in entropy_bounds)
  if len(thresholds) != 4 or len(bounds) != 2:
    raise ValueError(f"task_type {name!r}: expected length_thresholds (L_min, L_low, L_high, "
                     f"L_max) and entropy_bounds (H_min, H_max), got {length_thresholds!r} and "
                     f"{entropy_bounds!r}")

  def decorate(sample: Sampler) -> Sampler:
    module = sample.__module__
    for key in (name, *aliases):
      if key in TASKS or key in _ALIASES:
        raise ValueError(f"task_type: {key!r} is already registered")
    if module not in TASK_MODULES:
      raise ValueError(f"task_type {name!r}: its module {module!r} is not listed in "
                       "openvlthinker.tasks.registry.TASK_MODULES (add it at the end: that list "
                       "orders the task ids)")
    if module in _BY_MODULE:
      raise ValueError(f"{module}: registers {_BY_MODULE[module].name!r} already (one task type "
                       f"per module), got {name!r} too")
    spec = TaskSpec(name, sample, kinds, module, thresholds, bounds, tuple(aliases))
    TASKS[name] = _BY_MODULE[module] = spec
    _ALIASES.update((a, name) for a in aliases)
    return sample

  return decorate


def task_specs() -> tuple[TaskSpec, ...]:
  """Every task type, in task-id order (TASK_MODULES), importing the modules not yet imported."""
  for module in TASK_MODULES:
    if module not in _BY_MODULE:
      importlib.import_module(module)
      if module not in _BY_MODULE:
        raise ValueError(f"{module}: listed in TASK_MODULES but registers no task type "
                         "(@register_task)")
  return tuple(_BY_MODULE[m] for m in TASK_MODULES)


def all_task_types() -> tuple[str, ...]:
  """Every task type's canonical name, in task-id order (imports all task modules)."""
  return tuple(spec.name for spec in task_specs())


def canonical_task_type(name: str) -> str:
  """The canonical task type of `name` (aliases accepted), or a ValueError naming the choices."""
  task_specs()
  key = _ALIASES.get(name, name)
  if key not in TASKS:
    raise ValueError(f"task_type: got {name!r}, expected one of {all_task_types()} "
                     f"(or an alias in {sorted(_ALIASES)})")
  return key


def get_task(name: str) -> TaskSpec:
  """The TaskSpec of task type `name` (aliases accepted)."""
  return TASKS[canonical_task_type(name)]


def split_of(task_type: str, scene: str) -> str:
  """The split that owns `scene` of `task_type`: a fixed hash, independent of any seed."""
  digest = hashlib.blake2b(f"{task_type}|{scene}".encode(), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def seed_entropy(task_type: str, split: str, index: int, difficulty: int, image_size: int,
                 attempt: int) -> list[int]:
  """The SeedSequence entropy of one draw; the first word keys the split."""
  task = all_task_types().index(canonical_task_type(task_type))
  return [_SPLIT_KEYS[split], task, difficulty, image_size, index, attempt]


def generate(task_type: str, split: str, index: int, difficulty: int = 0,
             image_size: int = 64) -> Example:
  """Example number `index` of a task type and split: a pure function of its arguments.

  Random access is O(1): the data pipeline calls it with record indices. meta gains split, index,
  difficulty and image_size; uid is "task/split/d<difficulty>/s<image_size>/<index>".
  """
  spec = get_task(task_type)
  if split not in _SPLIT_KEYS:
    raise ValueError(f"split: got {split!r}, expected one of {SPLITS}")
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
      0 <= index < 2**63):
    raise ValueError(f"index: got {index!r}, expected an int in [0, 2**63)")
  difficulty = answers.check_difficulty(difficulty)
  image_size = answers.check_image_size(image_size)
  for attempt in range(_MAX_ATTEMPTS):
    seq = np.random.SeedSequence(
        seed_entropy(spec.name, split, int(index), difficulty, image_size, attempt))
    example = spec.sample(np.random.default_rng(seq), difficulty, image_size)
    if split_of(spec.name, example.meta["scene"]) == split:
      meta = dict(example.meta, split=split, index=int(index), difficulty=difficulty,
                  image_size=image_size)
      uid = f"{spec.name}/{split}/d{difficulty}/s{image_size}/{index}"
      return dataclasses.replace(example, uid=uid, meta=meta)
  raise RuntimeError(f"{spec.name}: no {split} scene in {_MAX_ATTEMPTS} draws (index {index}); "
                     "the generator's scene space is too small")
