"""Tests of rl/shaping.py: entropy bounds (REFERENCE §5) and length shaping (REFERENCE §6)."""
import dataclasses
import math

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvlthinker.rl import shaping
from openvlthinker.taxonomy import NUM_TASKS, TASK_TYPES

# ---------------------------------------------------------------------------------- length


def test_trapezoid_at_and_between_breakpoints():
  lengths = np.array([0, 10, 15, 20, 30, 40, 45, 50, 60, 70, 80, 1000])
  # L_min 10, L_low 20, L_high 50, L_max 70.
  want = [0, 0, 0.5, 1, 1, 1, 1, 1, 0.5, 0, 0, 0]
  np.testing.assert_allclose(shaping.trapezoid(lengths, 10, 20, 50, 70), want, atol=1e-7)
  # A plateau of one point and lengths between integer breakpoints.
  np.testing.assert_allclose(shaping.trapezoid(np.array([12.5, 20.0, 21.0]), 10, 20, 20, 30),
                             [0.25, 1.0, 0.9], atol=1e-6)


def test_length_reward_uses_each_rows_task():
  thresholds = shaping.static_thresholds()
  math_id, ocr_id = TASK_TYPES.index("math_reasoning"), TASK_TYPES.index("ocr")
  got = shaping.length_reward(np.array([40, 40, 800, 800]), np.array([ocr_id, math_id] * 2),
                              thresholds)
  # OCR plateau 30-50 tokens; math 600-1100 with its ramp starting at 300.
  np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(shaping.length_reward(np.array([450]), np.array([math_id]),
                                                   thresholds), [0.5])


def test_static_thresholds_are_checked():
  bad = dict(shaping.DEFAULT_LENGTH_THRESHOLDS, ocr=(30.0, 30.0, 50.0, 75.0))
  with pytest.raises(ValueError) as e:
    shaping.static_thresholds(bad)
  assert str(e.value) == ("thresholds.ocr: expected (L_min, L_low, L_high, L_max) with "
                          "0 <= L_min < L_low <= L_high < L_max, got (30.0, 30.0, 50.0, 75.0)")
  with pytest.raises(ValueError, match="^thresholds: expected one entry per task"):
    shaping.static_thresholds({"ocr": (1, 2, 3, 4)})


def ref_update(hist, lengths, tasks, counted, cfg):
  """Numpy loop: per task, decay if it has new correct lengths, then add their histogram."""
  hist = hist.astype(np.float64).copy()
  edges = np.expm1(np.linspace(0, math.log1p(cfg.max_length), cfg.num_bins + 1))
  for t in range(cfg.num_tasks):
    sel = lengths[counted & (tasks == t)]
    if len(sel):
      idx = np.clip(np.searchsorted(edges, sel, side="right") - 1, 0, cfg.num_bins - 1)
      hist[t] = hist[t] * cfg.decay + np.bincount(idx, minlength=cfg.num_bins)
  return hist


def test_update_matches_numpy_and_ignores_other_rows():
  cfg = shaping.AdaptiveLengthConfig(num_tasks=3, max_length=512, num_bins=16, decay=0.5,
                                     prior=((1, 2, 3, 4),) * 3)
  rng = np.random.default_rng(0)
  stats, want = cfg.init(), np.zeros((3, 16))
  update = jax.jit(cfg.update)
  for step in range(4):
    lengths = rng.integers(1, 600, 64)
    tasks = rng.integers(0, 3 if step else 2, 64)  # task 2 absent from the first batch
    correct, valid = rng.random(64) < 0.6, rng.random(64) < 0.9
    stats = update(stats, lengths, tasks, correct, valid)
    want = ref_update(want, lengths, tasks, correct & valid, cfg)
    np.testing.assert_allclose(stats.hist, want, rtol=1e-6)
  assert stats.hist.shape == (3, 16) and stats.hist.dtype == jnp.float32


