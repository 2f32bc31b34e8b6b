"""The update rule every stage shares (`state.apply_gradients`, `state.make_optimizer`) against a
float64 numpy AdamW: a non-finite step leaves parameters and optimizer state bit for bit as they
were (and later steps as if it never happened); warmup scales the first updates linearly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvlthinker.train.state import TrainState, apply_gradients, make_optimizer

B1, B2, EPS = 0.9, 0.999, 1e-8


def params0():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}


def grads_at(t):
  rng = np.random.default_rng(100 + t)
  return {"w": jnp.asarray(rng.standard_normal((3, 4)) * (1 + t), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(4) * (1 + t), jnp.float32)}


def numpy_adamw(params, grad_seq, lr_at, weight_decay, grad_clip, b1=B1, b2=B2):
  """Parameters after each step: clip by global norm, Adam with bias correction, decoupled decay
  on matrices only, all scaled by the step's learning rate."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for count, g in enumerate(grad_seq):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
    if grad_clip and norm > grad_clip:
      g = {k: x * grad_clip / norm for k, x in g.items()}
    lr = lr_at(count)
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      mhat, vhat = m[k] / (1 - b1 ** (count + 1)), v[k] / (1 - b2 ** (count + 1))
      decay = weight_decay * p[k] if p[k].ndim >= 2 else 0.0
      p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + EPS) + decay)
    out.append({k: x.copy() for k, x in p.items()})
  return out


def fresh_state(tx):
  params = params0()
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    skipped=jnp.zeros((), jnp.int32))


def bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_step_leaves_params_and_optimizer_state_untouched(bad):
  tx = make_optimizer(1e-2, weight_decay=0.1, grad_clip=1.0)
  step = jax.jit(lambda s, g: apply_gradients(s, g, tx))
  state, _ = step(fresh_state(tx), grads_at(0))  # moments are non-zero from here on
  before = jax.device_get(state)
  poisoned = grads_at(1)
  poisoned["b"] = poisoned["b"].at[2].set(bad)
  state, metrics = step(state, poisoned)
  assert bits(state.params) == bits(before.params)
  assert bits(state.opt_state) == bits(before.opt_state)
  assert int(state.step) == 2 and int(state.skipped) == 1
  # The same dtypes in and out: a state that changed dtype would recompile the next step.
  assert [x.dtype for x in jax.tree.leaves(state)] == [x.dtype
                                                       for x in jax.tree.leaves(fresh_state(tx))]
  assert metrics["skipped_step"] == 1.0 and not np.isfinite(metrics["grad_norm"])
  # The next finite step continues as if the skipped one never happened.
  state, metrics = step(state, grads_at(2))
  assert int(state.step) == 3 and int(state.skipped) == 1 and metrics["skipped_step"] == 0.0
  want = numpy_adamw(params0(), [grads_at(0), grads_at(2)], lambda c: 1e-2, 0.1, 1.0)[-1]
  for k in want:
    np.testing.assert_allclose(state.params[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_decay, grad_clip", [(0.0, 0.0), (0.1, 1.0)])
def test_warmup_scales_the_first_updates_linearly(weight_decay, grad_clip):
  lr, k, steps = 0.05, 4, 7
  tx = make_optimizer(lr, weight_decay=weight_decay, grad_clip=grad_clip, warmup_steps=k)
  step = jax.jit(lambda s, g: apply_gradients(s, g, tx))
  grad_seq = [grads_at(t) for t in range(steps)]
  # optax's convention: the t-th update (from 0) uses the schedule at t, so update 0 is zero.
  want = numpy_adamw(params0(), grad_seq, lambda c: lr * min(c / k, 1.0), weight_decay, grad_clip)
  state = fresh_state(tx)
  previous = params0()
  for t in range(steps):
    state, _ = step(state, grad_seq[t])
    for name in want[t]:
      np.testing.assert_allclose(state.params[name], want[t][name], rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {t} {name}")
    moved = max(np.abs(np.asarray(state.params[n]) - np.asarray(previous[n])).max()
                for n in previous)
    if t == 0:
      assert moved == 0.0
    else:
      assert moved > 0.1 * lr * min(t / k, 1.0)
    previous = jax.device_get(state.params)
  # The test has teeth: without warmup the first update alone moves every parameter.
  no_warmup = numpy_adamw(params0(), grad_seq[:1], lambda c: lr, weight_decay, grad_clip)[0]
  assert np.abs(no_warmup["b"] - np.asarray(params0()["b"])).min() > 0.5 * lr


def test_cosine_decay_anneals_to_the_floor_after_warmup():
  """Warm-up over k updates, a cosine from lr to end_lr_ratio·lr over the next d, then the floor;
  the parameters follow numpy's AdamW under that schedule."""
  lr, k, d, ratio, steps = 0.05, 2, 4, 0.1, 9
  tx = make_optimizer(lr, weight_decay=0.1, warmup_steps=k, decay_steps=d, end_lr_ratio=ratio)

  def schedule(c):
    if c < k:
      return lr * c / k
    frac = min(c - k, d) / d
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + np.cos(np.pi * frac)))

  assert [round(schedule(c) / lr, 4) for c in range(8)] == [
      0.0, 0.5, 1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]
  grad_seq = [grads_at(t) for t in range(steps)]
  want = numpy_adamw(params0(), grad_seq, schedule, 0.1, 1.0)
  step = jax.jit(lambda s, g: apply_gradients(s, g, tx))
  state = fresh_state(tx)
  for t in range(steps):
    state, _ = step(state, grad_seq[t])
    for name in want[t]:
      np.testing.assert_allclose(state.params[name], want[t][name], rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {t} {name}")
  # The test has teeth: a constant rate after warm-up ends elsewhere.
  constant = numpy_adamw(params0(), grad_seq, lambda c: lr * min(c / k, 1.0), 0.1, 1.0)[-1]
  assert np.abs(constant["b"] - want[-1]["b"]).max() > 0.05 * lr


def test_sft_decay_cosine_spans_the_steps_after_warmup():
  import ml_collections
  from openvlthinker.train.sft import sft_optimizer
  sft = ml_collections.ConfigDict(dict(steps=10, learning_rate=0.05, warmup_steps=2,
                                       weight_decay=0.0, grad_clip=0.0, decay="cosine",
                                       end_lr_ratio=0.0))
  grad_seq = [grads_at(t) for t in range(11)]
  schedule = lambda c: 0.05 * (c / 2 if c < 2 else 0.5 * (1 + np.cos(np.pi * min(c - 2, 8) / 8)))
  want = numpy_adamw(params0(), grad_seq, schedule, 0.0, 0.0)[-1]
  tx = sft_optimizer(sft)
  state = fresh_state(tx)
  step = jax.jit(lambda s, g: apply_gradients(s, g, tx))
  for g in grad_seq:
    state, _ = step(state, g)
  for name in want:
    np.testing.assert_allclose(state.params[name], want[name], rtol=1e-5, atol=1e-6)


def test_gradients_are_clipped_to_norm_1_by_default():
  """The public code's default (grad_clip 1.0): a gradient of norm 10 moves Adam's first step as
  the clipped gradient does."""
  lr = 0.05
  tx = make_optimizer(lr)
  big = jax.tree.map(lambda g: g * 10.0, grads_at(0))
  state, metrics = jax.jit(lambda s, g: apply_gradients(s, g, tx))(fresh_state(tx), big)
  want = numpy_adamw(params0(), [big], lambda c: lr, 0.0, 1.0)[-1]
  for name in want:
    np.testing.assert_allclose(state.params[name], want[name], rtol=1e-5, atol=1e-6)
  # Adam's first step is sign-like, so show the clip through the optimizer state: m = 0.1 · g/‖g‖.
  norm = np.sqrt(sum(float((np.asarray(g) ** 2).sum()) for g in jax.tree.leaves(big)))
  assert norm > 10 and metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
  mu = jax.tree.leaves(state.opt_state)
  first = [x for x in mu if x.shape == (4,)][0]
  np.testing.assert_allclose(first, 0.1 * np.asarray(big["b"]) / norm, rtol=1e-5)


def test_the_optimizer_uses_its_betas():
  b1, b2, lr = 0.5, 0.9, 0.05
  tx = make_optimizer(lr, b1=b1, b2=b2, weight_decay=0.1, grad_clip=0.0)
  step = jax.jit(lambda s, g: apply_gradients(s, g, tx))
  grad_seq = [grads_at(t) for t in range(3)]
  want = numpy_adamw(params0(), grad_seq, lambda c: lr, 0.1, 0.0, b1=b1, b2=b2)[-1]
  state = fresh_state(tx)
  for g in grad_seq:
    state, _ = step(state, g)
  for name in want:
    np.testing.assert_allclose(state.params[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0), "learning_rate: expected a finite number > 0, got 0.0"),
    (dict(learning_rate=float("nan")), "learning_rate: expected a finite number > 0, got nan"),
    (dict(learning_rate=1e-3, b1=-0.1), "b1: expected a number in [0, 1), got -0.1"),
    (dict(learning_rate=1e-3, b2=1.0), "b2: expected a number in [0, 1), got 1.0"),
    (dict(learning_rate=1e-3, weight_decay=-0.1), "weight_decay: expected a finite number >= 0"),
    (dict(learning_rate=1e-3, grad_clip=-1.0),
     "grad_clip: expected a finite number >= 0 (0 = off), got -1.0"),
    (dict(learning_rate=1e-3, warmup_steps=2.5), "warmup_steps: expected an integer >= 0"),
    (dict(learning_rate=1e-3, decay_steps=-1), "decay_steps: expected an integer >= 0, got -1"),
    (dict(learning_rate=1e-3, end_lr_ratio=1.5), "end_lr_ratio: expected a number in [0, 1]"),
])
def test_a_bad_optimizer_argument_is_named(kwargs, message):
  with pytest.raises(ValueError) as e:
    make_optimizer(**kwargs)
  assert str(e.value).startswith(message)


