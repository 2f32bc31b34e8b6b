"""The layer-scanned decoder against an independent reference: a plain per-layer loop over the
stacked parameters sliced layer by layer, with one dense softmax over a full visibility mask. Covers
forwards without cache, with a cache (prefill, decode steps, chunks, growth), behind a shared
prefix, with repeated prompt caches, and remat (logits and gradients); plus the parameters'
logical axes, HLO size against depth, and in-place cache writes in a decode loop."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import hlo_checks

from openvlthinker.models import decoder as dec
from openvlthinker.sharding import Sharder, make_mesh, state_shardings

ATOL = 1e-5
CFG = dec.DecoderConfig(vocab_size=128, width=32, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_dim=64)


def build(cfg, seed=0):
  """A decoder with random norm gains too (zeros at init), so every parameter matters."""
  graphdef, state = nnx.split(dec.Decoder(cfg, rngs=nnx.Rngs(seed)))
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  def gains(path, x):
    if path[-1].key == "scale":
      return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)
    return x
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(gains, pure))
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return build(CFG)


# --- the reference ---

def rms(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * (1 + scale)


def rotate(x, positions, theta):
  half = x.shape[-1] // 2
  angle = positions[..., None, None] * theta ** (-jnp.arange(half) / half)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


def visibility(mask, prefix, full_prefix):
  """bool[B, T, T]: key j is real and at or before query i, or both are in the prefix."""
  t = mask.shape[1]
  vis = mask[:, None, :] & np.tril(np.ones((t, t), bool))[None]
  if full_prefix:
    vis |= prefix[:, :, None] & prefix[:, None, :] & mask[:, None, :]
  return vis


def reference(model, x, positions, visible):
  """Logits float32[B, T, V] and per-layer keys [NL, B, T, K, H] (rotated) and values of a
  cache-free forward over the whole sequence, one layer after another."""
  cfg = model.cfg
  p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  g = cfg.num_heads // cfg.num_kv_heads
  keys, values = [], []
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[i], p["blocks"])
    h = rms(x, lp["attn_norm"]["scale"], cfg.norm_eps)
    q = rotate(jnp.einsum("btd,dnh->btnh", h, lp["attn"]["q"]), positions, cfg.rope_theta)
    k = rotate(jnp.einsum("btd,dkh->btkh", h, lp["attn"]["k"]), positions, cfg.rope_theta)
    v = jnp.einsum("btd,dkh->btkh", h, lp["attn"]["v"])
    keys.append(k), values.append(v)
    s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, g, 2)) / np.sqrt(cfg.head_dim)
    w = jax.nn.softmax(jnp.where(visible[:, None], s, -jnp.inf), -1)
    w = jnp.where(visible[:, None], w, 0.0)  # A query that sees nothing: 0, not NaN.
    x = x + jnp.einsum("bnts,bsnh,nhd->btd", w, jnp.repeat(v, g, 2), lp["attn"]["o"])
    h = rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
    x = x + (jax.nn.silu(h @ lp["mlp"]["gate"]) * (h @ lp["mlp"]["up"])) @ lp["mlp"]["down"]
  x = rms(x, p["final_norm"]["scale"], cfg.norm_eps)
  head = p["embedding"].T if cfg.tie_embeddings else p["head"]
  return x @ head, jnp.stack(keys), jnp.stack(values)


def sequences(rng, batch, length, pad=()):
  """Tokens int32[B, T], positions counting real tokens, and masks with pad[b] padding slots in
  front of row b."""
  tokens = rng.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  for b, n in enumerate(pad):
    mask[b, :n] = False
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, positions, mask


@jax.jit
def forward(m, tokens, positions, mask, prefix, cache=None):
  return m(m.embed(tokens), positions, mask, prefix, cache, full_prefix_attention=True)


@jax.jit
def forward_causal(m, tokens, positions, mask, cache=None):
  return m(m.embed(tokens), positions, mask, None, cache)


def close(got, want, where):
  """Logits equal at the real query positions `where` bool[B, T]."""
  np.testing.assert_allclose(np.asarray(got)[where], np.asarray(want)[where], atol=ATOL, rtol=0)


# --- numerics ---

def test_layers_have_their_own_parameters(model):
  q = np.asarray(model.blocks.attn.q[...])
  assert q.shape[0] == CFG.num_layers and not np.allclose(q[0], q[1])


@pytest.mark.parametrize("full_prefix", [False, True])
def test_forward_equals_reference(model, full_prefix):
  tokens, positions, mask = sequences(np.random.default_rng(0), 3, 9, pad=(0, 2, 4))
  prefix = mask & (np.arange(9) < 6)
  x = model.embed(tokens)
  if full_prefix:
    got, cache = forward(model, tokens, positions, mask, prefix)
  else:
    got, cache = forward_causal(model, tokens, positions, mask)
  assert cache is None
  want, _, _ = reference(model, x, positions, visibility(mask, prefix, full_prefix))
  close(got, want, mask)
  # The test has teeth: full prefix attention changes the prefix's logits.
  other, _, _ = reference(model, x, positions, visibility(mask, prefix, not full_prefix))
  assert np.abs(np.asarray(other - want)[prefix]).max() > 1e-3


def test_cache_prefill_steps_and_chunks_equal_reference(model):
  """Prefill 5 slots of a 12-slot cache (full prefix attention), two 1-token steps, a 2-token
  chunk, then growth to 14 slots and one more step: logits and the cache's keys and values."""
  tokens, positions, mask = sequences(np.random.default_rng(1), 2, 10, pad=(0, 2))
  prefix = mask & (np.arange(10) < 5)
  cache = dec.init_cache(CFG, 2, 12)
  logits, cache = forward(model, tokens[:, :5], positions[:, :5], mask[:, :5], prefix[:, :5],
                          cache)
  outs = [logits]
  for a, b in ((5, 6), (6, 7), (7, 9)):
    logits, cache = forward_causal(model, tokens[:, a:b], positions[:, a:b], mask[:, a:b], cache)
    outs.append(logits)
  cache = dec.grow_cache(cache, 14)
  logits, cache = forward_causal(model, tokens[:, 9:], positions[:, 9:], mask[:, 9:], cache)
  outs.append(logits)
  want, keys, values = reference(model, model.embed(tokens), positions,
                                 visibility(mask, prefix, True))
  close(jnp.concatenate(outs, 1), want, mask)
  assert cache.k.shape == (CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim, 14)
  assert int(cache.index) == 10
  np.testing.assert_array_equal(cache.valid, np.pad(mask, ((0, 0), (0, 4))))
  k = np.asarray(cache.k)[..., :10].transpose(0, 1, 4, 2, 3)  # [NL, B, S, K, H]
  v = np.asarray(cache.v)[:, :, :, :10].transpose(0, 1, 3, 2, 4)
  np.testing.assert_allclose(k[:, mask], np.asarray(keys)[:, mask], atol=ATOL)
  np.testing.assert_allclose(v[:, mask], np.asarray(values)[:, mask], atol=ATOL)
  np.testing.assert_array_equal(np.asarray(cache.k)[..., 10:], 0.0)


