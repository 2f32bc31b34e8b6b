"""Building blocks shared by the vision encoder and the decoder.

Weights are `nnx.Param`s created through `param`, which records their logical axis names
(`logical_axes` metadata) for `openvlthinker.sharding`. Parameters are stored in `param_dtype` and
cast to the compute `dtype` at use; norms and softmax run in float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter initialised by `init` and tagged with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"param: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def fan_in_init(fan_in_axes: Sequence[int]) -> Initializer:
  """Truncated-normal init scaled by 1/sqrt(fan-in) over the given input axes."""
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                           in_axis=tuple(fan_in_axes), out_axis=-1)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned (1 + scale) gain, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.zeros, (dim,), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...])).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with bias, in float32 (the ViT's norm)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (None,))
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (half-split convention). x: [B, L, N, H]; positions: int32[B, L]."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, L, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Grouped-query attention.

  q: [B, L, N, H]; k, v: [B, S, K, H] with N a multiple of K; mask: bool[B, L, S] or None.
  Returns [B, L, N, H]. Logits and softmax in float32.
  """
  b, l, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, l, kv, n // kv, h)
  logits = jnp.einsum("blkgh,bskh->bkgls", q, k, preferred_element_type=jnp.float32)
  logits = logits * (h ** -0.5)
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgls,bskh->blkgh", probs, v)
  return out.reshape(b, l, n, h)
