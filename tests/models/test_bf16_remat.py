"""The pod settings (model.dtype="bfloat16" with float32 parameters, model.remat=True, layer scan,
full prefix attention) through the sampler and the RL update's teacher-forced forward: the
bf16 variants of tests/sampler/test_sampler.py's log-prob test and tests/train/test_rl_update.py's
shared-prompt test, and remat gradients against plain ones (float32, tight).

bf16 tolerances. bf16 keeps 8 significant bits: every rounding of an activation or a logit is off
by up to 2^-8 ≈ 0.4% of its value. The sampler (prefill + a cached decode step per token) and the
teacher-forced forward (one pass over the sequence, or a shared prompt cache) round at different
places, so the same log-prob, |log p| ≈ 6 here (a 1024-token vocabulary at init), comes out a few
roundings apart: a few × 2^-8 × 6 ≈ 0.02-0.05 (measured: max 0.016 bf16 vs bf16, 0.024 bf16 vs
float32 compute). Hence LOGP_ATOL = 0.06 per token, and a mean error bound of 0.01, which a
systematic error (a wrong column, a cast of the softmax to bf16, a lost mask) breaks at once: the
tests assert that the next column's log-probs are > 10× the tolerance away.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.models.vlm import VLM
from openvlthinker.sampler import Sampler, SamplerConfig
from openvlthinker.train import rl
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.context import make_sharder

P, G, LR = 4, 3, 8
LOGP_ATOL, LOGP_MEAN_ATOL = 0.06, 0.01
GRAD_RTOL = 10 * 2 ** -8
SAMPLER = SamplerConfig(max_new_tokens=LR, prompt_buckets=(16,))


def pod_like_config():
  c = test_config.get_config()
  c.model.update(dtype="bfloat16", param_dtype="float32", remat=True, scan_layers=True,
                 prefix_full_attention=True)
  c.model.vision.update(image_size=16, patch_size=8, width=16, num_layers=1, num_heads=2,
                        mlp_dim=32)
  return c


def variant(cfg, sharder, **text):
  """The graph of `cfg` with other decoder (and matching ViT) settings; the same parameters."""
  vision = cfg.vision
  if "dtype" in text:
    vision = dataclasses.replace(vision, dtype=text["dtype"])
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text), vision=vision)
  return nnx.split(nnx.eval_shape(lambda: VLM(cfg, sharder, rngs=nnx.Rngs(0))))[0]


@pytest.fixture(scope="module")
def setup():
  c = pod_like_config()
  sharder = make_sharder(c)
  cfg = vlm_config(c.model)
  graphdef, params = nnx.split(build_model(cfg, sharder, seed=0))
  assert params["decoder"]["embedding"].value.dtype == jnp.float32
  graphs = {"bf16_remat": graphdef,
            "f32_remat": variant(cfg, sharder, dtype="float32"),
            "f32": variant(cfg, sharder, dtype="float32", remat=False)}
  rng = np.random.default_rng(0)
  n = np.array([5, 9, 7, 12])
  tokens = np.zeros((P, 12), np.int32)
  mask = np.arange(12) < n[:, None]
  tokens[mask] = rng.integers(10, cfg.text.vocab_size, mask.sum())
  tokens[:, 0], tokens[:, 1] = 1, cfg.image_token_id
  images = rng.integers(0, 256, (P, 1, 16, 16, 3), dtype=np.uint8)
  out = jax.device_get(Sampler(graphdef, SAMPLER, sharder)(params, tokens, mask, images,
                                                           jax.random.key(0), group_size=G))
  b = P * G
  z = np.zeros(b, np.float32)
  zi = np.zeros(b, np.int32)
  mb = RolloutBatch(
      sequence_tokens=out.sequence_tokens, sequence_positions=out.sequence_positions,
      sequence_mask=out.sequence_mask, prefix_mask=out.prefix_mask, tokens=out.tokens,
      old_logprobs=out.logprobs, entropies=out.entropies, response_mask=out.response_mask,
      lengths=out.lengths, images=np.repeat(images, G, axis=0), task_ids=zi, task_keys=zi,
      reward=z, accuracy=z, format=z, structure=z, length_reward=z, advantages=z,
      valid=np.ones(b, bool), response_start=out.response_start)
  return graphs, params, out, jax.tree.map(sharder.put_batch, mb)


logprobs_fn = jax.jit(rl.policy_logprobs, static_argnums=(1, 3, 4))


def weighted_logprob_grad(params, graphdef, mb, group_size, weights):
  def objective(p):
    return jnp.sum(rl.policy_logprobs(p, graphdef, mb, SAMPLER, group_size)[0] * weights)
  return jax.grad(objective)(params)


grad_fn = jax.jit(weighted_logprob_grad, static_argnums=(1, 3))


def close_logprobs(got, want, mask):
  err = np.abs(np.asarray(got) - np.asarray(want))[mask]
  assert err.max() <= LOGP_ATOL and err.mean() <= LOGP_MEAN_ATOL, (err.max(), err.mean())


@pytest.mark.parametrize("graph", ["bf16_remat", "f32"])
@pytest.mark.parametrize("group_size", [1, G])
def test_bf16_sampler_logprobs_equal_teacher_forced(setup, graph, group_size):
  """The bf16 sampler's log-probs and entropies against the update's teacher-forced forward,
  in bf16 (the trainer's) and in float32 compute over the same parameters."""
  graphs, params, out, mb = setup
  logp, ent = jax.device_get(logprobs_fn(params, graphs[graph], mb, SAMPLER, group_size))
  m = np.asarray(out.response_mask)
  assert m.sum() > 2 * P * G
  close_logprobs(logp, out.logprobs, m)
  close_logprobs(ent, out.entropies, m)
  assert np.isfinite(logp).all() and (logp[m] < 0).all() and (logp[~m] == 0).all()
  # Teeth: the log-probs of the next column are far outside the tolerance.
  assert np.abs(logp[:, 1:] - logp[:, :-1])[m[:, 1:]].max() > 10 * LOGP_ATOL


def test_bf16_model_gives_float32_logits(setup):
  """The head's matmul accumulates and returns float32 (the Protocol's logits): bf16 logits would
  carry 2^-8 relative error into every log-prob and ratio."""
  graphs, params, _, mb = setup
  logits = jax.jit(lambda p, m: nnx.merge(graphs["bf16_remat"], p)(
      m.sequence_tokens, m.sequence_positions, m.images, input_mask=m.sequence_mask,
      prefix_mask=m.prefix_mask)[0])(params, mb)
  assert logits.dtype == jnp.float32
  x = np.asarray(logits)
  as_bf16 = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(x != as_bf16) > 0.5  # not bf16 values stored as float32


@pytest.mark.slow  # two gradient compiles: ~20 s on 2 busy cores
def test_bf16_shared_prompt_forward_equals_per_row_forward(setup):
  graphs, params, out, mb = setup
  g = graphs["bf16_remat"]
  per_row = jax.device_get(logprobs_fn(params, g, mb, SAMPLER, 1))
  shared = jax.device_get(logprobs_fn(params, g, mb, SAMPLER, G))
  m = np.asarray(out.response_mask)
  for a, b in zip(per_row, shared):
    close_logprobs(b, a, m)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(m.shape), jnp.float32)
  want = jax.device_get(grad_fn(params, g, mb, 1, weights))
  got = jax.device_get(grad_fn(params, g, mb, G, weights))
  # The backward pass runs in bf16 too: each cotangent is rounded (2^-8) on its way through some
  # ten ops per layer, and the two paths sum the G responses' contributions in other orders. So
  # each leaf agrees to a few roundings of its norm (GRAD_RTOL = 10 × 2^-8; measured: <= 1.5%, in
  # the ViT, deepest in the backward chain), while the gradient of other weights is ~100% away.
  rel = lambda a, b: np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    assert a.dtype == np.float32  # float32 parameters get float32 gradients
    assert rel(a, b) <= GRAD_RTOL, (jax.tree_util.keystr(path), rel(a, b))
  assert np.abs(want["decoder"]["blocks"]["attn"]["k"].value).max() > 1e-3
  other = jax.device_get(grad_fn(params, g, mb, G, weights[::-1]))
  key = lambda t: t["decoder"]["blocks"]["attn"]["q"].value
  assert rel(key(want), key(other)) > 10 * GRAD_RTOL


@pytest.mark.slow  # two gradient compiles: ~15 s on 2 busy cores
def test_remat_gradients_equal_plain_gradients(setup, group_size=G):
  """float32 compute, through the shared prompt cache (the update's default path): remat
  recomputes the same float32 ops, so the gradients agree to float32 rounding of sums taken in
  another order (1e-5 of each leaf's scale)."""
  graphs, params, out, mb = setup
  weights = jnp.asarray(np.random.default_rng(2).standard_normal(out.tokens.shape), jnp.float32)
  want = jax.device_get(grad_fn(params, graphs["f32"], mb, group_size, weights))
  got = jax.device_get(grad_fn(params, graphs["f32_remat"], mb, group_size, weights))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max() + 1e-9,
                               err_msg=jax.tree_util.keystr(path))
  # Teeth: remat is on (the backward pass recomputes the layer's matmuls).
  dots = lambda graph: str(jax.make_jaxpr(
      lambda p: weighted_logprob_grad(p, graph, mb, group_size, weights))(params)).count(
          "dot_general")
  assert dots(graphs["f32_remat"]) > dots(graphs["f32"])
