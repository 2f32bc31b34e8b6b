"""G²RPO (REFERENCE §3): the quantile map within each prompt group, then within each task.

The general path runs `gaussian_quantile_map` twice (two sorts). For the sampler's prompt-major
layout there is a sort-free path, selected by static hints and checked at run time (a `lax.cond`
falls back to the sorted path when a batch does not fit). `estimator_inputs` is the input check
every estimator shares.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from openvlthinker.rl.quantile_map import (as_batch, gaussian_quantile_map, mirror_split,
                                           mirrored_normal_quantiles, run_sums)


def estimator_inputs(rewards, group_ids, task_ids, valid):
  """Checked float32/int32/bool [B] arrays; rows whose ids fall outside [0, B) become invalid."""
  rewards = as_batch("rewards", rewards, jnp.float32)
  b = rewards.shape[0]
  group_ids = as_batch("group_ids", group_ids, jnp.int32, b)
  task_ids = as_batch("task_ids", task_ids, jnp.int32, b)
  valid = jnp.ones((b,), bool) if valid is None else as_batch("valid", valid, bool, b)
  in_range = lambda ids: (ids >= 0) & (ids < b)
  return rewards, group_ids, task_ids, valid & in_range(group_ids) & in_range(task_ids)


def g2rpo_advantages(rewards, group_ids, task_ids, valid=None, *, group_size: int | None = None,
                     num_tasks: int | None = None):
  """G²RPO (REFERENCE §3): Q within each prompt group, then Q of those within each task.

  Args:
    rewards: float[B]. group_ids: int[B], the prompt group of each response. task_ids: int[B],
      the task key of each response (task type by default; the caller picks the key).
    valid: optional bool[B]; False rows get 0 and count in neither stage.
    group_size, num_tasks: optional static layout hints (see `_blocked_g2rpo`): rows in blocks of
      `group_size` that hold whole groups, task ids below `num_tasks`. With them and a batch that
      fits, no sort runs; the result has the same ranks and ties (last bits may differ).

  Returns:
    float32[B] per-response advantages.
  """
  rewards, group_ids, task_ids, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
  return _with_blocked_fast_path(rewards, group_ids, task_ids, valid, group_size, num_tasks, 2)


def g2rpo_group_advantages(rewards, group_ids, task_ids, valid=None, *,
                           group_size: int | None = None, num_tasks: int | None = None):
  """Stage 1 of G²RPO only: Q within each prompt group (task_ids unused)."""
  rewards, group_ids, task_ids, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
  return _with_blocked_fast_path(rewards, group_ids, task_ids, valid, group_size, None, 1)


def _sorted_g2rpo(rewards, group_ids, task_ids, valid, stages: int):
  stage1 = gaussian_quantile_map(rewards, group_ids, valid)
  return stage1 if stages == 1 else gaussian_quantile_map(stage1, task_ids, valid)


# ------------------------------------------------------------------- sort-free blocked layout
# The sampler lays a rollout out prompt-major: G responses per prompt in consecutive rows. Then
# stage 1 needs no sort (a G×G comparison inside each block gives every row its group size, rank
# and tie count), its outputs take one of a few hundred known values (a table built once per G),
# and stage 2 becomes a counting sort over (task, value id) bins. XLA:CPU runs comparison sorts
# through a compiled comparator call per comparison, so this is about 7x faster there
# (benchmarks/advantages.py); on TPU it avoids two sorts of the whole batch.

_MAX_BLOCKED_GROUP = 16  # the table has O(G³) entries and its build runs O(G⁴) values once.


@functools.lru_cache(maxsize=None)
def _stage1_table(group_size: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Every stage-1 value a group of at most `group_size` valid rows can produce.

  Returns (values float32[G³], ids int32[G³], number of distinct values), indexed by
  ((n - 1)·G + rank of the run's first row)·G + run length - 1; ids number the distinct values in
  ascending order (equal values, e.g. 0 = the median of any odd group, share an id). The values
  come from `gaussian_quantile_map` on one synthetic segment per entry.
  """
  g = group_size
  values, segments, entries = [], [], []
  for n in range(1, g + 1):
    for lo in range(n):
      for length in range(1, n - lo + 1):
        entries.append((((n - 1) * g + lo) * g + length - 1, len(values) + lo))
        segments += [len(entries)] * n
        values += list(range(lo)) + [lo] * length + list(range(lo + 1, n - length + 1))
  # Concrete even when first needed inside a jit trace.
  with jax.ensure_compile_time_eval():
    q = np.asarray(jax.jit(gaussian_quantile_map)(np.asarray(values, np.float32),
                                                  np.asarray(segments, np.int32)))
  index, at = (np.asarray(x) for x in zip(*entries))
  table = np.zeros(g ** 3, np.float32)
  table[index] = q[at]
  distinct, inverse = np.unique(table[index], return_inverse=True)
  ids = np.zeros(g ** 3, np.int32)
  ids[index] = inverse
  return table, ids, len(distinct)


