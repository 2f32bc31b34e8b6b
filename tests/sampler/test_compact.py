"""Compaction (`SamplerConfig.compact`): finished prompt groups leave the live batch as they finish.
Checked against the single-jit sampler (every output field, bit for bit) on the configs' 8-device
mesh, against a hand count of the row × step slots, and the length caps against an uncapped
run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from openvlthinker import sampler_compact
from openvlthinker.models import decoder as decoder_lib
from openvlthinker.models.build import vlm_config
from openvlthinker.models.decoder import DecoderConfig
from openvlthinker.models.hf.image_processor import ImageProcessorConfig
from openvlthinker.models.qwen3_vision import Qwen3VisionConfig
from openvlthinker.models.qwen_vl import QwenVL, QwenVLConfig
from openvlthinker.models.vlm import VLM
from openvlthinker.sampler import Sampler, SamplerConfig, decode_phase_ends
from openvlthinker.sharding import Sharder, make_mesh, state_shardings

PAD = 0
LR = 40
ENDS = decode_phase_ends(LR, 3)  # (14, 27, 40)
P, G = 16, 4  # 64 rows, 8 a shard; live buckets of 4, 8 and 16 groups


@pytest.fixture(scope="module")
def mesh_sharder():
  """The configs' mesh (`mesh.fsdp = -1`): rows over all 8 devices."""
  return Sharder(make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))


@pytest.fixture(scope="module")
def cfg():
  return vlm_config(test_config.get_config().model)


def random_model(module, sharder):
  """(graphdef, state) of `module(rngs)` with random parameters placed on the mesh; rbg keys
  (compiling the init with the default threefry keys takes twice as long)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: module(nnx.Rngs(0))))
  init = jax.jit(lambda: nnx.state(module(nnx.Rngs(jax.random.key(0, impl="rbg")))),
                 out_shardings=state_shardings(abstract, sharder))
  return graphdef, init()


@pytest.fixture(scope="module")
def vlm(cfg, mesh_sharder):
  return random_model(lambda rngs: VLM(cfg, mesh_sharder, rngs=rngs), mesh_sharder)


@pytest.fixture(scope="module")
def config(cfg):
  """Rare stop tokens (1 id in 97) and, in most tests, caps: rows end for both reasons."""
  return SamplerConfig(max_new_tokens=LR, stop_tokens=tuple(range(10, cfg.text.vocab_size, 97)),
                       prompt_buckets=(32,), decode_phases=3)


def make_prompts(vocab, image_token, image_tokens, n, seed, image_size=None):
  """Right-padded prompts of 4 to 15 tokens: BOS, text, an image's placeholder run, text."""
  rng = np.random.default_rng(seed)
  rows = [[1] + rng.integers(10, vocab, rng.integers(0, 3)).tolist() + [image_token] * image_tokens
          + rng.integers(10, vocab, rng.integers(2, 9)).tolist() for _ in range(n)]
  tokens = np.zeros((n, max(map(len, rows))), np.int32)
  mask = np.zeros(tokens.shape, bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  images = None if image_size is None else rng.integers(0, 256, (n, 1) + image_size + (3,),
                                                         dtype=np.uint8)
  return tokens, mask, images


def group_caps(maxima, g, seed):
  """Per-row caps int[len(maxima)·g]: group k's rows are capped at most at maxima[k], one of them
  exactly (so the group finishes after maxima[k] tokens)."""
  rng = np.random.default_rng(seed)
  caps = np.stack([rng.integers(1, m + 1, g) for m in maxima])
  caps[np.arange(len(maxima)), rng.integers(0, g, len(maxima))] = maxima
  return caps.reshape(-1)


def assert_identical(want, got):
  """Every field of two SamplerOutputs but the cost count, bit for bit (floats compared as their
  bytes)."""
  for field in dataclasses.fields(want):
    if field.name == "decoded_row_steps":
      continue
    a, b = getattr(want, field.name), getattr(got, field.name)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      x, y = np.asarray(x), np.asarray(y)
      assert (x.dtype, x.shape) == (y.dtype, y.shape), field.name
      assert x.tobytes() == y.tobytes(), (field.name, np.argwhere(x != y)[:5])


def both(graphdef, state, sharder, config, *args, **kwargs):
  """(single-jit output, compacted output), on the host."""
  run = lambda compact: jax.device_get(Sampler(
      graphdef, dataclasses.replace(config, compact=compact), sharder)(*args, **kwargs))
  return run(False), run(True)


def hand_count(lengths, g, buckets):
  """Row × step slots of a decode that draws each step t ≥ 1 for only the groups with a row still
  running (a row of n tokens runs until step n - 1), in the smallest of `buckets` (groups) that
  holds them, whatever the phases."""
  longest = lengths.reshape(-1, g).max(axis=1)
  return sum(g * min(k for k in buckets if k >= (longest > t).sum())
             for t in range(1, longest.max()))


def test_live_buckets_fill_the_shards_with_two_rows_each():
  # 16 groups of 4 on 8 shards: multiples of 2 groups, at least 4 (16 rows, 2 a shard).
  assert sampler_compact.live_buckets(16, 4, 8) == (4, 8, 16)
  assert sampler_compact.live_buckets(32, 1, 8) == (16, 32)
  assert sampler_compact.live_buckets(12, 2, 8) == (8, 12)  # the full batch is always one
  assert sampler_compact.live_buckets(8, 1, 1) == (2, 4, 8)
  assert sampler_compact.live_buckets(8, 2, 8) == (8,)  # one row a shard: never compacted
  for p, g, shards in [(16, 4, 8), (64, 8, 8), (32, 3, 4), (40, 2, 8)]:
    for k in sampler_compact.live_buckets(p, g, shards)[:-1]:
      assert k * g % shards == 0 and k * g >= 2 * shards, (p, g, shards, k)


def test_live_groups_are_those_with_a_row_running(mesh_sharder):
  done = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1], bool)
  on_mesh = jax.device_put(done, mesh_sharder.sharding(("batch",)))
  np.testing.assert_array_equal(sampler_compact.live_groups(on_mesh, 2), [1, 3, 6])
  np.testing.assert_array_equal(sampler_compact.live_groups(on_mesh, 4), [0, 1, 3])
  assert sampler_compact.live_groups(on_mesh | True, 4).size == 0


