"""The Gaussian quantile map Q of REFERENCE §3, applied inside every segment of a flat batch.

One lexsort by (segment, value), run bounds from cumsums and scatters, and run means of
Φ⁻¹((k + 0.5) / N) summed by distance-only doubling, so that a result depends only on its (rank, tie
run, segment size), bit for bit. G²RPO (`advantages.g2rpo_advantages`) is this map applied twice.
"""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Rows that do not count sort after every real segment under this key.
_INVALID_SEGMENT = np.iinfo(np.int32).max


def as_batch(name: str, x, dtype, batch: int | None = None) -> jax.Array:
  """x as a 1-D `dtype` array [B] (B = batch when given), or a ValueError naming `name`."""
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


def _run_sums(q: jax.Array, start: jax.Array, n: jax.Array, leftwards: jax.Array) -> jax.Array:
  """Per run r, the sum of q[start[r]] and the n[r] - 1 positions after it (before it where
  leftwards[r]), float32[R].

  The run is cut into blocks of 2^m positions, the low bits of n first; block sums of 2d come from
  those of d by one shifted add (doubling), so a block's sum is a balanced tree of its values.
  A run's bits thus depend only on its values, and a mirrored run's are their exact negation: no
  per-position bookkeeping of run bounds is needed.
  """
  b = q.shape[0]
  longest = jnp.max(n)

  def cond(carry):
    return carry[-1] <= longest

  def body(carry):
    blocks, total, d = carry  # blocks[i]: the sum of q[i], …, q[i + d - 1]
    done = n & (d - 1)  # positions the lower bits have covered
    first = jnp.clip(jnp.where(leftwards, start - done - d + 1, start + done), 0, b - 1)
    total = jnp.where((n & d) != 0, total + blocks[first], total)
    # Blocks that would run past the end wrap around; no run reaches them.
    return blocks + jnp.roll(blocks, -d), total, d * 2

  _, total, _ = lax.while_loop(cond, body, (q, jnp.zeros(n.shape, q.dtype), jnp.int32(1)))
  return total


def _mirror_split(seg_start, seg_end, run_start, run_end) -> tuple[jax.Array, jax.Array]:
  """Which of a tie run's ranks are summed, elementwise over runs given by their positions.

  A run's ranks that overlap its mirror image sum to exactly 0, so only the rest is summed:
  [lo, min(hi, last-hi-1)] for a run at or below the middle, [max(lo, last-lo+1), hi] above it,
  the latter as the mirror of a lower run (summed from the run end). Exact zeros and exact mirror
  symmetry make mathematically tied stage-1 values bitwise tied in stage 2.
  Returns (upper bool: sum from the run end; terms - 1, int32, < 0 when nothing is left).
  """
  last = seg_end - seg_start  # rank k mirrors to last - k
  lo, hi = run_start - seg_start, run_end - seg_start  # the run covers ranks [lo, hi]
  upper = lo + hi > last
  terms = jnp.where(upper, hi - jnp.maximum(lo, last - lo + 1), jnp.minimum(hi, last - hi - 1) - lo)
  return upper, terms


def _sorted_run_means(seg_start, seg_end, run_start, run_end, counted) -> jax.Array:
  """Q of every position of a batch laid out in (segment, value) order, float32[B].

  Each argument is int32[B] / bool[B] per position: its segment's first and last position, its
  tie run's first and last position, and whether it counts. The result at a position depends only
  on (rank, run length, segment size), bit for bit (see `gaussian_quantile_map`).
  """
  b = seg_start.shape[0]
  pos = jnp.arange(b, dtype=jnp.int32)
  q = _mirrored_normal_quantiles(pos - seg_start, seg_end - seg_start + 1)
  upper, terms = _mirror_split(seg_start, seg_end, run_start, run_end)
  # Upper runs are summed from their end, the mirror image of a lower run's sum. Ignored rows
  # form one long run; 0 terms keep them from lengthening the doubling loop.
  n = jnp.where(counted, jnp.maximum(terms + 1, 0), 0)
  total = _run_sums(q, jnp.where(upper, run_end, run_start), n, upper)
  return jnp.where(counted, total / (run_end - run_start + 1).astype(jnp.float32), 0.0)


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
  values = as_batch("values", values, jnp.float32)
  b = values.shape[0]
  segment_ids = as_batch("segment_ids", segment_ids, jnp.int32, b)
  valid = jnp.ones((b,), bool) if valid is None else as_batch("valid", valid, bool, b)
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
