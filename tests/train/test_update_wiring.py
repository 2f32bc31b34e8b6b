"""The RL update's wiring against direct computations, on a batch the real sampler drew.

A tiny text model (full prefix attention, as the pod preset) samples up to 24 tokens with many stop
tokens, so every row ends before the trim bucket (16): the trimmed batch's teacher-forced log-probs
must equal the sampler's. `make_update` (shared prompt forward, 2 micro-batches, entropy shaping
on and a KL term) must then produce the gradient, loss and metrics of one direct computation over
the whole batch with `losses.policy_loss` and `shaping.entropy_penalty` (the entropy hinge is per
micro-batch by design, so the direct computation averages it over the same two halves).
G = 3: not a power of two.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.rl import losses, shaping
from openvlthinker.sampler import Sampler, SamplerConfig
from openvlthinker.train import rl
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.context import make_sharder
from openvlthinker.train.rl_stage import RESPONSE_BUCKET
from openvlthinker.train.state import create_train_state, train_state_shardings

P, G, LR = 4, 3, 24
NUM_MICRO = 2
STOP = tuple(range(10, 1024, 5))  # a fifth of the vocabulary ends a row
SAMPLER = SamplerConfig(max_new_tokens=LR, stop_tokens=STOP, prompt_buckets=(16,))
TASKS = np.repeat([0, 3, 3, 0], G).astype(np.int32)  # both tasks in each micro-batch
LOSS = losses.PolicyLossConfig(kl_coef=0.5)
# Bounds that put both hinges to work: the exact entropy of the random model is ~6.9 nats, above
# task 0's H_max and below task 3's H_min.
ENTROPY = shaping.EntropyShapingConfig(enabled=True, coef=0.3, estimator="exact",
                                       h_min=(0.0, 0, 0, 9.0, 0, 0), h_max=(2.0, 9, 9, 12.0, 9, 9))


def grad_capture() -> optax.GradientTransformation:
  """An optimizer that leaves the parameters alone and keeps the last gradient as its state."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope="module")
def setup():
  config = test_config.get_config()
  config.model.vision.enabled = False
  config.model.prefix_full_attention = True
  sharder = make_sharder(config)  # the suite's 8 devices, fsdp as the trainer shards them
  graphdef, params = nnx.split(build_model(vlm_config(config.model), sharder, seed=0))
  rng = np.random.default_rng(0)
  n = np.array([5, 11, 8, 14])
  tokens = np.zeros((P, 14), np.int32)
  mask = np.arange(14) < n[:, None]
  tokens[mask] = rng.integers(10, 1024, mask.sum())
  tokens[:, 0] = 1
  out = jax.device_get(Sampler(graphdef, SAMPLER, sharder)(params, tokens, mask, None,
                                                           jax.random.key(5), group_size=G))
  b = P * G
  z = np.zeros(b, np.float32)
  batch = RolloutBatch(
      sequence_tokens=out.sequence_tokens, sequence_positions=out.sequence_positions,
      sequence_mask=out.sequence_mask, prefix_mask=out.prefix_mask, tokens=out.tokens,
      old_logprobs=out.logprobs, entropies=out.entropies, response_mask=out.response_mask,
      lengths=out.lengths, images=None, task_ids=TASKS, task_keys=TASKS, reward=z, accuracy=z,
      format=z, structure=z, length_reward=z,
      advantages=rng.standard_normal(b).astype(np.float32), valid=np.ones(b, bool),
      response_start=out.response_start)
  return graphdef, params, sharder, out, batch


@pytest.fixture(scope="module")
def trimmed(setup):
  _, _, _, out, batch = setup
  lengths = np.asarray(out.lengths)
  # The premise: rows end at different steps, all within the first bucket, some late in it.
  assert lengths.max() <= RESPONSE_BUCKET < LR and lengths.max() >= 9 and len(set(lengths)) > 3
  t = batch.trim(RESPONSE_BUCKET)
  assert t.tokens.shape == (P * G, RESPONSE_BUCKET)
  assert t.sequence_tokens.shape[1] == t.response_start + RESPONSE_BUCKET
  return t


@pytest.mark.parametrize("group_size", [1, G])
def test_trimmed_teacher_forced_logprobs_equal_the_samplers(setup, trimmed, group_size):
  graphdef, params, sharder, out, _ = setup
  fn = jax.jit(rl.policy_logprobs, static_argnums=(1, 3, 4))
  mb = jax.tree.map(sharder.put_batch, trimmed)
  logp, ent = jax.device_get(fn(params, graphdef, mb, SAMPLER, group_size))
  m = trimmed.response_mask
  np.testing.assert_allclose(logp, np.asarray(out.logprobs)[:, :RESPONSE_BUCKET], atol=1e-4)
  np.testing.assert_allclose(ent, np.asarray(out.entropies)[:, :RESPONSE_BUCKET], atol=1e-4)
  assert (logp[m] < 0).all() and (logp[~m] == 0).all()
  # The test has teeth: the log-probs of the next column's tokens are far off.
  shifted = np.take_along_axis(logp, np.minimum(np.arange(RESPONSE_BUCKET) + 1,
                                                RESPONSE_BUCKET - 1)[None].repeat(P * G, 0), 1)
  assert np.abs((shifted - logp)[m]).max() > 0.1


