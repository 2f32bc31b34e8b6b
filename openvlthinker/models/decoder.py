"""Decoder-only language model: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP,
tied or untied head, and a preallocated KV cache for generation (optionally behind a prefix cache
shared by groups of rows: a prompt's cache, stored once for its G samples).

The blocks' parameters are stacked along a leading "layers" axis and the forward is one
`lax.scan` over them (optionally rematerialised per layer), so tracing, HLO and compile time do
not grow with depth. The KV cache is stacked the same way.

The decoder takes embeddings (so the VLM can splice image features in) and returns float32 logits.
Attention masks come from slot order plus validity: a key is visible when it is a real token and
sits at or before the query's slot, or when both are in the prefix (image + prompt) and the config
asks for PaliGemma-style full attention there.
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from openvlthinker.fields import DTYPES, check, positive_int
from openvlthinker.models import layers
from openvlthinker.sharding import Sharder

# Logical name of the leading axis of stacked per-layer parameters and caches. No sharding rule
# maps it: every device holds all layers of its shard (the scan slices one layer at a time).
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 1024
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_dim: int = 1024
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # Layers under one lax.scan over stacked parameters (compile time and HLO size independent of
  # depth), or a Python loop over per-layer parameters (faster on CPU: XLA:CPU copies each
  # layer's slice of stacked weights and cache before its matmuls, ~25% of a small model's step).
  scan_layers: bool = True
  # Hugging Face families: q/k/v biases (Qwen2), per-head RMSNorm of q and k before the rotation
  # (Qwen3), no sqrt(D) embedding scale (Gemma-style scale is this project's own choice).
  qkv_bias: bool = False
  qk_norm: bool = False
  embed_scale: bool = True
  # M-RoPE (Qwen-VL): positions carry a trailing (t, h, w) axis and each rotary frequency reads
  # one of them: the first mrope_section[0] frequencies t, then h, then w (Qwen2-VL), or t/h/w
  # interleaved frequency by frequency (Qwen3-VL). Empty: 1-D positions.
  mrope_section: tuple[int, ...] = ()
  mrope_interleaved: bool = False

  def __post_init__(self):
    for f in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim"):
      check(positive_int(getattr(self, f)), f, "a positive integer", getattr(self, f))
    # head_dim is its own field: width need not be num_heads × head_dim.
    check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
          f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
    check(self.head_dim % 2 == 0, "head_dim", "an even number (rotary embeddings)", self.head_dim)
    for f in ("dtype", "param_dtype"):
      check(getattr(self, f) in DTYPES, f, f"one of {DTYPES}", getattr(self, f))
    check(not self.mrope_section or (len(self.mrope_section) == 3
                                     and sum(self.mrope_section) == self.head_dim // 2),
          "mrope_section", f"3 sizes summing to head_dim / 2 = {self.head_dim // 2}",
          self.mrope_section)


@flax.struct.dataclass
class KVCache:
  """A preallocated cache: keys k [NL, B, K, H, S] (stored transposed, see `layers.KVPart`) and
  values v [NL, B, K, S, H] of all NL layers (with `scan_layers`; otherwise tuples of NL arrays
  [B, K, H, S] and [B, K, S, H]), slot validity bool[B, S] and the next write slot (shared by all
  rows).

  `prefix`, when set, is a read-only cache of R rows (R divides B) that every query also attends to,
  before its own slots: row r serves rows r·B/R … (r+1)·B/R - 1. A prompt prefilled once then
  stays in memory once for its G samples, and each decode step reads it once per prompt.
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array
  prefix: KVCache | None = None

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]


CACHE_KV_AXES = (LAYERS, "cache_batch", "act_kv_heads", None, None)
CACHE_VALID_AXES = ("cache_batch", None)


def _constrain_cache(cache: KVCache, sharder: Sharder) -> KVCache:
  def kv(x):  # stacked [NL, B, K, ., .], or a tuple of per-layer [B, K, ., .]
    if isinstance(x, tuple):
      return tuple(sharder.constrain(a, CACHE_KV_AXES[1:]) for a in x)
    return sharder.constrain(x, CACHE_KV_AXES)
  return cache.replace(k=kv(cache.k), v=kv(cache.v),
                       valid=sharder.constrain(cache.valid, CACHE_VALID_AXES))


