"""The sampler against independent computations: a cache-free argmax loop, a teacher-forced
forward, numpy distributions, a model with a known next-token distribution, and itself on other
batches, other buckets and 8 devices."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import hlo_checks
import numpy_sampling as ref
from configs import test as test_config
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.models.vlm import VLM
from openvlthinker.sampler import (Sampler, SamplerConfig, align_prompts, decode_phase_ends,
                                   response_logprobs)
from openvlthinker.sharding import Sharder, make_mesh, state_shardings

EOS, PAD = 2, 0
LR = 6  # new tokens


def responses_of(out):
  return out.tokens, out.response_mask, out.response_start


@pytest.fixture(scope="module")
def cfg():
  return vlm_config(test_config.get_config().model)


@pytest.fixture(scope="module")
def model(cfg):
  return build_model(cfg, Sharder(), seed=0)


@pytest.fixture(scope="module")
def state(model):
  return nnx.state(model)


def make_prompts(cfg, n, seed, min_text=1, max_text=9):
  """Right-padded prompts: BOS 1, some text, one image's placeholder run, more text."""
  rng = np.random.default_rng(seed)
  t = cfg.num_image_tokens
  rows = []
  for _ in range(n):
    before, after = rng.integers(0, 4), rng.integers(min_text, max_text)
    text = lambda k: rng.integers(10, cfg.text.vocab_size, k).tolist()
    rows.append([1] + text(before) + [cfg.image_token_id] * t + text(after))
  width = max(map(len, rows))
  tokens = np.zeros((n, width), np.int32)
  mask = np.zeros((n, width), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  size = cfg.vision.image_size
  images = rng.integers(0, 256, (n, 1, size, size, 3), dtype=np.uint8)
  return tokens, mask, images


@functools.partial(jax.jit, static_argnames="logits_from")
def FORWARD(m, tokens, positions, images, mask, prefix=None, logits_from=0):
  return m(tokens, positions, images, input_mask=mask, prefix_mask=prefix,
           logits_from=logits_from)[0]


def teacher_forced_logits(model, out, images):
  """Logits predicting each response token, from one cache-free forward over the sequences."""
  images = np.asarray(images)[np.asarray(out.prompt_index)]
  logits = FORWARD(model, out.sequence_tokens, out.sequence_positions, images, out.sequence_mask,
                   out.prefix_mask)
  s = out.response_start
  return np.asarray(logits)[:, s - 1:s - 1 + out.tokens.shape[1]], logits


@pytest.fixture(scope="module")
def greedy(model, state, cfg):
  """Greedy output for 16 image prompts of different lengths, with its inputs."""
  tokens, mask, images = make_prompts(cfg, 16, seed=0)
  sampler = Sampler(model, SamplerConfig(max_new_tokens=LR, greedy=True, prompt_buckets=(16, 32)))
  out = sampler(state, tokens, mask, images, jax.random.key(0))
  return tokens, mask, images, jax.device_get(out)


def test_greedy_equals_cache_free_argmax_loop(model, cfg, greedy):
  """Each step recomputes the full forward over the right-padded prefix (no cache, positions
  from 0) and takes the argmax of the row's last logits."""
  tokens, mask, images, out = greedy
  n = mask.sum(1)
  seq = np.zeros((16, tokens.shape[1] + LR), np.int32)
  seq[:, :tokens.shape[1]] = tokens
  valid = np.zeros(seq.shape, bool)
  valid[:, :tokens.shape[1]] = mask
  positions = np.broadcast_to(np.arange(seq.shape[1], dtype=np.int32), seq.shape)
  done = np.zeros(16, bool)
  rows = np.arange(16)
  want, want_logp, want_ent = [], [], []
  for t in range(LR):
    logits = np.asarray(FORWARD(model, seq, positions, images, valid))[rows, n + t - 1]
    logp = ref.log_softmax(logits)
    nxt = np.where(done, PAD, logp.argmax(-1))
    want.append(nxt)
    want_logp.append(np.where(done, 0.0, logp[rows, nxt]))
    want_ent.append(np.where(done, 0.0, ref.entropy(logp)))
    seq[rows, n + t], valid[rows, n + t] = nxt, ~done
    done |= nxt == EOS
  np.testing.assert_array_equal(out.tokens, np.stack(want, 1))
  np.testing.assert_allclose(out.logprobs, np.stack(want_logp, 1), atol=1e-4)
  np.testing.assert_allclose(out.entropies, np.stack(want_ent, 1), atol=1e-4)
  assert len(set(n.tolist())) > 4


SAMPLED = SamplerConfig(max_new_tokens=LR, prompt_buckets=(16, 32))  # temperature 1


@pytest.fixture(scope="module")
def sampled(model, state, cfg):
  """8 image prompts of 11 to 21 tokens (bucket 32), 2 samples each, at temperature 1."""
  tokens, mask, images = make_prompts(cfg, 8, seed=4, min_text=6, max_text=14)
  out = Sampler(model, SAMPLED)(state, tokens, mask, images, jax.random.key(4), group_size=2)
  return tokens, mask, images, jax.device_get(out)


def test_sampled_logprobs_equal_teacher_forced_log_softmax(model, sampled):
  tokens, mask, images, out = sampled
  logits, full = teacher_forced_logits(model, out, images)
  logp = ref.log_softmax(logits)
  picked = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
  m = out.response_mask
  np.testing.assert_allclose(out.logprobs[m], picked[m], atol=1e-4)
  np.testing.assert_allclose(out.entropies[m], ref.entropy(logp)[m], atol=1e-4)
  # The trainer's helper reads the same alignment, from full logits or from only the columns
  # that predict the response.
  got_logp, got_ent = response_logprobs(full, *responses_of(out), SAMPLED)
  np.testing.assert_allclose(got_logp, out.logprobs, atol=1e-4)
  np.testing.assert_allclose(got_ent, out.entropies, atol=1e-4)
  tail = FORWARD(model, out.sequence_tokens, out.sequence_positions, images[out.prompt_index],
                 out.sequence_mask, out.prefix_mask, logits_from=out.response_start - 1)
  assert tail.shape[1] == LR + 1
  np.testing.assert_allclose(response_logprobs(tail, *responses_of(out), SAMPLED)[0], out.logprobs,
                             atol=1e-4)
  # Rows are prompt-major and the samples of one prompt differ (per-row keys).
  np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(8), 2))
  assert all((out.tokens[2 * p] != out.tokens[2 * p + 1]).any() for p in range(8))


