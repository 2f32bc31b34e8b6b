"""Packed updates (`train.packing`) against the padded update, on 8 fake devices.

A random minibatch of mixed response lengths (1 … Lr tokens, one filtered group with none, G = 3)
with images in every prompt, on the test config's VLM (fsdp over 8 devices): the packed
micro-batches' log-probs, entropies, loss and gradient must equal the padded path's (shared prompt
forward and per-row forward) to float32 precision; rows too small for a group split it into
several segments, each with its own prompt copy, and the result is still the same. A Qwen3-VL
model (M-RoPE, DeepStack) packs the same way.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.models.packed import PackedLayout, attention_mask
from openvlthinker.rl import losses
from openvlthinker.sampler import SamplerConfig
from openvlthinker.train import packing, rl
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.context import make_sharder
from openvlthinker.train.state import create_train_state

P, G, LB, LR = 8, 3, 32, 16
SAMPLER = SamplerConfig(max_new_tokens=LR, prompt_buckets=(LB,))
LOSS = losses.PolicyLossConfig(kl_coef=0.3)


def random_batch(model, rng, image_token_id, image_tokens, images_shape, vocab=1024):
  """A host RolloutBatch of P groups of G rows: prompts of 9 … 20 real tokens (with one image's
  tokens each), responses of 1 … LR tokens, group 2 filtered out (no response tokens)."""
  b = P * G
  n = rng.integers(9, 21, P)
  prompt = np.zeros((P, LB), np.int32)
  mask = np.arange(LB)[None] >= (LB - n)[:, None]  # right-aligned
  prompt[mask] = rng.integers(10, vocab, mask.sum())
  prompt[prompt == image_token_id] = 11  # image tokens only where the image is
  for p in range(P):  # BOS, the image's tokens, then text
    start = LB - n[p]
    prompt[p, start] = 1
    prompt[p, start + 1:start + 1 + image_tokens] = image_token_id
  positions, next_position = jax.device_get(model.prompt_positions(jnp.asarray(prompt),
                                                                   jnp.asarray(mask)))
  rep = lambda x: np.repeat(np.asarray(x), G, axis=0)
  response_positions = jax.device_get(model.response_positions(jnp.asarray(rep(next_position)),
                                                               LR))
  lengths = rng.integers(1, LR + 1, b)
  lengths[:G] = [LR, 1, 7]  # the extremes
  valid = np.ones(b, bool)
  valid[2 * G:3 * G] = False
  response_mask = (np.arange(LR)[None] < lengths[:, None]) & valid[:, None]
  tokens = np.where(response_mask, rng.integers(10, vocab, (b, LR)), 0).astype(np.int32)
  tokens[tokens == image_token_id] = 11  # image tokens only where the image is
  seq = lambda a, r: np.concatenate([rep(a), r], axis=1)
  f = np.float32
  return RolloutBatch(
      sequence_tokens=seq(prompt, tokens),
      sequence_positions=jax.tree.map(lambda a, r: np.concatenate([rep(a), np.asarray(r)], 1),
                                      positions, response_positions),
      sequence_mask=seq(mask, response_mask), prefix_mask=seq(mask, np.zeros((b, LR), bool)),
      tokens=tokens,
      old_logprobs=np.where(response_mask, -rng.uniform(3, 9, (b, LR)), 0).astype(f),
      entropies=np.zeros((b, LR), f), response_mask=response_mask,
      lengths=np.where(valid, lengths, 0).astype(np.int32),
      images=rep(rng.integers(0, 256, (P,) + images_shape, dtype=np.uint8)),
      task_ids=np.repeat(np.resize([0, 3, 1, 3], P), G).astype(np.int32),
      task_keys=np.repeat(np.resize([0, 3, 1, 3], P), G).astype(np.int32),
      reward=np.zeros(b, f), accuracy=np.zeros(b, f), format=np.zeros(b, f),
      structure=np.zeros(b, f), length_reward=np.zeros(b, f),
      advantages=np.where(valid, rng.standard_normal(b), 0).astype(f), valid=valid,
      ref_logprobs=np.where(response_mask, -rng.uniform(3, 9, (b, LR)), 0).astype(f),
      response_start=LB)


@pytest.fixture(scope="module")
def vlm():
  config = test_config.get_config()
  config.model.prefix_full_attention = True  # the pod preset's: the hardest mask to pack
  sharder = make_sharder(config)
  model = build_model(vlm_config(config.model), sharder, seed=0)
  graphdef, params = nnx.split(model)
  size = config.model.vision.image_size
  batch = random_batch(model, np.random.default_rng(0), model.cfg.image_token_id,
                       model.cfg.num_image_tokens, (1, size, size, 3))
  return graphdef, params, sharder, batch, model.cfg.image_token_id


def packed_tables(graphdef, params, sharder, batch, cfg, image_token_id):
  pk, stats = packing.pack(batch, cfg, group_size=G, shards=sharder.shards("batch"),
                           image_token_id=image_token_id)
  dev = packing.put(pk, sharder)
  logp, ent = zip(*[jax.device_get(PACKED_LOGPROBS(params, graphdef, dev.micro(i), SAMPLER))
                    for i in range(stats.num_micro)])
  return pk, stats, np.stack(logp), np.stack(ent)


PACKED_LOGPROBS = jax.jit(rl.packed_logprobs, static_argnums=(1, 3))


def unpack(pk, table):
  """Table rows [M, S, Lr] back to the minibatch's rows (zeros for rows not packed)."""
  out = np.zeros((P * G, LR), np.float32)
  rows = pk.rows.reshape(-1)
  out[rows[rows >= 0]] = table.reshape(-1, LR)[rows >= 0]
  return out