def prompts_and_responses(seed, r=2, g=3, lp=5, lr=5):
  """R prompts (row 1 left-padded by 2) and R·g responses: the prompt-major layout."""
  rng = np.random.default_rng(seed)
  p_tok, p_pos, p_mask = sequences(rng, r, lp, pad=(0, 2))
  resp = rng.integers(0, CFG.vocab_size, (r * g, lr)).astype(np.int32)
  r_pos = np.repeat(p_pos[:, -1:] + 1, g, 0) + np.arange(lr)
  seq = (np.concatenate([np.repeat(p_tok, g, 0), resp], 1),
         np.concatenate([np.repeat(p_pos, g, 0), r_pos], 1).astype(np.int32),
         np.concatenate([np.repeat(p_mask, g, 0), np.ones((r * g, lr), bool)], 1))
  return (p_tok, p_pos, p_mask), (resp, r_pos.astype(np.int32)), seq


def test_prefix_cache_equals_reference(model):
  """Prompts prefilled once serve their 3 responses each as a shared prefix; the responses run as
  a 3-token chunk into a 3-slot cache, grown to 5 for two single steps."""
  (p_tok, p_pos, p_mask), (resp, r_pos), (tokens, positions, mask) = prompts_and_responses(2)
  _, prompt_cache = forward(model, p_tok, p_pos, p_mask, p_mask, dec.init_cache(CFG, 2, 5))
  cache = dec.init_cache(CFG, 6, 3, prefix=prompt_cache)
  ones = lambda a, b: np.ones((6, b - a), bool)
  logits, cache = forward_causal(model, resp[:, :3], r_pos[:, :3], ones(0, 3), cache)
  outs = [logits]
  cache = dec.grow_cache(cache, 5)
  for t in (3, 4):
    logits, cache = forward_causal(model, resp[:, t:t + 1], r_pos[:, t:t + 1], ones(t, t + 1),
                                   cache)
    outs.append(logits)
  np.testing.assert_array_equal(cache.prefix.k, prompt_cache.k)  # read, never written
  want, _, _ = reference(model, model.embed(tokens), positions,
                         visibility(mask, mask & (np.arange(10) < 5), True))
  close(jnp.concatenate(outs, 1), want[:, 5:], mask[:, 5:])


