"""The training reward, assembled in one place: what is logged is what is trained.

R = (1 − w_fmt − w_len)·accuracy + w_fmt·format + structure + w_len·R_len (REFERENCE §2, §6). The
scores come from the host scorer (`rl.scoring`); the length term uses static thresholds or adaptive
ones read from the shaping statistics in the train state, which `update_stats` advances after each
rollout with the lengths of its correct valid responses.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from openvlthinker import taxonomy
from openvlthinker.fields import check
from openvlthinker.rl import rewards, shaping


@dataclasses.dataclass(frozen=True)
class LengthShaping:
  """The length term of the reward (`config.rl.length`); off when `enabled` is False."""
  enabled: bool
  weight: float
  adaptive: bool
  static: np.ndarray                       # float32[T, 4] (L_min, L_low, L_high, L_max)
  adaptive_config: shaping.AdaptiveLengthConfig

  def __post_init__(self):
    # The accuracy weight is 1 - w_fmt - w_len: it must stay positive.
    check(isinstance(self.weight, (int, float)) and 0 <= self.weight < 1 - rewards.W_FMT,
          "weight", f"a number in [0, {1 - rewards.W_FMT:g})", self.weight)

  @classmethod
  def from_config(cls, length, max_length: int) -> LengthShaping:
    static = shaping.static_thresholds({t: tuple(length.thresholds[t])
                                        for t in taxonomy.TASK_TYPES})
    adaptive = shaping.AdaptiveLengthConfig(
        max_length=max_length, decay=length.decay, min_count=length.min_count,
        prior=tuple(tuple(float(v) for v in row) for row in static))
    return cls(enabled=length.enabled, weight=length.weight, adaptive=length.adaptive,
               static=static, adaptive_config=adaptive)


class TrainingReward:
  """Scores → reward parts and the reward, per response; and the shaping-statistics update."""

  def __init__(self, length: LengthShaping):
    self.length = length
    # Jitted once: these run every step on small arrays, where op-by-op dispatch dominates.
    self._thresholds = jax.jit(length.adaptive_config.thresholds)
    self._update = jax.jit(length.adaptive_config.update)
    self._length_reward = jax.jit(shaping.length_reward)

  def init_stats(self) -> dict[str, Any]:
    """The shaping statistics a train state carries (`TrainState.extra`)."""
    return {"length_stats": self.length.adaptive_config.init()}

  def thresholds(self, stats: dict[str, Any]):
    """float32[T, 4] length thresholds for this step (adaptive from `stats`, or static)."""
    if self.length.adaptive:
      return self._thresholds(stats["length_stats"])
    return self.length.static

  def __call__(self, scores: dict[str, np.ndarray], lengths: np.ndarray, task_ids: np.ndarray,
               thresholds) -> dict[str, np.ndarray]:
    """float32[B] "reward", "accuracy", "format", "structure", "length_reward" (0 when off)."""
    w_len, r_len = 0.0, np.zeros(len(lengths), np.float32)
    if self.length.enabled:
      w_len = self.length.weight
      r_len = np.asarray(self._length_reward(lengths, task_ids, thresholds), np.float32)
    reward = rewards.combine(scores["accuracy"], scores["format"], scores["structure"], r_len,
                             w_len)
    return {"reward": np.asarray(reward, np.float32), "accuracy": scores["accuracy"],
            "format": scores["format"], "structure": scores["structure"], "length_reward": r_len}

  def update_stats(self, stats: dict[str, Any], lengths, task_ids, accuracy, valid):
    """Advances the adaptive thresholds' statistics with this rollout's correct valid responses."""
    if not (self.length.enabled and self.length.adaptive):
      return stats
    return {**stats, "length_stats": self._update(stats["length_stats"], lengths, task_ids,
                                                  accuracy >= 1.0, valid)}
