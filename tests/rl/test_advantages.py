"""Tests of rl/advantages.py against numpy loops over groups and tasks (float64, scipy's ndtri)."""
import functools

from hypothesis import assume, example, given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtri

import advantage_reference
from advantage_reference import (per_segment as ref_segments, ref_drgrpo, ref_grpo, ref_q,
                                 ref_rloo)
from openvlthinker.rl import advantages as adv

B_PAD = 512  # every random batch is padded with invalid rows to this size: one compile per fn
SETTINGS = settings(max_examples=40, deadline=None)

g2rpo = jax.jit(adv.g2rpo_advantages)
qmap = jax.jit(adv.gaussian_quantile_map)


# ------------------------------------------------------------------ independent numpy references


def ref_g2rpo(rewards, groups, tasks, valid):
  # Distinct stage-1 values are ≥ 4e-6 apart (test_stage1_tie_classes_are_exact): round at 1e-12.
  return advantage_reference.ref_g2rpo(rewards, groups, tasks, valid, decimals=12)


# ------------------------------------------------------------------------------- random batches


@st.composite
def batches(draw, discrete_only=False):
  """Groups of 1..16 (mostly 2..16) over 1..64 tasks, ties, invalid rows, shuffled, padded."""
  num_tasks = draw(st.integers(1, 64))
  num_groups = draw(st.integers(1, 30))
  reward_sets = [st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])]
  if not discrete_only:
    reward_sets.append(st.floats(-3.0, 3.0, width=32, allow_subnormal=False))
  rewards, groups, tasks = [], [], []
  for g in range(num_groups):
    size = draw(st.one_of(st.integers(2, 16), st.just(1)))
    kind = draw(st.integers(0, len(reward_sets)))  # the extra kind: an all-equal group
    if kind == len(reward_sets):
      r = [draw(reward_sets[1])] * size
    else:
      r = draw(st.lists(reward_sets[kind], min_size=size, max_size=size))
    rewards += r
    groups += [g] * size
    tasks += [draw(st.integers(0, num_tasks - 1))] * size
  n = len(rewards)
  valid = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))) | (
      draw(st.integers(0, 1)) == 1)  # half the batches keep every row
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  perm = rng.permutation(B_PAD)[:n]  # rows land anywhere in the padded batch
  out = dict(rewards=np.full(B_PAD, np.nan, np.float32), groups=np.zeros(B_PAD, np.int32),
             tasks=np.zeros(B_PAD, np.int32), valid=np.zeros(B_PAD, bool))
  out["rewards"][perm] = rewards
  out["groups"][perm] = groups
  out["tasks"][perm] = tasks
  out["valid"][perm] = valid
  return out


def run(fn, b):
  return np.asarray(fn(b["rewards"], b["groups"], b["tasks"], b["valid"]))


# ---------------------------------------------------------------------------------------- tests


def test_worked_examples():
  np.testing.assert_allclose(qmap(jnp.array([0.0, 0, 0, 0, 1]), jnp.zeros(5, jnp.int32)),
                             [-0.32, -0.32, -0.32, -0.32, 1.28], atol=5e-3)
  np.testing.assert_allclose(qmap(jnp.array([0.0, 0, 1, 1, 1]), jnp.zeros(5, jnp.int32)),
                             [-0.90, -0.90, 0.60, 0.60, 0.60], atol=5e-3)


def test_small_segments_and_all_equal_are_zero():
  values = jnp.array([5.0, 2.0, 2.0, 2.0, 7.0, 7.0])
  np.testing.assert_array_equal(qmap(values, jnp.array([0, 1, 1, 1, 2, 2])), np.zeros(6))


def test_an_empty_batch_has_empty_advantages():
  """A batch of no rows: float32[0] from the map and from the estimators that apply it twice or
  per reward part (not a scalar, nor an error)."""
  empty, ids = np.zeros(0, np.float32), np.zeros(0, np.int32)
  outs = [adv.gaussian_quantile_map(empty, ids), adv.g2rpo_advantages(empty, ids, ids),
          adv.gs_gdpo_advantages(empty, ids, ids, parts=np.zeros((0, 2), np.float32),
                                 lengths=ids)]
  assert [(out.shape, out.dtype) for out in outs] == [((0,), jnp.float32)] * 3


