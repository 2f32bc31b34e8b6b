"""Advantage estimators by name (REFERENCE §3): G²RPO and its stage-1-only variant, GRPO,
Dr.GRPO and RLOO, all with one signature
`fn(rewards, group_ids, task_ids, valid, *, group_size, num_tasks) -> float32[B]`: pure, jittable
functions of flat arrays, with no Python loop over groups or tasks. The quantile map lives in
`quantile_map`, G²RPO's two stages (and their sort-free path) in `g2rpo`.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from openvlthinker.rl.g2rpo import estimator_inputs, g2rpo_advantages, g2rpo_group_advantages
from openvlthinker.rl.quantile_map import gaussian_quantile_map

__all__ = ["gaussian_quantile_map", "g2rpo_advantages", "g2rpo_group_advantages",
           "grpo_advantages", "drgrpo_advantages", "rloo_advantages",
           "register_advantage_estimator", "get_advantage_estimator", "advantage_estimators"]

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
register_advantage_estimator("g2rpo_group")(g2rpo_group_advantages)


def _group_stats(rewards, group_ids, task_ids, valid):  # segment sums: no layout hint needed
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
