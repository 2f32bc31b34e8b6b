"""Random-access sources of `Example`s per task type, and their seeded mixture as a grain dataset.

Every source offers `by_task() -> {task_type: random-access sequence of Example}`: the procedural
suite (one virtual, effectively infinite sequence per task), a TFDS snapshot or a JSON file. The
mixture interleaves the tasks in exact per-block proportions with a seeded order inside each
block, so any stride of the stream (JAX processes, grain workers) still sees every task.
"""
from collections.abc import Mapping, Sequence
import bisect
import sys

import grain
from grain import experimental as grain_experimental
import numpy as np

from openvlthinker import taxonomy
from openvlthinker.tasks import answers
from openvlthinker.tasks import registry
from openvlthinker.tasks.base import Example

# Large enough that no run reads a task's virtual range twice, small enough for int32 indices.
SUITE_VIRTUAL_SIZE = 2**31
# The mixture stream is cut into blocks of this many records; weights resolve to 1/MIXTURE_BLOCK.
MIXTURE_BLOCK = 1000
# Tasks up to this many records shuffle with a cached numpy permutation per epoch: grain's
# index_shuffle costs about 25 ms / length per lookup (6 ms at length 4, 30 us at 1000), so only
# larger ones use it.
SMALL_TASK = 2**20


def derive_seed(*parts: int) -> int:
  """A 32-bit seed mixed from integers (splitmix64 steps): cheap and stable across processes."""
  x = 0x9E3779B97F4A7C15
  for part in parts:
    x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
  return x & 0xFFFFFFFF


class SuiteTaskSource:
  """One task of the procedural suite: record i is `generate(task_type, split, i, ...)`."""

  def __init__(self, task_type: str, split: str = "train", difficulty: int = 0,
               image_size: int = 64, size: int = SUITE_VIRTUAL_SIZE):
    if split not in registry.SPLITS:
      raise ValueError(f"split: got {split!r}, expected one of {registry.SPLITS}")
    self.task_type = taxonomy.canonical_task_type(task_type)
    self.split, self._size = split, size
    # Checked here so a bad config fails when the pipeline is built, not in a worker.
    self.difficulty = answers.check_difficulty(difficulty)
    self.image_size = answers.check_image_size(image_size)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> Example:
    return registry.generate(self.task_type, self.split, int(index), difficulty=self.difficulty,
                             image_size=self.image_size)


class SuiteSource:
  """The whole suite for one split: a `SuiteTaskSource` per task type."""

  def __init__(self, split: str = "train", difficulty: Mapping[str, int] | None = None,
               image_size: int = 64):
    levels = {}
    for name, level in (difficulty or {}).items():
      try:
        levels[taxonomy.canonical_task_type(name)] = answers.check_difficulty(level)
      except ValueError as e:
        raise ValueError(f"data.difficulty[{name!r}]: {e}") from None
    self._tasks = {t: SuiteTaskSource(t, split, levels.get(t, 0), image_size)
                   for t in taxonomy.TASK_TYPES}

  def by_task(self) -> dict[str, SuiteTaskSource]:
    return dict(self._tasks)


class Subset:
  """The records `indices` of a random-access `source`, as a random-access sequence."""

  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


class ShuffledEpochs:
  """`source` repeated forever, each epoch in the order of its own seeded permutation."""

  def __init__(self, source, seed: int):
    self._source, self._seed, self._cache = source, seed, {}

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int):
    epoch, position = divmod(int(index), len(self._source))
    cache = self._cache
    order = cache.get(epoch)
    if order is None:
      order = np.random.default_rng([self._seed, epoch]).permutation(len(self._source))
      # Rebinding a new dict is atomic, so reader threads never see a half-updated cache; readers
      # move forward, so the epoch before this one is all that is worth keeping.
      self._cache = {e: o for e, o in cache.items() if e >= epoch - 1} | {epoch: order}
    return self._source[int(order[position])]