@SETTINGS
@given(batches())
def test_g2rpo_matches_numpy_loop(b):
  want = ref_g2rpo(b["rewards"].astype(np.float64), b["groups"], b["tasks"], b["valid"])
  got = run(g2rpo, b)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert np.all(got[~b["valid"]] == 0)


@SETTINGS
@given(batches())
def test_group_stage_matches_numpy_loop(b):
  want = ref_segments(ref_q, b["rewards"].astype(np.float64), b["groups"], b["valid"])
  np.testing.assert_allclose(run(jax.jit(adv.get_advantage_estimator("g2rpo_group")), b), want,
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, ref", [("grpo", ref_grpo), ("drgrpo", ref_drgrpo),
                                       ("rloo", ref_rloo)])
@settings(max_examples=25, deadline=None)
@given(b=batches(discrete_only=True))
def test_baselines_match_numpy_loop(name, ref, b):
  want = ref_segments(ref, b["rewards"].astype(np.float64), b["groups"], b["valid"])
  got = run(_jitted_estimator(name), b)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.all(got[~b["valid"]] == 0)


@functools.cache
def _jitted_estimator(name):
  return jax.jit(adv.get_advantage_estimator(name))


@SETTINGS
@given(batches())
def test_invariant_under_increasing_transform(b):
  r = b["rewards"].astype(np.float64)
  transformed = dict(b, rewards=(r**3 + 2 * r).astype(np.float32))
  # The cubic is strictly increasing, but float32 rounding may merge two close values: skip those.
  t = transformed["rewards"][b["valid"]]
  r = b["rewards"][b["valid"]]
  assume(np.array_equal(r[:, None] < r[None], t[:, None] < t[None]))
  np.testing.assert_array_equal(run(g2rpo, transformed), run(g2rpo, b))


@SETTINGS
@given(batches())
def test_negation_and_permutation_equivariance(b):
  base = run(g2rpo, b)
  np.testing.assert_array_equal(run(g2rpo, dict(b, rewards=-b["rewards"])), -base)
  perm = np.random.default_rng(0).permutation(B_PAD)
  permuted = {k: v[perm] for k, v in b.items()}
  np.testing.assert_array_equal(run(g2rpo, permuted), base[perm])


@SETTINGS
@given(batches())
def test_zero_mean_and_bound_in_every_segment(b):
  valid = b["valid"]
  for ids, out in ((b["groups"], run(jax.jit(adv.g2rpo_group_advantages), b)),
                   (b["tasks"], run(g2rpo, b))):
    for s in np.unique(ids[valid]):
      seg = out[valid & (ids == s)]
      n = len(seg)
      assert abs(seg.astype(np.float64).sum()) < 1e-6 * max(n, 1)
      bound = -ndtri(0.5 / n) if n > 1 else 0.0
      assert np.all(np.abs(seg) <= bound + 1e-6)


def test_same_multiset_gives_identical_bits():
  rng = np.random.default_rng(1)
  multiset = np.array([0.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.25, 1.0], np.float32)
  rewards, groups = [], []
  for g in range(40):  # copies of the multiset, interleaved with groups of other sizes
    r = rng.permutation(multiset) if g % 3 == 0 else rng.random(rng.integers(1, 17))
    rewards.append(r)
    groups.append(np.full(len(r), g))
  rewards, groups = np.concatenate(rewards).astype(np.float32), np.concatenate(groups)
  perm = rng.permutation(len(rewards))
  rewards, groups = rewards[perm], groups[perm]
  s = np.asarray(qmap(rewards, groups))
  copies = {tuple(np.sort(s[groups == g]).view(np.int32)) for g in range(0, 40, 3)}
  assert len(copies) == 1