@pytest.fixture(scope="module")
def padded_logprobs(vlm):
  graphdef, params, sharder, batch, _ = vlm
  fn = jax.jit(lambda p, mb: rl.policy_logprobs(p, graphdef, mb, SAMPLER, G))
  return jax.device_get(fn(params, jax.tree.map(sharder.put_batch, batch)))


@pytest.mark.parametrize("row_tokens,splits", [(128, False), (40, True)])
def test_packed_logprobs_equal_the_padded_forward(vlm, padded_logprobs, row_tokens, splits):
  graphdef, params, sharder, batch, image_token_id = vlm
  cfg = packing.PackingConfig(enabled=True, row_tokens=row_tokens, rows_per_micro=8)
  pk, stats, logp, ent = packed_tables(graphdef, params, sharder, batch, cfg, image_token_id)
  want_logp, want_ent = padded_logprobs
  m = batch.response_mask
  np.testing.assert_allclose(unpack(pk, logp), want_logp, atol=2e-5)
  np.testing.assert_allclose(unpack(pk, ent), want_ent, atol=2e-5)
  # Every response row with tokens is packed exactly once; the filtered group not at all.
  rows = pk.rows[pk.rows >= 0]
  assert sorted(rows.tolist()) == np.flatnonzero(m.any(1)).tolist()
  assert stats.response_tokens == m.sum()
  # Groups split into several segments (prompt copies) exactly when a row cannot hold one; the
  # real tokens are the responses and one prompt per segment.
  groups_with_tokens = P - 1
  assert (stats.segments > groups_with_tokens) == splits
  prompts = pk.input_mask & (pk.layout.slot == 0)
  assert stats.real_tokens == m.sum() + prompts.sum()
  assert (logp[~pk.response_mask] == 0).all() and (logp[pk.response_mask] < 0).all()


def test_two_processes_blocks_index_the_global_minibatch(vlm):
  """Each process packs its half of a minibatch (sizes agreed: the larger of the two) and
  `for_process` shifts its indices past the earlier process's block: in the blocks joined along
  axis 1, as `put` joins them on the mesh, every table row's response tokens are the targets of
  its source columns, and the image those columns' prompt shows is the row's own."""
  _, _, _, batch, image_token_id = vlm
  cfg = packing.PackingConfig(enabled=True, row_tokens=64, rows_per_micro=4)
  half = P // 2 * G
  parts = [batch.rows(slice(0, half)), batch.rows(slice(half, 2 * half))]
  sizes = []
  for part in parts:
    packing.pack(part, cfg, group_size=G, image_token_id=image_token_id,
                 agree=lambda s: sizes.append(s) or s)
  agreed = tuple(np.max(sizes, 0))
  blocks = [packing.for_process(packing.pack(part, cfg, group_size=G,
                                             image_token_id=image_token_id,
                                             agree=lambda s: agreed)[0], i, half)
            for i, part in enumerate(parts)]
  join = lambda *xs: np.concatenate(xs, axis=1)
  tokens, targets, rows, source, images = (
      join(*(np.asarray(getattr(b, k)) for b in blocks))
      for k in ("tokens", "targets", "rows", "source", "images"))
  segment, image_set = (join(*(np.asarray(getattr(b.layout, k)) for b in blocks))
                        for k in ("segment", "image_set"))
  assert rows.dtype == np.int32
  padding = segment < 0  # columns no segment uses: no input, no token, nothing to predict
  input_mask = join(*(np.asarray(b.input_mask) for b in blocks))
  assert padding.any() and not input_mask[padding].any() and input_mask[~padding].all()
  assert not tokens[padding].any() and not targets[padding].any()
  np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(2 * half)[batch.valid])
  m_count, r_count, t = tokens.shape
  for m, s in zip(*np.nonzero(rows >= 0)):
    row = rows[m, s]
    mask = batch.response_mask[row]
    cols = source[m, s][mask]
    np.testing.assert_array_equal(targets[m].reshape(-1)[cols], batch.tokens[row][mask])
    packed_row = cols // t
    assert (packed_row == packed_row[0]).all()
    seg = segment[m].reshape(-1)[cols[0]]
    image_cols = (segment[m, packed_row[0]] == seg) & (tokens[m, packed_row[0]] == image_token_id)
    (q,) = set(image_set[m, packed_row[0]][image_cols])
    np.testing.assert_array_equal(images[m, q], batch.images[row])


