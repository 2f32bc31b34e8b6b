"""Tests of rl/losses.py against numpy formulas and the analytic gradient of REFERENCE §4."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvlthinker.rl import losses

CFG = losses.PolicyLossConfig()  # ε_low 0.2, ε_high 0.3, c 3


def loss_fn(cfg, **kw):
  def fn(new_logp, *args):
    out = losses.policy_loss(new_logp, *args, cfg=cfg, **kw)
    return losses.loss_value(out.numerator, out.denominator)
  return fn


def random_batch(seed, b=8, length=6, num_tasks=3):
  rng = np.random.default_rng(seed)
  old = -rng.random((b, length)).astype(np.float32) * 3
  new = (old + rng.normal(0, 0.4, (b, length))).astype(np.float32)
  ref = (old + rng.normal(0, 0.2, (b, length))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  lengths = rng.integers(0, length + 1, b)
  lengths[0] = length
  mask = np.arange(length)[None] < lengths[:, None]
  tasks = rng.integers(0, num_tasks, b)
  return new, old, ref, adv, mask, tasks


def ref_token_loss(new, old, adv, cfg):
  """REFERENCE §4 in numpy, written from the formulas."""
  delta = np.clip(new.astype(np.float64) - old, -20, 20)
  r = np.exp(delta)
  r_hat = np.exp(np.clip(delta, np.log(1 - cfg.clip_low), np.log(1 + cfg.clip_high)))
  a = np.broadcast_to(np.asarray(adv, np.float64).reshape(len(adv), -1), r.shape)
  clipped = np.maximum(-a * r, -a * r_hat)
  return np.where(a < 0, np.minimum(clipped, -a * cfg.dual_clip), clipped)


def ref_aggregate(token_loss, mask, cfg):
  mask = mask.astype(np.float64)
  rows = mask.sum(1) > 0
  if cfg.aggregation == "token_mean":
    return (token_loss * mask).sum() / mask.sum()
  if cfg.aggregation == "seq_mean_token_mean":
    per_seq = [(token_loss[i] * mask[i]).sum() / mask[i].sum() for i in np.flatnonzero(rows)]
    return np.mean(per_seq)
  return (token_loss * mask).sum() / (rows.sum() * (cfg.fixed_length or mask.shape[1]))


# One token per row, each in a region of REFERENCE §4: (A, ratio, gradient is live?).
REGIONS = [
    (1.0, 1.1, True),  # A > 0 inside the clip
    (1.0, 1.5, False),  # A > 0 beyond 1 + ε_high: clipped
    (2.0, 0.5, True),  # A > 0 below 1 - ε_low: PPO does not clip this side
    (-1.0, 1.1, True),  # A < 0 inside
    (-1.0, 0.5, False),  # A < 0 below 1 - ε_low: clipped
    (-1.5, 2.0, True),  # A < 0 beyond 1 + ε_high but below c: unclipped
    (-1.0, 4.0, False),  # A < 0 beyond the dual clip c = 3
    (0.0, 1.2, True),  # A = 0: loss and gradient 0
]


def test_gradient_matches_analytic_in_every_region():
  adv = np.array([a for a, _, _ in REGIONS], np.float32)
  ratio = np.array([r for _, r, _ in REGIONS], np.float32)
  old = np.full((len(REGIONS), 1), -1.0, np.float32)
  new = old + np.log(ratio)[:, None]
  mask = np.ones_like(old, bool)
  live = np.array([l for _, _, l in REGIONS])
  value, grad = jax.value_and_grad(loss_fn(CFG))(new, old, adv, mask)
  r = np.exp(new[:, 0].astype(np.float64) - old[:, 0])  # the ratio the float32 inputs encode
  want_grad = np.where(live, -adv * r, 0.0) / len(REGIONS)
  np.testing.assert_allclose(np.asarray(grad)[:, 0], want_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(value, ref_aggregate(ref_token_loss(new, old, adv, CFG), mask, CFG),
                             rtol=1e-6)


def test_log_ratio_clamp_stops_the_gradient():
  # Without the dual clip an A < 0 token far beyond the clip keeps -A·r: the clamp at Δ = 20
  # bounds that value and zeroes its gradient (unclamped it would be -A·e^25).
  cfg = dataclasses.replace(CFG, dual_clip=None)
  old = np.zeros((2, 1), np.float32)
  new = np.array([[25.0], [-25.0]], np.float32)
  value, grad = jax.value_and_grad(loss_fn(cfg))(new, old, np.array([-1.0, 1.0]), np.ones((2, 1)))
  np.testing.assert_array_equal(grad, 0.0)
  np.testing.assert_allclose(value, (np.exp(20.0) - np.exp(-20.0)) / 2, rtol=1e-6)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_aggregation_matches_numpy(aggregation, seed):
  cfg = dataclasses.replace(CFG, aggregation=aggregation, fixed_length=16 if seed else None)
  new, old, _, adv, mask, _ = random_batch(seed)
  got = loss_fn(cfg)(new, old, adv, mask)
  np.testing.assert_allclose(got, ref_aggregate(ref_token_loss(new, old, adv, cfg), mask, cfg),
                             rtol=1e-6, atol=1e-7)


def test_per_token_advantages():
  new, old, _, adv, mask, _ = random_batch(2)
  per_token = adv[:, None] * np.linspace(0.5, 1.5, new.shape[1])[None].astype(np.float32)
  got = loss_fn(CFG)(new, old, per_token, mask)
  np.testing.assert_allclose(got, ref_aggregate(ref_token_loss(new, old, per_token, CFG), mask,
                                                CFG), rtol=1e-6, atol=1e-7)


def test_k3_kl_value_and_gradient():
  cfg = dataclasses.replace(CFG, kl_coef=0.1)
  new, old, ref, adv, mask, _ = random_batch(3)
  value, grad = jax.value_and_grad(loss_fn(cfg, ref_logp=ref))(new, old, adv, mask)
  d = ref.astype(np.float64) - new
  kl = np.exp(d) - d - 1
  np.testing.assert_allclose(
      value, ref_aggregate(ref_token_loss(new, old, adv, cfg) + 0.1 * kl, mask, cfg), rtol=1e-6,
      atol=1e-7)
  _, pg_grad = jax.value_and_grad(loss_fn(CFG))(new, old, adv, mask)
  kl_grad = 0.1 * (1 - np.exp(d)) * mask / mask.sum()
  np.testing.assert_allclose(grad, np.asarray(pg_grad) + kl_grad, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="ref_logp"):
    losses.policy_loss(new, old, adv, mask, cfg)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_micro_batches_accumulate_to_the_full_batch(aggregation):
  cfg = dataclasses.replace(CFG, aggregation=aggregation, kl_coef=0.05)
  new, old, ref, adv, mask, tasks = map(jnp.asarray, random_batch(4, b=10))

  @jax.jit
  def terms(rows):
    def numerator(n):
      out = losses.policy_loss(n, old[rows], adv[rows], mask[rows], cfg, ref_logp=ref[rows],
                               task_ids=tasks[rows])
      return out.numerator, out
    grad, out = jax.grad(numerator, has_aux=True)(new[rows])
    return out, grad

  full, grad_full = terms(np.arange(10))
  (part1, grad1), (part2, grad2) = terms(np.arange(3)), terms(np.arange(3, 10))  # uneven split
  num, den = part1.numerator + part2.numerator, part1.denominator + part2.denominator
  np.testing.assert_allclose(losses.loss_value(num, den),
                             losses.loss_value(full.numerator, full.denominator), rtol=1e-6)
  # Gradients: Σ_k ∇numerator_k / Σ_k denominator_k is the full-batch gradient.
  np.testing.assert_allclose(np.concatenate([grad1, grad2]) / den,
                             grad_full / full.denominator, rtol=1e-5, atol=1e-8)
  acc = losses.finalize_metrics(losses.accumulate_metrics(part1.metrics, part2.metrics))
  for key, want in losses.finalize_metrics(full.metrics).items():
    np.testing.assert_allclose(acc[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


def test_metrics_match_numpy():
  new, old, _, adv, mask, tasks = random_batch(5, b=12)
  tasks[tasks == 2], tasks[-1] = 1, 2  # task 2: one response (its mean is its advantage)
  mask[-1, 0] = True
  adv[:4] = [1.0, -1.0, -2.0, 0.5]
  new[:4, 0] = old[:4, 0] + np.log([1.6, 0.5, 3.5, 0.7]).astype(np.float32)  # high, low, dual
  out = losses.policy_loss(new, old, adv, mask, CFG, task_ids=tasks)
  m = losses.finalize_metrics(out.metrics)
  on = mask
  r = np.exp(new.astype(np.float64) - old)
  a = np.broadcast_to(adv[:, None], r.shape)
  np.testing.assert_allclose(m["clip_high_frac"], ((a > 0) & (r > 1.3) & on).sum() / on.sum())
  np.testing.assert_allclose(m["clip_low_frac"], ((a < 0) & (r < 0.8) & on).sum() / on.sum())
  np.testing.assert_allclose(m["dual_clip_frac"], ((a < 0) & (r > 3) & on).sum() / on.sum())
  assert m["clip_high_frac"] > 0 and m["clip_low_frac"] > 0 and m["dual_clip_frac"] > 0
  np.testing.assert_allclose(m["ratio_mean"], r[on].mean(), rtol=1e-6)
  np.testing.assert_allclose(m["ratio_min"], r[on].min(), rtol=1e-6)
  np.testing.assert_allclose(m["ratio_max"], r[on].max(), rtol=1e-6)
  np.testing.assert_allclose(m["approx_kl"], (r - 1 - np.log(r))[on].mean(), rtol=1e-5)
  rows = on.any(1)
  for t in range(CFG.num_tasks):
    sel = adv[rows & (tasks == t)].astype(np.float64)
    want_mean, want_std = (sel.mean(), sel.std()) if len(sel) else (0.0, 0.0)
    np.testing.assert_allclose(m["task_adv_mean"][t], want_mean, atol=1e-6)
    np.testing.assert_allclose(m["task_adv_std"][t], want_std, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(aggregation="sum"), "aggregation: expected one of ('token_mean', 'seq_mean_token_mean', "
                              "'fixed_denominator'), got 'sum'"),
    (dict(clip_low=1.0), "clip_low: expected 0 <= clip_low < 1, got 1.0"),
    (dict(clip_high=11.0), "clip_high: expected a number in [0, 10], got 11.0"),
    (dict(dual_clip=1.1), "dual_clip: expected None or a number > 1 + clip_high=0.3, got 1.1"),
    (dict(name="nope"), "name: expected one of ('cispo', 'gspo', 'ppo_dual_clip'), got 'nope'"),
    (dict(fixed_length=0), "fixed_length: expected None or a positive integer, got 0"),
    (dict(kl_coef=-1.0), "kl_coef: expected a number >= 0, got -1.0"),
    (dict(log_ratio_clamp=0.0), "log_ratio_clamp: expected a number > 0, got 0.0"),
    (dict(num_tasks=0), "num_tasks: expected a positive integer, got 0"),
    (dict(name="gspo", aggregation="token_mean"),
     "aggregation: expected 'seq_mean_token_mean' with name='gspo' (its loss is a mean over "
     "sequences), got 'token_mean'"),
])
def test_a_bad_setting_is_named_with_what_was_expected(change, message):
  with pytest.raises(ValueError) as e:
    dataclasses.replace(CFG, **change)
  assert str(e.value) == message


def test_config_and_input_errors():
  with pytest.raises(ValueError, match="^old_logp: expected "):
    losses.policy_loss(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2), np.ones((2, 3)), CFG)
  with pytest.raises(ValueError, match="mask"):
    losses.policy_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), np.ones((2, 4)), CFG)
  with pytest.raises(ValueError, match="advantages"):
    losses.policy_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3), np.ones((2, 3)), CFG)
  assert "ppo_dual_clip" in losses.policy_losses()
  with pytest.raises(ValueError, match="already registered"):
    losses.register_policy_loss("ppo_dual_clip")(lambda *a: None)


def test_sharded_batch_gives_same_result():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data", *(None,) * (np.ndim(x) - 1))))
  cfg = dataclasses.replace(CFG, kl_coef=0.05, aggregation="seq_mean_token_mean")
  new, old, ref, adv, mask, tasks = random_batch(6, b=16)

  @jax.jit
  def step(new, old, adv, mask, ref, tasks):
    fn = lambda n: loss_fn(cfg, ref_logp=ref, task_ids=tasks)(n, old, adv, mask)
    out = losses.policy_loss(new, old, adv, mask, cfg, ref_logp=ref, task_ids=tasks)
    return jax.grad(fn)(new), losses.finalize_metrics(out.metrics)

  args = (new, old, adv, mask, ref, tasks)
  want = step(*args)
  got = step(*map(shard, args))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


def test_loss_value_divides_by_any_positive_token_count():
  """One response (seq_mean_token_mean's denominator 1) or one token still has its loss; only an
  empty batch gives 0."""
  assert float(losses.loss_value(jnp.float32(2.0), jnp.float32(1.0))) == 2.0
  assert float(losses.loss_value(jnp.float32(2.0), jnp.float32(4.0))) == 0.5
  assert float(losses.loss_value(jnp.float32(2.0), jnp.float32(0.0))) == 0.0


def test_dual_clip_needs_only_to_exceed_the_upper_ratio_bound():
  assert losses.PolicyLossConfig(clip_high=0.3, dual_clip=1.5).dual_clip == 1.5  # > 1.3


def test_clip_bounds_may_be_zero():
  """clip_high = 0 (no upward ratio change on positive advantages) is a valid setting."""
  assert losses.PolicyLossConfig(clip_high=0.0).clip_high == 0.0
  assert losses.PolicyLossConfig(clip_low=0.0).clip_low == 0.0  # no downward clip
  with pytest.raises(ValueError, match="clip_high"):
    losses.PolicyLossConfig(clip_high=-0.1)