def init_cache(config: DecoderConfig, batch: int, max_length: int,
               sharder: Sharder = Sharder(), prefix: KVCache | None = None) -> KVCache:
  """An empty cache in the model's compute dtype, sharded (batch over data/fsdp, kv heads over
  tensor), optionally behind a shared `prefix` (see `KVCache`)."""
  if prefix is not None and batch % prefix.valid.shape[0]:
    raise ValueError(f"init_cache: batch {batch} is not a multiple of the prefix's "
                     f"{prefix.valid.shape[0]} rows")
  n, k, h = config.num_layers, config.num_kv_heads, config.head_dim
  keys, values = (batch, k, h, max_length), (batch, k, max_length, h)
  if config.scan_layers:
    keys, values = (jnp.zeros((n,) + keys, config.dtype), jnp.zeros((n,) + values, config.dtype))
  else:
    keys = tuple(jnp.zeros(keys, config.dtype) for _ in range(n))
    values = tuple(jnp.zeros(values, config.dtype) for _ in range(n))
  return _constrain_cache(KVCache(
      k=keys, v=values, valid=jnp.zeros((batch, max_length), bool),
      index=jnp.zeros((), jnp.int32), prefix=prefix), sharder)


def grow_cache(cache: KVCache, max_length: int, sharder: Sharder = Sharder()) -> KVCache:
  """`cache` with empty slots appended up to `max_length` (the prefix is shared, not copied)."""
  extra = max_length - cache.max_length
  if extra < 0:
    raise ValueError(f"grow_cache: max_length {max_length} < the cache's {cache.max_length}")
  pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
  # Slots are the last axis of keys ([.., K, H, S]) and the one before last of values.
  cache = cache.replace(
      k=jax.tree.map(lambda x: pad(x, x.ndim - 1), cache.k),
      v=jax.tree.map(lambda x: pad(x, x.ndim - 2), cache.v), valid=pad(cache.valid, 1))
  return _constrain_cache(cache, sharder)


def take_cache_rows(cache: KVCache, rows: jax.Array, prefix_rows: jax.Array | None = None,
                    sharder: Sharder = Sharder()) -> KVCache:
  """The cache of rows int32[B'] of `cache`, in that order (same slots and write index), behind
  rows int32[R'] of its shared prefix, which must keep B' / R' rows per prefix row (the sampler
  drops whole prompt groups: `rows` are G per kept prompt, `prefix_rows` the kept prompts)."""
  if (cache.prefix is None) != (prefix_rows is None):
    raise ValueError("take_cache_rows: prefix_rows must be given exactly when the cache has a "
                     "prefix")
  if prefix_rows is not None and rows.shape[0] % prefix_rows.shape[0]:
    raise ValueError(f"take_cache_rows: {rows.shape[0]} rows are not a multiple of the "
                     f"{prefix_rows.shape[0]} prefix rows")
  # Rows are axis 1 of stacked [NL, B, ...] keys and values, axis 0 of per-layer tuples.
  take = lambda x, axis: jnp.take(x, rows, axis=axis, mode="clip")
  kv = lambda x: (tuple(take(a, 0) for a in x) if isinstance(x, tuple) else take(x, 1))
  prefix = (None if cache.prefix is None else
            take_cache_rows(cache.prefix, prefix_rows, None, sharder))
  return _constrain_cache(cache.replace(k=kv(cache.k), v=kv(cache.v),
                                        valid=take(cache.valid, 0), prefix=prefix), sharder)


def attention_mask(input_mask: jax.Array, prefix_mask: jax.Array | None,
                   full_prefix: bool) -> jax.Array:
  """bool[B, L, L]: which of one call's L tokens each of them sees (the call's own keys; cached
  slots come from `cached_mask`)."""
  l = input_mask.shape[1]
  mask = input_mask[:, None, :] & jnp.tril(jnp.ones((l, l), bool))[None]
  if full_prefix and prefix_mask is not None:
    mask = mask | (prefix_mask[:, :, None] & prefix_mask[:, None, :] & input_mask[:, None, :])
  return mask