def test_full_prefix_attention_logprobs_equal_teacher_forced(cfg):
  """PaliGemma-style prefix attention: the prefill sees the whole prompt, the teacher-forced
  forward gets it from `out.prefix_mask`."""
  model = build_model(dataclasses.replace(cfg, prefix_full_attention=True), Sharder(), seed=1)
  tokens, mask, images = make_prompts(cfg, 4, seed=12)
  out = jax.device_get(Sampler(model, SAMPLED)(nnx.state(model), tokens, mask, images,
                                               jax.random.key(12), group_size=2))
  logits, _ = teacher_forced_logits(model, out, images)
  picked = np.take_along_axis(ref.log_softmax(logits), out.tokens[..., None], -1)[..., 0]
  m = out.response_mask
  np.testing.assert_allclose(out.logprobs[m], picked[m], atol=1e-4)
  causal = np.asarray(FORWARD(model, out.sequence_tokens, out.sequence_positions,
                              images[out.prompt_index], out.sequence_mask))
  s = out.response_start
  assert np.abs(causal[:, s - 1:s - 1 + LR] - logits).max() > 1e-3  # The prefix mask matters.


def test_filtered_logprobs_equal_numpy_distribution(model, state, cfg):
  """Temperature, top-k, top-p and a banned token together, against numpy at teacher-forced
  logits."""
  tokens, mask, images = make_prompts(cfg, 4, seed=2)
  kw = dict(temperature=0.6, top_k=40, top_p=0.8, banned=(11,))
  config = SamplerConfig(max_new_tokens=LR, temperature=0.6, top_k=40, top_p=0.8,
                         banned_tokens=(11,), prompt_buckets=(32,))
  out = jax.device_get(Sampler(model, config)(state, tokens, mask, images, jax.random.key(2),
                                              group_size=2))
  logits, full = teacher_forced_logits(model, out, images)
  logp = ref.sampling_log_probs(logits, **kw)
  picked = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
  m = out.response_mask
  assert np.isfinite(picked[m]).all()  # Only tokens inside the filters were drawn.
  np.testing.assert_allclose(out.logprobs[m], picked[m], atol=1e-4)
  np.testing.assert_allclose(out.entropies[m], ref.entropy(logp)[m], atol=1e-4)
  np.testing.assert_allclose(response_logprobs(full, *responses_of(out), config)[0], out.logprobs,
                             atol=1e-4)


