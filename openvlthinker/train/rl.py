"""The G²RPO update: recompute log-probs under the current policy, dual-clip PPO loss, entropy
shaping, exact gradient accumulation over micro-batches, one optimizer step per minibatch.

A minibatch holds whole prompt groups. Its loss is Σ numerator / D plus λ·L_ent: the denominator D
depends only on the response masks, so it is computed for the whole minibatch before the
micro-batch scan, and the accumulated gradient equals the full-minibatch gradient exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from openvlthinker import sampler as sampler_lib
from openvlthinker.rl import losses, shaping
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.state import TrainState, apply_gradients


def policy_logprobs(params, graphdef: nnx.GraphDef, mb: RolloutBatch, sampler_config,
                    group_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced log-probs and exact entropies float32[b, Lr] of the sampled responses.

  With group_size G > 1 the rows come in groups of G responses to one prompt (prompt-major), and
  each prompt is run once: its KV cache, computed with gradient, is the shared prefix of its G
  responses, which are then run over it. The result, and its gradient, equal the per-row forward over
  prompt + response, at about (Lb/G + Lr)/(Lb + Lr) of its cost.
  """
  model = nnx.merge(graphdef, params)
  lb = mb.response_start
  logprobs = lambda logits: sampler_lib.response_logprobs(logits, mb.tokens, mb.response_mask, lb,
                                                          sampler_config)
  if group_size == 1:
    logits, _ = model(mb.sequence_tokens, mb.sequence_positions, mb.images,
                      input_mask=mb.sequence_mask, prefix_mask=mb.prefix_mask,
                      logits_from=lb - 1)
    return logprobs(logits)
  g = group_size
  prompt = lambda x: jax.tree.map(lambda a: a[::g, :lb], x)
  response = lambda x: jax.tree.map(lambda a: a[:, lb:], x)
  b, lr = mb.tokens.shape
  prompt_logits, prompt_cache = model(
      prompt(mb.sequence_tokens), prompt(mb.sequence_positions),
      None if mb.images is None else mb.images[::g], model.init_cache(b // g, lb),
      input_mask=prompt(mb.sequence_mask), prefix_mask=prompt(mb.prefix_mask), logits_from=lb - 1)
  # The prompt's cache (with gradient) is the shared prefix of its G responses' cache, as in the
  # sampler: stored once per prompt, read once per prompt per layer.
  response_logits, _ = model(response(mb.sequence_tokens), response(mb.sequence_positions), None,
                             model.init_cache(b, lr, prefix=prompt_cache),
                             input_mask=response(mb.sequence_mask))
  # Columns lb - 1 … lb + Lr - 1 of the sequence: the prompt's last column predicts token 0.
  return logprobs(jnp.concatenate([jnp.repeat(prompt_logits, g, axis=0), response_logits], axis=1))


def make_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, state_shardings,
                sampler_config, loss_config: losses.PolicyLossConfig, num_micro: int,
                entropy: shaping.EntropyShapingConfig | None, nan_at_step: int = -1,
                group_size: int = 1):
  """(TrainState, RolloutBatch minibatch) → (TrainState, metrics), jitted with the state donated
  and returned on `state_shardings` (`state.train_state_shardings`: left to XLA, the layout drifts
  and the next update and rollout compile again); one compile per batch shape and
  `response_start`.

  `nan_at_step` is a test hook: the loss of that optimizer step is multiplied by NaN, so the
  non-finite-gradient skip can be exercised end to end. `group_size` > 1 shares each prompt's
  forward among its responses (`policy_logprobs`); micro-batches must then hold whole groups.
  """

  def micro_loss(params, mb: RolloutBatch, denominator):
    logp, exact_entropy = policy_logprobs(params, graphdef, mb, sampler_config, group_size)
    mask = mb.response_mask
    ref = mb.ref_logprobs if loss_config.kl_coef > 0 else None
    pl = losses.policy_loss(logp, mb.old_logprobs, mb.advantages, mask, loss_config,
                            ref_logp=ref, task_ids=mb.task_ids)
    loss = pl.numerator / jnp.maximum(denominator, 1e-30)
    metrics = dict(pl.metrics)
    if entropy is not None and entropy.enabled:
      token_entropy = (exact_entropy if entropy.estimator == "exact"
                       else shaping.sampled_token_entropy(logp))
      ent_loss, _, _ = shaping.entropy_penalty(token_entropy, mask, mb.task_ids,
                                               *entropy.bounds())
      loss = loss + entropy.coef * ent_loss / num_micro
      metrics["entropy_loss_sum"] = ent_loss
    return loss, (pl.numerator, metrics)

  def update(state: TrainState, mb: RolloutBatch):
    # Denominator of the whole minibatch from its masks alone (no forward needed).
    zeros = jnp.zeros(mb.old_logprobs.shape, jnp.float32)
    denominator = losses.policy_loss(zeros, zeros, zeros[:, 0], mb.response_mask,
                                     dataclasses.replace(loss_config, kl_coef=0.0)).denominator
    micro = jax.tree.map(lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]),
                         mb)
    grad_fn = jax.grad(micro_loss, has_aux=True)

    def body(carry, m):
      grads, numerator, metrics = carry
      g, (num, met) = grad_fn(state.params, m, denominator)
      return (jax.tree.map(jnp.add, grads, g), numerator + num,
              losses.accumulate_metrics(metrics, met)), None

    # Start from the identity of each reduction, so the gradient is traced once (in the scan).
    met_shapes = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro),
                                                denominator)[1][1])
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
            losses.metrics_identity(met_shapes))
    (grads, numerator, metrics), _ = jax.lax.scan(body, init, micro)
    poison = jnp.where(state.step == nan_at_step, jnp.nan, 1.0)
    grads = jax.tree.map(lambda g: g * poison, grads)
    state, update_metrics = apply_gradients(state, grads, tx)
    out = losses.finalize_metrics(metrics)
    out["policy_loss"] = losses.loss_value(numerator, denominator) * poison
    if "entropy_loss_sum" in metrics:
      out["entropy_loss"] = metrics["entropy_loss_sum"] / num_micro
    return state, {**out, **update_metrics}

  return jax.jit(update, out_shardings=(state_shardings, None), donate_argnums=0)
