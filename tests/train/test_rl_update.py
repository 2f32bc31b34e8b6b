"""The RL update against independent computations: the shared-prompt forward equals the per-row
teacher-forced forward (values and gradients), and micro-batch accumulation equals one batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.rl import losses
from openvlthinker.sampler import SamplerConfig
from openvlthinker.train import rl
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.context import make_sharder
from openvlthinker.train.state import create_train_state

G, P, LB, LR = 4, 3, 20, 9


@pytest.fixture(scope="module")
def setup():
  config = test_config.get_config()
  cfg = vlm_config(config.model)
  sharder = make_sharder(config)  # The suite's 8 devices, as the trainer shards them.
  graphdef, params = nnx.split(build_model(cfg, sharder, seed=0))
  rng = np.random.default_rng(0)
  t = cfg.num_image_tokens
  rows = []
  for p in range(P):
    n = LB - 3 * p  # Right-aligned prompts of different lengths: pads in front.
    prompt = rng.integers(10, cfg.text.vocab_size, n)
    prompt[1:1 + t] = cfg.image_token_id
    for _ in range(G):
      length = rng.integers(1, LR + 1)
      resp = np.zeros(LR, np.int64)
      resp[:length] = rng.integers(10, cfg.text.vocab_size, length)
      rows.append((n, prompt, resp, length))
  b = P * G
  seq = np.zeros((b, LB + LR), np.int32)
  mask = np.zeros((b, LB + LR), bool)
  pos = np.zeros((b, LB + LR), np.int32)
  resp_mask = np.zeros((b, LR), bool)
  for i, (n, prompt, resp, length) in enumerate(rows):
    seq[i, LB - n:LB] = prompt
    seq[i, LB:] = resp
    mask[i, LB - n:LB + length] = True
    pos[i, LB - n:] = np.arange(n + LR)
    resp_mask[i, :length] = True
  size = cfg.vision.image_size
  images = np.repeat(rng.integers(0, 256, (P, 1, size, size, 3), dtype=np.uint8), G, axis=0)
  zeros = np.zeros(b, np.float32)
  task_ids = rng.integers(0, 6, b).astype(np.int32)
  mb = RolloutBatch(
      sequence_tokens=seq, sequence_positions=pos, sequence_mask=mask,
      prefix_mask=mask & (np.arange(LB + LR) < LB), tokens=seq[:, LB:], response_mask=resp_mask,
      old_logprobs=np.where(resp_mask, -7.0, 0.0).astype(np.float32),
      entropies=np.zeros((b, LR), np.float32), lengths=resp_mask.sum(1).astype(np.int32),
      images=images, task_ids=task_ids, task_keys=task_ids, reward=zeros, accuracy=zeros,
      format=zeros, structure=zeros, length_reward=zeros,
      advantages=rng.standard_normal(b).astype(np.float32), valid=np.ones(b, bool),
      response_start=LB)
  return graphdef, params, jax.tree.map(sharder.put_batch, mb), sharder


def test_shared_prompt_forward_equals_per_row_forward(setup):
  graphdef, params, mb, _ = setup
  cfg = SamplerConfig(max_new_tokens=LR)
  # Jitted: op by op, each of the forward's hundreds of ops would dispatch over 8 devices.
  logprobs = jax.jit(lambda p, g: rl.policy_logprobs(p, graphdef, mb, cfg, g), static_argnums=1)
  per_row, shared = logprobs(params, 1), logprobs(params, G)
  for a, b in zip(per_row, shared):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0)
  weights = np.random.default_rng(1).standard_normal(mb.tokens.shape).astype(np.float32)
  objective = lambda p, g: jnp.sum(rl.policy_logprobs(p, graphdef, mb, cfg, g)[0] * weights)
  grad = jax.jit(jax.grad(objective), static_argnums=1)
  want, got = grad(params, 1), grad(params, G)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4,
                                                       rtol=1e-4), want, got)


def test_micro_batches_accumulate_to_the_full_batch(setup):
  graphdef, params, mb, sharder = setup
  # Plain SGD: the parameter change is the gradient itself (Adam would rescale float noise).
  tx = optax.sgd(1.0)
  results = []
  for num_micro in (1, P):
    state, shardings = create_train_state(jax.tree.map(jnp.copy, params), tx, sharder)
    update = rl.make_update(graphdef, tx, state_shardings=shardings,
                            sampler_config=SamplerConfig(max_new_tokens=LR),
                            loss_config=losses.PolicyLossConfig(), num_micro=num_micro,
                            entropy=None, group_size=G)
    state, metrics = update(state, mb)
    results.append((state, metrics))
  (s1, m1), (s3, m3) = results
  np.testing.assert_allclose(m3["policy_loss"], m1["policy_loss"], rtol=1e-5)
  np.testing.assert_allclose(m3["grad_norm"], m1["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5,
                                                       rtol=1e-4), s1.params, s3.params)


def test_task_gradient_norms_are_each_tasks_rows_alone(setup):
  """`rl.make_task_gradient_norms` (micro-batched, shared prompt forward) against a direct
  per-task gradient: one forward per row over the whole minibatch, the loss numerator over task
  τ's tokens only, over the minibatch's full denominator. The per-task gradients add up to the
  update's policy gradient (its `grad_norm`), so every row is in exactly one task."""
  graphdef, params, mb, sharder = setup
  sampler_config, cfg = SamplerConfig(max_new_tokens=LR), losses.PolicyLossConfig()
  got = np.asarray(rl.make_task_gradient_norms(
      graphdef, sampler_config=sampler_config, loss_config=cfg, num_micro=P, num_tasks=6,
      group_size=G)(params, mb))

  denominator = losses.policy_loss(*(jnp.zeros(mb.tokens.shape),) * 2, jnp.zeros(P * G),
                                   mb.response_mask, cfg).denominator
  def task_loss(p, t):
    logp, _ = rl.policy_logprobs(p, graphdef, mb, sampler_config)
    adv = jnp.where(mb.task_ids == t, mb.advantages, 0.0)
    return losses.policy_loss(logp, mb.old_logprobs, adv, mb.response_mask, cfg).numerator / (
        denominator)
  grad = jax.jit(jax.grad(task_loss))
  per_task = [grad(params, t) for t in range(6)]
  # Jitted: eager ops over 8 fake devices each rendezvous (and can time out on a loaded host).
  norm = jax.jit(optax.global_norm)
  want = np.asarray([float(norm(g)) for g in per_task])
  present = np.isin(np.arange(6), np.asarray(mb.task_ids))
  assert present.sum() >= 4 and (want[present] > 0).all() and (want[~present] == 0).all()
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)

  total = jax.jit(lambda gs: jax.tree.map(lambda *g: sum(g), *gs))(per_task)
  state, shardings = create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(0.0), sharder)
  update = rl.make_update(graphdef, optax.sgd(0.0), state_shardings=shardings,
                          sampler_config=sampler_config, loss_config=cfg, num_micro=P,
                          entropy=None, group_size=G)
  _, metrics = update(state, mb)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm(total)),
                             rtol=2e-4)
