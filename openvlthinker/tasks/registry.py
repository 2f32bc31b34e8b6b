"""Task registry and the deterministic (task, split, index, difficulty, image_size) -> Example map.

A task type is one function `sample(rng, difficulty, image_size) -> Example` registered with
`@register_task(name, problem_types)` in the module `openvlthinker.tasks.<name>`; `get_task`
imports that module on first use. The generator must put a `scene` string in `Example.meta`: the
full content it drew (objects, numbers, words, question choice), everything but pixel noise.

Held-out split, disjoint from training by construction: a scene belongs to the eval split when a
hash of (task type, scene) falls in one of EVAL_BUCKETS buckets, else to train. `generate` draws
from a seed stream keyed by the split (numpy SeedSequence entropy [split, task, difficulty,
image_size, index, attempt]) and keeps the first sample whose scene belongs to the requested split,
so no eval scene can ever be produced for train, at any index, and evaluations are comparable
across runs. Eval costs about EVAL_BUCKETS draws per example, train about 1.14.
"""
import dataclasses
import hashlib
import importlib
from collections.abc import Callable

import numpy as np

from openvlthinker import taxonomy
from openvlthinker.tasks import answers
from openvlthinker.tasks.base import Example

SPLITS = ("train", "eval")
_SPLIT_KEYS = {"train": 1, "eval": 2}
EVAL_BUCKETS = 8
_MAX_ATTEMPTS = 1000

Sampler = Callable[[np.random.Generator, int, int], Example]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task type.

  name: canonical task type; sample(rng, difficulty, image_size) -> Example; problem_types: the
  problem types its examples use.
  """
  name: str
  sample: Sampler
  problem_types: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, problem_types: tuple[str, ...]) -> Callable[[Sampler], Sampler]:
  """Decorator registering `sample` as the generator of task type `name`."""
  key = taxonomy.canonical_task_type(name)
  kinds = tuple(taxonomy.canonical_problem_type(p) for p in problem_types)

  def decorate(sample: Sampler) -> Sampler:
    if key in TASKS:
      raise ValueError(f"task_type: {key!r} is already registered")
    TASKS[key] = TaskSpec(key, sample, kinds)
    return sample

  return decorate


def get_task(name: str) -> TaskSpec:
  """The TaskSpec of task type `name` (aliases accepted), importing its module on first use."""
  key = taxonomy.canonical_task_type(name)
  if key not in TASKS:
    importlib.import_module(f"openvlthinker.tasks.{key}")
  return TASKS[key]


def split_of(task_type: str, scene: str) -> str:
  """The split that owns `scene` of `task_type`: a fixed hash, independent of any seed."""
  digest = hashlib.blake2b(f"{task_type}|{scene}".encode(), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def seed_entropy(task_type: str, split: str, index: int, difficulty: int, image_size: int,
                 attempt: int) -> list[int]:
  """The SeedSequence entropy of one draw; the first word keys the split."""
  return [_SPLIT_KEYS[split], taxonomy.task_id(task_type), difficulty, image_size, index, attempt]


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


def all_task_types() -> tuple[str, ...]:
  """Every task type of the taxonomy, each registered (imports all task modules)."""
  return tuple(get_task(name).name for name in taxonomy.TASK_TYPES)
