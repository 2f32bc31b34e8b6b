"""Decoder-only language model: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP,
tied or untied head, and a preallocated KV cache for generation (optionally behind a prefix cache
shared by groups of rows: a prompt's cache, stored once for its G samples).

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

from openvlthinker.models import layers
from openvlthinker.sharding import Sharder


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

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads: {self.num_heads} is not a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim: expected an even number for rotary embeddings, "
                       f"got {self.head_dim}")


@flax.struct.dataclass
class KVCache:
  """A preallocated cache: per layer keys k [B, K, H, S] (stored transposed, see
  `layers.KVPart`) and values v [B, K, S, H], slot validity bool[B, S] and the next write slot
  (shared by all rows).

  `prefix`, when set, is a read-only cache of R rows (R divides B) that every query also attends to,
  before its own slots: row r serves rows r·B/R … (r+1)·B/R - 1. A prompt prefilled once then
  stays in memory once for its G samples, and each decode step reads it once per prompt.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array
  prefix: KVCache | None = None

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]


CACHE_KV_AXES = ("cache_batch", "act_kv_heads", None, None)


def init_cache(config: DecoderConfig, batch: int, max_length: int,
               sharder: Sharder = Sharder(), prefix: KVCache | None = None) -> KVCache:
  """An empty cache in the model's compute dtype, sharded (batch over data/fsdp, kv heads over
  tensor), optionally behind a shared `prefix` (see `KVCache`)."""
  if prefix is not None and batch % prefix.valid.shape[0]:
    raise ValueError(f"init_cache: batch {batch} is not a multiple of the prefix's "
                     f"{prefix.valid.shape[0]} rows")
  k_shape = (batch, config.num_kv_heads, config.head_dim, max_length)
  v_shape = (batch, config.num_kv_heads, max_length, config.head_dim)
  zeros = lambda shape: sharder.constrain(jnp.zeros(shape, config.dtype), CACHE_KV_AXES)
  return KVCache(k=tuple(zeros(k_shape) for _ in range(config.num_layers)),
                 v=tuple(zeros(v_shape) for _ in range(config.num_layers)),
                 valid=sharder.constrain(jnp.zeros((batch, max_length), bool), ("cache_batch", None)),
                 index=jnp.zeros((), jnp.int32), prefix=prefix)


def grow_cache(cache: KVCache, max_length: int, sharder: Sharder = Sharder()) -> KVCache:
  """`cache` with empty slots appended up to `max_length` (the prefix is shared, not copied)."""
  extra = max_length - cache.max_length
  if extra < 0:
    raise ValueError(f"grow_cache: max_length {max_length} < the cache's {cache.max_length}")
  pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
  kv = lambda xs, axis: tuple(sharder.constrain(pad(x, axis), CACHE_KV_AXES) for x in xs)
  return cache.replace(k=kv(cache.k, 3), v=kv(cache.v, 2),
                       valid=sharder.constrain(pad(cache.valid, 1), ("cache_batch", None)))


def attention_mask(input_mask: jax.Array, prefix_mask: jax.Array | None, cache: KVCache | None,
                   full_prefix: bool) -> tuple[jax.Array, jax.Array]:
  """bool[B, L, S] attention mask and the key validity bool[B, S] (the updated cache.valid)."""
  b, l = input_mask.shape
  if cache is None:
    start, valid = 0, input_mask
  else:
    start = cache.index
    valid = jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, start))
  s = valid.shape[1]
  q_slot = start + jnp.arange(l)
  mask = jnp.arange(s)[None, :] <= q_slot[:, None]  # [L, S]
  mask = valid[:, None, :] & mask[None]
  if full_prefix and prefix_mask is not None:
    prefix_k = prefix_mask if cache is None else jax.lax.dynamic_update_slice(
        jnp.zeros((b, s), bool), prefix_mask, (0, start))
    mask = mask | (prefix_mask[:, :, None] & prefix_k[:, None, :] & valid[:, None, :])
  return mask, valid


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache."""

  def __init__(self, cfg: DecoderConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = layers.fan_in_init((0,))
    self.q = layers.param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), cfg.param_dtype)
    self.k = layers.param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
    self.v = layers.param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
    self.o = layers.param(rngs, layers.fan_in_init((0, 1)), (n, h, d),
                          ("heads", "head_dim", "embed"), cfg.param_dtype)

  def __call__(self, x, rope, mask, layer_cache, prefix: layers.KVPart | None = None):
    """rope: `layers.rope_tables` of the positions; layer_cache: (k, v, write slot) of this layer
    or None; prefix: shared keys and values attended before the layer's own."""
    shd, dt = self.sharder, self.cfg.dtype
    q = jnp.einsum("bld,dnh->blnh", x, self.q[...].astype(dt))
    k = jnp.einsum("bld,dkh->blkh", x, self.k[...].astype(dt))
    v = jnp.einsum("bld,dkh->blkh", x, self.v[...].astype(dt))
    q = shd.constrain(layers.apply_rope(q, rope), ("batch", None, "act_heads", None))
    # Projections stay in [B, L, ...] form (no per-call weight transposes); moving L behind the
    # heads is free at decode time (L = 1).
    k = layers.apply_rope(k, rope).transpose(0, 2, 3, 1)  # [B, K, H, L]
    v = v.transpose(0, 2, 1, 3)  # [B, K, L, H]
    if layer_cache is not None:
      k_cache, v_cache, start = layer_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, start))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, start, 0))
      k, v = shd.constrain(k, CACHE_KV_AXES), shd.constrain(v, CACHE_KV_AXES)
    parts = [layers.KVPart(k, v, mask)]
    if prefix is not None:
      parts.insert(0, prefix)
    out = layers.attend(q, parts)
    out = jnp.einsum("blnh,nhd->bld", out, self.o[...].astype(dt))
    return out, (k, v)


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

  def __call__(self, x, rope, mask, layer_cache, prefix=None):
    h, kv = self.attn(self.attn_norm(x), rope, mask, layer_cache, prefix)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), kv