def test_stage1_tie_classes_are_exact():
  """Every (size ≤ 16, tie run) code: equal exact values ⇒ equal bits; order kept; ≤ 3e-7 off."""
  values, segments, codes = [], [], []
  for n in range(1, 17):
    for lo in range(n):
      for m in range(1, n - lo + 1):
        values.append(np.r_[np.arange(lo), np.full(m, lo), np.arange(lo + 1, n - m + 1)])
        segments.append(np.full(n, len(codes)))
        codes.append((n, lo, m))
  out = np.asarray(qmap(np.concatenate(values).astype(np.float32), np.concatenate(segments)))
  starts = np.cumsum([0] + [n for n, _, _ in codes])[:-1]
  got = np.array([out[start + lo] for start, (n, lo, _) in zip(starts, codes)])
  exact = np.array([ndtri((np.arange(lo, lo + m) + 0.5) / n).mean() if n > 1 else 0.0
                    for n, lo, m in codes])
  np.testing.assert_allclose(got, exact, rtol=0, atol=3e-7)
  classes = np.unique(np.round(exact, 12))
  assert np.diff(classes).min() > 1e-6  # the premise of ref_g2rpo's rounding
  firsts = []
  for c in classes:
    bits = got[np.round(exact, 12) == c].view(np.int32)
    assert np.all(bits == bits[0]), c  # e.g. Φ⁻¹(1/4) from sizes 2, 6, 10, 14; every exact 0
    firsts.append(got[np.round(exact, 12) == c][0])
  assert np.all(np.diff(firsts) > 0)


def test_float32_tails_at_16384():
  n = 16384
  x = np.random.default_rng(2).permutation(n).astype(np.float32)
  got = np.asarray(qmap(x, np.zeros(n, np.int32)))
  np.testing.assert_allclose(got, ndtri((x + 0.5) / n), rtol=0, atol=1e-6)


def test_num_segments_drops_out_of_range_ids():
  fn = jax.jit(adv.gaussian_quantile_map, static_argnames="num_segments")
  got = fn(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([0, 0, 5, 0]), num_segments=3)
  np.testing.assert_allclose(got, np.insert(ref_q([1.0, 2.0, 4.0]), 2, 0.0), atol=1e-6)


@pytest.mark.parametrize("name", ["g2rpo", "g2rpo_group", "grpo", "drgrpo", "rloo"])
def test_ids_outside_the_batch_count_as_invalid(name):
  fn = _jitted_estimator(name)
  rewards, groups, tasks = np.array([0.0, 1.0, 1.0, 0.5]), np.array([0, 0, 4, 0]), np.zeros(4)
  keep = [0, 1, 3]
  got = np.asarray(fn(rewards, groups, tasks))
  assert got[2] == 0
  np.testing.assert_allclose(got[keep], fn(rewards[keep], groups[keep], tasks[keep]), atol=1e-7)


def test_traces_once_per_batch_size():
  traces = []

  def counted(*args):
    traces.append(None)
    return adv.g2rpo_advantages(*args)

  fn = jax.jit(counted)
  rng = np.random.default_rng(3)
  for _ in range(3):
    fn(rng.random(64).astype(np.float32), rng.integers(0, 8, 64), rng.integers(0, 3, 64),
       rng.random(64) < 0.8)
  assert len(traces) == 1


def test_registry():
  assert set(adv.advantage_estimators()) >= {"g2rpo", "g2rpo_group", "grpo", "drgrpo", "rloo"}
  with pytest.raises(ValueError, match="expected one of"):
    adv.get_advantage_estimator("ppo")
  with pytest.raises(ValueError, match="already registered"):
    adv.register_advantage_estimator("grpo")(lambda *a: None)