def test_adaptive_thresholds_follow_quantiles_of_correct_lengths():
  cfg = shaping.AdaptiveLengthConfig(decay=1.0)
  rng = np.random.default_rng(1)
  math_id, ocr_id = TASK_TYPES.index("math_reasoning"), TASK_TYPES.index("ocr")
  lengths = np.r_[rng.integers(300, 1301, 4000), rng.integers(20, 61, 4000),
                  np.full(2000, 4000)]
  tasks = np.r_[np.full(4000, math_id), np.full(4000, ocr_id), np.full(2000, ocr_id)]
  correct = np.r_[np.ones(8000, bool), np.zeros(2000, bool)]  # long wrong answers: ignored
  got = np.asarray(cfg.thresholds(cfg.update(cfg.init(), lengths, tasks, correct)))
  for t, sample in ((math_id, lengths[:4000]), (ocr_id, lengths[4000:8000])):
    q25, q75 = np.quantile(sample, [0.25, 0.75])
    np.testing.assert_allclose(got[t], [0.5 * q25, q25, q75, 1.5 * q75], rtol=0.03)
  # Tasks without data keep their static prior.
  others = [i for i in range(NUM_TASKS) if i not in (math_id, ocr_id)]
  np.testing.assert_array_equal(got[others], shaping.static_thresholds()[others])


ORDERED_CFG = shaping.AdaptiveLengthConfig(num_tasks=2, min_count=1.0, plateau=(0.1, 0.9),
                                           prior=((1, 2, 3, 4),) * 2)


@jax.jit
def _two_updates_then_thresholds(lengths, correct):
  stats = ORDERED_CFG.init()
  for c in correct:
    stats = ORDERED_CFG.update(stats, lengths, jnp.zeros_like(lengths), c)
  return ORDERED_CFG.thresholds(stats)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=64, max_size=64), st.integers(0, 2**31 - 1))
def test_adaptive_thresholds_are_ordered(lengths, seed):
  correct = np.random.default_rng(seed).random((2, 64)) < np.array([[0.05], [0.7]])
  l_min, l_low, l_high, l_max = np.asarray(
      _two_updates_then_thresholds(np.array(lengths), correct))[0]
  assert 0 <= l_min < l_low <= l_high < l_max


@pytest.mark.parametrize("change, message", [
    (dict(max_length=0), "max_length: expected a positive integer, got 0"),
    (dict(num_bins=0), "num_bins: expected a positive integer, got 0"),
    (dict(decay=0.0), "decay: expected 0 < decay <= 1, got 0.0"),
    (dict(plateau=(0.5, 0.4)), "plateau: expected quantiles 0 <= lo <= hi <= 1, got (0.5, 0.4)"),
    (dict(min_count=-1), "min_count: expected a number >= 0, got -1"),
])
def test_a_bad_length_setting_is_named_with_what_was_expected(change, message):
  with pytest.raises(ValueError) as e:
    dataclasses.replace(shaping.AdaptiveLengthConfig(), **change)
  assert str(e.value) == message


def test_thresholds_start_from_the_prior():
  cfg = shaping.AdaptiveLengthConfig()
  np.testing.assert_array_equal(cfg.thresholds(cfg.init()), shaping.static_thresholds())
  assert dataclasses.replace(cfg, plateau=(0.0, 1.0)).plateau == (0.0, 1.0)  # the whole range
  with pytest.raises(ValueError, match=r"^ramp: expected 0 < ramp < 1, got 1\.0$"):
    dataclasses.replace(cfg, ramp=1.0)
  with pytest.raises(ValueError, match=r"^prior: expected 3 rows of \(L_min, L_low, L_high, "
                                       r"L_max\), got "):
    dataclasses.replace(cfg, num_tasks=3)


@pytest.mark.parametrize("q", [0.1, 0.35, 0.5, 0.95])
def test_quantile_inverts_the_histograms_piecewise_linear_cdf(q):
  """The q-quantile of each row: the CDF linear inside each bin, bins even in log1p(length)."""
  cfg = shaping.AdaptiveLengthConfig(num_tasks=2, max_length=100, num_bins=4,
                                     prior=((1, 2, 3, 4),) * 2)
  hist = np.array([[2.0, 2.0, 4.0, 1.0], [1.0, 5.0, 1.0, 3.0]], np.float32)
  got = np.asarray(cfg._quantile(jnp.asarray(hist), q))
  for row, value in zip(hist, got):
    cdf = np.r_[0.0, np.cumsum(row)]
    u = np.interp(q * cdf[-1], cdf, np.arange(5) / 4)
    np.testing.assert_allclose(value, np.expm1(u * np.log1p(100)), rtol=1e-5)


