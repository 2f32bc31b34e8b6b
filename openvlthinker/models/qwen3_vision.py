"""The Qwen3-VL vision tower: Conv3d patch embedding, a learned position table resampled to each
image's grid, 2-D rotary attention within each frame, a 2×2 patch merger into the language
model's width and the DeepStack mergers of chosen intermediate layers.

Images come as the Hugging Face image processor emits them: flattened patches in spatial-merge-
block order, one row's images concatenated, with a static (t, h, w) grid per image. Everything
that depends only on the grids (interpolation taps, rotary positions, the block-diagonal mask)
is computed in numpy at trace time. `hf_rules` maps HF's `Qwen3VLVisionModel` tensors to ours.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openvlthinker.fields import DTYPES, check, positive_int
from openvlthinker.models import layers
from openvlthinker.models.hf.mapping import Rule, linear
from openvlthinker.sharding import Sharder

ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}
NORM_EPS = 1e-6  # every LayerNorm of the tower (fixed in HF, not a config field)

Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig:
  depth: int = 27
  hidden_size: int = 1152
  num_heads: int = 16
  intermediate_size: int = 4304
  out_hidden_size: int = 3584
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  hidden_act: str = "gelu_pytorch_tanh"
  in_channels: int = 3
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for f in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
              "patch_size", "temporal_patch_size", "spatial_merge_size",
              "num_position_embeddings", "in_channels"):
      check(positive_int(getattr(self, f)), f, "a positive integer", getattr(self, f))
    check(self.hidden_size % self.num_heads == 0, "num_heads",
          f"a divisor of hidden_size={self.hidden_size}", self.num_heads)
    # The rotary angles split head_dim / 2 evenly between the row and the column coordinate.
    check(self.head_dim % 4 == 0, "num_heads",
          f"a divisor of hidden_size={self.hidden_size} giving a head_dim divisible by 4",
          self.num_heads)
    side = math.isqrt(self.num_position_embeddings)
    check(side * side == self.num_position_embeddings, "num_position_embeddings",
          "a perfect square (a square position table)", self.num_position_embeddings)
    idx = self.deepstack_visual_indexes
    check(isinstance(idx, tuple) and all(isinstance(i, int) and 0 <= i < self.depth for i in idx)
          and list(idx) == sorted(set(idx)), "deepstack_visual_indexes",
          f"a strictly increasing tuple of layer indices in [0, {self.depth})", idx)
    check(self.hidden_act in ACTIVATIONS, "hidden_act", f"one of {tuple(ACTIVATIONS)}",
          self.hidden_act)
    check(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, "rope_theta",
          "a positive number", self.rope_theta)
    for f in ("dtype", "param_dtype"):
      check(getattr(self, f) in DTYPES, f, f"one of {DTYPES}", getattr(self, f))

  @classmethod
  def from_hf(cls, vision_config: dict, **overrides) -> Qwen3VisionConfig:
    """From the "vision_config" section of an HF Qwen3-VL config.json; `overrides` (dtype,
    param_dtype, …) take precedence. Keys we do not model (initializer_range, …) are ignored."""
    kwargs = {f.name: vision_config[f.name] for f in dataclasses.fields(cls)
              if f.name in vision_config and f.name not in ("dtype", "rope_theta")}
    rope = vision_config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", vision_config.get("rope_theta"))
    if theta is not None:
      kwargs["rope_theta"] = float(theta)
    if "deepstack_visual_indexes" in kwargs:
      kwargs["deepstack_visual_indexes"] = tuple(kwargs["deepstack_visual_indexes"])
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels × temporal patch × patch × patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def merged_dim(self) -> int:
    """Width of one merged token before the merger's MLP: merge² patches side by side."""
    return self.hidden_size * self.spatial_merge_size ** 2

  @property
  def table_side(self) -> int:
    return math.isqrt(self.num_position_embeddings)