def test_top_k_one_equals_greedy(model, state, greedy):
  tokens, mask, images, want = greedy
  config = SamplerConfig(max_new_tokens=LR, top_k=1, prompt_buckets=(16, 32))
  out = Sampler(model, config)(state, tokens, mask, images, jax.random.key(3))
  np.testing.assert_array_equal(out.tokens, want.tokens)
  # A one-token distribution: log-prob and entropy 0.
  np.testing.assert_array_equal(out.logprobs, 0.0)
  np.testing.assert_array_equal(out.entropies, 0.0)


def test_prompt_alone_equals_prompt_in_batch(model, state, sampled):
  tokens, mask, images, batch = sampled
  n = mask.sum(1)
  short, long = int(np.argmin(n)), int(np.argmax(n))
  assert n[short] <= 16 < n[long] and batch.response_start == 32
  sampler = Sampler(model, SAMPLED)
  # Alone, the short prompt lands in the 16-slot bucket (other padding, other slots), the long
  # one in the batch's 32-slot bucket.
  for p, bucket in [(short, 16), (long, 32)]:
    alone = sampler(state, tokens[p:p + 1], mask[p:p + 1], images[p:p + 1], jax.random.key(4),
                    group_size=2, prompt_ids=np.array([p]))
    assert alone.response_start == bucket
    rows = slice(2 * p, 2 * p + 2)
    np.testing.assert_array_equal(alone.tokens, batch.tokens[rows])
    np.testing.assert_allclose(alone.logprobs, batch.logprobs[rows], atol=1e-5)
    np.testing.assert_allclose(alone.entropies, batch.entropies[rows], atol=1e-5)


def test_end_token_padding_and_lengths(model, state, cfg):
  """A third of the vocabulary ends a row, so rows end at different steps."""
  stop = tuple(range(10, cfg.text.vocab_size, 3))
  config = SamplerConfig(max_new_tokens=12, stop_tokens=stop, prompt_buckets=(32,))
  tokens, mask, images = make_prompts(cfg, 6, seed=5)
  out = jax.device_get(Sampler(model, config)(state, tokens, mask, images, jax.random.key(5),
                                              group_size=4))
  is_stop = np.isin(out.tokens, stop)
  want_len = np.where(is_stop.any(1), is_stop.argmax(1) + 1, 12)
  assert len(set(want_len.tolist())) >= 3 and want_len.min() < 12  # The test has teeth.
  after = np.arange(12) >= want_len[:, None]
  np.testing.assert_array_equal(out.lengths, want_len)
  np.testing.assert_array_equal(out.response_mask, ~after)
  np.testing.assert_array_equal(out.tokens[after], PAD)
  np.testing.assert_array_equal(out.logprobs[after], 0.0)
  np.testing.assert_array_equal(out.entropies[after], 0.0)
  assert (out.logprobs[~after] < 0).all() and (out.entropies[~after] > 0).all()
  s = out.response_start
  np.testing.assert_array_equal(out.sequence_mask[:, s:], out.response_mask)
  np.testing.assert_array_equal(out.sequence_tokens[:, s:], out.tokens)