def test_stats_round_trip_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = shaping.AdaptiveLengthConfig()
  stats = cfg.update(cfg.init(), np.array([50, 900]), np.array([5, 3]), np.array([True, True]))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "stats", stats)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "stats", cfg.init())
  np.testing.assert_array_equal(restored.hist, stats.hist)


# --------------------------------------------------------------------------------- entropy


def ref_penalty(ent, mask, tasks, h_min, h_max):
  total, hs = 0.0, {}
  for t in np.unique(tasks):
    m = mask[tasks == t].astype(bool)
    if m.sum() == 0:
      continue
    h = ent[tasks == t][m].astype(np.float64).mean()
    hs[t] = h
    total += max(0.0, h - h_max[t]) + max(0.0, h_min[t] - h)
  return total, hs


def entropy_batch(seed, b=12, length=5, num_tasks=4):
  rng = np.random.default_rng(seed)
  ent = rng.random((b, length)).astype(np.float32) * 1.2
  mask = rng.random((b, length)) < 0.8
  tasks = rng.integers(0, num_tasks - 1, b)  # the last task is absent
  return ent, mask, tasks


def test_entropy_penalty_matches_numpy_and_skips_absent_tasks():
  cfg = shaping.EntropyShapingConfig(h_min=(0.2, 0.5, 0.1, 0.3), h_max=(0.6, 0.7, 0.4, 0.3),
                                     num_tasks=4)
  ent, mask, tasks = entropy_batch(0)
  one = np.flatnonzero(tasks == 2)  # task 2: a single response token
  mask[one], mask[one[0], 0] = False, True
  penalty, h, present = shaping.entropy_penalty(ent, mask, tasks, *cfg.bounds())
  want, want_h = ref_penalty(ent, mask, tasks, *cfg.bounds())
  assert want_h[2] == pytest.approx(ent[one[0], 0])
  np.testing.assert_allclose(penalty, want, rtol=1e-6)
  assert list(np.flatnonzero(present)) == sorted(want_h)
  np.testing.assert_allclose(np.asarray(h)[sorted(want_h)], [want_h[t] for t in sorted(want_h)],
                             rtol=1e-6)


