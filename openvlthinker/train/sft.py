"""Cold-start SFT: cross-entropy on the response tokens of the suite's reasoning traces.

Batches come from `data.pipeline.sft_dataset` (each process reads its data shards' rows of the
global batch, `data/shards.py`): `loss_mask[b, t]` marks target positions, so the logits at t - 1
are scored against tokens[t] there. The loss is a token mean over the global batch.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from openvlthinker import multihost
from openvlthinker.data import pipeline
from openvlthinker.train import loop
from openvlthinker.train.state import (TrainState, apply_gradients, create_train_state,
                                       make_optimizer)


def prefix_mask_of(input_mask: jax.Array, target_mask: jax.Array) -> jax.Array:
  """bool[B, L]: the real tokens before the first target (image + prompt)."""
  return input_mask & (jnp.cumsum(target_mask, axis=1) == 0)


def target_losses(params, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]):
  """(ce float32[B, L - 1], mask float32[B, L - 1], logits [B, L, V]): each position's
  cross-entropy against the next token, and 1 where that token is a target."""
  model = nnx.merge(graphdef, params)
  tokens, input_mask, target = batch["tokens"], batch["input_mask"], batch["loss_mask"]
  # The model's own positions (1-D, or M-RoPE's over the image tokens): right-padded rows are
  # prompts as far as positions go.
  positions, _ = model.prompt_positions(tokens, input_mask)
  logits, _ = model(tokens, positions, batch["images"], input_mask=input_mask,
                    prefix_mask=prefix_mask_of(input_mask, target))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  return ce, target[:, 1:].astype(jnp.float32), logits


def sft_loss(params, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]):
  """Token-mean cross-entropy on the targets; returns (loss, metrics)."""
  ce, mask, logits = target_losses(params, graphdef, batch)
  count = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / count
  correct = (jnp.argmax(logits[:, :-1], -1) == batch["tokens"][:, 1:]).astype(jnp.float32)
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


def sft_optimizer(sft) -> optax.GradientTransformation:
  """AdamW of the `config.sft` section; `sft.decay='cosine'` anneals the learning rate to
  `sft.end_lr_ratio` of its peak over the steps after warm-up."""
  decay_steps = max(sft.steps - sft.warmup_steps, 0) if sft.decay == "cosine" else 0
  return make_optimizer(sft.learning_rate, weight_decay=sft.weight_decay, grad_clip=sft.grad_clip,
                        warmup_steps=sft.warmup_steps, decay_steps=decay_steps,
                        end_lr_ratio=sft.end_lr_ratio)


def run_sft(ctx, metrics_writer) -> Any:
  """Runs (or resumes, or skips when finished) the SFT stage; returns the final parameters."""
  c = ctx.config
  tx = sft_optimizer(c.sft)
  if c.sft.steps == 0:
    return ctx.initial_params
  state, state_shardings = create_train_state(ctx.initial_params, tx, ctx.sharder)
  data_iter = ctx.sft_batches()  # this process's rows of each global batch
  compiled = {}

  def sft_step(state, step):
    del step
    batch = next(data_iter)
    device_batch = {k: ctx.sharder.put_batch(batch[k]) for k in pipeline.SFT_DEVICE_KEYS}
    if "fn" not in compiled:  # Batches have one shape: one compile.
      compiled["fn"] = make_sft_step(ctx.graphdef, tx, state_shardings,
                                     jax.tree.map(lambda x: x.sharding, device_batch))
    state, metrics = compiled["fn"](state, device_batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["records_dropped"] = int(multihost.concat(batch["num_dropped"][None]).sum())
    return state, metrics

  state = loop.run_stage(
      "sft", c.sft.steps, state, sft_step, data_iter,
      loop.StageCheckpoints(ctx.workdir, "sft", c.checkpoint.keep), metrics_writer,
      checkpoint_every=c.checkpoint.every, progress_bar=c.progress_bar,
      postfix=("loss", "token_accuracy"))
  return state.params
