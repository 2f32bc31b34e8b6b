"""The G²RPO update: recompute log-probs under the current policy, dual-clip PPO loss, entropy
shaping, exact gradient accumulation over micro-batches (rows padded to the longest response, or
packed token rows, `train.packing`), one optimizer step per minibatch.

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
from openvlthinker import sampling
from openvlthinker.rl import losses, shaping
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.packing import PackedMicros
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


def packed_logprobs(params, graphdef: nnx.GraphDef, pm: PackedMicros, sampler_config
                    ) -> tuple[jax.Array, jax.Array]:
  """`policy_logprobs` of one packed micro-batch (`train.packing`): float32[S, Lr] each, over its
  response table. One forward over the R packed rows; column r·T + t's prediction is scored
  against its target, then gathered to the table by `pm.source`."""
  model = nnx.merge(graphdef, params)
  logits, _ = model(pm.tokens, pm.positions, pm.images, input_mask=pm.input_mask,
                    prefix_mask=pm.prefix_mask, packing=pm.layout)
  dist = sampling.candidates(logits, sampler_config)
  table = lambda x: jnp.where(pm.response_mask, x.reshape(-1)[pm.source], 0.0)
  return table(sampling.log_prob_of(dist, pm.targets)), table(sampling.entropy(dist))


def packed_reference_logprobs(params, graphdef: nnx.GraphDef, pk: PackedMicros, sampler_config
                              ) -> jax.Array:
  """float32[M, S, Lr]: `packed_logprobs` of every micro-batch in use (zeros in the rest), under
  `params` (the reference policy of the KL term)."""
  body = lambda i, out: out.at[i].set(packed_logprobs(params, graphdef, pk.micro(i),
                                                      sampler_config)[0])
  return jax.lax.fori_loop(0, pk.num_micro, body, jnp.zeros(pk.old_logprobs.shape, jnp.float32))


def _denominator(response_mask, loss_config: losses.PolicyLossConfig):
  """The optimizer minibatch's loss denominator, from its response masks alone (no forward)."""
  zeros = jnp.zeros(response_mask.shape, jnp.float32)
  return losses.policy_loss(zeros, zeros, zeros[:, 0], response_mask,
                            dataclasses.replace(loss_config, kl_coef=0.0)).denominator


def _accumulate(grad_fn, params, mb, loss_config, num_micro: int, packed: bool):
  """Σ over the minibatch's micro-batches of `grad_fn(params, micro, denominator, count)` →
  (gradient, Σ numerator, accumulated metrics, denominator, micro-batch count): exact gradient
  accumulation, the one loop both the update and the per-task gradients run."""
  if packed:
    micros, count = mb, mb.num_micro
    denominator = _denominator(mb.response_mask.reshape((-1,) + mb.response_mask.shape[2:]),
                               loss_config)
    one = lambda i: micros.micro(i)
  else:
    micros, count = jax.tree.map(
        lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]), mb), num_micro
    denominator = _denominator(mb.response_mask, loss_config)
    one = lambda i: jax.tree.map(lambda x: x[i], micros)

  def body(i, carry):
    grads, numerator, metrics = carry
    g, (num, met) = grad_fn(params, one(i), denominator, count)
    return (jax.tree.map(jnp.add, grads, g), numerator + num,
            losses.accumulate_metrics(metrics, met))

  # Start from the identity of each reduction, so the gradient is traced once (in the loop).
  met_shapes = jax.eval_shape(lambda: grad_fn(params, one(0), denominator, count)[1][1])
  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
          losses.metrics_identity(met_shapes))
  # A static count (the padded split) lowers to a scan; a traced one (packing) to a while loop
  # that runs only the micro-batches in use.
  grads, numerator, metrics = jax.lax.fori_loop(0, count, body, init)
  return grads, numerator, metrics, denominator, count


