"""Building blocks shared by the vision encoder and the decoder.

Weights are `nnx.Param`s created through `param`, which records their logical axis names
(`logical_axes` metadata) for `openvlthinker.sharding`. Parameters are stored in `param_dtype` and
cast to the compute `dtype` at use; norms and softmax run in float32.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """sin, cos float32[B, L, 1, head_dim / 2] of the rotary angles, computed once per forward for
  every layer. (XLA may still fuse sin and cos into each consumer and evaluate them per head; a
  loop that calls the model many times passes tables computed outside it, see `Decoder`'s rope.)
  """
  half = head_dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq
  return jnp.sin(angle), jnp.cos(angle)


def mrope_tables(positions: jax.Array, head_dim: int, theta: float, section: Sequence[int],
                 interleaved: bool) -> tuple[jax.Array, jax.Array]:
  """`rope_tables` of multimodal positions int32[B, L, 3] (t, h, w): frequency j rotates by the
  axis `section` assigns it, in blocks (t t … h h … w w …, Qwen2-VL) or interleaved from
  frequency 0 (t h w t h w …, Qwen3-VL, where w's share may end first)."""
  half = head_dim // 2
  j = np.arange(half)
  if interleaved:
    axis = np.zeros(half, np.int32)
    for a in (1, 2):
      axis[(j % 3 == a) & (j < 3 * section[a])] = a
  else:
    axis = np.repeat(np.arange(3), section)
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.take(positions.astype(jnp.float32), jnp.asarray(axis), axis=-1)[..., None, :] * freq
  return jnp.sin(angle), jnp.cos(angle)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding (half-split convention). x: [B, L, N, H]; rope: `rope_tables(...)`."""
  sin, cos = rope
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def splice_images(x: jax.Array, is_image: jax.Array, feats: jax.Array) -> jax.Array:
  """x [B, L, D] with the j-th image token of each row (is_image bool[B, L]) replaced by that
  row's j-th image feature (feats [B, M, D]); rows with more image tokens than M reuse the last."""
  slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
  spliced = jnp.take_along_axis(feats.astype(x.dtype), slot[..., None], axis=1)
  return jnp.where(is_image[..., None], spliced, x)


class KVPart(NamedTuple):
  """Keys and values that a batch of queries attends to (see `attend`).

  k: [R, K, H, S], keys stored transposed so q·k is a plain [M, H] @ [H, S] matmul per head
  (a decode step reads them without a transpose); v: [R, K, S, H]; mask: bool[R, L or 1, S] or
  None. R divides the query batch B: part row r serves the B/R consecutive query rows
  r·B/R … (r+1)·B/R - 1, so a prompt's keys can be stored once for all of its samples.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array | None


def attend(q: jax.Array, parts: Sequence[KVPart]) -> jax.Array:
  """Grouped-query attention with one softmax over the keys of all `parts`.

  q: [B, L, N, H] with N a multiple of the parts' K kv heads. Returns [B, L, N, H]. Logits and
  softmax statistics are float32; the softmax is normalised after the value product.
  """
  b, l, n, h = q.shape
  batch = ((0, 1), (0, 1))

  # Per-part arrays are [R, K, rep, g, L, ...] (rep = B/R query rows per part row, g query heads
  # per kv head); softmax statistics meet across parts in the query layout [B, L, K, g, ...].
  def to_rows(x):
    x = x.transpose((0, 2, 4, 1, 3) + tuple(range(5, x.ndim)))
    return x.reshape((b,) + x.shape[2:])

  def from_rows(x, r):
    x = x.reshape((r, b // r) + x.shape[1:])
    return x.transpose((0, 3, 1, 4, 2) + tuple(range(5, x.ndim)))

  scores = []
  for part in parts:
    r, kv, _, s = part.k.shape
    g = n // kv
    # Queries of the B/R rows that share a part row become extra rows of one matmul.
    qp = from_rows(q.reshape(b, l, kv, g, h), r).reshape(r, kv, -1, h)
    logits = jax.lax.dot_general(qp, part.k, (((3,), (2,)), batch),
                                 preferred_element_type=jnp.float32)
    logits = logits.reshape(r, kv, b // r, g, l, s) * (h ** -0.5)
    if part.mask is not None:
      logits = jnp.where(part.mask[:, None, None, None], logits, jnp.finfo(jnp.float32).min)
    scores.append(logits)
  # Masked logits hold finfo.min (not -inf): a query with no visible key averages uniformly
  # instead of producing NaN.
  top = functools.reduce(jnp.maximum, [to_rows(jnp.max(x, axis=-1)) for x in scores])
  out, total = 0.0, 0.0
  for part, logits in zip(parts, scores):
    r, kv, _, s = part.k.shape
    e = jnp.exp(logits - from_rows(top, r)[..., None])
    total = total + to_rows(jnp.sum(e, axis=-1))
    pv = jax.lax.dot_general(e.astype(part.v.dtype).reshape(r, kv, -1, s), part.v,
                             (((3,), (2,)), batch), preferred_element_type=jnp.float32)
    out = out + to_rows(pv.reshape(r, kv, b // r, n // kv, l, h))
  return (out / total[..., None]).reshape(b, l, n, h).astype(q.dtype)
