"""A toy task RL must solve, through the step the trainer runs (`RLStage.step`: rollout with the
real sampler, the real scorer and the training reward, advantages, minibatch updates).

The policy is the built-in VLM at a tiny size with a 16-token vocabulary. A stub tokenizer decodes
a response as `<thinking>t</thinking><answer>{first token id}</answer>`, so the real scorer turns
the first token into a reward, with two topologies: task A (numerical, truth "4") rewards token 4
with accuracy 1 and every other token with 0; task B (regression, truth "9") grades tokens by their
distance to 9 (mean relative accuracy). Eight steps must raise p(4 | A prompt) and the
expected reward of A and B prompts (exact expectations over the policy's first-token
distribution, not sampled means) for every registered advantage estimator; the advantages each
minibatch trains on must equal a numpy reference of that estimator over the rollout's rewards,
with groups of G consecutive rows and the task of each row.
"""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from advantage_reference import REFERENCES, ref_q
from configs import test as test_config
from openvlthinker import configuration, taxonomy
from openvlthinker.models import registry
from openvlthinker.rl import advantages as advantages_lib
from openvlthinker.sampler import align_prompts
from openvlthinker.train.context import Context, make_sharder
from openvlthinker.train.rl_stage import RLStage

V = 16
PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
TASK_A = taxonomy.TASK_TYPES.index("general_vqa")
TASK_B = taxonomy.TASK_TYPES.index("spatial_reasoning")
X, TARGET_B = 4, 9  # the token task A rewards; the number task B's graded reward peaks at
P, G = 4, 8         # prompts per step (A, B, A, B) × responses each
STEPS = 8           # RL steps per estimator


class DigitTokenizer:
  """Decodes a response to a well-formed one whose answer is its first token's id."""
  pad_id, eos_id, bos_id, image_id, vocab_size = PAD, EOS, BOS, IMAGE, V
  stop_ids, placeholder_ids = (EOS,), (IMAGE,)

  def decode(self, ids):
    return f"<thinking>t</thinking><answer>{ids[0]}</answer>" if ids else ""


# Accuracy of each first token, from REFERENCE §2 directly (not from the scorer).
ACC_A = (np.arange(V) == X).astype(np.float64)
_REL = np.abs(np.arange(V) - TARGET_B) / (TARGET_B + 1e-8)
ACC_B = np.mean([_REL < 1 - theta for theta in np.arange(0.50, 0.951, 0.05)], axis=0)
# R = (1 - w_fmt)·a + w_fmt·f + s with f = 1 and s = 0.5: every decoded response is well formed.
reward_of = lambda acc: 0.9 * acc + 0.1 + 0.5


