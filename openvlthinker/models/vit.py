"""ViT image encoder: patch embedding, learned position embeddings, pre-norm transformer blocks."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from openvlthinker.fields import DTYPES, check, positive_int
from openvlthinker.models import layers
from openvlthinker.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 64
  patch_size: int = 8
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for f in ("image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim"):
      check(positive_int(getattr(self, f)), f, "a positive integer", getattr(self, f))
    check(self.image_size % self.patch_size == 0, "patch_size",
          f"a divisor of image_size={self.image_size}", self.patch_size)
    check(self.width % self.num_heads == 0, "num_heads", f"a divisor of width={self.width}",
          self.num_heads)
    for f in ("dtype", "param_dtype"):
      check(getattr(self, f) in DTYPES, f, f"one of {DTYPES}", getattr(self, f))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


class ViTBlock(nnx.Module):
  """Pre-norm block: full multi-head self-attention and a GELU MLP."""

  def __init__(self, cfg: ViTConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    d, n = cfg.width, cfg.num_heads
    h = d // n
    init = layers.fan_in_init((0,))
    pd = cfg.param_dtype
    self.norm1 = layers.LayerNorm(d, rngs=rngs)
    self.qkv = layers.param(rngs, init, (3, d, n, h), (None, "embed", "heads", "head_dim"), pd)
    self.o = layers.param(rngs, layers.fan_in_init((0, 1)), (n, h, d),
                          ("heads", "head_dim", "embed"), pd)
    self.norm2 = layers.LayerNorm(d, rngs=rngs)
    self.fc1 = layers.param(rngs, init, (d, cfg.mlp_dim), ("embed", "mlp"), pd)
    self.b1 = layers.param(rngs, nnx.initializers.zeros, (cfg.mlp_dim,), ("mlp",), pd)
    self.fc2 = layers.param(rngs, init, (cfg.mlp_dim, d), ("mlp", "embed"), pd)
    self.b2 = layers.param(rngs, nnx.initializers.zeros, (d,), (None,), pd)

  def __call__(self, x):
    dt = self.cfg.dtype
    x_norm, qkv = self.norm1(x), self.qkv[...].astype(dt)
    q = jnp.einsum("bpd,dnh->bpnh", x_norm, qkv[0])
    k = jnp.einsum("bpd,dnh->bpnh", x_norm, qkv[1]).transpose(0, 2, 3, 1)  # [B, N, H, P]
    v = jnp.einsum("bpd,dnh->bpnh", x_norm, qkv[2]).transpose(0, 2, 1, 3)  # [B, N, P, H]
    out = layers.attend(q, [layers.KVPart(k, v, None)])
    x = x + jnp.einsum("bpnh,nhd->bpd", out, self.o[...].astype(dt))
    h = jax.nn.gelu(self.norm2(x) @ self.fc1[...].astype(dt) + self.b1[...].astype(dt))
    h = self.sharder.constrain(h, ("batch", None, "act_mlp"))
    return x + h @ self.fc2[...].astype(dt) + self.b2[...].astype(dt)


class ViT(nnx.Module):
  """Images uint8/float[B, H, W, 3] → patch features [B, grid*grid, width] (row-major patches)."""

  def __init__(self, cfg: ViTConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    p = cfg.patch_size
    self.patch = layers.param(rngs, layers.fan_in_init((0,)), (p * p * 3, cfg.width),
                              (None, "embed"), cfg.param_dtype)
    self.pos = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.num_patches, cfg.width),
                            (None, "embed"), cfg.param_dtype)
    self.blocks = nnx.List([ViTBlock(cfg, sharder, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = layers.LayerNorm(cfg.width, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, hgt, wid, c = images.shape
    if (hgt, wid, c) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"images: expected [..., {cfg.image_size}, {cfg.image_size}, 3] "
                       f"(model.vision.image_size), got {images.shape}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x / 127.5 - 1.0
    g, p = cfg.grid, cfg.patch_size
    x = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
    x = x.astype(cfg.dtype) @ self.patch[...].astype(cfg.dtype) + self.pos[...].astype(cfg.dtype)
    x = self.sharder.constrain(x, ("batch", None, None))
    for block in self.blocks:
      x = block(x)
    return self.norm(x)