def _block_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column int[h * w] of each patch of an h × w frame in spatial-merge-block order
  (block row, block column, row in block, column in block), the processor's patch order."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  shape = (h // merge, merge, w // merge, merge)
  return (rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
          cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear (align_corners) taps int[n, 2] into a `side`-long table axis and their weights
  float32[n, 2] for positions `index` on an axis of `size`, in float32 as HF computes them."""
  src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
  floor = np.floor(src)
  offsets = np.arange(2, dtype=np.float32)
  taps = np.clip(floor[:, None] + offsets, 0, side - 1).astype(np.int64)
  weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), 0)
  return taps, weights.astype(np.float32)


def position_taps(cfg: Qwen3VisionConfig, grids: Sequence[Grid]) -> tuple[np.ndarray, np.ndarray]:
  """Indices int32[M, 4] into the flattened position table and weights float32[M, 4]: each
  patch's bilinear resampling of the square table to its image's grid (every frame alike)."""
  side, merge = cfg.table_side, cfg.spatial_merge_size
  indices, weights = [], []
  for t, h, w in grids:
    rows, cols = _block_order(h, w, merge)
    h_taps, h_weights = _axis_taps(rows, h, side)
    w_taps, w_weights = _axis_taps(cols, w, side)
    idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    wgt = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    indices.append(np.tile(idx, (t, 1)))
    weights.append(np.tile(wgt, (t, 1)))
  return np.concatenate(indices).astype(np.int32), np.concatenate(weights)


def rope_tables(cfg: Qwen3VisionConfig, grids: Sequence[Grid]) -> tuple[jax.Array, jax.Array]:
  """sin, cos float32[1, M, 1, head_dim / 2] for `layers.apply_rope`: the first half of each
  head's angles turn with the patch's row, the second half with its column (HF's axial rope)."""
  quarter = cfg.head_dim // 4
  freq = cfg.rope_theta ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
  pos = [np.stack(_block_order(h, w, cfg.spatial_merge_size), -1) for t, h, w in grids
         for _ in range(t)]
  pos = jnp.asarray(np.concatenate(pos), jnp.float32)  # [M, 2] (row, column)
  angle = (pos[:, :, None] * freq).reshape(-1, 2 * quarter)
  return jnp.sin(angle)[None, :, None], jnp.cos(angle)[None, :, None]


def frame_mask(grids: Sequence[Grid]) -> np.ndarray | None:
  """bool[1, M, M]: patches see the patches of their own frame (HF's cu_seqlens); None when
  the row is a single frame."""
  sizes = [h * w for t, h, w in grids for _ in range(t)]
  if len(sizes) == 1:
    return None
  segment = np.repeat(np.arange(len(sizes)), sizes)
  return (segment[:, None] == segment[None, :])[None]


class Qwen3VisionBlock(nnx.Module):
  """Pre-LayerNorm block: full attention with 2-D rotary positions (qkv and output with bias)
  and a two-layer MLP."""

  def __init__(self, cfg: Qwen3VisionConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    d, n, h, f, pd = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size,
                      cfg.param_dtype)
    init, zeros = layers.fan_in_init((0,)), nnx.initializers.zeros
    self.norm1 = layers.LayerNorm(d, eps=NORM_EPS, rngs=rngs)
    self.qkv = layers.param(rngs, init, (3, d, n, h), (None, "embed", "heads", "head_dim"), pd)
    self.qkv_bias = layers.param(rngs, zeros, (3, n, h), (None, "heads", "head_dim"), pd)
    self.proj = layers.param(rngs, layers.fan_in_init((0, 1)), (n, h, d),
                             ("heads", "head_dim", "embed"), pd)
    self.proj_bias = layers.param(rngs, zeros, (d,), (None,), pd)
    self.norm2 = layers.LayerNorm(d, eps=NORM_EPS, rngs=rngs)
    self.fc1 = layers.param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.fc1_bias = layers.param(rngs, zeros, (f,), ("mlp",), pd)
    self.fc2 = layers.param(rngs, init, (f, d), ("mlp", "embed"), pd)
    self.fc2_bias = layers.param(rngs, zeros, (d,), (None,), pd)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               mask: jax.Array | None) -> jax.Array:
    """x float[B, M, D]; rope: `rope_tables`; mask bool[1, M, M] or None → float[B, M, D]."""
    cfg, shd, dt = self.cfg, self.sharder, self.cfg.dtype
    y, w, b = self.norm1(x), self.qkv[...].astype(dt), self.qkv_bias[...].astype(dt)
    q, k, v = (jnp.einsum("bmd,dnh->bmnh", y, w[i]) + b[i] for i in range(3))
    q = shd.constrain(layers.apply_rope(q, rope), ("batch", None, "act_heads", None))
    k = layers.apply_rope(k, rope).transpose(0, 2, 3, 1)  # [B, N, H, M]
    v = v.transpose(0, 2, 1, 3)  # [B, N, M, H]
    out = layers.attend(q, [layers.KVPart(k, v, mask)])
    x = x + jnp.einsum("bmnh,nhd->bmd", out, self.proj[...].astype(dt))
    x = x + self.proj_bias[...].astype(dt)
    h = ACTIVATIONS[cfg.hidden_act](self.norm2(x) @ self.fc1[...].astype(dt)
                                    + self.fc1_bias[...].astype(dt))
    h = shd.constrain(h, ("batch", None, "act_mlp"))
    x = x + h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)
    return shd.constrain(x, ("batch", None, None))