def test_a_fresh_state_lives_on_the_mesh_extra_statistics_included():
  """The 8-device start-up: params sharded by their rules, the step, the skip count and the
  shaping statistics (`extra`, made on the host) replicated on the mesh, not left on device 0."""
  from openvlthinker.sharding import Sharder, make_mesh
  from openvlthinker.train.state import create_train_state
  from flax import nnx
  sharder = Sharder(make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
  model = nnx.Dict(w=nnx.Param(jnp.ones((8, 4)), logical_axes=("embed", None)))
  params = nnx.state(model, nnx.Param)
  extra = {"length_hist": np.zeros((6, 4), np.float32)}
  state, shardings = create_train_state(params, make_optimizer(1e-3), sharder, extra=extra)
  for leaf in (state.step, state.skipped, state.extra["length_hist"]):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  # The shardings the trainer pins and restores checkpoints with: one NamedSharding on the mesh
  # per leaf, the state's own.
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))
  for leaf, pinned in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert isinstance(pinned, jax.sharding.NamedSharding) and pinned.mesh == sharder.mesh
    assert leaf.sharding.is_equivalent_to(pinned, leaf.ndim)
  assert not jax.tree.leaves(state.params)[0].sharding.is_fully_replicated


def test_a_constant_rate_keeps_the_optimizer_state_of_earlier_checkpoints():
  """No warm-up and no decay: the state has no schedule count, as the checkpoints written before
  schedules were configurable (a new leaf would stop them restoring)."""
  leaves = jax.tree.leaves(make_optimizer(1e-3).init(params0()))
  with_schedule = jax.tree.leaves(make_optimizer(1e-3, decay_steps=5).init(params0()))
  assert len(with_schedule) == len(leaves) + 1
  assert all(x.shape == y.shape for x, y in zip(leaves, jax.tree.leaves(
      make_optimizer(1e-3, warmup_steps=0, decay_steps=0, end_lr_ratio=0.5).init(params0()))))