def test_sharded_on_8_devices_equals_one_device(cfg, state, sampled):
  tokens, mask, images, want = sampled
  sharder = Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  # The same parameters, placed by their logical axes (what build_model does with a mesh).
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(cfg, sharder, rngs=nnx.Rngs(0))))
  sharded = jax.device_put(state, state_shardings(abstract, sharder))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  sampler = Sampler(graphdef, SAMPLED, sharder)
  # The decode loop carries each device's shard of the response cache: rows over data × fsdp
  # (16 / 4), kv heads over tensor (2 / 2).
  lowered = sampler.lower(sharded, tokens, mask, images, jax.random.key(4), group_size=2)
  # The images are an input of the lowered program (the vision tower runs in it).
  assert f"tensor<{'x'.join(map(str, images.shape))}x" in lowered.as_text()
  hlo = lowered.compile().as_text()
  t = cfg.text
  local = {f"f32[4,1,{t.head_dim},{LR - 1}]", f"f32[4,1,{LR - 1},{t.head_dim}]"}
  assert any(re.search(r"\) while\(", l) and all(x in l for x in local) for l in hlo.split("\n"))
  # ... and each device's rows of the tokens and log-probs it writes (16 / 4 rows).
  rows = {f"s32[4,{LR}]", f"f32[4,{LR}]"}
  assert any(re.search(r"\) while\(", l) and all(x in l for x in rows) for l in hlo.split("\n"))
  out = sampler(sharded, tokens, mask, images, jax.random.key(4), group_size=2)
  assert out.tokens.sharding.spec[0] == ("data", "fsdp")
  assert len(out.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(out.tokens, want.tokens)
  np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-5)


def test_same_bucket_compiles_nothing(model, state, cfg, sampled):
  """The `sampled` fixture compiled bucket 32 for 8 prompts × 2 samples."""
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)
  sampler = Sampler(model, SAMPLED)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for seed in (8, 9):  # Other prompts and lengths, the same bucket.
      tokens, mask, images = make_prompts(cfg, 8, seed=seed, min_text=12, max_text=20)
      assert 16 < mask.sum(1).max() <= 32
      jax.block_until_ready(sampler(state, tokens, mask, images, jax.random.key(seed),
                                    group_size=2))
    assert "/jax/core/compile/backend_compile_duration" not in compiles
    # The counter does see a compile: shorter prompts take the 16-slot bucket.
    tokens, mask, images = make_prompts(cfg, 8, seed=10, min_text=1, max_text=5)
    jax.block_until_ready(sampler(state, tokens, mask, images, jax.random.key(0), group_size=2))
    assert "/jax/core/compile/backend_compile_duration" in compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# --- a model with a known next-token distribution ---

KNOWN_LOGITS = np.log(np.array([0.30, 0.20, 0.02, 0.12, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02,
                                0.01, 0.005, 0.003, 0.001, 0.0005, 0.0005]))


@pytest.fixture(scope="module")
def known():
  graphdef, state = ref.known_distribution_model(KNOWN_LOGITS)
  tokens = np.array([[1, 5, 7, 9, 4]] * 16, np.int32)
  mask = np.ones_like(tokens, bool)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, jnp.arange(5)[None])[0])
  logits = np.asarray(forward(state, tokens[:1]))[0, -1]
  np.testing.assert_allclose(logits, KNOWN_LOGITS, atol=1e-5)
  return graphdef, state, tokens, mask, logits


def test_top_p_never_leaves_the_nucleus(known):
  graphdef, state, tokens, mask, logits = known
  config = SamplerConfig(max_new_tokens=32, top_p=0.7, stop_tokens=(), prompt_buckets=(8,))
  out = Sampler(graphdef, config)(state, tokens, mask, None, jax.random.key(7), group_size=4)
  want = ref.sampling_log_probs(logits, top_p=0.7)
  nucleus = np.flatnonzero(np.isfinite(want))
  np.testing.assert_array_equal(np.sort(nucleus), [0, 1, 3, 4])  # 0.30+0.20+0.12+0.10 ≥ 0.7
  assert set(np.unique(out.tokens)) == set(nucleus)
  np.testing.assert_allclose(out.logprobs, want[np.asarray(out.tokens)], atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7])
