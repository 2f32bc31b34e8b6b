"""Advantage estimators by name (REFERENCE §3): G²RPO and its stage-1-only variant, GRPO,
Dr.GRPO and RLOO.

Every estimator is one function registered with `@register_advantage_estimator(name)` and chosen
by name in the config (`rl.advantage`):

  fn(rewards float32[B], group_ids int32[B], task_ids int32[B], valid bool[B] | None = None)
      -> float32[B]

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
           "register_advantage_estimator", "get_advantage_estimator", "advantage_estimators"]

# ------------------------------------------------------------------------------------ registry

AdvantageFn = Callable[..., jax.Array]
# fn(rewards float32[B], group_ids int32[B], task_ids int32[B], valid bool[B] | None) -> float32[B]
_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage_estimator = _ESTIMATORS.register
get_advantage_estimator = _ESTIMATORS.get
advantage_estimators = _ESTIMATORS.names


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