def test_a_one_shard_batch_mesh_packs_a_lone_group_with_one_image(vlm):
  """`RLStage.place` on a mesh whose batch axis is not split (tensor parallelism only): a
  micro-batch holding one group packs one image set and a table of 4 rows (3 responses, rounded
  to a power of two), not rounded up further for batch shards the mesh does not have, which would
  add a padding image for the vision tower to encode."""
  import types
  from openvlthinker import sharding
  from openvlthinker.train.rl_stage import RLStage
  _, _, sharder, batch, image_token_id = vlm
  one = sharding.Sharder(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": -1}), sharder.rules)
  assert one.shards("batch") == 1
  cfg = packing.PackingConfig(enabled=True, row_tokens=128, rows_per_micro=1)
  ns = types.SimpleNamespace
  stage = ns(ctx=ns(sharder=one, model=ns(cfg=ns(image_token_id=image_token_id))),
             packing=cfg, local_packing=cfg, c=ns(rl=ns(group_size=G)))
  placed = RLStage.place(stage, batch.rows(slice(0, G)))  # group 0: responses of 16, 1, 7
  assert placed.images.shape[:2] == (1, 1) and placed.rows.shape == (1, 4)
  np.testing.assert_array_equal(np.sort(np.asarray(placed.rows)[0]), [-1, 0, 1, 2])


def test_the_mask_is_what_the_test_checks(vlm):
  """Teeth: a packed row whose responses may see each other (one slot for all) changes the
  log-probs the equality test compares."""
  graphdef, params, sharder, batch, image_token_id = vlm
  cfg = packing.PackingConfig(enabled=True, row_tokens=128, rows_per_micro=8)
  pk, stats, logp, _ = packed_tables(graphdef, params, sharder, batch, cfg, image_token_id)
  leaky = pk.replace(layout=pk.layout.replace(slot=np.minimum(pk.layout.slot, 1)))
  dev = packing.put(leaky, sharder)
  bad = jax.device_get(PACKED_LOGPROBS(params, graphdef, dev.micro(0), SAMPLER)[0])
  assert np.abs(bad - logp[0])[pk.response_mask[0]].max() > 1e-2


def test_rows_are_filled_first_fit_by_decreasing_size():
  # Decreasing: 4+2 | 3+2+1, two rows; by increasing size 1+2+2 | 3 | 4 would take three.
  assert packing._rows_first_fit([4, 3, 2, 2, 1], 6) == [[0, 2], [1, 3, 4]]


def test_attention_mask_by_hand():
  """A row [p0 p1 p2 | b0 r0 | b1 r1' r2'] (prompt of 3, responses of 2 and 3 tokens, Lb = 3)."""
  layout = PackedLayout(
      segment=np.array([[0, 0, 0, 0, 0, 0, 0, 0, -1]]),
      slot=np.array([[0, 0, 0, 1, 1, 2, 2, 2, 0]]),
      order=np.array([[0, 1, 2, 2, 3, 2, 3, 4, 0]]),
      image_set=np.zeros((1, 9), np.int32), image_index=np.zeros((1, 9), np.int32),
      response_start=3)
  real = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0]], bool)
  mask = np.asarray(attention_mask(layout, real, None, False))[0].astype(int)
  want = np.array([
      [1, 0, 0, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 1, 0, 0, 0, 0, 0],   # bridge 0: the prompt before its last token, itself
      [1, 1, 0, 1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 1, 0, 0, 0],   # bridge 1 does not see response 0
      [1, 1, 0, 0, 0, 1, 1, 0, 0],
      [1, 1, 0, 0, 0, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0]])  # padding sees nothing
  np.testing.assert_array_equal(mask, want)
  full = np.asarray(attention_mask(layout, real, np.array([[1, 1, 1, 1, 0, 1, 0, 0, 0]], bool),
                                   True))[0].astype(int)
  want[:3, :3] = 1  # prompt tokens see the whole prompt; responses unchanged
  np.testing.assert_array_equal(full, want)