def cached_mask(cache: KVCache) -> jax.Array:
  """bool[B, 1, S]: the cache's slots that a call writing from `cache.index` on sees: the valid
  ones before that slot (every query of the call sits at or after it)."""
  return (cache.valid & (jnp.arange(cache.max_length) < cache.index))[:, None, :]


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions over the call's own keys and, before
  them, any cached ones."""

  def __init__(self, cfg: DecoderConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = layers.fan_in_init((0,))
    self.q = layers.param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), cfg.param_dtype)
    self.k = layers.param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
    self.v = layers.param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
    self.o = layers.param(rngs, layers.fan_in_init((0, 1)), (n, h, d),
                          ("heads", "head_dim", "embed"), cfg.param_dtype)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = layers.param(rngs, zeros, (n, h), ("heads", "head_dim"), cfg.param_dtype)
      self.k_bias = layers.param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), cfg.param_dtype)
      self.v_bias = layers.param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), cfg.param_dtype)
    if cfg.qk_norm:
      self.q_norm = layers.RMSNorm(h, eps=cfg.norm_eps, rngs=rngs)
      self.k_norm = layers.RMSNorm(h, eps=cfg.norm_eps, rngs=rngs)

  def __call__(self, x, rope, mask, context: tuple[layers.KVPart, ...] = (), store=None):
    """x [B, L, D]; rope: `layers.rope_tables` of the positions; mask bool[B, L, L] over the
    call's own keys; context: cached keys and values (a shared prefix, this layer's cache)
    attended in one softmax with them. Returns [B, L, D] and the call's keys [B, K, H, L] and
    values [B, K, L, H] (what a cache stores) or, with `store(k, v) -> (context, kv)` (which
    writes them into a cache and reads the context from it), what `store` returns."""
    shd, dt = self.sharder, self.cfg.dtype
    q = jnp.einsum("bld,dnh->blnh", x, self.q[...].astype(dt))
    k = jnp.einsum("bld,dkh->blkh", x, self.k[...].astype(dt))
    v = jnp.einsum("bld,dkh->blkh", x, self.v[...].astype(dt))
    if self.cfg.qkv_bias:
      q, k, v = (a + b[...].astype(dt) for a, b in
                 ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = shd.constrain(layers.apply_rope(q, rope), ("batch", None, "act_heads", None))
    # Projections stay in [B, L, ...] form (no per-call weight transposes); moving L behind the
    # heads is free at decode time (L = 1).
    k = layers.apply_rope(k, rope).transpose(0, 2, 3, 1)  # [B, K, H, L]
    v = v.transpose(0, 2, 1, 3)  # [B, K, L, H]
    kv = (k, v)
    if store is not None:  # Writes k, v into a cache and reads the context from what it wrote.
      context, kv = store(k, v)
    out = layers.attend(q, list(context) + [layers.KVPart(k, v, mask)])
    out = jnp.einsum("blnh,nhd->bld", out, self.o[...].astype(dt))
    return out, kv


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg: DecoderConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    init = layers.fan_in_init((0,))
    self.gate = layers.param(rngs, init, (cfg.width, cfg.mlp_dim), ("embed", "mlp"), cfg.param_dtype)
    self.up = layers.param(rngs, init, (cfg.width, cfg.mlp_dim), ("embed", "mlp"), cfg.param_dtype)
    self.down = layers.param(rngs, init, (cfg.mlp_dim, cfg.width), ("mlp", "embed"), cfg.param_dtype)

  def __call__(self, x):
    dt = self.cfg.dtype
    h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    h = self.sharder.constrain(h, ("batch", None, "act_mlp"))
    return h @ self.down[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: DecoderConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, sharder, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
    self.mlp = MLP(cfg, sharder, rngs=rngs)

  def __call__(self, x, rope, mask, context=(), store=None):
    h, kv = self.attn(self.attn_norm(x), rope, mask, context, store)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), kv


def stack_blocks(blocks: list[Block]) -> Block:
  """One `Block` whose parameters are the given blocks' stacked on a leading axis, their logical
  axes prefixed with "layers" (which no rule maps: each device holds every layer of its shard)."""
  graphdef, *states = (nnx.split(blocks[0])[0],) + tuple(nnx.state(b) for b in blocks)

  def stack(*variables):
    v = variables[0]
    names = v.get_metadata().get("logical_axes") or (None,) * v[...].ndim
    return v.replace(jnp.stack([x[...] for x in variables]), logical_axes=(LAYERS,) + tuple(names))

  return nnx.merge(graphdef, jax.tree.map(stack, *states,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))


class Decoder(nnx.Module):
  """The language model over embeddings; `embed` turns token ids into embeddings."""

  def __init__(self, cfg: DecoderConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    # std 1/sqrt(D): unit-scale inputs after the sqrt(D) multiply and O(1) tied logits at init.
    self.embedding = layers.param(rngs, nnx.initializers.normal(cfg.width ** -0.5),
                                  (cfg.vocab_size, cfg.width),
                                  ("vocab", "embed"), cfg.param_dtype)
    # Drawn layer by layer either way, so both layouts start from the same weights.
    blocks = [Block(cfg, sharder, rngs=rngs) for _ in range(cfg.num_layers)]
    self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = layers.RMSNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, layers.fan_in_init((0,)), (cfg.width, cfg.vocab_size),
                               ("embed", "vocab"), cfg.param_dtype)

  def rope_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin, cos float32[..., 1, head_dim / 2] of the rotary angles of int32 `positions`
    ([...] for 1-D RoPE; [..., 3] (t, h, w) with `mrope_section`)."""
    cfg = self.cfg
    if cfg.mrope_section and positions.ndim and positions.shape[-1] == 3:
      return layers.mrope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                                 cfg.mrope_interleaved)
    return layers.rope_tables(positions, cfg.head_dim, cfg.rope_theta)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int32[B, L] → [B, L, D] in the compute dtype (scaled by sqrt(D), Gemma-style)."""
    # The lookup gathers from a table sharded over vocab and embed; replicating it first (what
    # FSDP does for every weight at use) keeps SPMD from rematerialising the gather's output.
    table = self.sharder.constrain(self.embedding[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.cfg.dtype)
    if self.cfg.embed_scale:
      x = x * jnp.sqrt(float(self.cfg.width)).astype(x.dtype)
    return self.sharder.constrain(x, ("batch", None, None))

  def __call__(self, x: jax.Array, positions: jax.Array, input_mask: jax.Array,
               prefix_mask: jax.Array | None = None, cache: KVCache | None = None,
               full_prefix_attention: bool = False, logits_from: int = 0,
               rope: tuple[jax.Array, jax.Array] | None = None,
               deepstack: jax.Array | None = None, attention: jax.Array | None = None):
    """x: [B, L, D]; positions int32[B, L]; masks bool[B, L] → (float32[B, L - logits_from, V],
    cache): logits from column `logits_from` (static) on. `rope`, when given, is
    `self.rope_tables(positions)` computed by the caller (the sampler builds every decode step's
    tables before its loop: XLA fuses sin and cos into each consumer, so a step would otherwise
    evaluate them once per head and per use). `deepstack` [k, B, L, D] (Qwen3-VL): added to the
    residual stream after each of the first k layers (visual features of intermediate vision
    layers at the image tokens, zeros elsewhere). `attention` bool[B, L, L], when given, replaces
    the mask built from the input and prefix masks (packed rows, `models.packed`)."""
    shd = self.sharder
    mask = (attention_mask(input_mask, prefix_mask, full_prefix_attention) if attention is None
            else attention)
    if rope is None:
      rope = self.rope_tables(positions)
    # Per-layer inputs (sliced by the scan, or indexed by the loop): parameters and the cached
    # keys and values. Either way a decode step writes the cache in place and copies none of it.
    scan = self.cfg.scan_layers
    if scan:
      graphdef, params = nnx.split(self.blocks)
    else:
      graphdef, params = nnx.split(self.blocks[0])[0], [nnx.state(b) for b in self.blocks]
    xs, masks = {"params": params, "index": jnp.arange(self.cfg.num_layers)}, {}
    if deepstack is not None and deepstack.shape[0] > self.cfg.num_layers:
      raise ValueError(f"deepstack: {deepstack.shape[0]} feature sets for "
                       f"{self.cfg.num_layers} layers")
    if cache is not None:
      # A call as long as the cache fills it from slot 0 (a prefill): no cached slot to attend.
      if cache.max_length > input_mask.shape[1]:
        xs["cache"], masks["cache"] = (cache.k, cache.v), cached_mask(cache)
      if cache.prefix is not None:
        xs["prefix"] = (cache.prefix.k, cache.prefix.v)
        masks["prefix"] = cache.prefix.valid[:, None, :]

    start = None if cache is None else cache.index
    write = lambda buf, new, slot_axis: jax.lax.dynamic_update_slice(
        buf, new.astype(buf.dtype), tuple(start if a == slot_axis else 0 for a in range(buf.ndim)))
    constrain_kv = lambda k, v: (shd.constrain(k, CACHE_KV_AXES[1:]),
                                 shd.constrain(v, CACHE_KV_AXES[1:]))

    def layer(x, xs):
      # Keys in slot order: the shared prefix, the row's cached slots, then (in Attention) the
      # call's own.
      context = tuple(layers.KVPart(*xs[name], masks[name]) for name in ("prefix", "cache")
                      if name in xs)
      store = None
      if "buffers" in xs:
        # Loop layout: the layer writes its keys into its cache first, then reads the cached
        # slots (those before `start`) from the written buffer, so the read follows the write
        # and XLA updates the buffer in place. Returns the written buffers.
        def store(k, v, prefix=context):
          kb, vb = (write(buf, new, axis) for buf, new, axis
                    in zip(xs["buffers"], constrain_kv(k, v), (3, 2)))
          return prefix + ((layers.KVPart(kb, vb, masks["cache"]),)
                           if "cache" in masks else ()), (kb, vb)
        context = ()
      x, kv = nnx.merge(graphdef, xs["params"])(x, rope, mask, context, store)
      if deepstack is not None:
        i, k = xs["index"], deepstack.shape[0]
        x = x + jnp.where(i < k, deepstack[jnp.minimum(i, k - 1)], 0).astype(x.dtype)
      x = shd.constrain(x, ("batch", None, None))
      return x, (None if cache is None else kv if store else constrain_kv(*kv))

    if self.cfg.remat:
      # Per layer only the residual stream is saved; the scan forbids CSE across iterations
      # already, so the barrier prevent_cse adds would only cost fusion.
      layer = jax.checkpoint(layer, prevent_cse=False)
    if scan:
      # The scan's outputs are the call's new keys and values, written into the stacked cache
      # after it (the scan reads the cache, so it is done with it).
      x, new_kv = jax.lax.scan(layer, x, xs)
      if cache is not None:
        k, v = new_kv  # [NL, B, K, H, L], [NL, B, K, L, H]
        cache = cache.replace(k=write(cache.k, k, 4), v=write(cache.v, v, 3))
    else:
      if cache is not None:
        xs["buffers"] = (cache.k, cache.v)
        xs.pop("cache", None)  # read from the written buffers instead
      outs = []
      for i in range(self.cfg.num_layers):
        layer_xs = {name: value[i] if name in ("params", "index") else
                    tuple(part[i] for part in value)
                    for name, value in xs.items()}  # layer i's parameters, cache and prefix
        x, kv = layer(x, layer_xs)
        outs.append(kv)
      if cache is not None:
        k, v = zip(*outs)
        cache = cache.replace(k=tuple(k), v=tuple(v))
    # Columns before `logits_from` skip the head (the sampler's prefill needs one column).
    x = self.final_norm(x[:, logits_from:])
    if self.cfg.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("bld,dv->blv", x, self.head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    logits = shd.constrain(logits, ("batch", None, "act_vocab"))
    if cache is not None:
      cache = _constrain_cache(cache.replace(
          valid=jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, start)),
          index=start + input_mask.shape[1]), shd)
    return logits, cache
