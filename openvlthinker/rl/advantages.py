"""Advantage estimators (REFERENCE §3): the Gaussian quantile map, G²RPO and its baselines.

Owns `gaussian_quantile_map` (the map Q applied inside every segment of a flat batch), the two-stage
`g2rpo_advantages`, and a registry of estimators chosen by name, all with one signature
`fn(rewards, group_ids, task_ids, valid, *, group_size, num_tasks) -> float32[B]`. Everything is a
pure, jittable function of flat arrays (a lexsort per quantile map, cumsums, scatters and segment
sums), with no Python loop over groups or tasks; for the sampler's prompt-major layout, G²RPO has a
sort-free path (G×G comparisons, a table of stage-1 values, a counting sort).
"""
from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Rows that do not count sort after every real segment under this key.
_INVALID_SEGMENT = np.iinfo(np.int32).max


def _as_batch(name: str, x, dtype, batch: int | None = None) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array [B], got shape {x.shape}")
  if batch is not None and x.shape[0] != batch:
    raise ValueError(f"{name}: expected shape ({batch},) like the rewards/values, got {x.shape}")
  return x.astype(dtype)


def _order_preserving_int(x: jax.Array) -> jax.Array:
  """int32 keys with the order of float32 x, and -0.0 and 0.0 mapped to one key."""
  bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _mirrored_normal_quantiles(rank: jax.Array, size: jax.Array) -> jax.Array:
  """Φ⁻¹((rank + 0.5) / size) for int32 rank < size, as float32.

  Evaluated on the nearer tail and negated for the upper half, so q[size-1-k] == -q[k] bitwise and
  the median is exactly 0. This also keeps full float32 accuracy in the upper tail, where
  (rank + 0.5) / size itself would round to a multiple of 2^-24 near 1.
  """
  mirror = size - 1 - rank
  k = jnp.minimum(rank, mirror)
  # (2k + 1) / (2n) is one correctly rounded division of exact integers: equal rationals p from
  # different segment sizes give the same float32 p, hence the same quantile bits.
  p = (2 * k + 1).astype(jnp.float32) / (2 * size).astype(jnp.float32)
  q = jax.scipy.special.ndtri(p)
  return jnp.where(rank < mirror, q, jnp.where(rank > mirror, -q, 0.0))


