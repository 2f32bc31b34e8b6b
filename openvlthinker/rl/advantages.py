"""Advantage estimators (REFERENCE §3): the Gaussian quantile map, G²RPO and its baselines.

Owns `gaussian_quantile_map` (the map Q applied inside every segment of a flat batch), the two-stage
`g2rpo_advantages`, and a registry of estimators chosen by name, all with one signature
`fn(rewards, group_ids, task_ids, valid) -> float32[B]`. Everything is a pure, jittable function of
flat arrays (a lexsort per quantile map, cumsums, scatters and segment sums), with no Python loop
over groups or tasks.
"""
from collections.abc import Callable

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
  counted = seg_s != _INVALID_SEGMENT
  # Ignored rows form one long run; distance 0 keeps them from lengthening the doubling loop.
  dist = jnp.where(counted, jnp.where(upper, run_end - pos, pos - run_start), 0)
  sums = _run_prefix_sums(jnp.where(upper, -q, q), dist, upper)
  count = jnp.where(upper, hi - jnp.maximum(lo, last - lo + 1),
                    jnp.minimum(hi, last - hi - 1) - lo)  # terms - 1; < 0 when nothing is left
  at = jnp.clip(jnp.where(upper, run_end - count, run_start + count), 0, b - 1)
  total = jnp.where(count >= 0, sums[at], 0.0)
  mean = jnp.where(upper, -total, total) / (hi - lo + 1).astype(jnp.float32)

  out_sorted = jnp.where(counted, mean, 0.0)
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


def g2rpo_advantages(rewards, group_ids, task_ids, valid=None):
  """G²RPO (REFERENCE §3): Q within each prompt group, then Q of those within each task.

  Args:
    rewards: float[B]. group_ids: int[B], the prompt group of each response. task_ids: int[B],
      the task key of each response (task type by default; the caller picks the key).
    valid: optional bool[B]; False rows get 0 and count in neither stage.

  Returns:
    float32[B] per-response advantages.
  """
  rewards, group_ids, task_ids, valid = _estimator_inputs(rewards, group_ids, task_ids, valid)
  stage1 = gaussian_quantile_map(rewards, group_ids, valid)
  return gaussian_quantile_map(stage1, task_ids, valid)


# ----------------------------------------------------------------------------------------------
# Registry. Every estimator: fn(rewards, group_ids, task_ids, valid=None) -> float32[B], with ids
# in [0, B); invalid rows, and rows with ids outside [0, B), get 0 and count nowhere.
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
def g2rpo_group_advantages(rewards, group_ids, task_ids, valid=None):
  """Stage 1 of G²RPO only: Q within each prompt group (task_ids unused)."""
  rewards, group_ids, _, valid = _estimator_inputs(rewards, group_ids, task_ids, valid)
  return gaussian_quantile_map(rewards, group_ids, valid)


def _group_stats(rewards, group_ids, task_ids, valid):
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
def grpo_advantages(rewards, group_ids, task_ids, valid=None):
  """GRPO: (r - mean_g) / (std_g + 1e-6), unbiased std; groups of one get 0 (no baseline)."""
  n, dev, ss, valid = _group_stats(rewards, group_ids, task_ids, valid)
  std = jnp.sqrt(ss / jnp.maximum(n - 1.0, 1.0))
  return jnp.where(valid & (n > 1), dev / (std + 1e-6), 0.0)


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(rewards, group_ids, task_ids, valid=None):
  """Dr.GRPO: r - mean_g (no std normalisation)."""
  _, dev, _, _ = _group_stats(rewards, group_ids, task_ids, valid)
  return dev


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, group_ids, task_ids, valid=None):
  """RLOO: r - mean of the other responses of the group = n/(n-1) (r - mean_g); 0 for n = 1."""
  n, dev, _, valid = _group_stats(rewards, group_ids, task_ids, valid)
  return jnp.where(valid & (n > 1), dev * n / jnp.maximum(n - 1.0, 1.0), 0.0)