def test_remat_gives_the_same_logits_and_gradients(model):
  """Without a cache, and through a prompt cache serving its responses as a prefix (train/rl.py's
  shared-prompt forward): the gradient flows through the cache. Both forwards agree too."""
  graphdef, params = nnx.split(model, nnx.Param)
  remat_graphdef, _ = nnx.split(dec.Decoder(dataclasses.replace(CFG, remat=True),
                                            rngs=nnx.Rngs(0)), nnx.Param)
  (p_tok, p_pos, p_mask), (resp, r_pos), (tokens, positions, mask) = prompts_and_responses(4)
  weights = jnp.asarray(np.random.default_rng(4).standard_normal((6, 5, CFG.vocab_size)))

  def loss(params, graphdef, shared):
    m = nnx.merge(graphdef, params)
    ones = np.ones(resp.shape, bool)
    if shared == "none":
      logits, _ = m(m.embed(tokens), positions, mask)
      logits = logits[:, 5:]
    else:
      _, cache = m(m.embed(p_tok), p_pos, p_mask, cache=dec.init_cache(CFG, 2, 5))
      logits, _ = m(m.embed(resp), r_pos, ones, cache=dec.init_cache(CFG, 6, 5, prefix=cache))
    return jnp.sum(logits * weights), logits

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=(1, 2))
  base_g, base = grad(params, graphdef, "none")
  # Gradients reach ~10², so paths that sum in another order agree to float32 rounding of that.
  path_atol = 1e-6 * max(np.abs(g).max() for g in jax.tree.leaves(base_g))
  for shared in ("none", "prefix"):
    want_g, want = grad(params, graphdef, shared)
    got_g, got = grad(params, remat_graphdef, shared)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=ATOL, rtol=0), want_g, got_g)
    np.testing.assert_allclose(want, base, atol=ATOL, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=path_atol, rtol=0), base_g,
                 want_g)
  assert np.abs(np.asarray(base_g["blocks"]["attn"]["k"][...])).max() > 1e-3
  # The test has teeth: with remat the backward pass recomputes each layer's matmuls.
  dots = lambda gd: str(jax.make_jaxpr(lambda p: grad(p, gd, "none"))(params)).count("dot_general")
  assert dots(remat_graphdef) > dots(graphdef)


# --- layout and compilation ---