def shuffled_epochs(source, seed: int) -> grain.MapDataset:
  """An infinite MapDataset over `source`: a new seeded order every epoch."""
  if len(source) <= SMALL_TASK:
    return grain.MapDataset.source(ShuffledEpochs(source, seed))
  return grain.MapDataset.source(source).shuffle(seed=seed).repeat()


def mixture_counts(weights: Sequence[float], block: int = MIXTURE_BLOCK) -> np.ndarray:
  """int64[T] records per block for each weight: largest remainder, every positive weight ≥ 1."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or not len(w) or np.any(~np.isfinite(w)) or np.any(w <= 0):
    raise ValueError(f"mixture weights: expected positive finite numbers, got {list(weights)}")
  if len(w) > block:
    raise ValueError(f"mixture weights: at most {block} tasks, got {len(w)}")
  exact = w / w.sum() * block
  counts = np.floor(exact).astype(np.int64)
  remainder = block - counts.sum()
  counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
  for tiny in np.flatnonzero(counts == 0):  # a positive weight keeps one slot, from the largest
    counts[np.argmax(counts)] -= 1
    counts[tiny] = 1
  return counts


class TaskMixture(grain.transforms.DatasetSelectionMap):
  """Stream index → (task slot, index within that task's dataset).

  Each block of `sum(counts)` records holds exactly `counts[t]` records of task t, in an order
  that is a seeded permutation of the block; task t's records get consecutive indices, so a
  finite task dataset is read epoch by epoch.
  """

  def __init__(self, counts: Sequence[int], seed: int):
    self._counts = [int(c) for c in counts]
    self._ends = np.cumsum(self._counts).tolist()
    self._block = self._ends[-1]
    self._seed = seed

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    block, position = divmod(int(index), self._block)
    slot = position if self._block == 1 else grain_experimental.index_shuffle(
        position, max_index=self._block - 1, seed=derive_seed(self._seed, block), rounds=4)
    task = bisect.bisect_right(self._ends, slot)
    start = self._ends[task] - self._counts[task]
    return task, block * self._counts[task] + slot - start


def resolve_weights(available: Sequence[str],
                    weights: Mapping[str, float] | None) -> dict[str, float]:
  """Canonical task type → positive weight; None means uniform over `available`."""
  if weights is None:
    return {t: 1.0 for t in available}
  resolved = {}
  for name, w in weights.items():
    task = taxonomy.canonical_task_type(name)
    if not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
      raise ValueError(f"mixture[{name!r}]: expected a finite weight >= 0, got {w!r}")
    if w > 0:
      if task not in available:
        raise ValueError(f"mixture[{name!r}]: weight {w} but the source has no {task!r} records "
                         f"(it has {sorted(available)})")
      resolved[task] = float(w)
  if not resolved:
    raise ValueError(f"mixture: expected at least one positive weight, got {dict(weights)}")
  return resolved


def mixed_dataset(by_task: Mapping[str, Sequence[Example]], weights: Mapping[str, float] | None,
                  seed: int) -> tuple[grain.MapDataset, tuple[str, ...]]:
  """An infinite grain MapDataset of Examples mixing the tasks of `by_task` by `weights`.

  Each task's records are shuffled with a seed derived from (seed, task id) and repeated with a
  new order every epoch. Returns the dataset and the task types it mixes, in slot order.
  """
  resolved = resolve_weights([t for t, s in by_task.items() if len(s)], weights)
  tasks = tuple(t for t in taxonomy.TASK_TYPES if t in resolved)
  parts = [shuffled_epochs(by_task[t], derive_seed(seed, 1, taxonomy.task_id(t))) for t in tasks]
  counts = mixture_counts([resolved[t] for t in tasks])
  mixture = TaskMixture(counts, derive_seed(seed, 2))
  return grain.MapDataset.select_from_datasets(parts, mixture), tasks