def test_one_decorated_function_adds_an_estimator(monkeypatch):
  monkeypatch.setattr(adv._ESTIMATORS, "_items", dict(adv._ESTIMATORS._items))  # no leak

  @adv.register_advantage_estimator("group_max_gap")
  def group_max_gap(rewards, group_ids, task_ids, valid=None):
    rewards, group_ids, _, valid = adv.estimator_inputs(rewards, group_ids, task_ids, valid)
    best = jax.ops.segment_max(jnp.where(valid, rewards, -jnp.inf), group_ids,
                               num_segments=rewards.shape[0])
    return jnp.where(valid, rewards - best[group_ids], 0.0)

  assert "group_max_gap" in adv.advantage_estimators()
  fn = jax.jit(adv.get_advantage_estimator("group_max_gap"))
  got = fn(np.array([0.0, 1.0, 0.5, 2.0]), np.array([0, 0, 1, 1]), np.zeros(4),
           np.array([True, True, True, False]))
  np.testing.assert_array_equal(got, [-1.0, 0.0, 0.0, 0.0])


def test_bad_shapes_name_the_argument():
  with pytest.raises(ValueError,
                     match=r"^rewards: expected a 1-D array \[B\], got shape \(4, 1\)$"):
    adv.g2rpo_advantages(jnp.zeros((4, 1)), jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"^group_ids: expected shape \(4,\) like the rewards"):
    adv.g2rpo_advantages(jnp.zeros(4), jnp.zeros(3, jnp.int32), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"^task_ids: expected shape \(4,\) like the rewards/values, "
                                       r"got \(5,\)$"):
    adv.g2rpo_advantages(jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match="values"):
    adv.gaussian_quantile_map(jnp.zeros((2, 2)), jnp.zeros(4, jnp.int32))


@pytest.mark.parametrize("name", ["g2rpo", "g2rpo_group", "grpo", "drgrpo", "rloo"])
def test_sharded_batch_gives_same_result(name):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(4)
  b = 256
  args = (rng.integers(0, 3, b).astype(np.float32) / 2, rng.permutation(b) // 8,
          rng.integers(0, 6, b), rng.random(b) < 0.9)
  fn = _jitted_estimator(name)
  want = np.asarray(fn(*args))
  sharded = [jax.device_put(a, sharding) for a in args]
  assert sharded[0].addressable_shards[0].data.shape == (b // 8,)
  np.testing.assert_allclose(np.asarray(fn(*sharded)), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------- estimators of the reward's parts


@st.composite
def part_batches(draw):
  """`batches` with three reward parts per row (accuracy, format, structure: discrete, as the
  scorer gives them) and response lengths."""
  b = draw(batches(discrete_only=True))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  b["parts"] = np.stack([np.where(np.isnan(b["rewards"]), 0.0, b["rewards"]),
                         rng.integers(0, 2, B_PAD), rng.integers(0, 2, B_PAD) * 0.5],
                        axis=1).astype(np.float32)
  b["lengths"] = rng.integers(1, 200, B_PAD).astype(np.int32)
  return b


def _cancelling_parts_batch():
  """Two valid rows whose accuracy and structure advantages cancel but for GRPO's 1e-6 (the
  summed advantages are +-1e-6): the worst conditioning of GDPO's whitening, found by hypothesis
  under `make mutate`'s seeds (float32 gives 0.5545 where float64 gives 0.5505)."""
  b = dict(rewards=np.full(B_PAD, np.nan, np.float32), groups=np.zeros(B_PAD, np.int32),
           tasks=np.zeros(B_PAD, np.int32), valid=np.zeros(B_PAD, bool),
           parts=np.zeros((B_PAD, 3), np.float32), lengths=np.ones(B_PAD, np.int32))
  b["rewards"][:2] = [1.0, 0.0]
  b["valid"][:2] = True
  b["parts"][:2] = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]
  return b


@settings(max_examples=25, deadline=None)
@given(b=part_batches())
@example(b=_cancelling_parts_batch())
def test_gdpo_matches_numpy_loop(b):
  assert adv.uses_reward_parts("gdpo")
  kw = dict(parts=b["parts"], lengths=b["lengths"])
  want = advantage_reference.ref_gdpo(b["rewards"], b["groups"], b["tasks"], b["valid"], **kw)
  got = np.asarray(_jitted_estimator("gdpo")(b["rewards"], b["groups"], b["tasks"], b["valid"],
                                             **kw))
  # The final whitening divides by the std of the summed part advantages: where the parts'
  # advantages cancel (say +0.70711 and -0.70711, which GRPO's 1e-6 makes differ in the 6th
  # digit), that std is ~1e-6 and float32's rounding of the sums (a few ulps of values up to ~4:
  # 2e-6) is divided by it. Tolerance as that conditioning allows.
  summed = advantage_reference.ref_gdpo_summed(b["groups"], b["valid"], parts=b["parts"])
  w = np.where(b["valid"], b["lengths"], 0.0)
  total = max(w.sum(), 1.0)
  std = np.sqrt((w * (summed - (w * summed).sum() / total) ** 2).sum() / total)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 + 2e-6 / (std + 1e-6))
  assert np.all(got[~b["valid"]] == 0)