@pytest.mark.parametrize("scan_layers", [True, False])
def test_take_cache_rows_equals_numpy_indexing(scan_layers):
  config = DecoderConfig(vocab_size=16, width=8, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=4, mlp_dim=8, scan_layers=scan_layers)
  rng = np.random.default_rng(0)
  fill = lambda c: c.replace(
      k=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), c.k),
      v=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), c.v),
      valid=jnp.asarray(rng.random(c.valid.shape) > 0.5), index=jnp.int32(3))
  prefix = fill(decoder_lib.init_cache(config, 4, 5))
  cache = fill(decoder_lib.init_cache(config, 12, 6, prefix=prefix))  # 3 rows a prefix row
  prompts = np.array([3, 0])
  rows = (prompts[:, None] * 3 + np.arange(3)).reshape(-1)
  got = decoder_lib.take_cache_rows(cache, jnp.asarray(rows), jnp.asarray(prompts))
  axis = 1 if scan_layers else 0
  for full, part, index in [(cache, got, rows), (prefix, got.prefix, prompts)]:
    for a, b in zip(jax.tree.leaves((full.k, full.v)), jax.tree.leaves((part.k, part.v))):
      np.testing.assert_array_equal(b, np.take(np.asarray(a), index, axis=axis))
    np.testing.assert_array_equal(part.valid, np.asarray(full.valid)[index])
    assert int(part.index) == int(full.index)
  with pytest.raises(ValueError, match="not a multiple"):
    decoder_lib.take_cache_rows(cache, jnp.arange(5), jnp.arange(2))


@pytest.fixture(scope="module")
def image_batch(cfg):
  return make_prompts(cfg.text.vocab_size, cfg.image_token_id, cfg.num_image_tokens, P, seed=1,
                      image_size=(cfg.vision.image_size,) * 2)


def run_capped(vlm, sharder, config, batch, caps):
  graphdef, state = vlm
  return both(graphdef, state, sharder, config, state, *batch, jax.random.key(7), group_size=G,
              max_lengths=caps)


