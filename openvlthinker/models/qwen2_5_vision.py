"""The Qwen2.5-VL vision tower (HF `Qwen2_5_VisionTransformerPretrainedModel`) in JAX.

Owns the tower's config, its modules (Conv3d patch embedding as a matmul, pre-norm RMSNorm blocks
with 2-D rotary positions, full or window attention, a SwiGLU MLP, and the 2×2 patch merger) and
the table of HF ↔ ours weight names (`hf_rules`). Input rows are the HF image processor's
flattened patches (each merge unit's patches consecutive); the output is each image's merged
tokens in HF's order. Attention is block-diagonal, written as a mask over the whole row built
from the static grids (no token permutation).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openvlthinker.fields import DTYPES, check, positive_int
from openvlthinker.models import layers
from openvlthinker.models.hf.mapping import Rule, linear, norm_to_hf, norm_to_ours
from openvlthinker.sharding import Sharder

# HF's ACT2FN names the block MLP may use ("gelu" is the exact, erf form).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
  depth: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  out_hidden_size: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # in pixels: windows of window_size // merge // patch merged tokens
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  hidden_act: str = "silu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for f in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
              "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
              "in_channels"):
      check(positive_int(getattr(self, f)), f, "a positive integer", getattr(self, f))
    check(self.hidden_size % self.num_heads == 0, "num_heads",
          f"a divisor of hidden_size={self.hidden_size}", self.num_heads)
    # The rotary angles are h- and w-frequencies of head_dim / 4 each, rotating the whole head.
    check(self.head_dim % 4 == 0, "num_heads",
          f"a divisor of hidden_size={self.hidden_size} leaving head_dim a multiple of 4",
          self.num_heads)
    check(self.window_size >= self.spatial_merge_size * self.patch_size, "window_size",
          f"at least spatial_merge_size × patch_size = "
          f"{self.spatial_merge_size * self.patch_size} (one merged token)", self.window_size)
    idx = self.fullatt_block_indexes
    check(isinstance(idx, tuple) and all(isinstance(i, int) and 0 <= i < self.depth for i in idx),
          "fullatt_block_indexes", f"a tuple of block indices in [0, depth={self.depth})", idx)
    check(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, "norm_eps",
          "a positive number", self.norm_eps)
    check(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, "rope_theta",
          "a positive number", self.rope_theta)
    check(self.hidden_act in ACTIVATIONS, "hidden_act", f"one of {tuple(ACTIVATIONS)}",
          self.hidden_act)
    for f in ("dtype", "param_dtype"):
      check(getattr(self, f) in DTYPES, f, f"one of {DTYPES}", getattr(self, f))
    check(isinstance(self.remat, bool), "remat", "a bool", self.remat)

  @classmethod
  def from_hf(cls, vision_config: dict[str, Any], **overrides) -> Qwen25VisionConfig:
    """From the "vision_config" of an HF config.json (keys it lacks take HF's defaults);
    `overrides` set our own fields (dtype, param_dtype, remat) or replace read ones."""
    v = vision_config
    get = lambda *keys, default: next((v[k] for k in keys if k in v), default)
    rope = v.get("rope_parameters") or v.get("rope_scaling") or {}
    fields = dict(
        depth=get("depth", "num_hidden_layers", default=32),
        hidden_size=get("hidden_size", default=3584),
        num_heads=get("num_heads", "num_attention_heads", default=16),
        intermediate_size=get("intermediate_size", default=3420),
        out_hidden_size=get("out_hidden_size", default=3584),
        patch_size=get("patch_size", "spatial_patch_size", default=14),
        temporal_patch_size=get("temporal_patch_size", default=2),
        spatial_merge_size=get("spatial_merge_size", default=2),
        window_size=get("window_size", default=112),
        fullatt_block_indexes=tuple(get("fullatt_block_indexes", default=(7, 15, 23, 31))),
        in_channels=get("in_channels", "in_chans", default=3),  # released checkpoints: in_chans
        rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10_000.0))),
        hidden_act=get("hidden_act", default="silu"))
    return cls(**{**fields, **overrides})

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: (channel, frame, row, column), row-major."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches merged into one output token."""
    return self.spatial_merge_size ** 2

  @property
  def merged_window(self) -> int:
    """Side of an attention window, in merged tokens (HF's vit_merger_window_size)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


def _check_grids(cfg: Qwen25VisionConfig, grids: Sequence[Sequence[int]],
                 shape: Sequence[int]) -> tuple[Grid, ...]:
  m = cfg.spatial_merge_size
  try:
    grids = tuple(tuple(int(n) for n in g) for g in grids)
  except TypeError:  # a traced array among them, or not a sequence of triples
    raise ValueError("grids: expected a static tuple of (t, h, w) ints per image, "
                     f"got {type(grids).__name__}") from None
  for g in grids:
    if len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m:
      raise ValueError(f"grids: expected (t, h, w) positive with h and w multiples of "
                       f"spatial_merge_size={m}, got {g}")
  total = sum(t * h * w for t, h, w in grids)
  if len(shape) != 3 or shape[1:] != (total, cfg.patch_dim):
    raise ValueError(f"patches: expected [B, {total}, {cfg.patch_dim}] for grids {grids} "
                     f"(sum of t·h·w, patch_dim), got {tuple(shape)}")
  return grids


def grid_tables(cfg: Qwen25VisionConfig, grids: Sequence[Grid]):
  """Per patch of a row, in the processor's order (image, frame, merge unit row-major, then the
  patch within its unit): its (h, w) position int32[M, 2], the id of its frame int32[M] (full
  attention's block) and the id of its window int32[M] (window attention's block).

  A window is merged_window × merged_window merge units of one frame, tiled from the frame's
  top-left corner; the windows at the bottom and right edges may be partial (as HF's
  get_window_index, which pads them).
  """
  m, win = cfg.spatial_merge_size, cfg.merged_window
  pos, frame, window = [], [], []
  frames = windows = 0
  for t, h, w in grids:
    bi, bj, i, j = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m),
                               indexing="ij")
    rows, cols = (bi * m + i).ravel(), (bj * m + j).ravel()
    across = -(-(w // m) // win)  # windows per window row
    in_frame = ((bi // win) * across + bj // win).ravel()
    per_frame = -(-(h // m) // win) * across
    for _ in range(t):
      pos.append(np.stack([rows, cols], axis=-1))
      frame.append(np.full(rows.size, frames))
      window.append(in_frame + windows)
      frames, windows = frames + 1, windows + per_frame
  return tuple(np.concatenate(x).astype(np.int32) for x in (pos, frame, window))


def rope_tables(cfg: Qwen25VisionConfig, positions: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """sin, cos float32[1, M, 1, head_dim / 2] for `positions` int[M, 2] (h, w): the first half of
  the angles rotates by h, the second by w, with the same head_dim / 4 frequencies (HF's axial
  rope; `layers.apply_rope`'s half-split rotation is HF's rotate_half)."""
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, half, 2, dtype=np.float32) / half))
  angle = jnp.asarray(positions, jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)
  angle = angle.reshape(1, positions.shape[0], 1, half)
  return jnp.sin(angle), jnp.cos(angle)


def block_mask(ids: np.ndarray) -> jax.Array:
  """bool[1, M, M]: patch i sees patch j when both carry the same block id.

  A dense mask over the whole row: O(M²) memory and attention work per row and layer, where HF's
  per-window kernels do O(M · window). Fine for a few thousand patches (a few MB of mask); the
  ids are the compile-time constants (O(M)), the comparison runs on device.
  """
  ids = jnp.asarray(ids)
  return (ids[:, None] == ids[None, :])[None]


class Qwen25VisionBlock(nnx.Module):
  """Pre-norm block: block-diagonal self-attention with 2-D rotary positions (fused qkv with
  bias, output projection with bias), then a SwiGLU MLP with biases."""

  def __init__(self, cfg: Qwen25VisionConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    pd, init, zeros = cfg.param_dtype, layers.fan_in_init((0,)), nnx.initializers.zeros
    self.norm1 = layers.RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.qkv = layers.param(rngs, layers.fan_in_init((1,)), (3, d, n, h),
                            (None, "embed", "heads", "head_dim"), pd)
    self.qkv_bias = layers.param(rngs, zeros, (3, n, h), (None, "heads", "head_dim"), pd)
    self.proj = layers.param(rngs, layers.fan_in_init((0, 1)), (n, h, d),
                             ("heads", "head_dim", "embed"), pd)
    self.proj_bias = layers.param(rngs, zeros, (d,), (None,), pd)
    self.norm2 = layers.RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.gate = layers.param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.gate_bias = layers.param(rngs, zeros, (f,), ("mlp",), pd)
    self.up = layers.param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.up_bias = layers.param(rngs, zeros, (f,), ("mlp",), pd)
    self.down = layers.param(rngs, init, (f, d), ("mlp", "embed"), pd)
    self.down_bias = layers.param(rngs, zeros, (d,), (None,), pd)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               mask: jax.Array) -> jax.Array:
    """x [B, M, D]; rope: `rope_tables` of the row; mask bool[1, M, M]. Returns [B, M, D]."""
    dt, shd = self.cfg.dtype, self.sharder
    w = lambda p: p[...].astype(dt)
    y = self.norm1(x)
    qkv = jnp.einsum("bmd,cdnh->cbmnh", y, w(self.qkv)) + w(self.qkv_bias)[:, None, None]
    q = shd.constrain(layers.apply_rope(qkv[0], rope), ("batch", None, "act_heads", None))
    k = layers.apply_rope(qkv[1], rope).transpose(0, 2, 3, 1)  # [B, N, H, M]
    v = qkv[2].transpose(0, 2, 1, 3)  # [B, N, M, H]
    out = layers.attend(q, [layers.KVPart(k, v, mask)])
    x = x + jnp.einsum("bmnh,nhd->bmd", out, w(self.proj)) + w(self.proj_bias)
    y = self.norm2(x)
    act = ACTIVATIONS[self.cfg.hidden_act]
    hid = act(y @ w(self.gate) + w(self.gate_bias)) * (y @ w(self.up) + w(self.up_bias))
    hid = shd.constrain(hid, ("batch", None, "act_mlp"))
    x = x + hid @ w(self.down) + w(self.down_bias)
    return shd.constrain(x, ("batch", None, None))


class Qwen25PatchMerger(nnx.Module):
  """RMSNorm, then each merge unit's patches concatenated through Linear, exact GELU, Linear."""

  def __init__(self, cfg: Qwen25VisionConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    u, pd, init = cfg.hidden_size * cfg.merge_unit, cfg.param_dtype, layers.fan_in_init((0,))
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, rngs=rngs)
    self.fc1 = layers.param(rngs, init, (u, u), ("embed", "mlp"), pd)
    self.fc1_bias = layers.param(rngs, nnx.initializers.zeros, (u,), ("mlp",), pd)
    self.fc2 = layers.param(rngs, init, (u, cfg.out_hidden_size), ("mlp", "embed"), pd)
    self.fc2_bias = layers.param(rngs, nnx.initializers.zeros, (cfg.out_hidden_size,), (None,),
                                 pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, M, D] → [B, M / merge_unit, out_hidden_size]."""
    dt = self.cfg.dtype
    w = lambda p: p[...].astype(dt)
    b, m, d = x.shape
    x = self.norm(x).reshape(b, m // self.cfg.merge_unit, self.cfg.merge_unit * d)
    h = jax.nn.gelu(x @ w(self.fc1) + w(self.fc1_bias), approximate=False)
    h = self.sharder.constrain(h, ("batch", None, "act_mlp"))
    return self.sharder.constrain(h @ w(self.fc2) + w(self.fc2_bias), ("batch", None, None))


def _run_block(block: Qwen25VisionBlock, x, rope, mask):
  return block(x, rope, mask)


class Qwen25VisionTower(nnx.Module):
  """Patches float[B, M, patch_dim] + static grids → merged tokens [B, M / 4, out_hidden_size]."""

  def __init__(self, cfg: Qwen25VisionConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    # The Conv3d's stride equals its kernel, so on one patch it is a matmul over the flattened
    # (channel, frame, row, column) patch, the order of HF's view(-1, C, T, P, P).
    self.patch = layers.param(rngs, layers.fan_in_init((0,)), (cfg.patch_dim, cfg.hidden_size),
                              (None, "embed"), cfg.param_dtype)
    self.blocks = nnx.List([Qwen25VisionBlock(cfg, sharder, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.merger = Qwen25PatchMerger(cfg, sharder, rngs=rngs)

  def __call__(self, patches: jax.Array, grids: Sequence[Grid]) -> jax.Array:
    """patches float[B, M, patch_dim]: each row the HF image processor's pixel_values of its
    images, image after image; grids: a static (t, h, w) per image, in patches, shared by all
    rows (sum of t·h·w = M). Returns [B, M / merge_unit, out_hidden_size]: the images' merged
    tokens in order (for B = 1, HF's output)."""
    cfg = self.cfg
    grids = _check_grids(cfg, grids, patches.shape)
    positions, frame, window = grid_tables(cfg, grids)
    rope = rope_tables(cfg, positions)
    # HF permutes the tokens window by window, attends within each window (or frame) and
    # un-permutes after the merger. Attention is permutation-equivariant and the permutation
    # moves whole merge units, so masking the unpermuted row gives the same tokens.
    full_mask, window_mask = block_mask(frame), block_mask(window)
    x = patches.astype(cfg.dtype) @ self.patch[...].astype(cfg.dtype)
    x = self.sharder.constrain(x, ("batch", None, None))
    run = nnx.remat(_run_block) if cfg.remat else _run_block
    for i, block in enumerate(self.blocks):
      x = run(block, x, rope, full_mask if i in cfg.fullatt_block_indexes else window_mask)
    return self.merger(x)


def _vision(cfg: Any) -> Qwen25VisionConfig:
  """The tower's config for a hook: this module's config, or a family config holding it as
  `.vision`."""
  vision = getattr(cfg, "vision", cfg)
  if not isinstance(vision, Qwen25VisionConfig):
    raise TypeError(f"qwen2_5_vision hooks need a Qwen25VisionConfig (or a config with one as "
                    f".vision), got {type(cfg).__name__}")
  return vision


def _patch_to_ours(x, cfg):  # Conv3d [D, C, T, P, P] → [patch_dim, D]
  del cfg
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def _patch_to_hf(x, cfg):
  c = _vision(cfg)
  p = c.patch_size
  return np.ascontiguousarray(x.T.reshape(x.shape[1], c.in_channels, c.temporal_patch_size, p, p))


def _qkv_to_ours(x, cfg):  # [3·N·H, D] (q, k, v; head-major) → [3, D, N, H]
  c = _vision(cfg)
  return np.ascontiguousarray(x.reshape(3, c.num_heads, c.head_dim, -1).transpose(0, 3, 1, 2))


def _qkv_to_hf(x, cfg):
  del cfg
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]))


