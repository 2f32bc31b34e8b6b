"""The VLM against independent references: a single-device forward, perturbation tests for
causality and image placement, and cache-free forwards for the KV-cache path."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.sharding import Sharder, make_mesh

ATOL = 1e-5


@pytest.fixture(scope="module")
def cfg():
  return vlm_config(test_config.get_config().model)


@pytest.fixture(scope="module")
def sharder():
  return Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))


@pytest.fixture(scope="module")
def model(cfg):
  return build_model(cfg, Sharder(), seed=0)


@pytest.fixture(scope="module")
def sharded_model(cfg, sharder):
  return build_model(cfg, sharder, seed=0)


FWD = jax.jit(lambda m, tokens, positions, images, mask: m(tokens, positions, images,
                                                           input_mask=mask)[0])


def make_batch(cfg, rng, batch=4, text_len=12, image_at=(0, 0, 0, 0)):
  """Rows with one image whose placeholder run starts at image_at[b]."""
  t = cfg.num_image_tokens
  length = t + text_len
  tokens = rng.integers(10, cfg.text.vocab_size, (batch, length)).astype(np.int32)
  for b, start in enumerate(image_at[:batch]):
    tokens[b, start:start + t] = cfg.image_token_id
  size = cfg.vision.image_size
  images = rng.integers(0, 256, (batch, 1, size, size, 3), dtype=np.uint8)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
  return tokens, positions, images, np.ones(tokens.shape, bool)


def test_parameters_are_sharded(sharded_model):
  params = nnx.state(sharded_model, nnx.Param)
  leaves = jax.tree.leaves(params)
  total = sum(x.nbytes for x in leaves)
  per_device = {}
  for x in leaves:
    if x.ndim >= 2 and x.size >= 4096:
      assert x.sharding.spec != jax.sharding.PartitionSpec(*([None] * x.ndim)), x.shape
      assert not x.sharding.is_fully_replicated, (x.shape, x.sharding.spec)
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  assert len(per_device) == 8
  assert max(per_device.values()) <= total / 3, (max(per_device.values()), total)


def test_sharded_forward_equals_single_device(model, sharded_model, cfg, sharder):
  batch = make_batch(cfg, np.random.default_rng(0))
  want = FWD(model, *batch)
  shard = lambda x: jax.device_put(x, sharder.sharding(("batch",) + (None,) * (x.ndim - 1),
                                                      x.shape))
  got = FWD(sharded_model, *map(shard, batch))
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)


def test_causality(model, cfg):
  tokens, positions, images, mask = make_batch(cfg, np.random.default_rng(1), batch=1)
  base = np.asarray(FWD(model, tokens, positions, images, mask))
  t = cfg.num_image_tokens + 5
  changed = tokens.copy()
  changed[0, t] = (tokens[0, t] + 7) % cfg.text.vocab_size or 11
  out = np.asarray(FWD(model, changed, positions, images, mask))
  np.testing.assert_array_equal(out[:, :t], base[:, :t])
  assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


def test_images_at_different_positions_batch_equals_alone(model, cfg):
  rng = np.random.default_rng(2)
  tokens, positions, images, mask = make_batch(cfg, rng, batch=2, image_at=(0, 7))
  both = np.asarray(FWD(model, tokens, positions, images, mask))
  for b in range(2):
    alone = np.asarray(FWD(model, tokens[b:b + 1], positions[b:b + 1], images[b:b + 1],
                           mask[b:b + 1]))
    np.testing.assert_allclose(both[b:b + 1], alone, atol=ATOL, rtol=0)
  # Changing row 1's image changes no logit before its first placeholder (position 7) ...
  other = images.copy()
  other[1] = 255 - other[1]
  out = np.asarray(FWD(model, tokens, positions, other, mask))
  np.testing.assert_array_equal(out[1, :7], both[1, :7])
  assert np.abs(out[1, 7:] - both[1, 7:]).max() > 1e-4
  np.testing.assert_array_equal(out[0], both[0])  # ... and nothing in the other row.


def test_two_images_fill_their_own_placeholder_runs(model, cfg):
  """Image k goes to the k-th run: swapping images changes logits after the first run only."""
  rng = np.random.default_rng(3)
  t = cfg.num_image_tokens
  tokens = rng.integers(10, cfg.text.vocab_size, (1, 2 * t + 8)).astype(np.int32)
  tokens[0, 2:2 + t] = cfg.image_token_id
  tokens[0, t + 6:2 * t + 6] = cfg.image_token_id
  size = cfg.vision.image_size
  images = rng.integers(0, 256, (1, 2, size, size, 3), dtype=np.uint8)
  positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
  mask = np.ones(tokens.shape, bool)
  base = np.asarray(FWD(model, tokens, positions, images, mask))
  second = images.copy()
  second[0, 1] = 255 - second[0, 1]
  out = np.asarray(FWD(model, tokens, positions, second, mask))
  np.testing.assert_array_equal(out[0, :t + 6], base[0, :t + 6])
  assert np.abs(out[0, t + 6:] - base[0, t + 6:]).max() > 1e-4


def test_cache_decode_equals_full_forward(model, cfg):
  rng = np.random.default_rng(4)
  tokens, positions, images, mask = make_batch(cfg, rng, batch=2, text_len=10)
  full = np.asarray(FWD(model, tokens, positions, images, mask))
  prompt = cfg.num_image_tokens + 4

  @jax.jit
  def prefill(m, tokens, positions, images):
    cache = m.init_cache(tokens.shape[0], tokens.shape[1] + 8)
    return m(tokens, positions, images, cache)

  @jax.jit
  def step(m, token, position, cache):
    return m(token, position, None, cache)

  logits, cache = prefill(model, tokens[:, :prompt], positions[:, :prompt], images)
  outs = [np.asarray(logits)]
  for i in range(prompt, tokens.shape[1]):
    logits, cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=ATOL, rtol=0)


def test_full_prefix_attention_lets_prefix_see_ahead(cfg):
  import dataclasses
  prefix_cfg = dataclasses.replace(cfg, prefix_full_attention=True)
  model = build_model(prefix_cfg, Sharder(), seed=0)
  tokens, positions, images, mask = make_batch(cfg, np.random.default_rng(5), batch=1)
  prefix = np.zeros_like(mask)
  n_prefix = cfg.num_image_tokens + 4
  prefix[:, :n_prefix] = True
  fwd = jax.jit(lambda m, t, p, i, pm: m(t, p, i, prefix_mask=pm)[0])
  base = np.asarray(fwd(model, tokens, positions, images, prefix))
  changed = tokens.copy()
  changed[0, n_prefix - 1] += 1
  out = np.asarray(fwd(model, changed, positions, images, prefix))
  # Earlier prefix tokens see the change; nothing is leaked from after the prefix.
  assert np.abs(out[0, :n_prefix - 1] - base[0, :n_prefix - 1]).max() > 1e-4
  changed = tokens.copy()
  changed[0, n_prefix + 2] += 1
  out = np.asarray(fwd(model, changed, positions, images, prefix))
  np.testing.assert_array_equal(out[0, :n_prefix + 2], base[0, :n_prefix + 2])