class Decoder(nnx.Module):
  """The language model over embeddings; `embed` turns token ids into embeddings."""

  def __init__(self, cfg: DecoderConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    # std 1/sqrt(D): unit-scale inputs after the sqrt(D) multiply and O(1) tied logits at init.
    self.embedding = layers.param(rngs, nnx.initializers.normal(cfg.width ** -0.5),
                                  (cfg.vocab_size, cfg.width),
                                  ("vocab", "embed"), cfg.param_dtype)
    self.blocks = nnx.List([Block(cfg, sharder, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, layers.fan_in_init((0,)), (cfg.width, cfg.vocab_size),
                               ("embed", "vocab"), cfg.param_dtype)

  def rope_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin, cos float32[..., 1, head_dim / 2] of the rotary angles of int32 `positions`."""
    return layers.rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int32[B, L] → [B, L, D] in the compute dtype (scaled by sqrt(D), Gemma-style)."""
    # The lookup gathers from a table sharded over vocab and embed; replicating it first (what
    # FSDP does for every weight at use) keeps SPMD from rematerialising the gather's output.
    table = self.sharder.constrain(self.embedding[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.cfg.dtype)
    return self.sharder.constrain(x * jnp.sqrt(float(self.cfg.width)).astype(x.dtype),
                                  ("batch", None, None))

  def __call__(self, x: jax.Array, positions: jax.Array, input_mask: jax.Array,
               prefix_mask: jax.Array | None = None, cache: KVCache | None = None,
               full_prefix_attention: bool = False, logits_from: int = 0,
               rope: tuple[jax.Array, jax.Array] | None = None):
    """x: [B, L, D]; positions int32[B, L]; masks bool[B, L] → (float32[B, L - logits_from, V],
    cache): logits from column `logits_from` (static) on. `rope`, when given, is
    `self.rope_tables(positions)` computed by the caller (the sampler builds every decode step's
    tables before its loop: XLA fuses sin and cos into each consumer, so a step would otherwise
    evaluate them once per head and per use)."""
    mask, valid = attention_mask(input_mask, prefix_mask, cache, full_prefix_attention)
    if rope is None:
      rope = self.rope_tables(positions)
    shared = None if cache is None else cache.prefix
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
      prefix = None if shared is None else layers.KVPart(shared.k[i], shared.v[i],
                                                         shared.valid[:, None, :])
      if self.cfg.remat:
        x, (k, v) = nnx.remat(lambda blk, *a: blk(*a))(block, x, rope, mask, layer_cache, prefix)
      else:
        x, (k, v) = block(x, rope, mask, layer_cache, prefix)
      x = self.sharder.constrain(x, ("batch", None, None))
      new_k.append(k)
      new_v.append(v)
    # Columns before `logits_from` skip the head (the sampler's prefill needs one column).
    x = self.final_norm(x[:, logits_from:])
    if self.cfg.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("bld,dv->blv", x, self.head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    logits = self.sharder.constrain(logits, ("batch", None, "act_vocab"))
    if cache is not None:
      cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid,
                      index=cache.index + input_mask.shape[1], prefix=shared)
    return logits, cache