@settings(max_examples=25, deadline=None)
@given(b=part_batches())
def test_gs_gdpo_stages_match_numpy_loops(b):
  """Stage 1 (per part Q in each group, summed) against numpy; stage 2 is numpy's Q of those
  float32 sums within each task (their ties as float32 has them: see `_exact_sum`)."""
  kw = dict(parts=b["parts"], lengths=b["lengths"])
  sums = np.asarray(jax.jit(adv.gs_gdpo_group_sums)(b["parts"], b["groups"], b["valid"]))
  want_sums = sum(ref_segments(ref_q, b["parts"][:, k].astype(np.float64), b["groups"],
                               b["valid"]) for k in range(3))
  np.testing.assert_allclose(sums, want_sums, atol=1e-5)
  got = np.asarray(_jitted_estimator("gs_gdpo")(b["rewards"], b["groups"], b["tasks"],
                                                b["valid"], **kw))
  want = ref_segments(ref_q, sums.astype(np.float64), b["tasks"], b["valid"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(got[~b["valid"]] == 0)


def test_gs_gdpo_sums_permuted_parts_to_the_same_bits():
  """Rows whose mapped parts are the same values in another order tie exactly in stage 2."""
  x = np.float32([[0.1, 0.7, -1.3], [-1.3, 0.1, 0.7], [0.7, -1.3, 0.1], [0.3, -0.3, 0.2]])
  s = np.asarray(adv._exact_sum(jnp.asarray(x)))  # pylint: disable=protected-access
  assert s[0] == s[1] == s[2] and s[3] == np.float32(0.2)


def test_part_estimators_normalise_each_part_separately():
  """Two groups whose summed reward is the same ranking: per part normalisation differs from
  normalising the sum (a format point weighs as much as an accuracy point)."""
  parts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], np.float32)
  groups, tasks, lengths = np.zeros(4, np.int32), np.zeros(4, np.int32), np.full(4, 10)
  reward = parts.sum(1) * np.array([0.9, 0.1, 0.5]).sum()  # any reward: GDPO does not read it
  got = adv.gdpo_advantages(reward, groups, tasks, parts=parts, lengths=lengths)
  # Each part: (x - 0.5) / (std 0.577 + 1e-6) over the group; rows 0 and 1 are then equal.
  assert float(got[0]) == pytest.approx(float(got[1]), abs=1e-6)
  assert float(got[3]) > float(got[0]) > float(got[2])
  bad = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match="parts"):
    adv.gdpo_advantages(reward, groups, tasks, parts=bad, lengths=lengths)


def test_batch_estimator_has_one_signature():
  r, g, t = np.array([0.0, 1.0, 1.0, 0.0]), np.array([0, 0, 1, 1]), np.zeros(4, np.int32)
  kw = dict(parts=np.zeros((4, 3), np.float32), lengths=np.ones(4, np.int32))
  np.testing.assert_array_equal(adv.batch_estimator("grpo")(r, g, t, None, **kw),
                                adv.grpo_advantages(r, g, t))
  assert not adv.uses_reward_parts("g2rpo")