def test_temperature_frequencies_pass_chi_square(known, temperature):
  graphdef, state, tokens, mask, logits = known
  config = SamplerConfig(max_new_tokens=64, temperature=temperature, stop_tokens=(),
                         prompt_buckets=(8,))
  out = Sampler(graphdef, config)(state, tokens, mask, None, jax.random.key(8), group_size=4)
  counts = np.bincount(np.asarray(out.tokens).ravel(), minlength=len(logits))
  n = counts.sum()

  def p_value(t):
    p = np.exp(ref.log_softmax(logits / t))
    # Pool the rare tokens so every expected count is at least 5.
    rare = p * n < 5
    obs = np.append(counts[~rare], counts[rare].sum())
    exp = np.append(p[~rare], p[rare].sum()) * n
    return stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue

  assert p_value(temperature) > 1e-3
  assert p_value(1.0) < 1e-6  # The test tells temperatures apart.


def test_align_prompts_right_aligns_with_positions_from_zero():
  tokens = np.array([[5, 6, 7, 0], [8, 0, 0, 0]], np.int32)
  mask = tokens > 0
  aligned, positions, valid = align_prompts(tokens, mask, 5, pad_id=0)
  np.testing.assert_array_equal(aligned, [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8]])
  np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(valid, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


@pytest.mark.parametrize("change,message", [
    (lambda t, m, i: (t, m[:, ::-1], i), "prompt_mask: expected right-padded"),
    (lambda t, m, i: (t, m & False, i), "prompt_mask: rows"),
    (lambda t, m, i: (np.ones((2, 40), np.int32), np.ones((2, 40), bool), i),
     "prompt_tokens: a prompt of 40 tokens"),
    (lambda t, m, i: (t, m, i.astype(np.float32)), "images: expected uint8"),
    (lambda t, m, i: (t, m[:, :-1], i), "prompt_tokens/prompt_mask"),
])
def test_bad_input_names_the_field(model, state, cfg, change, message):
  sampler = Sampler(model, SamplerConfig(max_new_tokens=2, prompt_buckets=(32,)))
  tokens, mask, images = make_prompts(cfg, 2, seed=11)
  with pytest.raises(ValueError, match=message):
    sampler(state, *change(tokens, mask, images), jax.random.key(0))


def test_decode_loop_updates_the_cache_in_place(model, state, cfg):
  """In the compiled while loop, every cache-shaped value is the loop's own buffer or an in-place
  dynamic-update-slice of it: no copy of the cache per step."""
  tokens, mask, images = make_prompts(cfg, 8, seed=4, min_text=6, max_text=14)
  hlo = Sampler(model, SAMPLED).lower(state, tokens, mask, images, jax.random.key(4),
                                      group_size=2).compile().as_text()
  t = cfg.text
  b, s = 16, LR - 1
  cache_shapes = {f"f32[{b},{t.num_kv_heads},{t.head_dim},{s}]",
                  f"f32[{b},{t.num_kv_heads},{s},{t.head_dim}]"}
  loops = [l for l in hlo.split("\n") if re.search(r"\) while\(", l)
           and all(shape in l.split(" while(")[0] for shape in cache_shapes)]
  assert len(loops) == 1
  updates = hlo_checks.in_place_writes(hlo, loops[0], cache_shapes)
  assert updates == 2 * t.num_layers  # k and v of every layer, each written once per step.


@pytest.mark.parametrize("phases", [2, 4])
def test_decode_phases_change_only_the_cache_size(model, state, cfg, phases):
  """Growing the response cache between phases leaves the samples as they are with one loop over
  the full cache (rows stopping in every phase), and each phase's loop carries only the slots its
  steps can reach."""
  stop = tuple(range(10, cfg.text.vocab_size, 19))
  lr = 40
  # The single call's phases (`compact` runs them as separate calls: tests/sampler/test_compact).
  one = SamplerConfig(max_new_tokens=lr, stop_tokens=stop, prompt_buckets=(32,), decode_phases=1,
                      compact=False)
  tokens, mask, images = make_prompts(cfg, 6, seed=6)
  args = (state, tokens, mask, images, jax.random.key(6))
  want = jax.device_get(Sampler(model, one)(*args, group_size=3))
  ends = decode_phase_ends(lr, phases)
  assert len(ends) == phases and ends[-1] == lr
  # The test has teeth: rows stop in every phase (a row of length L stopped at step L - 1).
  assert set(np.searchsorted(ends, want.lengths - 1, side="right").tolist()) == set(range(phases))
  phased = Sampler(model, dataclasses.replace(one, decode_phases=phases))
  got = jax.device_get(phased(*args, group_size=3))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  np.testing.assert_allclose(got.entropies, want.entropies, atol=1e-5)

  hlo = phased.lower(*args, group_size=3).compile().as_text()
  t = cfg.text
  key_cache = re.compile(rf"f32\[18,{t.num_kv_heads},{t.head_dim},(\d+)\]")
  slots = {int(m) for line in hlo.split("\n") if re.search(r"\) while\(", line)
           for m in key_cache.findall(line.split(" while(")[0])}
  assert sorted(slots) == [end - 1 for end in ends]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_buckets=()), "prompt_buckets: expected a non-empty tuple of positive lengths, "
                              "got ()"),
    (dict(prompt_buckets=(16, 0)), "prompt_buckets: expected a non-empty tuple of positive "
                                   "lengths, got (16, 0)"),
    (dict(stop_tokens=(2,), banned_tokens=(2, 3)), "banned_tokens: expected no overlap with "
                                                   "stop_tokens=(2,), got (2, 3)"),
])
def test_a_bad_sampler_setting_is_named(kwargs, message):
  with pytest.raises(ValueError) as e:
    SamplerConfig(max_new_tokens=2, **kwargs)
  assert str(e.value) == message