@pytest.mark.parametrize("level, sign", [(0.1, -1.0), (0.4, 0.0), (0.9, 1.0)])
def test_entropy_term_is_zero_inside_linear_outside_and_pushes_back(level, sign):
  h_min, h_max = np.full(3, 0.2, np.float32), np.full(3, 0.6, np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
  tasks = np.array([0, 0, 1])
  ent = np.full((3, 3), level, np.float32)

  def penalty(e):
    return shaping.entropy_penalty(e, mask, tasks, h_min, h_max)[0]

  value, grad = jax.value_and_grad(penalty)(ent)
  # Tasks 0 and 1 are present, each off the band by the same distance.
  np.testing.assert_allclose(value, 2 * max(0.0, level - 0.6, 0.2 - level), atol=1e-6)
  counts = np.array([3, 3, 3])[:, None]  # task 0: 3 tokens over rows 0-1; task 1: 3 tokens
  np.testing.assert_allclose(grad, sign * mask / counts, atol=1e-7)
  # A small descent step moves each task's mean entropy towards the band; through the
  # sampled-token estimator the same gradient lands on -log π.
  logp = -ent
  grad_logp = jax.grad(lambda lp: penalty(shaping.sampled_token_entropy(lp)))(logp)
  np.testing.assert_allclose(grad_logp, -np.asarray(grad), atol=1e-7)
  stepped = ent - 0.05 * np.asarray(grad)
  _, h_after, _ = shaping.entropy_penalty(stepped, mask, tasks, h_min, h_max)
  assert np.all(np.abs(np.asarray(h_after)[:2] - 0.4) <= abs(level - 0.4) + 1e-7)
  if sign:
    assert np.all(np.abs(np.asarray(h_after)[:2] - 0.4) < abs(level - 0.4))


def test_exact_entropy_matches_numpy():
  logits = np.random.default_rng(2).normal(size=(2, 3, 11)).astype(np.float32) * 3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(shaping.exact_entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_exact_entropy_gradient_with_removed_tokens_is_the_kept_distributions(top_p):
  """The update's entropy (`sampling.entropy` of `sampling.candidates`) with banned tokens (the
  image placeholders every VLM config bans) and a nucleus: a finite gradient, equal to central
  differences of the entropy of the kept tokens' renormalised distribution, in float64 numpy.
  It was NaN (0 · −inf through a `where`), so entropy shaping skipped every update."""
  from openvlthinker import sampling

  class Dist:
    temperature, top_k, top_p, banned_tokens = 1.0, 0, 0.0, (2, 5)
  Dist.top_p = top_p
  logits = np.random.default_rng(0).normal(size=(3, 9)) * 2.0
  grad = np.asarray(jax.grad(lambda l: sampling.entropy(sampling.candidates(l, Dist())).sum())(
      jnp.asarray(logits, jnp.float32)), np.float64)
  assert np.isfinite(grad).all()
  dist = sampling.candidates(jnp.asarray(logits, jnp.float32), Dist())
  kept = np.isfinite(np.asarray(dist.log_probs))  # candidates' order (sorted with a nucleus)
  if dist.ids is not None:  # back to vocabulary order
    kept = np.take_along_axis(kept, np.argsort(np.asarray(dist.ids), -1), -1)
  # The banned tokens are removed, and with a nucleus some others too.
  assert not kept[:, list(Dist.banned_tokens)].any()
  assert (kept.sum() < logits.size - logits.shape[0] * 2) == (top_p < 1.0)

  def entropy(l):
    z = np.where(kept, l, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -np.sum(np.where(kept, p * np.log(np.where(kept, p, 1.0)), 0.0))

  eps, want = 1e-6, np.zeros_like(logits)
  for index in np.ndindex(logits.shape):
    step = np.zeros_like(logits)
    step[index] = eps
    want[index] = (entropy(logits + step) - entropy(logits - step)) / (2 * eps)
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(grad, want, atol=2e-5)
  np.testing.assert_array_equal(grad[~kept], 0.0)


def test_entropy_config_errors():
  with pytest.raises(ValueError,
                     match=r"^estimator: expected one of \('sampled_token', 'exact'\), got 'mc'$"):
    shaping.EntropyShapingConfig(estimator="mc")
  with pytest.raises(ValueError, match="^h_min: expected "):
    shaping.EntropyShapingConfig(h_min=(0.1, 0.2))
  with pytest.raises(ValueError, match="^h_max: expected "):
    shaping.EntropyShapingConfig(h_max=(0.1, 0.2))
  with pytest.raises(ValueError) as e:  # a mapping must name every task
    shaping.EntropyShapingConfig(h_min={"ocr": 0.1})
  assert str(e.value) == f"h_min: expected one entry per task {TASK_TYPES}, got {{'ocr': 0.1}}"
  with pytest.raises(ValueError, match="h_min.spatial_grounding"):
    shaping.EntropyShapingConfig(h_min=0.7, h_max=0.6)


def test_sharded_batch_gives_same_result():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data", *(None,) * (np.ndim(x) - 1))))
  cfg = shaping.AdaptiveLengthConfig()
  ent, mask, tasks = entropy_batch(3, b=16, num_tasks=NUM_TASKS)
  rng = np.random.default_rng(3)
  lengths, correct = rng.integers(1, 2000, 16), rng.random(16) < 0.5
  bounds = shaping.EntropyShapingConfig().bounds()

  @jax.jit
  def step(ent, mask, tasks, lengths, correct):
    penalty, grad = jax.value_and_grad(
        lambda e: shaping.entropy_penalty(e, mask, tasks, *bounds)[0])(ent)
    stats = cfg.update(cfg.init(), lengths, tasks, correct)
    return penalty, grad, stats, shaping.length_reward(lengths, tasks, cfg.thresholds(stats))

  args = (ent, mask, tasks, lengths, correct)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7),
               step(*map(shard, args)), step(*args))