def prompt_batches(seed=0):
  """An endless stream of RL prompt batches (the host fields `rollout.collect` reads)."""
  rng = np.random.default_rng(seed)
  rows = [[BOS, IMAGE, 10, 12, 13], [BOS, IMAGE, 11], [BOS, IMAGE, 10], [BOS, IMAGE, 11, 14]]
  tokens = np.zeros((P, 8), np.int32)
  mask = np.zeros((P, 8), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  while True:
    yield {
        "prompt_tokens": tokens, "prompt_mask": mask,
        "images": rng.integers(0, 256, (P, 1, 16, 16, 3), dtype=np.uint8),
        "task_ids": np.array([TASK_A, TASK_B] * (P // 2), np.int32),
        "answer": np.array([str(X), str(TARGET_B)] * (P // 2)),
        "problem_type": np.array(["numerical", "regression"] * (P // 2)),
        "options": np.array([(), ()] * (P // 2) + [None], object)[:-1],
        "num_dropped": np.int32(0),
    }


def toy_config(packed=False):
  c = test_config.get_config()
  c.rl.packing.enabled = packed
  # Untied embeddings: a tied tiny model mostly echoes the prompt's last token (p(X) ~ 1%).
  c.model.update(vocab_size=V, width=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                 mlp_dim=64, tie_embeddings=False)
  c.model.vision.update(image_size=16, patch_size=8, width=16, num_layers=1, num_heads=2,
                        mlp_dim=32)  # a 2x2 patch grid, merged: one <image> token
  c.data.prompt_buckets = (8, 16)
  c.rl.update(prompts_per_step=P, group_size=G, updates_per_rollout=2, micro_batch_size=8,
              learning_rate=1e-2, weight_decay=0.0)
  c.rl.sampler.max_new_tokens = 2
  c.rl.filter.enabled = False
  return configuration.validate(c)  # a config the trainer accepts


def build_stage(config, data_shards=None):
  """(RLStage, initial params) of the toy policy; `data_shards` a ShardLayout (default: one)."""
  sharder = make_sharder(config)
  model, info = registry.build(config.model, sharder, seed=0)
  graphdef, params = nnx.split(model)
  ctx = Context(config=config, workdir="", sharder=sharder, model=model, model_info=info,
                graphdef=graphdef, initial_params=params, tokenizer=DigitTokenizer(),
                **({} if data_shards is None else {"data_shards": data_shards}))
  return RLStage(ctx, metrics_writer=None), params


def make_toy(config):
  stage, params = build_stage(config)
  minibatches, rollouts = [], []
  update, advantages = stage.update, stage.advantages

  def recording_update(state, mb):  # what each optimizer step trains on, on the host
    minibatches.append(jax.device_get(mb))
    return update(state, mb)

  def recording_advantages(batch, rows=None):  # the rollout with its advantages
    rollouts.append(advantages(batch, rows))
    return rollouts[-1]

  stage.update, stage.advantages = recording_update, recording_advantages
  return stage, params, minibatches, rollouts


@pytest.fixture(scope="module")
def toy():
  return make_toy(toy_config())


@functools.partial(jax.jit, static_argnums=0)
def _first_token_probs(graphdef, params, tokens, mask, images):
  model = nnx.merge(graphdef, params)
  positions, _ = model.prompt_positions(tokens, mask)
  logits, _ = model(tokens, positions, images, input_mask=mask, prefix_mask=mask,
                    logits_from=tokens.shape[1] - 1)
  return jax.nn.softmax(logits[:, -1])


def first_token_probs(stage, params):
  """float64[P, V]: the policy's distribution of the first response token of each prompt, from a
  cache-free forward over the right-aligned prompts."""
  batch = next(prompt_batches())
  tokens, _, mask = align_prompts(batch["prompt_tokens"], batch["prompt_mask"], 8)
  return np.asarray(_first_token_probs(stage.ctx.graphdef, params, tokens, mask,
                                       batch["images"]), np.float64)


def expected_accuracy(probs):
  """(E[accuracy | A prompts] = p(X | A prompts), E[accuracy | B prompts])."""
  a, b = probs[0::2], probs[1::2]
  return (a @ ACC_A).mean(), (b @ ACC_B).mean()


# ---------------------------------------------------------------------------------------- tests


def test_references_cover_every_registered_estimator():
  assert set(advantages_lib.advantage_estimators()) <= set(REFERENCES), (
      "add a numpy reference for the new estimator to REFERENCES")


def test_reference_worked_examples():
  np.testing.assert_allclose(ref_q([0, 0, 0, 0, 1]), [-0.32, -0.32, -0.32, -0.32, 1.28], atol=5e-3)
  np.testing.assert_allclose(ref_q([0, 0, 1, 1, 1]), [-0.90, -0.90, 0.60, 0.60, 0.60], atol=5e-3)


@pytest.mark.parametrize("name", advantages_lib.advantage_estimators())
def test_rl_steps_solve_the_toy_task(toy, name):
  stage, params, minibatches, rollouts = toy
  stage.advantage_fn = jax.jit(advantages_lib.batch_estimator(name))
  state = stage.initial_state(params)
  before = expected_accuracy(first_token_probs(stage, params))
  data = prompt_batches(seed=1)
  sampled_reward = []
  for step in range(STEPS):
    minibatches.clear(), rollouts.clear()
    state, metrics = stage.step(state, data, step, params)
    assert int(state.step) == 2 * (step + 1) and int(state.skipped) == 0
    assert np.isfinite(metrics["policy_loss"]) and metrics["grad_norm"] > 0
    sampled_reward.append(metrics["reward/mean"])

    # The rows the updates trained on: the whole rollout, in order, in two minibatches.
    assert len(minibatches) == 2 and all(mb.size == P * G // 2 for mb in minibatches)
    rows = jax.tree.map(lambda *xs: np.concatenate(xs), *minibatches)
    (rollout,) = rollouts
    np.testing.assert_array_equal(rows.tokens, rollout.tokens)  # max_new_tokens 2: not trimmed
    np.testing.assert_array_equal(rows.advantages, rollout.advantages)
    np.testing.assert_array_equal(rows.task_ids, np.repeat([TASK_A, TASK_B] * (P // 2), G))
    np.testing.assert_array_equal(rows.task_keys, rows.task_ids)  # advantage_task_key=task_type
    assert rows.valid.all()
    # The reward of each row is the toy reward of its first token under its prompt's task.
    first = rows.tokens[:, 0]
    acc = np.where(rows.task_ids == TASK_A, ACC_A[first], ACC_B[first])
    np.testing.assert_allclose(rows.accuracy, acc, atol=1e-6)
    np.testing.assert_allclose(rows.reward, reward_of(acc), atol=1e-6)
    # The advantages trained on are the estimator's over the rollout: groups of G rows, by task.
    groups = np.arange(P * G) // G
    parts = ({"parts": np.stack([rows.accuracy, rows.format, rows.structure], 1),
              "lengths": rows.lengths} if advantages_lib.uses_reward_parts(name) else {})
    want = REFERENCES[name](rows.reward.astype(np.float64), groups, rows.task_keys, rows.valid,
                            **parts)
    np.testing.assert_allclose(rows.advantages, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.1  # the rollout had a learning signal

  after = expected_accuracy(first_token_probs(stage, state.params))
  (a_before, b_before), (a_after, b_after) = before, after
  # Measured (8 steps): p(X | A) 0.07 -> 0.25 (grpo) to 0.78; E[acc | B] 0.20 -> 0.93 to 0.97.
  assert a_after > 2 * a_before, (name, before, after)  # the rewarded answer's probability
  assert b_after > b_before + 0.3, (name, before, after)  # the graded task's expected accuracy
  # The expected training reward over both tasks, and the sampled one, rise.
  assert reward_of((a_after + b_after) / 2) > reward_of((a_before + b_before) / 2) + 0.2
  assert np.mean(sampled_reward[-3:]) > np.mean(sampled_reward[:3]) + 0.1, sampled_reward


def test_reference_logprobs_of_the_starting_policy_are_the_samplers(toy):
  """The KL term's reference log-probs (padded rows): for the parameters that sampled the rollout,
  the sampler's own log-probs of its tokens, under the same sampling rules (banned tokens)."""
  stage, params, minibatches, _ = toy
  minibatches.clear()
  stage.step(stage.initial_state(params), prompt_batches(seed=2), 0, params)
  mb = minibatches[0]  # the first update's rows: sampled by `params`, not yet updated
  ref = np.asarray(stage.reference_logprobs(params, stage.place(mb)))
  m = mb.response_mask
  assert m.any() and np.isfinite(ref[m]).all()
  np.testing.assert_allclose(ref[m], mb.old_logprobs[m], atol=2e-5)


def test_packed_rl_steps_solve_the_toy_task():
  """The trainer's step with `rl.packing` on (images in every prompt): each minibatch is packed
  (every rollout row with tokens in one table row exactly once) and G²RPO still solves the task,
  with a KL term to the reference model and entropy shaping on."""
  config = toy_config(packed=True)
  config.rl.task_balance_every = 4  # each task's gradient share on steps 0 and 4
  # A KL term to the reference model (its log-probs through the packed rows) and entropy
  # shaping, the options the trainer wires in besides the policy loss.
  config.rl.loss.kl_coef = 0.01
  config.rl.entropy.enabled = True
  stage, params, minibatches, rollouts = make_toy(config)
  state = stage.initial_state(params)
  before = expected_accuracy(first_token_probs(stage, params))
  data = prompt_batches(seed=1)
  kls = []
  for step in range(STEPS):
    minibatches.clear(), rollouts.clear()
    state, metrics = stage.step(state, data, step, params)
    assert np.isfinite(metrics["policy_loss"]) and metrics["grad_norm"] > 0
    assert np.isfinite(metrics["entropy_loss"]) and metrics["kl_ref"] >= 0
    kls.append(metrics["kl_ref"])
    shares = {k: v for k, v in metrics.items() if k.startswith("grad_share/")}
    if step % 4:
      assert not shares
    else:  # both tasks are in every minibatch, and both have a learning signal
      assert sorted(shares) == sorted(f"grad_share/{taxonomy.TASK_TYPES[t]}"
                                      for t in (TASK_A, TASK_B))
      assert sum(shares.values()) == pytest.approx(1.0) and min(shares.values()) > 0.01
    assert len(minibatches) == 2 and all(mb.images is not None for mb in minibatches)
    for u, mb in enumerate(minibatches):
      rows = np.sort(mb.rows[mb.rows >= 0])
      np.testing.assert_array_equal(rows, np.arange(P * G // 2))
      table = mb.advantages.reshape(-1)[mb.rows.reshape(-1) >= 0]
      order = mb.rows.reshape(-1)[mb.rows.reshape(-1) >= 0]
      want = rollouts[0].advantages[u * P * G // 2:(u + 1) * P * G // 2][order]
      np.testing.assert_array_equal(table, want)
  (a_before, b_before) = before
  a_after, b_after = expected_accuracy(first_token_probs(stage, state.params))
  assert a_after > 2 * a_before and b_after > b_before + 0.3, (before, (a_after, b_after))
  assert kls[-1] > 0  # the policy moved away from the reference