def _run_bounds(start_flag: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and last position of each row's run, int32[B] each, from flags marking run starts.

  Runs are numbered by a cumsum of the flags; one scatter records where each run starts, and run
  r ends where run r + 1 starts (XLA:CPU does this about twice as fast as cummax + cummin).
  """
  b = start_flag.shape[0]
  run = jnp.cumsum(start_flag.astype(jnp.int32)) - 1
  starts = jnp.full((b + 1,), b, jnp.int32)  # runs that do not exist start at b
  starts = starts.at[jnp.where(start_flag, run, b + 1)].set(pos, mode="drop")
  return starts[run], starts[run + 1] - 1


def _run_prefix_sums(x: jax.Array, dist: jax.Array, from_right: jax.Array) -> jax.Array:
  """Sums of x over [anchor, i] within runs of equal keys, by Hillis-Steele doubling.

  dist[i] is i's distance from its run's anchor: the run start, or the run end where from_right.
  Step d adds the partial sum d places towards the anchor; every element's summation tree thus
  depends only on its distance, so identical runs anywhere in the batch give identical bits (a
  global cumsum or an associative_scan, whose trees depend on absolute positions, would not).
  """
  max_dist = jnp.max(dist)

  def cond(carry):
    _, d = carry
    return d <= max_dist

  def body(carry):
    acc, d = carry
    from_left_nb = jnp.roll(acc, d)  # acc[i - d]; wrapped entries are masked by dist >= d.
    from_right_nb = jnp.roll(acc, -d)  # acc[i + d]
    step = jnp.where(from_right, from_right_nb, from_left_nb)
    return acc + jnp.where(dist >= d, step, 0.0), d * 2

  acc, _ = lax.while_loop(cond, body, (x, jnp.int32(1)))
  return acc


def _sorted_run_means(seg_start, seg_end, run_start, run_end, counted) -> jax.Array:
  """Q of every position of a batch laid out in (segment, value) order, float32[B].

  Each argument is int32[B] / bool[B] per position: its segment's first and last position, its
  tie run's first and last position, and whether it counts. The result at a position depends only
  on (rank, run length, segment size), bit for bit (see `gaussian_quantile_map`).
  """
  b = seg_start.shape[0]
  pos = jnp.arange(b, dtype=jnp.int32)
  size = seg_end - seg_start + 1
  last = size - 1  # rank k mirrors to last - k
  lo = run_start - seg_start  # the run covers ranks [lo, hi]
  hi = run_end - seg_start
  q = _mirrored_normal_quantiles(pos - seg_start, size)

  # A run's ranks that overlap its mirror image sum to exactly 0, so only the rest is summed:
  # [lo, min(hi, last-hi-1)] for a run at or below the middle, [max(lo, last-lo+1), hi] above it,
  # the latter as the mirror of a lower run (summed from the run end over -q). Exact zeros and
  # exact mirror symmetry make mathematically tied stage-1 values bitwise tied in stage 2.
  upper = lo + hi > last
  # Ignored rows form one long run; distance 0 keeps them from lengthening the doubling loop.
  dist = jnp.where(counted, jnp.where(upper, run_end - pos, pos - run_start), 0)
  sums = _run_prefix_sums(jnp.where(upper, -q, q), dist, upper)
  count = jnp.where(upper, hi - jnp.maximum(lo, last - lo + 1),
                    jnp.minimum(hi, last - hi - 1) - lo)  # terms - 1; < 0 when nothing is left
  at = jnp.clip(jnp.where(upper, run_end - count, run_start + count), 0, b - 1)
  total = jnp.where(count >= 0, sums[at], 0.0)
  mean = jnp.where(upper, -total, total) / (hi - lo + 1).astype(jnp.float32)

  return jnp.where(counted, mean, 0.0)


def gaussian_quantile_map(values, segment_ids, valid=None, num_segments: int | None = None):
  """The Gaussian quantile map Q of REFERENCE §3, applied independently inside each segment.

  Within a segment of N counted values, the value at rank k (0-based, ascending) targets
  Φ⁻¹((k + 0.5) / N); tied values share the mean target of the ranks they occupy; N ≤ 1 gives 0.

  Args:
    values: float[B].
    segment_ids: int[B], the segment of each row (any non-negative ints; they need not be sorted
      or contiguous).
    valid: optional bool[B]; rows with False get 0 and are not counted in any segment.
    num_segments: optional static bound; ids outside [0, num_segments) then count as invalid,
      as in `jax.ops.segment_sum`.

  Returns:
    float32[B]. Results depend only on each row's (rank, tie-run length, segment size), bit for
    bit: segments holding the same multiset of values get identical outputs wherever they sit,
    mathematically equal outputs (0, mirror images ±q) are bitwise equal, and Q(-x) == -Q(x).
  """
  values = _as_batch("values", values, jnp.float32)
  b = values.shape[0]
  segment_ids = _as_batch("segment_ids", segment_ids, jnp.int32, b)
  valid = jnp.ones((b,), bool) if valid is None else _as_batch("valid", valid, bool, b)
  if b == 0:
    return jnp.zeros((0,), jnp.float32)
  if num_segments is not None:
    valid &= (segment_ids >= 0) & (segment_ids < num_segments)

  seg = jnp.where(valid, segment_ids, _INVALID_SEGMENT)
  key = _order_preserving_int(jnp.where(valid, values, 0.0))
  pos = jnp.arange(b, dtype=jnp.int32)
  # The lexsort by (segment, value). Integer keys compare faster than floats under XLA's total
  # order, and stability is not needed: tied rows all receive their run's mean.
  seg_s, val_s, perm = lax.sort((seg, key, pos), num_keys=2, is_stable=False)

  first = jnp.ones((1,), bool)
  seg_flag = jnp.concatenate([first, seg_s[1:] != seg_s[:-1]])
  run_flag = seg_flag | jnp.concatenate([first, val_s[1:] != val_s[:-1]])
  seg_start, seg_end = _run_bounds(seg_flag, pos)
  run_start, run_end = _run_bounds(run_flag, pos)

  out_sorted = _sorted_run_means(seg_start, seg_end, run_start, run_end,
                                 seg_s != _INVALID_SEGMENT)
  return jnp.zeros((b,), jnp.float32).at[perm].set(out_sorted, unique_indices=True)


def _estimator_inputs(rewards, group_ids, task_ids, valid):
  """Checked float32/int32/bool [B] arrays; rows whose ids fall outside [0, B) become invalid."""
  rewards = _as_batch("rewards", rewards, jnp.float32)
  b = rewards.shape[0]
  group_ids = _as_batch("group_ids", group_ids, jnp.int32, b)
  task_ids = _as_batch("task_ids", task_ids, jnp.int32, b)
  valid = jnp.ones((b,), bool) if valid is None else _as_batch("valid", valid, bool, b)
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
  rewards, group_ids, task_ids, valid = _estimator_inputs(rewards, group_ids, task_ids, valid)
  return _with_blocked_fast_path(rewards, group_ids, task_ids, valid, group_size, num_tasks, 2)


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


def _scan(op, x: jax.Array) -> jax.Array:
  # The counting sort's scans: jnp.cumsum / lax.cummax measured ~4x slower alone on XLA:CPU at
  # 4096 rows (inside the sorted path's fusions, cumsum measured faster, so it keeps it).
  return lax.associative_scan(op, x)


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
  bin_start = _scan(jnp.add, counts) - counts
  task_count = counts.reshape(num_tasks, num_values).sum(1)
  task_start = jnp.cumsum(task_count) - task_count  # a handful of tasks: no scan needed
  marks = jnp.zeros((b,), jnp.int32).at[jnp.where(counts > 0, bin_start, b)].set(
      jnp.arange(num_bins, dtype=jnp.int32), mode="drop")
  bin_at = _scan(jnp.maximum, marks)  # the bin of every position
  task_at = bin_at // num_values
  seg_start, run_start = task_start[task_at], bin_start[bin_at]
  means = _sorted_run_means(seg_start, seg_start + task_count[task_at] - 1,
                            run_start, run_start + counts[bin_at] - 1,
                            jnp.arange(b) < jnp.sum(counts))
  return jnp.where(valid, means[bin_start[jnp.minimum(bins, num_bins - 1)]], 0.0)


def _blocked_layout_fits(rewards, group_ids, task_ids, valid, group_size: int,
                         num_tasks: int | None) -> jax.Array:
  """Whether the hints hold, as bool[]: group ids never decrease along the rows and change at
  every block boundary (so each group is contiguous and inside one block, as in the sampler's
  layout; other blocked layouts take the sorted path too), every valid task id is below
  num_tasks (when given) and no valid reward is NaN (the sort orders NaN, the comparisons of
  `_table_entries` do not). Elementwise and one reduction: no scatter, no sort."""
  blocks = group_ids.reshape(-1, group_size)
  fits = jnp.all(group_ids[1:] >= group_ids[:-1]) & jnp.all(blocks[1:, 0] != blocks[:-1, -1])
  ok = ~jnp.isnan(rewards)
  if num_tasks is not None:
    ok &= task_ids < num_tasks
  return fits & jnp.all(~valid | ok)


def _with_blocked_fast_path(rewards, group_ids, task_ids, valid, group_size, num_tasks, stages):
  b = rewards.shape[0]
  usable = (group_size is not None and b > 0 and 1 <= group_size <= _MAX_BLOCKED_GROUP
            and b % group_size == 0 and (stages == 1 or (num_tasks or 0) >= 1))
  if not usable:
    return _sorted_g2rpo(rewards, group_ids, task_ids, valid, stages)
  fits = _blocked_layout_fits(rewards, group_ids, task_ids, valid, group_size,
                              num_tasks if stages == 2 else None)
  entry = _table_entries(rewards, group_ids, valid, group_size)
  args = (rewards, group_ids, task_ids, valid, entry)
  # The hints are checked, not trusted: a batch that does not fit takes the sorted path.
  fast = lambda r, g, t, v, e: _blocked_g2rpo(t, v, e, group_size, num_tasks, stages)
  return lax.cond(fits, fast, lambda r, g, t, v, _: _sorted_g2rpo(r, g, t, v, stages), *args)


# ----------------------------------------------------------------------------------------------
# Registry. Every estimator: fn(rewards, group_ids, task_ids, valid=None, *, group_size=None,
# num_tasks=None) -> float32[B], with ids in [0, B); invalid rows, and rows with ids outside
# [0, B), get 0 and count nowhere. group_size / num_tasks are layout hints (g2rpo_advantages)
# that change speed, not ranks or ties.
# ----------------------------------------------------------------------------------------------

AdvantageFn = Callable[..., jax.Array]
_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
  def decorate(fn: AdvantageFn) -> AdvantageFn:
    if name in _ESTIMATORS:
      raise ValueError(f"advantage estimator {name!r} is already registered")
    _ESTIMATORS[name] = fn
    return fn
  return decorate


def get_advantage_estimator(name: str) -> AdvantageFn:
  if name not in _ESTIMATORS:
    raise ValueError(f"advantage estimator: got {name!r}, expected one of {sorted(_ESTIMATORS)}")
  return _ESTIMATORS[name]


def advantage_estimators() -> tuple[str, ...]:
  return tuple(sorted(_ESTIMATORS))


register_advantage_estimator("g2rpo")(g2rpo_advantages)


@register_advantage_estimator("g2rpo_group")
def g2rpo_group_advantages(rewards, group_ids, task_ids, valid=None, *,
                           group_size: int | None = None, num_tasks: int | None = None):
  """Stage 1 of G²RPO only: Q within each prompt group (task_ids unused)."""
  rewards, group_ids, task_ids, valid = _estimator_inputs(rewards, group_ids, task_ids, valid)
  return _with_blocked_fast_path(rewards, group_ids, task_ids, valid, group_size, None, 1)


def _group_stats(rewards, group_ids, task_ids, valid):  # segment sums: no layout hint needed
  """Per-row group count n, r - group mean and group sum of squared deviations, float32[B] each.

  The mean is taken relative to a pivot (the group max) so that an all-equal group has a mean
  equal to its value bit for bit and gets exactly 0, not rounding noise divided by 1e-6.
  """
  rewards, group_ids, _, valid = _estimator_inputs(rewards, group_ids, task_ids, valid)
  b = rewards.shape[0]
  seg = jnp.where(valid, group_ids, b)  # out of range: dropped by the segment ops
  per_row = lambda per_group: per_group[jnp.where(valid, group_ids, 0)]
  group_sum = lambda x: per_row(jax.ops.segment_sum(x, seg, num_segments=b))
  n = group_sum(valid.astype(jnp.float32))
  dev = jnp.where(valid, rewards - per_row(jax.ops.segment_max(rewards, seg, num_segments=b)), 0.0)
  dev = jnp.where(valid, dev - group_sum(dev) / jnp.maximum(n, 1.0), 0.0)
  return n, dev, group_sum(dev * dev), valid


@register_advantage_estimator("grpo")
def grpo_advantages(rewards, group_ids, task_ids, valid=None, *, group_size=None,
                    num_tasks=None):
  """GRPO: (r - mean_g) / (std_g + 1e-6), unbiased std; groups of one get 0 (no baseline)."""
  n, dev, ss, valid = _group_stats(rewards, group_ids, task_ids, valid)
  std = jnp.sqrt(ss / jnp.maximum(n - 1.0, 1.0))
  return jnp.where(valid & (n > 1), dev / (std + 1e-6), 0.0)


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(rewards, group_ids, task_ids, valid=None, *, group_size=None,
                      num_tasks=None):
  """Dr.GRPO: r - mean_g (no std normalisation)."""
  _, dev, _, _ = _group_stats(rewards, group_ids, task_ids, valid)
  return dev


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, group_ids, task_ids, valid=None, *, group_size=None,
                    num_tasks=None):
  """RLOO: r - mean of the other responses of the group = n/(n-1) (r - mean_g); 0 for n = 1."""
  n, dev, _, valid = _group_stats(rewards, group_ids, task_ids, valid)
  return jnp.where(valid & (n > 1), dev * n / jnp.maximum(n - 1.0, 1.0), 0.0)
