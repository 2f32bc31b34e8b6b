"""GSPO, CISPO and DAPO's overlong penalty against direct numpy implementations of their formulas
(REFERENCE §4, "Other policy losses"), values and gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvlthinker.fields import FieldError
from openvlthinker.rl import losses, shaping
from openvlthinker.train.reward import LengthShaping, OverlongPenalty, TrainingReward

GSPO = losses.PolicyLossConfig(name="gspo", clip_low=3e-3, clip_high=4e-3,
                               aggregation="seq_mean_token_mean")
CISPO = losses.PolicyLossConfig(name="cispo", clip_high=0.2)


def batch(seed, b=12, length=7, spread=0.01):
  rng = np.random.default_rng(seed)
  old = -rng.random((b, length)).astype(np.float32) * 3
  new = (old + rng.normal(0, spread, (b, length))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  lengths = rng.integers(1, length + 1, b)
  lengths[-1] = 0  # a row without response tokens counts nowhere
  mask = np.arange(length)[None] < lengths[:, None]
  return new, old, adv, mask


def value_and_grad(cfg, new, old, adv, mask):
  def f(n):
    out = losses.policy_loss(n, old, adv, mask, cfg)
    return losses.loss_value(out.numerator, out.denominator)
  v, g = jax.value_and_grad(f)(jnp.asarray(new))
  return float(v), np.asarray(g, np.float64)


def numpy_gspo(new, old, adv, mask, lo, hi):
  """(loss, d loss / d new) of GSPO: -min(s·A, clip(s)·A) averaged over sequences, s the
  exponentiated mean log-ratio of each sequence's tokens."""
  m = mask.astype(np.float64)
  n = m.sum(1)
  rows = n > 0
  s = np.exp(((new.astype(np.float64) - old) * m).sum(1) / np.maximum(n, 1))
  a = adv.astype(np.float64)
  per_seq = -np.minimum(s * a, np.clip(s, 1 - lo, 1 + hi) * a)
  loss = per_seq[rows].mean()
  # The unclipped term is the one chosen unless the clip binds on the side that caps A's gain.
  live = ~(((a > 0) & (s > 1 + hi)) | ((a < 0) & (s < 1 - lo)))
  grad = np.where((live & rows)[:, None], -a[:, None] * s[:, None] * m / np.maximum(n, 1)[:, None],
                  0.0) / rows.sum()
  return loss, grad


@pytest.mark.parametrize("seed,spread", [(0, 0.001), (1, 0.01), (2, 0.05)])
def test_gspo_equals_its_formula(seed, spread):
  new, old, adv, mask = batch(seed, spread=spread)
  v, g = value_and_grad(GSPO, new, old, adv, mask)
  want_v, want_g = numpy_gspo(new, old, adv, mask, GSPO.clip_low, GSPO.clip_high)
  assert v == pytest.approx(want_v, rel=1e-5, abs=1e-7)
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)
  if spread == 0.05:  # wide enough that some sequences sit beyond the clip, others inside
    s = np.exp(((new - old) * mask).sum(1) / np.maximum(mask.sum(1), 1))
    assert np.any(np.abs(s - 1) > 4e-3) and np.any(np.abs(s - 1) < 3e-3)


def test_gspo_needs_the_sequence_mean():
  with pytest.raises(FieldError, match="aggregation.*gspo"):
    dataclasses.replace(GSPO, aggregation="token_mean")


@pytest.mark.parametrize("seed", [0, 1])
def test_cispo_equals_its_formula_with_a_stop_gradient_weight(seed):
  new, old, adv, mask = batch(seed, spread=0.4)  # many ratios beyond 1 + ε_high
  v, g = value_and_grad(CISPO, new, old, adv, mask)
  m = mask.astype(np.float64)
  delta = new.astype(np.float64) - old
  w = np.minimum(np.exp(delta), 1 + CISPO.clip_high)
  a = adv.astype(np.float64)[:, None]
  assert v == pytest.approx((-w * a * delta * m).sum() / m.sum(), rel=1e-5)
  # d/d log π_θ of -sg(w)·A·log π_θ is -w·A: the weight carries no gradient, and a clipped token
  # still has one (unlike PPO's clip).
  np.testing.assert_allclose(g, -w * a * m / m.sum(), rtol=1e-4, atol=1e-8)
  assert np.any((np.exp(delta) > 1 + CISPO.clip_high) & mask & (np.abs(g) > 0))


def test_overlong_penalty_equals_dapos_formula():
  l_max, cache = 100, 20
  lengths = np.arange(0, 111)
  got = np.asarray(shaping.overlong_penalty(lengths, l_max, cache))
  want = np.array([0.0 if x <= l_max - cache else
                   (l_max - cache - x) / cache if x <= l_max else -1.0 for x in lengths])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[80] == 0 and got[90] == pytest.approx(-0.5) and got[100] == -1