class Qwen3VisionMerger(nnx.Module):
  """merge² neighbouring patches → one token of the language model's width: LayerNorm, concat,
  Linear, exact GELU, Linear. The final merger normalises each patch (over hidden_size) before
  the concat; the DeepStack mergers normalise the concatenation (`postshuffle`)."""

  def __init__(self, cfg: Qwen3VisionConfig, sharder: Sharder, *, postshuffle: bool,
               rngs: nnx.Rngs):
    self.cfg, self.sharder, self.postshuffle = cfg, sharder, postshuffle
    m, pd = cfg.merged_dim, cfg.param_dtype
    init, zeros = layers.fan_in_init((0,)), nnx.initializers.zeros
    self.norm = layers.LayerNorm(m if postshuffle else cfg.hidden_size, eps=NORM_EPS, rngs=rngs)
    self.fc1 = layers.param(rngs, init, (m, m), ("embed", "mlp"), pd)
    self.fc1_bias = layers.param(rngs, zeros, (m,), ("mlp",), pd)
    self.fc2 = layers.param(rngs, init, (m, cfg.out_hidden_size), ("mlp", "embed"), pd)
    self.fc2_bias = layers.param(rngs, zeros, (cfg.out_hidden_size,), (None,), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, M, hidden_size] → float[B, M / merge², out_hidden_size]."""
    dt, (b, m, _) = self.cfg.dtype, x.shape
    # The merge² patches of a block are consecutive (the processor's patch order).
    shuffle = lambda y: y.reshape(b, m // self.cfg.spatial_merge_size ** 2, self.cfg.merged_dim)
    x = self.norm(shuffle(x)) if self.postshuffle else shuffle(self.norm(x))
    h = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt),
                    approximate=False)
    h = self.sharder.constrain(h, ("batch", None, "act_mlp"))
    out = h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)
    return self.sharder.constrain(out, ("batch", None, None))


class Qwen3VisionTower(nnx.Module):
  """Patches float[B, M, patch_dim] of static `grids` → (merged features, DeepStack features)."""

  def __init__(self, cfg: Qwen3VisionConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    d, pd = cfg.hidden_size, cfg.param_dtype
    # The Conv3d's stride equals its kernel: one matmul on each flattened patch.
    self.patch = layers.param(rngs, layers.fan_in_init((0,)), (cfg.patch_dim, d),
                              (None, "embed"), pd)
    self.patch_bias = layers.param(rngs, nnx.initializers.zeros, (d,), (None,), pd)
    self.pos = layers.param(rngs, nnx.initializers.normal(0.02),
                            (cfg.num_position_embeddings, d), (None, "embed"), pd)
    self.blocks = nnx.List([Qwen3VisionBlock(cfg, sharder, rngs=rngs) for _ in range(cfg.depth)])
    self.merger = Qwen3VisionMerger(cfg, sharder, postshuffle=False, rngs=rngs)
    self.deepstack = nnx.List([Qwen3VisionMerger(cfg, sharder, postshuffle=True, rngs=rngs)
                               for _ in cfg.deepstack_visual_indexes])

  def check_grids(self, patches_shape: Sequence[int], grids: Sequence[Grid]) -> None:
    cfg, merge = self.cfg, self.cfg.spatial_merge_size
    for g in grids:
      if len(g) != 3 or not all(positive_int(int(v)) for v in g) or g[1] % merge or g[2] % merge:
        raise ValueError(f"grids: expected (t, h, w) of positive integers with h and w multiples "
                         f"of spatial_merge_size={merge}, got {tuple(grids)}")
    m = sum(t * h * w for t, h, w in grids)
    if len(patches_shape) != 3 or tuple(patches_shape[1:]) != (m, cfg.patch_dim):
      raise ValueError(f"patches: expected [B, {m}, {cfg.patch_dim}] for grids {tuple(grids)} "
                       f"(sum of t*h*w, patch_dim), got {tuple(patches_shape)}")

  def __call__(self, patches: jax.Array, grids: Sequence[Grid]
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """patches float[B, M, patch_dim] in the HF processor's order; grids: a static (t, h, w) per
    image of every row. Returns features float[B, M / merge², out_hidden_size] and one such
    array per `deepstack_visual_indexes` entry (HF's pooler_output and deepstack_features)."""
    cfg, shd, dt = self.cfg, self.sharder, self.cfg.dtype
    grids = tuple(tuple(int(v) for v in g) for g in grids)
    self.check_grids(patches.shape, grids)
    x = patches.astype(dt) @ self.patch[...].astype(dt) + self.patch_bias[...].astype(dt)
    # Gather and weigh in jnp, so gradients reach the table; in float32 like HF.
    idx, weights = position_taps(cfg, grids)
    pos = jnp.einsum("mtd,mt->md", self.pos[...].astype(jnp.float32)[idx], weights)
    x = shd.constrain(x + pos.astype(dt), ("batch", None, None))
    rope, mask = rope_tables(cfg, grids), frame_mask(grids)
    mask = None if mask is None else jnp.asarray(mask)
    deepstack = []
    for i, block in enumerate(self.blocks):
      x = block(x, rope, mask)
      if i in cfg.deepstack_visual_indexes:
        deepstack.append(self.deepstack[cfg.deepstack_visual_indexes.index(i)](x))
    return self.merger(x), tuple(deepstack)


# --- Hugging Face names -------------------------------------------------------------------------

def _vision_config(cfg: Any) -> Qwen3VisionConfig:
  """The Qwen3VisionConfig the hooks need: `cfg` itself, its `vision` (the VLM's config) or one
  of its (nested) dataclass fields."""
  if isinstance(cfg, Qwen3VisionConfig):
    return cfg
  if isinstance(getattr(cfg, "vision", None), Qwen3VisionConfig):
    return cfg.vision
  if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
    for f in dataclasses.fields(cfg):
      try:
        return _vision_config(getattr(cfg, f.name))
      except TypeError:
        pass
  raise TypeError(f"qwen3_vision rules: no Qwen3VisionConfig in the config {type(cfg).__name__}")


def _patch_to_ours(x: np.ndarray, cfg: Any) -> np.ndarray:
  """Conv3d kernel [D, C, T, P, P] → [patch_dim, D] (the patch is flattened as (C, T, P, P))."""
  del cfg
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def _patch_to_hf(x: np.ndarray, cfg: Any) -> np.ndarray:
  c = _vision_config(cfg)
  p = c.patch_size
  return np.ascontiguousarray(x.T.reshape(x.shape[1], c.in_channels, c.temporal_patch_size, p, p))


def _qkv_to_ours(x: np.ndarray, cfg: Any) -> np.ndarray:
  """Linear weight [3 D, D] (rows: q, k, v, each head-major) → [3, D, N, H]."""
  c = _vision_config(cfg)
  d = x.shape[1]
  return np.ascontiguousarray(x.T.reshape(d, 3, c.num_heads, -1).transpose(1, 0, 2, 3))


def _qkv_to_hf(x: np.ndarray, cfg: Any) -> np.ndarray:
  del cfg
  return np.ascontiguousarray(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).T)