def test_stacked_parameters_keep_their_logical_axes():
  sharder = Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  abstract = nnx.state(nnx.eval_shape(lambda: dec.Decoder(CFG, sharder, rngs=nnx.Rngs(0))))
  axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], abstract,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert axes["blocks"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
  assert axes["blocks"]["mlp"]["down"] == ("layers", "mlp", "embed")
  assert axes["blocks"]["attn_norm"]["scale"] == ("layers", None)
  assert axes["embedding"] == ("vocab", "embed")
  specs = jax.tree.map(lambda s: s.spec, state_shardings(abstract, sharder))
  assert specs["blocks"]["attn"]["q"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["attn"]["k"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["mlp"]["gate"] == P(None, "fsdp", "tensor")


def compiled_train_step(layers: int) -> str:
  cfg = dataclasses.replace(CFG, num_layers=layers)
  graphdef, params = nnx.split(dec.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tokens = jnp.zeros((2, 8), jnp.int32)

  def loss(params):
    m = nnx.merge(graphdef, params)
    return m(m.embed(tokens), jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool))[0].sum()
  return jax.jit(jax.grad(loss)).lower(params).compile().as_text()


def test_hlo_does_not_grow_with_depth():
  two, eight = len(compiled_train_step(2)), len(compiled_train_step(8))
  assert abs(eight - two) < 0.01 * two, (two, eight)


def test_decode_loop_writes_the_stacked_cache_in_place(model):
  """In a compiled decode loop (behind a prefix), the stacked cache is only passed along, read,
  or written in place by one dynamic-update-slice per step for k and v each: no copy of it."""
  graphdef, state = nnx.split(model)
  b, s = 4, 6

  @jax.jit
  def decode(state, prompt_cache):
    m = nnx.merge(graphdef, state)
    def step(t, carry):
      token, cache = carry
      logits, cache = m(m.embed(token), jnp.full((b, 1), t, jnp.int32), jnp.ones((b, 1), bool),
                        cache=cache)
      return jnp.argmax(logits, -1).astype(jnp.int32), cache
    cache = dec.init_cache(CFG, b, s, prefix=prompt_cache)
    return jax.lax.fori_loop(0, s, step, (jnp.zeros((b, 1), jnp.int32), cache))

  prompt_cache = dec.init_cache(CFG, 2, 5)
  hlo = decode.lower(state, prompt_cache).compile().as_text()
  n, k, h = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
  stacked = {f"f32[{n},{b},{k},{h},{s}]", f"f32[{n},{b},{k},{s},{h}]"}
  loops = [l for l in hlo.split("\n") if re.search(r"\) while\(", l)
           and all(x in l.split(" while(")[0] for x in stacked)]
  assert len(loops) == 2  # The decode loop and the layer scan inside it.
  updates = sum(hlo_checks.in_place_writes(hlo, loop, stacked) for loop in loops)
  assert updates == 2


def test_loop_layout_is_the_same_model():
  """`scan_layers=False` (per-layer weights, per-layer cache tuples, a Python loop) starts from
  the same weights and computes the same logits, caches and gradients as the scan."""
  scan = dec.Decoder(CFG, rngs=nnx.Rngs(3))
  loop = dec.Decoder(dataclasses.replace(CFG, scan_layers=False), rngs=nnx.Rngs(3))
  assert isinstance(loop.blocks, nnx.List) and len(loop.blocks) == CFG.num_layers
  for i, block in enumerate(loop.blocks):
    np.testing.assert_array_equal(block.attn.q[...], scan.blocks.attn.q[...][i])
    np.testing.assert_array_equal(block.mlp.down[...], scan.blocks.mlp.down[...][i])
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, CFG.width)), jnp.float32)
  positions = jnp.tile(jnp.arange(7), (2, 1))
  mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [5]]))

  def run(model):
    c = model.cfg
    prompt_cache = dec.init_cache(c, 2, 4)
    _, prompt_cache = model(x[:, :4], positions[:, :4], mask[:, :4], cache=prompt_cache)
    cache = dec.init_cache(c, 4, 2, prefix=prompt_cache)  # 2 samples per prompt
    cache = dec.grow_cache(cache, 3)
    rows = lambda a: jnp.repeat(a, 2, axis=0)
    logits, cache = model(rows(x[:, 4:]), rows(positions[:, 4:]), rows(mask[:, 4:]), cache=cache)
    return logits, cache

  (want, want_cache), (got, got_cache) = run(scan), run(loop)
  np.testing.assert_allclose(got, want, atol=ATOL)
  assert isinstance(got_cache.k, tuple) and got_cache.k[0].shape == want_cache.k.shape[1:]
  for i in range(CFG.num_layers):
    np.testing.assert_allclose(got_cache.k[i], want_cache.k[i], atol=ATOL)
    np.testing.assert_allclose(got_cache.v[i], want_cache.v[i], atol=ATOL)
  grad = lambda m: jax.grad(lambda p: jnp.sum(nnx.merge(nnx.graphdef(m), p)(
      x, positions, mask)[0] ** 2))(nnx.state(m))
  g_scan, g_loop = grad(scan), grad(loop)
  for i, block in enumerate(g_loop["blocks"].values()):
    np.testing.assert_allclose(block["attn"]["k"][...], g_scan["blocks"]["attn"]["k"][...][i],
                               rtol=1e-4, atol=1e-5)