def test_the_training_reward_adds_the_weighted_overlong_penalty():
  from configs import test as test_config
  c = test_config.get_config()
  length = LengthShaping.from_config(c.rl.length, 16)
  scores = {"accuracy": np.array([1.0, 1.0, 0.0, 1.0], np.float32),
            "format": np.ones(4, np.float32), "structure": np.full(4, 0.5, np.float32)}
  lengths, tasks = np.array([4, 12, 14, 16]), np.zeros(4, np.int32)
  plain = TrainingReward(length)(scores, lengths, tasks, length.static)
  c.rl.overlong.update(enabled=True, cache_length=8, weight=0.5)  # as the trainer builds it
  on = TrainingReward(length, OverlongPenalty.from_config(c.rl.overlong, 16))
  shaped = on(scores, lengths, tasks, length.static)
  np.testing.assert_allclose(shaped["overlong_penalty"], 0.5 * np.array([0, -0.5, -0.75, -1]))
  np.testing.assert_allclose(shaped["reward"], plain["reward"] + shaped["overlong_penalty"],
                             atol=1e-6)
  assert not np.any(plain["overlong_penalty"])
  for out in (plain, shaped):  # float32[B] each, as the docstring says, shaping on or off
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        k: (np.dtype(np.float32), (4,)) for k in out}, out
  with pytest.raises(FieldError) as e:
    OverlongPenalty(True, cache_length=32, max_length=16)
  assert str(e.value) == ("cache_length: expected an integer in [1, rl.sampler.max_new_tokens=16], "
                          "got 32")


def test_the_training_reward_adds_the_weighted_length_term_when_length_shaping_is_on():
  """R = (1 − w_fmt − w_len)·a + w_fmt·f + s + w_len·R_len (REFERENCE §3), R_len the trapezoid of
  each row's task thresholds; with shaping off the length term is 0 and the accuracy weight
  1 − w_fmt."""
  from configs import test as test_config
  c = test_config.get_config()
  c.rl.length.update(enabled=True, adaptive=False, weight=0.2)
  length = LengthShaping.from_config(c.rl.length, 16)
  scores = {"accuracy": np.array([1.0, 1.0, 0.0, 1.0], np.float32),
            "format": np.array([1.0, 0.0, 1.0, 1.0], np.float32),
            "structure": np.full(4, 0.5, np.float32)}
  lengths, tasks = np.array([1, 6, 9, 16]), np.array([0, 1, 2, 3], np.int32)
  thresholds = np.asarray(length.static)
  got = TrainingReward(length)(scores, lengths, tasks, thresholds)
  r_len = np.asarray(shaping.length_reward(lengths, tasks, thresholds))
  assert np.ptp(r_len) > 0  # the rows' lengths sit on different parts of their trapezoids
  np.testing.assert_allclose(got["length_reward"], r_len, rtol=1e-6)
  want = 0.7 * scores["accuracy"] + 0.1 * scores["format"] + 0.5 + 0.2 * r_len
  np.testing.assert_allclose(got["reward"], want, rtol=1e-6)
  c.rl.length.enabled = False
  off = TrainingReward(LengthShaping.from_config(c.rl.length, 16))(scores, lengths, tasks,
                                                                    thresholds)
  np.testing.assert_allclose(off["reward"], 0.9 * scores["accuracy"] + 0.1 * scores["format"]
                             + 0.5, rtol=1e-6)
  assert not np.any(off["length_reward"])


def test_adaptive_length_statistics_count_each_tasks_fully_correct_valid_responses():
  """`TrainingReward.update_stats` adds exactly the valid rows of accuracy 1 (not 0.99) to their
  task's length histogram; with adaptive length shaping off the statistics stay as they were."""
  from configs import test as test_config
  c = test_config.get_config()
  c.rl.length.update(enabled=True, adaptive=True, weight=0.2)
  reward = TrainingReward(LengthShaping.from_config(c.rl.length, 16))
  stats = reward.init_stats()
  accuracy = np.array([1.0, 0.99, 1.0, 1.0, 1.0, 0.0], np.float32)
  valid = np.array([True, True, True, False, True, True])
  tasks = np.array([0, 0, 3, 3, 3, 1], np.int32)
  lengths = np.array([4, 5, 6, 7, 15, 2])
  hist = np.asarray(reward.update_stats(stats, lengths, tasks, accuracy, valid)
                    ["length_stats"].hist)
  np.testing.assert_allclose(hist.sum(1), [1, 0, 0, 2, 0, 0])  # rows 0; 2 and 4
  c.rl.length.adaptive = False
  still = TrainingReward(LengthShaping.from_config(c.rl.length, 16))
  assert still.update_stats(stats, lengths, tasks, accuracy, valid) is stats


def test_a_length_weight_that_leaves_no_accuracy_weight_is_named():
  from configs import test as test_config
  from openvlthinker.rl import rewards
  c = test_config.get_config()
  c.rl.length.weight = 1.0
  with pytest.raises(ValueError) as e:
    LengthShaping.from_config(c.rl.length, 16)
  assert str(e.value) == f"weight: expected a number in [0, {1 - rewards.W_FMT:g}), got 1.0"
