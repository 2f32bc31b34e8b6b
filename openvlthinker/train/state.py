"""Train state (params, optimizer state, step, rng) and the one update rule every stage shares.

Parameters live in an `nnx.State` split from the model; the graph definition stays outside jit as
static data. The update clips by global norm and skips a step whose gradient norm is not finite
(parameters and optimizer state unchanged, the skip counted), as REFERENCE §4 asks.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32[]
  params: Any              # nnx.State of the model's parameters
  opt_state: Any
  rng: jax.Array           # uint32[2] raw key data (checkpointable as a plain array)
  skipped: jax.Array       # int32[]: updates skipped for a non-finite gradient norm
  extra: Any = None        # e.g. shaping statistics; a pytree of arrays


def make_optimizer(learning_rate: float, *, b1: float = 0.9, b2: float = 0.999,
                   weight_decay: float = 0.0, grad_clip: float = 1.0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with decay on matrices only (not norms or biases), after global-norm clipping."""
  lr = (optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps
        else learning_rate)
  if warmup_steps:
    lr = optax.join_schedules([lr, optax.constant_schedule(learning_rate)], [warmup_steps])
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = [optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)]
  if grad_clip and grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*chain)


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int,
                       extra: Any = None) -> TrainState:
  """Optimizer state is created by a jitted init, so it inherits the parameters' shardings."""
  opt_state = jax.jit(tx.init)(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.random.key_data(jax.random.key(seed)),
                    skipped=jnp.zeros((), jnp.int32), extra=extra)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update; skipped (state unchanged but step and counter) when ‖g‖ is not finite."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  # Zeroed gradients keep NaN out of the optimizer maths; the `where` below discards the result.
  safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt = tx.update(safe, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                        opt_state=keep(new_opt, state.opt_state),
                        skipped=state.skipped + (~finite).astype(jnp.int32))
  return state, {"grad_norm": grad_norm, "skipped_step": (~finite).astype(jnp.float32),
                 "param_norm": optax.global_norm(state.params)}
