"""Advantage estimators by name (REFERENCE §3): G²RPO and its stage-1-only variant, GRPO,
Dr.GRPO, RLOO, and the public code's per-reward-part variants GDPO and GS-GDPO.

Every estimator is one function registered with `@register_advantage_estimator(name)` and chosen
by name in the config (`rl.advantage`):

  fn(rewards float32[B], group_ids int32[B], task_ids int32[B], valid bool[B] | None = None)
      -> float32[B]

Estimators of the reward's parts register with `@register_parts_estimator(name)` and take, besides,
the keywords parts float32[B, K] (accuracy, format, structure) and lengths int32[B] (response
tokens); `uses_reward_parts(name)` tells the caller to pass them.

pure and jittable over flat arrays, with no Python loop over groups or tasks. Ids lie in [0, B);
rows that are invalid, or whose ids fall outside [0, B), get 0 and count in no group or task. The
Gaussian quantile map itself lives in `quantile_map`.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from openvlthinker.registry import Registry
from openvlthinker.rl.quantile_map import as_batch, gaussian_quantile_map

__all__ = ["gaussian_quantile_map", "g2rpo_advantages", "g2rpo_group_advantages",
           "grpo_advantages", "drgrpo_advantages", "rloo_advantages", "estimator_inputs",
           "gdpo_advantages", "gs_gdpo_advantages", "register_advantage_estimator",
           "register_parts_estimator", "uses_reward_parts", "batch_estimator",
           "get_advantage_estimator",
           "advantage_estimators"]

# ------------------------------------------------------------------------------------ registry

AdvantageFn = Callable[..., jax.Array]
# fn(rewards float32[B], group_ids int32[B], task_ids int32[B], valid bool[B] | None) -> float32[B]
_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage_estimator = _ESTIMATORS.register
get_advantage_estimator = _ESTIMATORS.get
advantage_estimators = _ESTIMATORS.names


_PARTS_ESTIMATORS: set[str] = set()


def register_parts_estimator(name: str):
  """Registers an estimator that also takes `parts` and `lengths` (see the module docstring)."""
  def decorate(fn: AdvantageFn) -> AdvantageFn:
    _PARTS_ESTIMATORS.add(name)
    return register_advantage_estimator(name)(fn)
  return decorate


def uses_reward_parts(name: str) -> bool:
  return name in _PARTS_ESTIMATORS


def batch_estimator(name: str) -> AdvantageFn:
  """The estimator `name` with the one signature the RL step calls, fn(rewards, group_ids,
  task_ids, valid, *, parts, lengths); estimators of the reward alone ignore the keywords."""
  fn = get_advantage_estimator(name)
  if uses_reward_parts(name):
    return fn
  return lambda rewards, group_ids, task_ids, valid=None, *, parts, lengths: fn(
      rewards, group_ids, task_ids, valid)


def estimator_inputs(rewards, group_ids, task_ids, valid):
  """Checked float32/int32/int32/bool [B] arrays; rows with ids outside [0, B) become invalid.

  Every estimator starts here, so a bad shape names the argument and the id range is one rule.
  """
  rewards = as_batch("rewards", rewards, jnp.float32)
  b = rewards.shape[0]
  group_ids = as_batch("group_ids", group_ids, jnp.int32, b)
  task_ids = as_batch("task_ids", task_ids, jnp.int32, b)
  valid = jnp.ones((b,), bool) if valid is None else as_batch("valid", valid, bool, b)
  in_range = lambda ids: (ids >= 0) & (ids < b)
  return rewards, group_ids, task_ids, valid & in_range(group_ids) & in_range(task_ids)


# ---------------------------------------------------------------------------------------- G²RPO


@register_advantage_estimator("g2rpo")
def g2rpo_advantages(rewards, group_ids, task_ids, valid=None):
  """G²RPO (REFERENCE §3): Q within each prompt group, then Q of those within each task.

  Args:
    rewards: float[B]. group_ids: int[B], the prompt group of each response. task_ids: int[B],
      the task key of each response (task type by default; the caller picks the key).
    valid: optional bool[B]; False rows get 0 and count in neither stage.

  Returns:
    float32[B] per-response advantages. Mathematically tied stage-1 values are bitwise tied (see
    `gaussian_quantile_map`), so stage 2 sees exactly the ties of exact arithmetic.
  """
  rewards, group_ids, task_ids, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
  return gaussian_quantile_map(gaussian_quantile_map(rewards, group_ids, valid), task_ids, valid)


@register_advantage_estimator("g2rpo_group")
def g2rpo_group_advantages(rewards, group_ids, task_ids, valid=None):
  """Stage 1 of G²RPO only: Q within each prompt group, float32[B] (task_ids only checked)."""
  rewards, group_ids, _, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
  return gaussian_quantile_map(rewards, group_ids, valid)


# ------------------------------------------------------------------------------------ baselines


def _group_stats(rewards, group_ids, task_ids, valid):
  """Per-row group count n, r - group mean and group sum of squared deviations, float32[B] each.

  The mean is taken relative to a pivot (the group max) so that an all-equal group has a mean
  equal to its value bit for bit and gets exactly 0, not rounding noise divided by 1e-6.
  """
  rewards, group_ids, _, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
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


# ------------------------------------------------------------------- per reward part (public code)


def _parts(parts, b: int) -> jax.Array:
  parts = jnp.asarray(parts, jnp.float32)
  if parts.ndim != 2 or parts.shape[0] != b:
    raise ValueError(f"parts: expected float[B={b}, K] (one column per reward part), got shape "
                     f"{parts.shape}")
  return parts


@register_parts_estimator("gdpo")
def gdpo_advantages(rewards, group_ids, task_ids, valid=None, *, parts, lengths):
  """GDPO (REFERENCE §3, "Variants"): GRPO's normalisation of each reward part within its group,
  summed over the parts, then whitened over all valid response tokens of the batch (each
  response weighted by its length: token-weighted mean and population std, + 1e-6)."""
  rewards, group_ids, task_ids, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
  parts = _parts(parts, rewards.shape[0])
  summed = sum(grpo_advantages(parts[:, k], group_ids, task_ids, valid)
               for k in range(parts.shape[1]))
  w = jnp.where(valid, as_batch("lengths", lengths, jnp.float32, rewards.shape[0]), 0.0)
  total = jnp.maximum(w.sum(), 1.0)
  mean = jnp.sum(w * summed) / total
  std = jnp.sqrt(jnp.sum(w * (summed - mean) ** 2) / total)
  return jnp.where(valid, (summed - mean) / (std + 1e-6), 0.0)


@register_parts_estimator("gs_gdpo")
def gs_gdpo_advantages(rewards, group_ids, task_ids, valid=None, *, parts, lengths):
  """GS-GDPO (REFERENCE §3, "Variants"): Q of each reward part within each prompt group, summed
  over the parts, then Q of the sums within each task (a task of one response gets 0). lengths
  is unused (the signature of the parts estimators)."""
  del lengths
  rewards, group_ids, task_ids, valid = estimator_inputs(rewards, group_ids, task_ids, valid)
  return gaussian_quantile_map(gs_gdpo_group_sums(parts, group_ids, valid), task_ids, valid)


def gs_gdpo_group_sums(parts, group_ids, valid) -> jax.Array:
  """GS-GDPO's first stage, float32[B]: Q of each reward part (parts float[B, K]) within each
  group, summed per row (`_exact_sum`)."""
  parts = _parts(parts, group_ids.shape[0])
  mapped = jnp.stack([gaussian_quantile_map(parts[:, k], group_ids, valid)
                      for k in range(parts.shape[1])], axis=1)
  return _exact_sum(mapped)


def _two_sum(a, b):
  """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth)."""
  s = a + b
  v = s - a
  return s, (a - (s - v)) + (b - v)


def _exact_sum(x: jax.Array) -> jax.Array:
  """Row sums of float32[B, K] that do not depend on the order of a row's terms: sorted, added
  with every rounding error carried (TwoSum) and rounded once at the end. Rows whose terms are the
  same multiset, or differ by terms that cancel (q and its mirror −q), get the same bits, so stage
  2 sees those ties exactly (the public code's plain float sums split them; REFERENCE §3,
  "Variants"). Sums equal only in exact arithmetic from other terms (a tie mean twice against the
  two targets it averages) can still differ in the last bit and then rank apart in stage 2."""
  x = jnp.sort(x, axis=1)
  s, err = x[:, 0], jnp.zeros_like(x[:, 0])
  for k in range(1, x.shape[1]):
    s, e = _two_sum(s, x[:, k])
    err = err + e
  return s + err
