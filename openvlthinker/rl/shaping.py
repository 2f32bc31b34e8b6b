"""Task-level shaping (REFERENCE §5, §6): per-task entropy bounds and the response-length reward.

Owns the two token-entropy estimators and the entropy penalty L_ent, the trapezoid length reward
with static per-task thresholds, and adaptive thresholds computed from per-task running statistics
(`AdaptiveLengthConfig.update` / `.thresholds`, pure functions of a small fixed-shape pytree that
goes into the checkpoint).
"""
from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from openvlthinker.fields import check, positive_int
from openvlthinker.taxonomy import ENTROPY_BOUNDS, LENGTH_THRESHOLDS, NUM_TASKS, TASK_TYPES

# ------------------------------------------------------------------------ entropy (REFERENCE §5)

ENTROPY_ESTIMATORS = ("sampled_token", "exact")


def sampled_token_entropy(logp):
  """The public code's estimate: -log π(y_t), float32[B, L], differentiable through logp."""
  return -jnp.asarray(logp, jnp.float32)


def exact_entropy(logits):
  """-Σ_v p_v log p_v of the next-token distributions, float32[B, L] from logits float[B, L, V]."""
  logits = jnp.asarray(logits, jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def _task_values(name: str, value, num_tasks: int) -> tuple[float, ...]:
  """A number for every task, a {task type: number} mapping or a per-task sequence → floats."""
  if isinstance(value, Mapping):  # e.g. a config section
    check(set(value) == set(TASK_TYPES[:num_tasks]), name, f"one entry per task {TASK_TYPES}",
          dict(value))
    value = [value[t] for t in TASK_TYPES[:num_tasks]]
  if np.ndim(value) == 0:
    value = [value] * num_tasks
  check(np.shape(value) == (num_tasks,), name, f"a number or {num_tasks} per-task values", value)
  return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class EntropyShapingConfig:
  """Entropy shaping; defaults are the public code's (off, λ = 0.02) and each task's declared
  bounds (`TaskSpec.entropy_bounds`: the public code's [0.2, 0.6] unless a task declares its own).

  h_min / h_max: one bound for every task, or a tuple with one per task id (taxonomy order).
  estimator: "sampled_token" (-log π of the sampled token) or "exact" (-Σ p log p).
  """
  enabled: bool = False
  coef: float = 0.02
  h_min: float | tuple[float, ...] = tuple(lo for lo, _ in ENTROPY_BOUNDS.values())
  h_max: float | tuple[float, ...] = tuple(hi for _, hi in ENTROPY_BOUNDS.values())
  estimator: str = "exact"  # REFERENCE §5: this project's default; the public code's is the other
  num_tasks: int = NUM_TASKS

  def __post_init__(self):
    check(self.estimator in ENTROPY_ESTIMATORS, "estimator", f"one of {ENTROPY_ESTIMATORS}",
          self.estimator)
    check(self.coef >= 0, "coef", "a number >= 0", self.coef)
    for bound in ("h_min", "h_max"):  # Hashable: a mapping from a config becomes a tuple.
      object.__setattr__(self, bound, _task_values(bound, getattr(self, bound), self.num_tasks))
    for task, lo, hi in zip(TASK_TYPES, self.h_min, self.h_max):
      check(0 <= lo <= hi, f"h_min.{task}", f"0 <= h_min <= h_max={hi}", lo)

  def bounds(self) -> tuple[np.ndarray, np.ndarray]:
    """(H_min, H_max), float32[num_tasks] each (`__post_init__` made them one per task)."""
    return np.asarray(self.h_min, np.float32), np.asarray(self.h_max, np.float32)


def entropy_penalty(token_entropy, mask, task_ids, h_min, h_max):
  """L_ent = Σ_τ [max(0, H_τ - H_max,τ) + max(0, H_min,τ - H_τ)] over the tasks present.

  H_τ is the mean token entropy over task τ's response tokens in this (micro-)batch, as in the
  public code; being a hinge of a per-batch mean, it is computed per micro-batch, not accumulated
  like the policy loss. A task without tokens in the batch contributes nothing.

  Args:
    token_entropy: float[B, L], an estimate per token (`sampled_token_entropy`, `exact_entropy`).
    mask: bool/float[B, L] response tokens. task_ids: int[B] in [0, T).
    h_min, h_max: float[T] per-task bounds.

  Returns:
    (L_ent float32[], H float32[T], present bool[T]); H is 0 where the task is absent.
  """
  token_entropy = jnp.asarray(token_entropy, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  if token_entropy.ndim != 2 or mask.shape != token_entropy.shape:
    raise ValueError(f"token_entropy/mask: expected equal shapes [B, L], got "
                     f"{token_entropy.shape} and {mask.shape}")
  h_min = jnp.asarray(h_min, jnp.float32)
  h_max = jnp.asarray(h_max, jnp.float32)
  num_tasks = h_min.shape[0]
  task_ids = jnp.asarray(task_ids, jnp.int32)
  tokens = jax.ops.segment_sum(mask.sum(1), task_ids, num_segments=num_tasks)
  total = jax.ops.segment_sum((token_entropy * mask).sum(1), task_ids, num_segments=num_tasks)
  present = tokens > 0
  h = jnp.where(present, total / jnp.maximum(tokens, 1.0), 0.0)
  hinge = jax.nn.relu(h - h_max) + jax.nn.relu(h_min - h)
  return jnp.sum(jnp.where(present, hinge, 0.0)), h, present


# ------------------------------------------------------------------------- length (REFERENCE §6)

# Static thresholds (L_min, L_low, L_high, L_max) in tokens, as each task module declares them:
# the plateau is the range the paper observed after about 100 steps (REFERENCE §6), with ramps to
# 0.5x L_low and 1.5x L_high, the same rule the adaptive thresholds use.
DEFAULT_LENGTH_THRESHOLDS = LENGTH_THRESHOLDS


def static_thresholds(table: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
  """float32[NUM_TASKS, 4] in taxonomy order, checked L_min < L_low ≤ L_high < L_max."""
  table = dict(DEFAULT_LENGTH_THRESHOLDS if table is None else table)
  check(set(table) == set(TASK_TYPES), "thresholds", f"one entry per task type {TASK_TYPES}",
        sorted(table))
  for task in TASK_TYPES:
    th = tuple(table[task])
    check(len(th) == 4 and 0 <= th[0] < th[1] <= th[2] < th[3], f"thresholds.{task}",
          "(L_min, L_low, L_high, L_max) with 0 <= L_min < L_low <= L_high < L_max", th)
  out = np.asarray([table[t] for t in TASK_TYPES], np.float32)
  return out


def trapezoid(lengths, l_min, l_low, l_high, l_max):
  """R_len: 0 outside [L_min, L_max], linear ramps up to L_low and down from L_high, 1 between.

  Arguments broadcast; thresholds must satisfy L_min < L_low ≤ L_high < L_max. Returns float32.
  """
  x = jnp.asarray(lengths, jnp.float32)
  up = (x - l_min) / (l_low - l_min)
  down = (l_max - x) / (l_max - l_high)
  return jnp.clip(jnp.minimum(up, down), 0.0, 1.0)


def length_reward(lengths, task_ids, thresholds):
  """R_len per response, float32[B], from lengths int[B], task_ids int[B], thresholds f32[T, 4]."""
  per_row = jnp.asarray(thresholds, jnp.float32)[jnp.asarray(task_ids, jnp.int32)]
  return trapezoid(lengths, *(per_row[:, i] for i in range(4)))


def overlong_penalty(lengths, max_length: int, cache_length: int):
  """DAPO's soft overlong penalty R_over, float32[B]: 0 up to L_max − L_c tokens, then linear down
  to −1 at L_max (the generation limit, where a response that never stopped ends), −1 beyond."""
  x = jnp.asarray(lengths, jnp.float32)
  start = max_length - cache_length
  return jnp.where(x <= start, 0.0, jnp.where(x <= max_length, (start - x) / cache_length, -1.0))


class LengthStats(NamedTuple):
  """Running per-task statistics: decayed counts of correct-response lengths, float32[T, K]."""
  hist: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveLengthConfig:
  """Adaptive length thresholds from running quantiles of the lengths of correct responses.

  The rule: per task, keep an exponentially decayed histogram of the lengths of its correct
  responses, K bins evenly spaced in log(1 + length) over [0, max_length]. The plateau
  [L_low, L_high] is the (plateau[0], plateau[1]) quantile range of that distribution, interpolated
  within a bin; the ramps end at L_min = (1 - ramp)·L_low and L_max = (1 + ramp)·L_high.

  Why: the plateau tracks the lengths at which the policy currently solves that task, so it moves
  with training (the paper's "dynamic" thresholds) and differs by task (long chains for math,
  short answers for OCR) without hand tuning; responses drifting well outside the range of
  successful ones lose reward. A decayed histogram, not an EMA of per-batch quantiles, because a
  batch may hold only a few correct responses of a task: the histogram pools them into one
  weighted empirical distribution whose quantiles are well defined, while averaged quantiles of
  tiny samples are noisy and biased. Log-spaced bins give the same relative resolution (about 7%
  with the defaults) for 30-token OCR answers and 1400-token VQA chains; multiplicative ramps are
  scale-free for the same reason. A task decays only in updates that bring it new correct
  responses, so a task absent for a while keeps its estimate; until its decayed count reaches
  min_count it uses its static prior. Counts are integers until decayed and the update is
  elementwise, so it is deterministic on every backend.
  """
  num_tasks: int = NUM_TASKS
  max_length: int = 4096
  num_bins: int = 128
  decay: float = 0.9
  plateau: tuple[float, float] = (0.25, 0.75)
  ramp: float = 0.5
  min_count: float = 16.0
  prior: tuple[tuple[float, float, float, float], ...] = tuple(
      tuple(float(v) for v in row) for row in static_thresholds())

  def __post_init__(self):
    check(positive_int(self.max_length), "max_length", "a positive integer", self.max_length)
    check(positive_int(self.num_bins), "num_bins", "a positive integer", self.num_bins)
    check(0 < self.decay <= 1, "decay", "0 < decay <= 1", self.decay)
    check(0 <= self.plateau[0] <= self.plateau[1] <= 1, "plateau",
          "quantiles 0 <= lo <= hi <= 1", self.plateau)
    check(0 < self.ramp < 1, "ramp", "0 < ramp < 1", self.ramp)
    check(self.min_count >= 0, "min_count", "a number >= 0", self.min_count)
    check(np.shape(self.prior) == (self.num_tasks, 4), "prior",
          f"{self.num_tasks} rows of (L_min, L_low, L_high, L_max)", self.prior)

  def init(self) -> LengthStats:
    return LengthStats(hist=jnp.zeros((self.num_tasks, self.num_bins), jnp.float32))

  def _bin(self, lengths):
    u = jnp.log1p(jnp.maximum(lengths.astype(jnp.float32), 0.0)) / math.log1p(self.max_length)
    return jnp.clip(jnp.floor(u * self.num_bins), 0, self.num_bins - 1).astype(jnp.int32)

  def update(self, stats: LengthStats, lengths, task_ids, correct, valid=None) -> LengthStats:
    """Adds the correct, valid responses of a batch (lengths/task_ids int[B], correct bool[B])."""
    lengths = jnp.asarray(lengths)
    b = lengths.shape[0]
    counted = jnp.asarray(correct, bool)
    if valid is not None:
      counted &= jnp.asarray(valid, bool)
    task_ids = jnp.asarray(task_ids, jnp.int32)
    if lengths.shape != (b,) or task_ids.shape != (b,) or counted.shape != (b,):
      raise ValueError(f"lengths/task_ids/correct/valid: expected shape ({b},) each, got "
                       f"{lengths.shape}, {task_ids.shape}, {counted.shape}")
    flat = jnp.where(counted, task_ids * self.num_bins + self._bin(lengths), -1)
    new = jax.ops.segment_sum(counted.astype(jnp.float32), flat,
                              num_segments=self.num_tasks * self.num_bins)
    new = new.reshape(self.num_tasks, self.num_bins)
    touched = new.sum(axis=1, keepdims=True) > 0
    return LengthStats(hist=jnp.where(touched, stats.hist * self.decay, stats.hist) + new)

  def _quantile(self, hist, q):
    """Length at quantile q of each row of hist, float32[T], interpolated in log1p space."""
    cum = jnp.cumsum(hist, axis=1)
    target = q * cum[:, -1:]
    k = jnp.minimum(jnp.sum(cum < target, axis=1, keepdims=True), self.num_bins - 1)
    before = jnp.where(k > 0, jnp.take_along_axis(cum, jnp.maximum(k - 1, 0), axis=1), 0.0)
    inside = jnp.take_along_axis(hist, k, axis=1)
    frac = jnp.clip((target - before) / jnp.maximum(inside, 1e-30), 0.0, 1.0)
    u = (k + frac)[:, 0] / self.num_bins
    return jnp.expm1(u * math.log1p(self.max_length))

  def thresholds(self, stats: LengthStats) -> jax.Array:
    """Per-task (L_min, L_low, L_high, L_max), float32[T, 4]; the prior where data is scarce."""
    l_low = jnp.maximum(self._quantile(stats.hist, self.plateau[0]), 1.0)
    l_high = jnp.maximum(self._quantile(stats.hist, self.plateau[1]), l_low)
    adaptive = jnp.stack([(1 - self.ramp) * l_low, l_low, l_high, (1 + self.ramp) * l_high], 1)
    enough = stats.hist.sum(axis=1, keepdims=True) >= self.min_count
    return jnp.where(enough, adaptive, jnp.asarray(self.prior, jnp.float32))