def make_task_gradient_norms(graphdef: nnx.GraphDef, *, sampler_config,
                             loss_config: losses.PolicyLossConfig, num_micro: int,
                             num_tasks: int, group_size: int = 1, packed: bool = False):
  """(params, minibatch) → float32[num_tasks]: ‖g_τ‖, the norm of the policy-gradient term of
  task τ's rows alone, g_τ = ∇ Σ_{tokens of τ} numerator / D, with the update's minibatch
  denominator D, so Σ_τ g_τ is the update's policy gradient (no KL, no entropy term). Other rows
  enter with advantage 0, which zeroes their term in every registered loss. What G²RPO claims to
  balance across tasks; one full gradient per task (a `lax.map`, so one compile)."""
  loss_config = dataclasses.replace(loss_config, kl_coef=0.0)
  if packed:
    logprobs_fn = lambda params, m: packed_logprobs(params, graphdef, m, sampler_config)
  else:
    logprobs_fn = lambda params, m: policy_logprobs(params, graphdef, m, sampler_config,
                                                    group_size)

  def micro_loss(params, m, denominator, count):
    del count
    logp, _ = logprobs_fn(params, m)
    pl = losses.policy_loss(logp, m.old_logprobs, m.advantages, m.response_mask, loss_config)
    return pl.numerator / jnp.maximum(denominator, 1e-30), (pl.numerator, {})

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def norms(params, mb):
    def one_task(t):
      only = mb.replace(advantages=jnp.where(mb.task_ids == t, mb.advantages, 0.0))
      grads = _accumulate(grad_fn, params, only, loss_config, num_micro, packed)[0]
      return optax.global_norm(grads)
    return jax.lax.map(one_task, jnp.arange(num_tasks))

  return jax.jit(norms)


def make_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, state_shardings,
                sampler_config, loss_config: losses.PolicyLossConfig, num_micro: int,
                entropy: shaping.EntropyShapingConfig | None, nan_at_step: int = -1,
                group_size: int = 1, packed: bool = False):
  """(TrainState, minibatch) → (TrainState, metrics), jitted with the state donated and returned
  on `state_shardings` (`state.train_state_shardings`: left to XLA, the layout drifts and the
  next update and rollout compile again); one compile per batch shape and `response_start`.

  The minibatch is a `RolloutBatch` split into `num_micro` micro-batches of equal rows, or, with
  `packed`, `PackedMicros` (`train.packing`), whose `num_micro` (a traced count) micro-batches
  run. Both give the same loss and gradient: Σ numerator / D over the same tokens.

  `nan_at_step` is a test hook: the loss of that optimizer step is multiplied by NaN, so the
  non-finite-gradient skip can be exercised end to end. `group_size` > 1 shares each prompt's
  forward among its responses (`policy_logprobs`); micro-batches must then hold whole groups.
  """
  if packed:
    logprobs_fn = lambda params, m: packed_logprobs(params, graphdef, m, sampler_config)
  else:
    logprobs_fn = lambda params, m: policy_logprobs(params, graphdef, m, sampler_config,
                                                    group_size)

  def micro_loss(params, m, denominator, count):
    logp, exact_entropy = logprobs_fn(params, m)
    mask = m.response_mask
    ref = m.ref_logprobs if loss_config.kl_coef > 0 else None
    pl = losses.policy_loss(logp, m.old_logprobs, m.advantages, mask, loss_config,
                            ref_logp=ref, task_ids=m.task_ids)
    loss = pl.numerator / jnp.maximum(denominator, 1e-30)
    metrics = dict(pl.metrics)
    if entropy is not None and entropy.enabled:
      token_entropy = (exact_entropy if entropy.estimator == "exact"
                       else shaping.sampled_token_entropy(logp))
      ent_loss, _, _ = shaping.entropy_penalty(token_entropy, mask, m.task_ids,
                                               *entropy.bounds())
      loss = loss + entropy.coef * ent_loss / count
      metrics["entropy_loss_sum"] = ent_loss
    return loss, (pl.numerator, metrics)

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def update(state: TrainState, mb):
    grads, numerator, metrics, denominator, count = _accumulate(grad_fn, state.params, mb,
                                                                 loss_config, num_micro, packed)
    poison = jnp.where(state.step == nan_at_step, jnp.nan, 1.0)
    grads = jax.tree.map(lambda g: g * poison, grads)
    state, update_metrics = apply_gradients(state, grads, tx)
    out = losses.finalize_metrics(metrics)
    out["policy_loss"] = losses.loss_value(numerator, denominator) * poison
    if "entropy_loss_sum" in metrics:
      out["entropy_loss"] = metrics["entropy_loss_sum"] / count
    return state, {**out, **update_metrics}

  return jax.jit(update, out_shardings=(state_shardings, None), donate_argnums=0)