def grad_capture() -> optax.GradientTransformation:
  """Leaves the parameters alone and keeps the last gradient as its state."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def run_update(graphdef, params, sharder, mb, packed, **kw):
  tx = grad_capture()
  state, shardings = create_train_state(jax.tree.map(jnp.copy, params), tx, sharder)
  update = rl.make_update(graphdef, tx, state_shardings=shardings, sampler_config=SAMPLER,
                          loss_config=LOSS, entropy=None, packed=packed, **kw)
  state, metrics = update(state, mb)
  return jax.device_get(state.opt_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def packed_update(vlm):
  graphdef, params, sharder, batch, image_token_id = vlm
  cfg = packing.PackingConfig(enabled=True, row_tokens=48, rows_per_micro=8)
  pk, stats = packing.pack(batch, cfg, group_size=G, shards=sharder.shards("batch"),
                           image_token_id=image_token_id)
  assert stats.num_micro >= 2  # the gradient is accumulated over packed micro-batches
  return run_update(graphdef, params, sharder, packing.put(pk, sharder), True, num_micro=1)


@pytest.mark.parametrize("group_size", [1, G])
def test_packed_update_equals_the_padded_update(vlm, packed_update, group_size):
  graphdef, params, sharder, batch, _ = vlm
  grads_pad, met_pad = run_update(graphdef, params, sharder,
                                  jax.tree.map(sharder.put_batch, batch), False, num_micro=2,
                                  group_size=group_size)
  grads_pk, met_pk = packed_update
  np.testing.assert_allclose(met_pk["policy_loss"], met_pad["policy_loss"], rtol=1e-5)
  for name in ("tokens", "kl_ref", "approx_kl", "clip_high_frac"):
    if name in met_pad:
      np.testing.assert_allclose(met_pk[name], met_pad[name], rtol=1e-5, atol=1e-7)
  flat_pad, flat_pk = jax.tree.leaves(grads_pad), jax.tree.leaves(grads_pk)
  assert max(np.abs(g).max() for g in flat_pad) > 1e-3  # a gradient worth comparing
  for a, b in zip(flat_pk, flat_pad):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_row_too_small_for_a_response_is_a_one_line_error(vlm):
  *_, batch, image_token_id = vlm
  with pytest.raises(ValueError, match=r"rl.packing.row_tokens: .* expected at least"):
    packing.pack(batch, packing.PackingConfig(row_tokens=24), group_size=G,
                 image_token_id=image_token_id)


def test_qwen3_vl_packs_like_its_padded_forward(tmp_path):
  """M-RoPE positions and DeepStack features through packed rows: Qwen3-VL's packed log-probs
  equal its padded shared-prompt forward's."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
  import tiny_qwen_vl  # pylint: disable=g-import-not-at-top
  from openvlthinker.models.hf import pretrained  # pylint: disable=g-import-not-at-top
  tiny_qwen_vl.write("qwen3_vl", str(tmp_path))
  config = test_config.get_config()
  sharder = make_sharder(config)
  cfg = pretrained.model_config(str(tmp_path), image_sizes=((64, 64),))
  model = pretrained.build(cfg, sharder, directory=str(tmp_path))
  graphdef, params = nnx.split(model)
  batch = random_batch(model, np.random.default_rng(1), cfg.image_token_id,
                       model.tokens_per_image(64, 64), (1, 64, 64, 3),
                       vocab=cfg.text.vocab_size)
  assert np.ndim(batch.sequence_positions) == 3  # M-RoPE (t, h, w) positions
  pad = jax.jit(lambda p, mb: rl.policy_logprobs(p, graphdef, mb, SAMPLER, G))
  want_logp, want_ent = jax.device_get(pad(params, jax.tree.map(sharder.put_batch, batch)))
  cfg_pack = packing.PackingConfig(enabled=True, row_tokens=64, rows_per_micro=8)
  pk, _, logp, ent = packed_tables(graphdef, params, sharder, batch, cfg_pack,
                                   cfg.image_token_id)
  np.testing.assert_allclose(unpack(pk, logp), want_logp, atol=2e-5)
  np.testing.assert_allclose(unpack(pk, ent), want_ent, atol=2e-5)


@pytest.mark.parametrize("change, message", [
    (dict(row_tokens=0), "row_tokens: expected a positive integer, got 0"),
    (dict(rows_per_micro=0), "rows_per_micro: expected a positive integer, got 0"),
])
def test_a_bad_packing_setting_is_named(change, message):
  with pytest.raises(ValueError) as e:
    packing.PackingConfig(**change)
  assert str(e.value) == message
