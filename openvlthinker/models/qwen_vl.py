"""Qwen2.5-VL and Qwen3-VL as `VisionLanguageModel`s: a Qwen vision tower, the shared decoder
(Qwen2: q/k/v biases; Qwen3: q/k RMSNorm, DeepStack) and M-RoPE positions.

Images arrive as the rest of the project passes them, uint8[B, N, H, W, 3], and are normalised
and cut into patches on device exactly as the checkpoint's image processor does for an image of
that size (the host resizes; `hf/image_processor.py`). Image slot k of every row has the static
size `image_sizes[k]` (one shape bucket), stored in the top-left corner of the [H, W] canvas, so
images of different sizes can share a prompt. The k-th run of image-pad tokens of a row takes
the merged tokens of image k.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from openvlthinker.fields import check
from openvlthinker.models import decoder as decoder_lib
from openvlthinker.models import layers
from openvlthinker.models import mrope, packed
from openvlthinker.models.decoder import Decoder, DecoderConfig, KVCache
from openvlthinker.models.hf import image_processor as improc
from openvlthinker.models.qwen2_5_vision import Qwen25VisionConfig, Qwen25VisionTower
from openvlthinker.models.qwen3_vision import Qwen3VisionConfig, Qwen3VisionTower
from openvlthinker.sharding import Sharder

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  family: str
  text: DecoderConfig
  vision: Any  # Qwen25VisionConfig for qwen2_5_vl, Qwen3VisionConfig for qwen3_vl
  image: improc.ImageProcessorConfig
  image_token_id: int
  image_sizes: tuple[tuple[int, int], ...] = ((448, 448),)  # (H, W) of each image slot; one
  #   entry serves every slot

  def __post_init__(self):
    check(self.family in FAMILIES, "family", f"one of {FAMILIES}", self.family)
    tower = Qwen25VisionConfig if self.family == "qwen2_5_vl" else Qwen3VisionConfig
    check(isinstance(self.vision, tower), "vision", tower.__name__, type(self.vision).__name__)
    v, im = self.vision, self.image
    check((im.patch_size, im.merge_size, im.temporal_patch_size)
          == (v.patch_size, v.spatial_merge_size, v.temporal_patch_size), "image",
          f"patch/merge/temporal sizes of the vision tower "
          f"{(v.patch_size, v.spatial_merge_size, v.temporal_patch_size)}",
          (im.patch_size, im.merge_size, im.temporal_patch_size))
    check(v.out_hidden_size == self.text.width, "vision.out_hidden_size",
          f"the text width {self.text.width}", v.out_hidden_size)
    check(len(self.image_sizes) > 0 and all(
        len(s) == 2 and s[0] > 0 and s[1] > 0 and s[0] % im.factor == 0 and s[1] % im.factor == 0
        for s in self.image_sizes), "image_sizes",
          f"(H, W) pairs, each a positive multiple of patch * merge = {im.factor}",
          self.image_sizes)
    check(0 <= self.image_token_id < self.text.vocab_size, "image_token_id",
          f"an id in [0, vocab_size={self.text.vocab_size})", self.image_token_id)

  def slot_sizes(self, num_slots: int) -> tuple[tuple[int, int], ...]:
    """(H, W) of each of `num_slots` image slots."""
    if len(self.image_sizes) == 1:
      return self.image_sizes * num_slots
    if num_slots != len(self.image_sizes):
      raise ValueError(f"images: {num_slots} image slots for image_sizes {self.image_sizes}")
    return self.image_sizes

  def merged_grid(self, height: int, width: int) -> tuple[int, int]:
    f = self.image.factor
    return height // f, width // f


class QwenVL(nnx.Module):
  """Vision tower (`vision`) + decoder (`decoder`); parameter paths mirror HF's modules."""

  def __init__(self, cfg: QwenVLConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    self.decoder = Decoder(cfg.text, sharder, rngs=rngs)
    tower = Qwen25VisionTower if cfg.family == "qwen2_5_vl" else Qwen3VisionTower
    self.vision = tower(cfg.vision, sharder, rngs=rngs)

  def encode_images(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """uint8[B, N, H, W, 3] → merged image tokens [B, T, D] of the N images in order, and
    DeepStack features [k, B, T, D] (Qwen3-VL) or None."""
    if images.ndim != 5:
      raise ValueError(f"images: expected [B, N, H, W, 3], got shape {images.shape}")
    cfg = self.cfg
    b, n = images.shape[:2]
    sizes = cfg.slot_sizes(n)
    for h, w in sizes:
      if h > images.shape[2] or w > images.shape[3]:
        raise ValueError(f"images: a {h}x{w} slot (model image_sizes) does not fit the "
                         f"{images.shape[2]}x{images.shape[3]} image array")
    pixels = lambda x: improc.patchify(improc.normalize(x, cfg.image, jnp), cfg.image, jnp)
    grid = lambda h, w: (1, h // cfg.image.patch_size, w // cfg.image.patch_size)
    if len(set(sizes)) == 1:
      # One size: every image is its own row of the tower (no attention across images to mask).
      (h, w), = set(sizes)
      patches = pixels(images[:, :, :h, :w].reshape((b * n, h, w, 3)))
      out = self.vision(patches, (grid(h, w),))
      unflatten = lambda x: x.reshape(b, n * x.shape[1], x.shape[2])
    else:
      patches = jnp.concatenate([pixels(images[:, k, :h, :w]) for k, (h, w) in enumerate(sizes)],
                                axis=1)
      out = self.vision(patches, tuple(grid(h, w) for h, w in sizes))
      unflatten = lambda x: x
    if isinstance(out, tuple):  # Qwen3-VL: (features, deepstack features per chosen layer)
      feats, deep = out
      return unflatten(feats), jnp.stack([unflatten(x) for x in deep]) if deep else None
    return unflatten(out), None

  def embed(self, tokens: jax.Array, images: jax.Array | None, input_mask: jax.Array,
            packing: packed.PackedLayout | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Token embeddings with the image tokens spliced in at the image-pad tokens (packed rows:
    the features `packing` names), and the DeepStack residuals [k, B, L, D] (zero
    off the image tokens) or None."""
    x = self.decoder.embed(tokens)
    if images is None:
      return x, None
    feats, deep = self.encode_images(images)
    is_image = (tokens == self.cfg.image_token_id) & input_mask
    constrain = lambda f: self.sharder.constrain(f.astype(x.dtype), ("batch", None, None))
    if packing is None:
      splice = lambda base, f: layers.splice_images(base, is_image, constrain(f))
    else:
      splice = lambda base, f: packed.splice_features(base, is_image, constrain(f),
                                                      packing)
    x = splice(x, feats)
    if deep is not None:  # DeepStack residuals: the image features on image tokens, else zero
      deep = jnp.stack([splice(jnp.zeros_like(x), f) for f in deep])
    return x, deep

  def __call__(self, tokens: jax.Array, positions: jax.Array, images: jax.Array | None = None,
               cache: KVCache | None = None, *, input_mask: jax.Array | None = None,
               prefix_mask: jax.Array | None = None, logits_from: int = 0,
               rope: tuple[jax.Array, jax.Array] | None = None,
               packing: packed.PackedLayout | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens int32[B, L], positions int32[B, L, 3] (M-RoPE), images uint8[B, N, H, W, 3] or
    None. Causal attention everywhere (prefix_mask is accepted for the contract and unused: Qwen
    attends causally over its prompt). Returns float32 logits [B, L - logits_from, V], cache.
    `packing`: packed rows (`models.packed`), images then uint8[Q, N, H, W, 3]."""
    del prefix_mask
    if input_mask is None:
      input_mask = jnp.ones(tokens.shape, bool)
    x, deep = self.embed(tokens, images, input_mask, packing)
    attention = None if packing is None else packed.attention_mask(packing, input_mask, None,
                                                                   False)
    return self.decoder(x, positions, input_mask, None, cache, logits_from=logits_from,
                        rope=rope, deepstack=deep, attention=attention)

  # --------------------------------------------------- the rest of the VisionLanguageModel contract

  def init_cache(self, batch: int, max_length: int, prefix: KVCache | None = None) -> KVCache:
    return decoder_lib.init_cache(self.cfg.text, batch, max_length, self.sharder, prefix)

  def grow_cache(self, cache: KVCache, max_length: int) -> KVCache:
    return decoder_lib.grow_cache(cache, max_length, self.sharder)

  def take_cache_rows(self, cache: KVCache, rows: jax.Array,
                      prefix_rows: jax.Array | None = None) -> KVCache:
    return decoder_lib.take_cache_rows(cache, rows, prefix_rows, self.sharder)

  def prompt_positions(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """M-RoPE positions int32[B, L, 3] of prompts (any padding) and each row's next position."""
    grids = tuple(self.cfg.merged_grid(h, w) for h, w in self.cfg.image_sizes)
    return mrope.prompt_positions(tokens, mask, self.cfg.image_token_id, grids)

  def response_positions(self, start: jax.Array, length: int) -> jax.Array:
    return mrope.response_positions(start, length)

  def decode_tables(self, num_positions: int) -> tuple[jax.Array, jax.Array]:
    """1-D rotary tables: a generated token has the same position on all three M-RoPE axes, where
    M-RoPE is plain RoPE."""
    return self.decoder.rope_tables(jnp.arange(num_positions))

  def decode_rope(self, tables, position: jax.Array):
    return tuple(x[position][:, None] for x in tables)  # [B, 1, 1, head_dim / 2]

  def tokens_per_image(self, height: int, width: int) -> int:
    sizes = self.cfg.image_sizes
    if (height, width) not in sizes:
      raise ValueError(f"images: expected one of the model's image sizes {sizes} (H, W), "
                       f"got {height}x{width}")
    gh, gw = self.cfg.merged_grid(height, width)
    return gh * gw