def _qkv_bias_to_ours(x, cfg):  # [3·N·H] → [3, N, H]
  c = _vision(cfg)
  return x.reshape(3, c.num_heads, c.head_dim)


def _qkv_bias_to_hf(x, cfg):
  del cfg
  return x.reshape(-1)


def _proj_to_ours(x, cfg):  # torch Linear [D, N·H] → [N, H, D]
  c = _vision(cfg)
  return np.ascontiguousarray(x.T.reshape(c.num_heads, c.head_dim, -1))


def _proj_to_hf(x, cfg):
  del cfg
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def hf_rules(hf_prefix: str = "model.visual", ours_prefix: str = "vision") -> list[Rule]:
  """Every tensor of HF's vision state_dict under `hf_prefix` (a plain name, "" for the bare
  module) ↔ our parameters under `ours_prefix` ("" when the tower is the root). Hooks read the
  tower's config (see `_vision`)."""
  hf = re.escape(hf_prefix) + r"\." if hf_prefix else ""
  ours = ours_prefix + "." if ours_prefix else ""
  blk, our_blk = hf + r"blocks\.(\d+)\.", ours + "blocks.{0}."
  norm = lambda name, path: Rule(name, path, norm_to_ours, norm_to_hf)
  rules = [
      Rule(hf + r"patch_embed\.proj\.weight", ours + "patch", _patch_to_ours, _patch_to_hf),
      norm(blk + r"norm1\.weight", our_blk + "norm1.scale"),
      norm(blk + r"norm2\.weight", our_blk + "norm2.scale"),
      Rule(blk + r"attn\.qkv\.weight", our_blk + "qkv", _qkv_to_ours, _qkv_to_hf),
      Rule(blk + r"attn\.qkv\.bias", our_blk + "qkv_bias", _qkv_bias_to_ours, _qkv_bias_to_hf),
      Rule(blk + r"attn\.proj\.weight", our_blk + "proj", _proj_to_ours, _proj_to_hf),
      Rule(blk + r"attn\.proj\.bias", our_blk + "proj_bias"),
  ]
  for name in ("gate", "up", "down"):
    rules += linear(blk + rf"mlp\.{name}_proj", our_blk + name, our_blk + name + "_bias")
  rules.append(norm(hf + r"merger\.ln_q\.weight", ours + "merger.norm.scale"))
  rules += linear(hf + r"merger\.mlp\.0", ours + "merger.fc1", ours + "merger.fc1_bias")
  rules += linear(hf + r"merger\.mlp\.2", ours + "merger.fc2", ours + "merger.fc2_bias")
  return rules