def _qkv_bias_to_ours(x: np.ndarray, cfg: Any) -> np.ndarray:
  return x.reshape(3, _vision_config(cfg).num_heads, -1)


def _flatten(x: np.ndarray, cfg: Any) -> np.ndarray:
  del cfg
  return x.reshape(-1)


def _proj_to_ours(x: np.ndarray, cfg: Any) -> np.ndarray:
  """Linear weight [D, N·H] → [N, H, D]."""
  return np.ascontiguousarray(x.T.reshape(_vision_config(cfg).num_heads, -1, x.shape[0]))


def _proj_to_hf(x: np.ndarray, cfg: Any) -> np.ndarray:
  del cfg
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def _join(prefix: str, name: str, regex: bool) -> str:
  if regex:
    return re.escape(prefix) + r"\." + name if prefix else name
  return f"{prefix}.{name}" if prefix else name


def _norm(hf: str, ours: str) -> list[Rule]:
  return [Rule(hf + r"\.weight", ours + ".scale"), Rule(hf + r"\.bias", ours + ".bias")]


def _merger(hf: str, ours: str) -> list[Rule]:
  return (_norm(hf + r"\.norm", ours + ".norm")
          + linear(hf + r"\.linear_fc1", ours + ".fc1", ours + ".fc1_bias")
          + linear(hf + r"\.linear_fc2", ours + ".fc2", ours + ".fc2_bias"))