def test_mixed_lengths_with_images_equal_the_single_call(vlm, mesh_sharder, config, image_batch):
  """Groups finish in every phase, in a shuffled order (16 → 12 → 4 live groups over the phases),
  so a compaction gathers scattered groups, inside a phase as well as at its end; two groups end
  on the same step, 9 → 7 live, so a bucket of 8 runs a padding group (a copy of the first live
  group, here the longest: it must not count as live); a few rows also stop on a stop token."""
  rest = np.random.default_rng(2).permutation([3, 7, 14, 5] + [15, 18, 20, 22, 25, 27, 16, 20]
                                              + [30, 35, 38])
  maxima = np.concatenate([[40], rest])
  caps = group_caps(maxima, G, seed=8)
  want, got = run_capped(vlm, mesh_sharder, config, image_batch, caps)
  assert (want.lengths <= caps).all() and 0 < (want.lengths < caps).sum() < 8  # natural stops
  longest = want.lengths.reshape(P, G).max(axis=1)
  live = [int((longest > t).sum()) for t in ENDS[:2]]
  assert 8 < live[0] < 16 and 0 < live[1] <= 4  # the test's teeth
  assert any((longest > t - 1).sum() > 8 > (longest > t).sum() for t in range(1, LR))  # padding
  assert longest[0] == longest.max()
  assert_identical(want, got)
  assert got.tokens.shape == (P * G, LR)
  assert want.decoded_row_steps == P * G * (longest.max() - 1)  # every row, every step
  assert got.decoded_row_steps == hand_count(want.lengths, G, (4, 8, 16))
  # 16 groups until at most 8 are live (inside the second phase), 8 until at most 4 are, then 4.
  t8, t4 = (next(t for t in range(LR) if (longest > t).sum() <= k) for k in (8, 4))
  assert ENDS[0] < t8 < ENDS[1] and t8 < t4
  assert got.decoded_row_steps == G * (16 * (t8 - 1) + 8 * (t4 - t8) + 4 * (longest.max() - t4))


def test_every_group_done_in_phase_one(vlm, mesh_sharder, config, image_batch):
  caps = group_caps(np.random.default_rng(4).integers(1, ENDS[0] + 1, P), G, seed=4)
  want, got = run_capped(vlm, mesh_sharder, config, image_batch, caps)
  assert_identical(want, got)
  assert want.decoded_row_steps == P * G * (want.lengths.max() - 1)
  assert got.decoded_row_steps == hand_count(want.lengths, G, (4, 8, 16)) < want.decoded_row_steps


@pytest.fixture(scope="module")
def uncapped(vlm, mesh_sharder, config, image_batch):
  """Caps of max_new_tokens: no cap at all. Every group keeps a row to the end."""
  return run_capped(vlm, mesh_sharder, config, image_batch, np.full(P * G, LR))


def test_no_group_done_early(uncapped):
  want, got = uncapped
  assert (want.lengths.reshape(P, G).max(axis=1) == LR).all()
  assert (want.lengths < LR).any()  # some rows did stop
  assert_identical(want, got)
  assert got.decoded_row_steps == want.decoded_row_steps == P * G * (LR - 1)


