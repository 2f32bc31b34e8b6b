"""Cold-start SFT: cross-entropy on the response tokens of the suite's reasoning traces.

Batches come from `data.pipeline.sft_dataset`: `loss_mask[b, t]` marks target positions, so the
logits at t - 1 are scored against tokens[t] there. The loss is a token mean over the batch.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from openvlthinker.train.state import TrainState, apply_gradients


def prefix_mask_of(input_mask: jax.Array, target_mask: jax.Array) -> jax.Array:
  """bool[B, L]: the real tokens before the first target (image + prompt)."""
  return input_mask & (jnp.cumsum(target_mask, axis=1) == 0)


def positions_of(input_mask: jax.Array) -> jax.Array:
  """int32[B, L]: 0, 1, … over the real tokens of each row (pads repeat the last position)."""
  return jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0).astype(jnp.int32)


def sft_loss(params, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]):
  """Token-mean cross-entropy on the targets; returns (loss, metrics)."""
  model = nnx.merge(graphdef, params)
  tokens, input_mask, target = batch["tokens"], batch["input_mask"], batch["loss_mask"]
  logits, _ = model(tokens, positions_of(input_mask), batch["images"], input_mask=input_mask,
                    prefix_mask=prefix_mask_of(input_mask, target))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  mask = target[:, 1:].astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / count
  correct = (jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]).astype(jnp.float32)
  return loss, {"loss": loss, "token_accuracy": (correct * mask).sum() / count,
                "target_tokens": mask.sum()}


def make_sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state_shardings,
                  batch_shardings) -> Any:
  """The jitted SFT update: (TrainState, batch) → (TrainState, metrics); the state is donated."""

  def step(state: TrainState, batch):
    grads, metrics = jax.grad(sft_loss, has_aux=True)(state.params, graphdef, batch)
    state, update_metrics = apply_gradients(state, grads, tx)
    return state, {**metrics, **update_metrics}

  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def run_sft(ctx, metrics_writer) -> Any:
  """Runs (or resumes, or skips when finished) the SFT stage; returns the final parameters."""
  from openvlthinker.data import pipeline  # pylint: disable=g-import-not-at-top
  from openvlthinker.sharding import batch_sharding
  from openvlthinker.train import loop
  from openvlthinker.train.state import create_train_state, make_optimizer

  c = ctx.config
  steps = c.sft.steps
  tx = make_optimizer(c.sft.learning_rate, weight_decay=c.sft.weight_decay,
                      grad_clip=c.sft.grad_clip, warmup_steps=c.sft.warmup_steps)
  state = create_train_state(ctx.initial_params, tx, c.seed)
  if steps == 0:
    return state.params
  ckpts = loop.StageCheckpoints(ctx.workdir, "sft", c.checkpoint.keep)
  data_iter = iter(pipeline.sft_dataset(ctx.data_config(c.data.batch_size), ctx.tokenizer))
  restored = ckpts.restore(state)
  if restored is not None:
    _, state, meta = restored
    data_iter.set_state(meta["data_iterator"])
  start = int(state.step)
  metrics_writer.truncate_after("sft", start)
  if start >= steps:
    return state.params

  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_keys = pipeline.SFT_DEVICE_KEYS
  shard = lambda b: {k: jax.device_put(b[k], batch_sharding(ctx.sharder, b[k].ndim, b[k].shape))
                     for k in batch_keys}
  step_fn = None
  preempt = loop.Preemption()
  bar = loop.progress(steps, start, "sft", c.progress_bar)
  try:
    for step in range(start, steps):
      batch = next(data_iter)
      device_batch = shard(batch)
      if step_fn is None:
        step_fn = make_sft_step(ctx.graphdef, tx, state_shardings,
                                jax.tree.map(lambda x: x.sharding, device_batch))
      state, metrics = step_fn(state, device_batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["records_dropped"] = int(batch["num_dropped"])
      metrics_writer.write("sft", step + 1, metrics)
      bar.update()
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_accuracy']:.3f}")
      done = step + 1 == steps
      if done or (step + 1) % c.checkpoint.every == 0 or preempt.requested:
        ckpts.save(step + 1, state, {"data_iterator": data_iter.get_state()})
      if preempt.requested and not done:
        raise loop.Preempted(f"SIGTERM: saved the SFT checkpoint at step {step + 1}")
  finally:
    bar.close()
    preempt.restore()
  return state.params