def _table_entries(rewards, group_ids, valid, group_size: int) -> jax.Array:
  """Each row's `_stage1_table` entry from a G×G comparison inside its block, int32[B].

  One sum per row packs (peers, peers below, peers tied) in base G: each valid peer j of row i
  adds G² + G·[r_j < r_i] + [r_j == r_i], the row itself included. Rows of other groups or invalid
  rows add nothing; invalid rows get garbage, which the caller masks.
  """
  g = group_size
  r, gid, ok = (x.reshape(-1, g) for x in (rewards, group_ids, valid))
  acc = jnp.zeros(r.shape, jnp.int32)
  for j in range(g):  # unrolled: one fused elementwise loop, no [B, G] comparison tensor
    rj = r[:, j:j + 1]
    acc += jnp.where(ok[:, j:j + 1] & (gid[:, j:j + 1] == gid),
                     g * g + g * (rj < r).astype(jnp.int32) + (rj == r).astype(jnp.int32), 0)
  return acc.reshape(-1) - g * g - 1


def _blocked_g2rpo(task_ids, valid, entry, group_size: int, num_tasks: int | None,
                   stages: int):
  """`_sorted_g2rpo` for batches where every group lies inside one block of `group_size` rows and
  every valid task id is below `num_tasks` (the caller checks): the same ranks, ties and run means.
  Stage-1 values are table lookups, so equal (size, rank, ties) give equal bits."""
  b = valid.shape[0]
  table, ids, num_values = _stage1_table(group_size)
  entry = jnp.clip(entry, 0, group_size ** 3 - 1)
  stage1 = jnp.where(valid, jnp.asarray(table)[entry], 0.0)
  if stages == 1:
    return stage1

  # Stage 2 as a counting sort: bin (task, value id) holds one tie run, and bins in ascending order
  # are the (task, value) order the sorted path would produce, position for position.
  num_bins = num_tasks * num_values
  bins = jnp.where(valid, task_ids * num_values + jnp.asarray(ids)[entry], num_bins)
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), bins, num_segments=num_bins)
  # One past each bin's last position (XLA:CPU runs jnp.cumsum as a quadratic windowed reduce).
  bin_end = lax.associative_scan(jnp.add, counts)
  bin_start = bin_end - counts
  task_first, task_end = bin_start[::num_values], bin_end[num_values - 1::num_values]
  # Every position's quantile from its rank in its task. Tasks are contiguous ranges of
  # positions, a handful: one select per task boundary finds a position's (no gather).
  pos = jnp.arange(b, dtype=jnp.int32)
  first, end = task_first[0], task_end[0]
  for t in range(1, num_tasks):
    past = pos >= task_end[t - 1]
    first, end = jnp.where(past, task_first[t], first), jnp.where(past, task_end[t], end)
  q = jnp.where(pos < bin_end[-1], mirrored_normal_quantiles(pos - first, end - first), 0.0)
  # Per bin, the sum of its ranks that do not cancel against their mirror image, then its mean.
  per_bin = lambda per_task: jnp.repeat(per_task, num_values)
  upper, terms = mirror_split(per_bin(task_first), per_bin(task_end) - 1, bin_start, bin_end - 1)
  sums = run_sums(q, jnp.where(upper, bin_end - 1, bin_start), jnp.maximum(terms + 1, 0), upper)
  row_bin = jnp.minimum(bins, num_bins - 1)
  return jnp.where(valid, sums[row_bin] / counts[row_bin].astype(jnp.float32), 0.0)


def _blocked_layout_fits(rewards, group_ids, task_ids, valid, group_size: int,
                         num_tasks: int | None) -> jax.Array:
  """Whether the hints hold, as bool[]: group ids never decrease along the rows and change at
  every block boundary (so each group is contiguous and inside one block, as in the sampler's
  layout; other blocked layouts take the sorted path too), every valid task id is below
  num_tasks (when given) and no valid reward is NaN (the sort orders NaN, the comparisons of
  `_table_entries` do not). Elementwise and one reduction: no scatter, no sort."""
  row = jnp.arange(group_ids.shape[0])
  previous = jnp.concatenate([group_ids[:1], group_ids[:-1]])  # row 0 compares with itself
  inside_block = (row % group_size != 0) | (row == 0)
  ok = ~jnp.isnan(rewards)
  if num_tasks is not None:
    ok &= task_ids < num_tasks
  row_fits = (group_ids >= previous) & (inside_block | (group_ids != previous))
  return jnp.all(row_fits & (~valid | ok))


def _with_blocked_fast_path(rewards, group_ids, task_ids, valid, group_size, num_tasks, stages):
  b = rewards.shape[0]
  usable = (group_size is not None and b > 0 and 1 <= group_size <= _MAX_BLOCKED_GROUP
            and b % group_size == 0 and (stages == 1 or (num_tasks or 0) >= 1))
  if not usable:
    return _sorted_g2rpo(rewards, group_ids, task_ids, valid, stages)
  fits = _blocked_layout_fits(rewards, group_ids, task_ids, valid, group_size,
                              num_tasks if stages == 2 else None)

  def fast(r, g, t, v):
    return _blocked_g2rpo(t, v, _table_entries(r, g, v, group_size), group_size, num_tasks,
                          stages)

  # The hints are checked, not trusted: a batch that does not fit takes the sorted path. The
  # table entries are computed inside the fast branch, where XLA fuses them with their consumers.
  return lax.cond(fits, fast, lambda r, g, t, v: _sorted_g2rpo(r, g, t, v, stages),
                  rewards, group_ids, task_ids, valid)