def test_bad_response_caps_are_named_with_their_first_values(model, state, cfg):
  sampler = Sampler(model, SamplerConfig(max_new_tokens=2, prompt_buckets=(32,)))
  tokens, mask, images = make_prompts(cfg, 2, seed=11)
  caps = np.arange(10, dtype=np.int32)  # 10 rows for 2 prompts × 2: a 0 among them, too
  with pytest.raises(ValueError) as e:
    sampler(state, tokens, mask, images, jax.random.key(0), group_size=2, max_lengths=caps)
  assert str(e.value) == ("max_lengths: expected integers >= 1 of shape (2,) (per prompt) or (4,) "
                          "(per row), got int32[10] [0, 1, 2, 3, 4, 5, 6, 7]")


def test_prompts_are_padded_with_the_configured_pad_token(model, state, cfg):
  """The prompt side of the sampled sequences: pad_id where the mask is off (right-aligned)."""
  sampler = Sampler(model, SamplerConfig(max_new_tokens=2, prompt_buckets=(32,), pad_id=3))
  tokens, mask, images = make_prompts(cfg, 2, seed=11)
  out = sampler(state, tokens, mask, images, jax.random.key(0))
  lb = out.sequence_tokens.shape[1] - 2
  prompt, prompt_mask = np.asarray(out.sequence_tokens[:, :lb]), np.asarray(out.sequence_mask[:, :lb])
  assert (~prompt_mask).any() and (prompt[~prompt_mask] == 3).all()


def test_the_row_invariant_cpu_build_is_chosen_by_the_meshs_platform():
  """XLA:CPU's row-invariant options for a CPU mesh (or none on a CPU host), the plain build for
  an accelerator mesh, whatever the host's default backend is."""
  import types
  from openvlthinker.sampler import RowJit
  jitted = RowJit(lambda x, **_: x)
  mesh_on = lambda platform: types.SimpleNamespace(mesh=types.SimpleNamespace(
      devices=np.array([types.SimpleNamespace(platform=platform)], dtype=object)))
  assert jitted.on(mesh_on("tpu")) is jitted.default
  assert jitted.on(mesh_on("cpu")) is jitted.cpu
  assert jitted.on(Sharder(None)) is (jitted.cpu if jax.default_backend() == "cpu"
                                      else jitted.default)
