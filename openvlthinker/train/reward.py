"""The training reward, assembled in one place: what is logged is what is trained.

R = (1 − w_fmt − w_len)·accuracy + w_fmt·format + structure + w_len·R_len (REFERENCE §2, §6),
plus DAPO's overlong penalty w_over·R_over when it is on (REFERENCE §4, "Other policy losses"). The
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
from openvlthinker.fields import check, positive_int
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


@dataclasses.dataclass(frozen=True)
class OverlongPenalty:
  """DAPO's overlong penalty (`config.rl.overlong`): weight · R_over added to the reward, with
  R_over from 0 at max_length − cache_length tokens down to −1 at max_length (the generation
  limit); off when `enabled` is False."""
  enabled: bool = False
  cache_length: int = 256
  weight: float = 1.0
  max_length: int = 1

  def __post_init__(self):
    check(positive_int(self.max_length), "max_length", "a positive integer", self.max_length)
    check(not self.enabled or (positive_int(self.cache_length)
                               and self.cache_length <= self.max_length), "cache_length",
          f"an integer in [1, rl.sampler.max_new_tokens={self.max_length}]", self.cache_length)
    check(isinstance(self.weight, (int, float)) and self.weight >= 0, "weight", "a number >= 0",
          self.weight)

  @classmethod
  def from_config(cls, overlong, max_length: int) -> OverlongPenalty:
    return cls(**overlong, max_length=max_length)

  def __call__(self, lengths) -> np.ndarray:
    """float32[B] weight · R_over (zeros when off)."""
    if not self.enabled:
      return np.zeros(len(lengths), np.float32)
    return self.weight * np.asarray(
        shaping.overlong_penalty(lengths, self.max_length, self.cache_length), np.float32)


class TrainingReward:
  """Scores → reward parts and the reward, per response; and the shaping-statistics update."""

  def __init__(self, length: LengthShaping, overlong: OverlongPenalty = OverlongPenalty()):
    self.length, self.overlong = length, overlong
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
    """float32[B] "reward", "accuracy", "format", "structure", "length_reward" and
    "overlong_penalty" (weighted; 0 when off)."""
    w_len, r_len = 0.0, np.zeros(len(lengths), np.float32)
    if self.length.enabled:
      w_len = self.length.weight
      r_len = np.asarray(self._length_reward(lengths, task_ids, thresholds), np.float32)
    overlong = self.overlong(lengths)
    reward = rewards.combine(scores["accuracy"], scores["format"], scores["structure"], r_len,
                             w_len) + overlong
    return {"reward": np.asarray(reward, np.float32), "accuracy": scores["accuracy"],
            "format": scores["format"], "structure": scores["structure"], "length_reward": r_len,
            "overlong_penalty": overlong}

  def update_stats(self, stats: dict[str, Any], lengths, task_ids, accuracy, valid):
    """Advances the adaptive thresholds' statistics with this rollout's correct valid responses."""
    if not (self.length.enabled and self.length.adaptive):
      return stats
    return {**stats, "length_stats": self._update(stats["length_stats"], lengths, task_ids,
                                                  accuracy >= 1.0, valid)}