def hf_rules(hf_prefix: str = "model.visual", ours_prefix: str = "vision") -> list[Rule]:
  """Every tensor of HF's Qwen3-VL vision model under `hf_prefix` ↔ our `Qwen3VisionTower` under
  `ours_prefix` (either may be "" for the module itself). The qkv, proj and patch hooks read
  num_heads / the patch shape from the Qwen3VisionConfig in the hooks' config."""
  hf = lambda name: _join(hf_prefix, name, regex=True)
  ours = lambda name: _join(ours_prefix, name, regex=False)
  blk, our_blk = r"blocks\.(\d+)", "blocks.{0}"
  return [
      Rule(hf(r"patch_embed\.proj\.weight"), ours("patch"), _patch_to_ours, _patch_to_hf),
      Rule(hf(r"patch_embed\.proj\.bias"), ours("patch_bias")),
      Rule(hf(r"pos_embed\.weight"), ours("pos")),
      *_norm(hf(blk + r"\.norm1"), ours(our_blk + ".norm1")),
      *_norm(hf(blk + r"\.norm2"), ours(our_blk + ".norm2")),
      Rule(hf(blk + r"\.attn\.qkv\.weight"), ours(our_blk + ".qkv"), _qkv_to_ours, _qkv_to_hf),
      Rule(hf(blk + r"\.attn\.qkv\.bias"), ours(our_blk + ".qkv_bias"), _qkv_bias_to_ours,
           _flatten),
      Rule(hf(blk + r"\.attn\.proj\.weight"), ours(our_blk + ".proj"), _proj_to_ours,
           _proj_to_hf),
      Rule(hf(blk + r"\.attn\.proj\.bias"), ours(our_blk + ".proj_bias")),
      *linear(hf(blk + r"\.mlp\.linear_fc1"), ours(our_blk + ".fc1"), ours(our_blk + ".fc1_bias")),
      *linear(hf(blk + r"\.mlp\.linear_fc2"), ours(our_blk + ".fc2"), ours(our_blk + ".fc2_bias")),
      *_merger(hf(r"merger"), ours("merger")),
      *_merger(hf(r"deepstack_merger_list\.(\d+)"), ours("deepstack.{0}")),
  ]