def direct_loss(params, graphdef, mb, entropy_weight=1.0):
  """The minibatch loss written out: one per-row forward over the whole batch."""
  logp, exact = rl.policy_logprobs(params, graphdef, mb, SAMPLER, group_size=1)
  pl = losses.policy_loss(logp, mb.old_logprobs, mb.advantages, mb.response_mask, LOSS,
                          ref_logp=mb.ref_logprobs, task_ids=mb.task_ids)
  half = mb.tokens.shape[0] // NUM_MICRO
  h_min, h_max = ENTROPY.bounds()
  hinges = [shaping.entropy_penalty(exact[s], mb.response_mask[s], mb.task_ids[s], h_min, h_max)[0]
            for s in (slice(0, half), slice(half, None))]
  ent = jnp.mean(jnp.stack(hinges))
  policy = pl.numerator / pl.denominator
  return policy + entropy_weight * ENTROPY.coef * ent, (policy, ent, logp)


@pytest.fixture(scope="module")
def update_runs(setup, trimmed):
  """The update on the sampled batch as is (π_old = π_θ) and with π_old and π_ref moved."""
  graphdef, params, sharder, _, _ = setup
  tx = grad_capture()
  update = rl.make_update(graphdef, tx, state_shardings=train_state_shardings(params, tx, sharder),
                          sampler_config=SAMPLER, loss_config=LOSS, num_micro=NUM_MICRO,
                          entropy=ENTROPY, group_size=G)
  rng = np.random.default_rng(1)
  m = trimmed.response_mask
  noise = lambda s: np.where(m, s * rng.standard_normal(m.shape), 0.0).astype(np.float32)
  as_is = trimmed.replace(ref_logprobs=trimmed.old_logprobs + noise(0.5))
  moved = as_is.replace(old_logprobs=trimmed.old_logprobs + noise(0.4))
  runs = []
  for mb in (as_is, moved):
    state, shardings = create_train_state(jax.tree.map(jnp.copy, params), tx, sharder)
    mb = jax.tree.map(sharder.put_batch, mb)
    new_state, metrics = update(state, mb)
    runs.append((mb, shardings, new_state, jax.device_get(metrics)))
  return runs


def test_update_recomputes_the_samplers_logprobs_on_the_trimmed_batch(update_runs):
  _, _, _, metrics = update_runs[0]
  assert abs(metrics["ratio_min"] - 1) < 2e-4 and abs(metrics["ratio_max"] - 1) < 2e-4
  assert metrics["approx_kl"] < 1e-7


def test_update_equals_direct_loss_with_entropy_and_kl(setup, update_runs):
  graphdef, params, _, _, _ = setup
  mb, _, state, metrics = update_runs[1]
  direct = jax.jit(jax.value_and_grad(direct_loss, has_aux=True), static_argnums=1)
  (_, (policy, ent, logp)), grads = direct(params, graphdef, mb, 1.0)
  logp, mb = jax.device_get((logp, mb))
  m = mb.response_mask
  assert metrics["clip_high_frac"] + metrics["clip_low_frac"] > 0.05  # clipping is exercised
  np.testing.assert_allclose(metrics["policy_loss"], policy, rtol=1e-4)
  np.testing.assert_allclose(metrics["entropy_loss"], ent, rtol=1e-4)
  assert ent > 1.0  # both hinges are active
  log_ref_ratio = np.clip(mb.ref_logprobs - logp, -20, 20)
  k3 = np.exp(log_ref_ratio) - log_ref_ratio - 1
  np.testing.assert_allclose(metrics["kl_ref"], k3[m].mean(), rtol=1e-3)
  log_ratio = logp - mb.old_logprobs
  np.testing.assert_allclose(metrics["ratio_mean"], np.exp(log_ratio)[m].mean(), rtol=1e-4)
  # The gradient (the captured optimizer state) is the direct loss's: policy, KL and entropy terms.
  got = jax.device_get(state.opt_state)
  want = jax.device_get(grads)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * scale),
               want, got)
  # The test has teeth: an entropy term counted once per micro-batch moves the gradient by far
  # more than the tolerance.
  _, doubled = direct(params, graphdef, mb, float(NUM_MICRO))
  gap = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(jax.device_get(doubled)),
                                                jax.tree.leaves(want)))
  assert gap > 0.05 * scale


def test_update_keeps_the_rule_table_shardings(update_runs):
  _, shardings, state, _ = update_runs[1]
  flat_want = jax.tree_util.tree_flatten_with_path(shardings)[0]
  got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state))
  drifted = [jax.tree_util.keystr(path) for (path, want), have, leaf in
             zip(flat_want, got, jax.tree.leaves(state))
             if not have.is_equivalent_to(want, leaf.ndim)]
  assert not drifted, drifted[:5]