def test_caps_cut_the_uncapped_rows(vlm, mesh_sharder, config, image_batch, uncapped):
  """A capped row is the uncapped row's first `cap` tokens (the same keys), then padding."""
  graphdef, state = vlm
  free = uncapped[0]
  caps = group_caps(np.random.default_rng(6).integers(1, LR + 1, P), G, seed=6)
  sampler = Sampler(graphdef, dataclasses.replace(config, compact=False), mesh_sharder)
  capped = jax.device_get(sampler(state, *image_batch, jax.random.key(7), group_size=G,
                                  max_lengths=caps))
  want_len = np.minimum(caps, free.lengths)
  assert (caps < free.lengths).sum() > P * G // 2
  keep = np.arange(LR) < want_len[:, None]
  np.testing.assert_array_equal(capped.lengths, want_len)
  np.testing.assert_array_equal(capped.response_mask, keep)
  np.testing.assert_array_equal(capped.tokens, np.where(keep, free.tokens, PAD))
  np.testing.assert_allclose(capped.logprobs, np.where(keep, free.logprobs, 0.0), atol=1e-6)
  np.testing.assert_allclose(capped.entropies, np.where(keep, free.entropies, 0.0), atol=1e-6)
  # One cap per prompt is the same as that cap on each of its rows.
  per_prompt = caps.reshape(P, G).max(axis=1)
  a = sampler(state, *image_batch, jax.random.key(7), group_size=G, max_lengths=per_prompt)
  b = sampler(state, *image_batch, jax.random.key(7), group_size=G,
              max_lengths=np.repeat(per_prompt, G))
  assert_identical(jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize("caps", [np.zeros(P, int), np.ones(3, int), np.ones(P) * 2.0])
def test_bad_max_lengths_name_the_field(vlm, mesh_sharder, config, image_batch, caps):
  graphdef, state = vlm
  with pytest.raises(ValueError, match="max_lengths: expected integers >= 1"):
    Sampler(graphdef, config, mesh_sharder)(state, *image_batch, jax.random.key(0),
                                             group_size=G, max_lengths=caps)


def test_natural_stops_text_only_one_sample(vlm, mesh_sharder, cfg):
  """Rows end on stop tokens alone (1 id in 10), no images, G = 1: 32 rows, live buckets of 16
  and 32 rows; phases end at 13 and 24."""
  graphdef, state = vlm
  stop = tuple(range(10, cfg.text.vocab_size, 10))
  config = SamplerConfig(max_new_tokens=24, stop_tokens=stop, prompt_buckets=(32,),
                         decode_phases=2)
  tokens, mask, _ = make_prompts(cfg.text.vocab_size, 9, 0, 32, seed=8)
  want, got = both(graphdef, state, mesh_sharder, config, state, tokens, mask, None,
                   jax.random.key(8))
  lengths = want.lengths
  ends = decode_phase_ends(24, 2)
  assert ends == (13, 24) and 0 < (lengths > 13).sum() <= 16
  stopped = np.isin(want.tokens[np.arange(32), lengths - 1], stop)
  assert stopped[lengths < 24].all() and (lengths < 24).sum() > 16
  assert_identical(want, got)
  assert got.decoded_row_steps == hand_count(lengths, 1, (16, 32)) < want.decoded_row_steps


def qwen3_vl(sharder):
  """A tiny random Qwen3-VL (M-RoPE, q/k norms, DeepStack), its parameters on the mesh."""
  text = DecoderConfig(vocab_size=256, width=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, mlp_dim=128, tie_embeddings=False, qk_norm=True,
                       embed_scale=False, mrope_section=(2, 3, 3), mrope_interleaved=True,
                       scan_layers=False)
  vision = Qwen3VisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                             out_hidden_size=64, patch_size=16, num_position_embeddings=16,
                             deepstack_visual_indexes=(0,))
  config = QwenVLConfig(family="qwen3_vl", text=text, vision=vision,
                        image=ImageProcessorConfig(patch_size=16), image_token_id=5,
                        image_sizes=((64, 64),))
  return random_model(lambda rngs: QwenVL(config, sharder, rngs=rngs), sharder) + (config,)


def test_qwen3_vl_with_images_equals_the_single_call(mesh_sharder):
  graphdef, state, config = qwen3_vl(mesh_sharder)
  lr, p, g = 24, 8, 4  # phases end at 13 and 24; live buckets of 4 and 8 groups
  tokens, mask, images = make_prompts(256, config.image_token_id, 4, p, seed=9,
                                      image_size=(64, 64))
  caps = group_caps([3, 24, 9, 20, 12, 13, 5, 2], g, seed=9)
  sampler_config = SamplerConfig(max_new_tokens=lr, stop_tokens=(), prompt_buckets=(16,),
                                 decode_phases=2)
  want, got = both(graphdef, state, mesh_sharder, sampler_config, state, tokens, mask, images,
                   jax.random.key(9), group_size=g, max_lengths=caps)
  np.testing.assert_array_equal(want.lengths, caps)
  assert np.asarray(want.sequence_positions).shape == (p * g, 16 + lr, 3)
  assert_identical(want, got)
  # 8 groups for steps 1-8; from step 9 (inside the first phase) at most 4 are live: 9-23.
  assert got.decoded_row_steps == hand_count(caps, g, (4, 8)) == 32 * 8 + 16 * 15
