"""Train state (params, optimizer state, step) and the one update rule every stage shares.

Parameters live in an `nnx.State` split from the model; the graph definition stays outside jit as
static data. Every leaf of the state has the sharding the rule table gives (`state_shardings`):
parameters by their logical axes, each optimizer moment like its parameter, scalars replicated on
the mesh; the state is created under jit with those out_shardings, so nothing sits on device 0.
The update clips by global norm and skips a step whose gradient norm is not finite (parameters and
optimizer state unchanged, the skip counted), as REFERENCE §4 asks.
"""
from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from openvlthinker import sharding
from openvlthinker.fields import check
from openvlthinker.sharding import Sharder


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32[]
  params: Any              # nnx.State of the model's parameters
  opt_state: Any
  skipped: jax.Array       # int32[]: updates skipped for a non-finite gradient norm
  extra: Any = None        # e.g. shaping statistics; a pytree of arrays


def make_optimizer(learning_rate: float, *, b1: float = 0.9, b2: float = 0.999,
                   weight_decay: float = 0.0, grad_clip: float = 1.0,
                   warmup_steps: int = 0, decay_steps: int = 0,
                   end_lr_ratio: float = 0.0) -> optax.GradientTransformation:
  """AdamW with decay on matrices only (not norms or biases), after global-norm clipping
  (`grad_clip=0` turns clipping off). The learning rate warms up linearly over `warmup_steps`,
  then stays constant (`decay_steps=0`) or follows a cosine from `learning_rate` down to
  `end_lr_ratio * learning_rate` over the next `decay_steps` and stays there. Raises FieldError
  naming a bad argument."""
  finite = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  check(finite(learning_rate) and learning_rate > 0, "learning_rate", "a finite number > 0",
        learning_rate)
  for name, beta in (("b1", b1), ("b2", b2)):
    check(finite(beta) and 0 <= beta < 1, name, "a number in [0, 1)", beta)
  check(finite(weight_decay) and weight_decay >= 0, "weight_decay", "a finite number >= 0",
        weight_decay)
  check(finite(grad_clip) and grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = off)",
        grad_clip)
  for name, steps in (("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
    check(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0, name,
          "an integer >= 0", steps)
  check(finite(end_lr_ratio) and 0 <= end_lr_ratio <= 1, "end_lr_ratio", "a number in [0, 1]",
        end_lr_ratio)
  # A constant rate stays a plain float: a schedule adds a step count to the optimizer state,
  # and checkpoints written without one (every RL run's) would no longer restore.
  lr = learning_rate
  if decay_steps:
    lr = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_ratio)
  if warmup_steps:
    after = lr if decay_steps else optax.constant_schedule(learning_rate)
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after],
                              [warmup_steps])
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = [optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)]
  if grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*chain)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


def state_shardings(abstract: TrainState, sharder: Sharder) -> TrainState:
  """The NamedSharding of every leaf of a (possibly abstract) TrainState, from the rule table.

  Parameters by their logical axes; an optimizer leaf whose path ends with a parameter's path (the
  moments of AdamW, also under optax.masked) like that parameter; everything else (step, counts,
  `extra` statistics) replicated on the mesh.
  """
  param_shardings = sharding.state_shardings(abstract.params, sharder)
  by_path = {_path_names(p): (s, x.shape) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(param_shardings))}
  replicated = sharder.replicated()

  def like_param(path, leaf):
    names = _path_names(path)
    for start in range(len(names)):
      found, shape = by_path.get(names[start:], (None, None))
      if found is not None and shape == leaf.shape:
        return found
    return replicated

  opt = jax.tree_util.tree_map_with_path(like_param, abstract.opt_state)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt, skipped=replicated,
                    extra=jax.tree.map(lambda _: replicated, abstract.extra))


def _init_fn(tx: optax.GradientTransformation):
  def init(params, extra):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32), extra=extra)
  return init


def train_state_shardings(params: Any, tx: optax.GradientTransformation, sharder: Sharder,
                          extra: Any = None) -> TrainState:
  """The shardings of the state `create_train_state` makes, without making it: what a jitted
  update pins as its out_shardings, so the state keeps the rule table's layout step after step."""
  return state_shardings(jax.eval_shape(_init_fn(tx), params, extra), sharder)


def create_train_state(params: Any, tx: optax.GradientTransformation, sharder: Sharder,
                       extra: Any = None) -> tuple[TrainState, TrainState]:
  """A fresh state and its shardings (see `state_shardings`), made by one jitted init."""
  shardings = train_state_shardings(params, tx, sharder, extra)
  return jax.jit(_init_fn(tx), out_shardings=shardings)(params, extra), shardings


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
