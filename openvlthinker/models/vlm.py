"""The built-in vision-language model: ViT features, projected (optionally 2×2-merged) into the
decoder's embedding space at the `<image>` placeholder tokens.

It implements `models.protocol.VisionLanguageModel`, the interface the sampler, the trainer and the
evaluator use. Images are uint8[B, N, H, W, 3]; image k of a row fills the k-th run of
`num_image_tokens` placeholder tokens of that row, wherever in the sequence it stands. Positions
are 1-D: int32[B, L], counting a row's real tokens from 0.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from openvlthinker.fields import check
from openvlthinker.models import layers, packed
from openvlthinker.models import decoder as decoder_lib
from openvlthinker.models.decoder import Decoder, DecoderConfig, KVCache
from openvlthinker.models.vit import ViT, ViTConfig
from openvlthinker.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  text: DecoderConfig = DecoderConfig()
  vision: ViTConfig | None = ViTConfig()
  image_token_id: int = 3
  merge_patches: bool = True
  prefix_full_attention: bool = False

  def __post_init__(self):
    check(self.vision is None or not self.merge_patches or self.vision.grid % 2 == 0,
          "merge_patches", "False when the patch grid (image_size / patch_size) is odd",
          self.merge_patches)
    check(0 <= self.image_token_id < self.text.vocab_size, "image_token_id",
          f"an id in [0, vocab_size={self.text.vocab_size})", self.image_token_id)

  @property
  def num_image_tokens(self) -> int:
    if self.vision is None:
      return 0
    return self.vision.num_patches // (4 if self.merge_patches else 1)


class Projector(nnx.Module):
  """Optional 2×2 patch merge, then a two-layer GELU MLP from vision width to text width."""

  def __init__(self, cfg: VLMConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.cfg = cfg
    vin = cfg.vision.width * (4 if cfg.merge_patches else 1)
    d, pd = cfg.text.width, cfg.text.param_dtype
    self.norm = layers.LayerNorm(vin, rngs=rngs)
    self.w1 = layers.param(rngs, layers.fan_in_init((0,)), (vin, d), (None, "mlp"), pd)
    self.w2 = layers.param(rngs, layers.fan_in_init((0,)), (d, d), ("mlp", "embed"), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, grid*grid, Dv] → [B, num_image_tokens, D]."""
    if self.cfg.merge_patches:
      b, n, dv = x.shape
      g = self.cfg.vision.grid
      x = x.reshape(b, g // 2, 2, g // 2, 2, dv).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(b, n // 4, 4 * dv)
    dt = self.cfg.text.dtype
    x = jax.nn.gelu(self.norm(x).astype(dt) @ self.w1[...].astype(dt))
    return x @ self.w2[...].astype(dt)


class VLM(nnx.Module):
  """ViT + projector + decoder."""

  def __init__(self, cfg: VLMConfig, sharder: Sharder = Sharder(), *, rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    self.decoder = Decoder(cfg.text, sharder, rngs=rngs)
    if cfg.vision is not None:
      self.vit = ViT(cfg.vision, sharder, rngs=rngs)
      self.projector = Projector(cfg, sharder, rngs=rngs)

  def encode_images(self, images: jax.Array) -> jax.Array:
    """uint8[B, N, H, W, 3] → image token embeddings [B, N * num_image_tokens, D]."""
    if self.cfg.vision is None:
      raise ValueError("images: this model has no vision encoder (model.vision is None)")
    if images.ndim != 5:
      raise ValueError(f"images: expected [B, N, H, W, 3], got shape {images.shape}")
    b, n = images.shape[:2]
    feats = self.projector(self.vit(images.reshape((b * n,) + images.shape[2:])))
    return feats.reshape(b, n * feats.shape[1], feats.shape[2])

  def embed(self, tokens: jax.Array, images: jax.Array | None, input_mask: jax.Array,
            packing: packed.PackedLayout | None = None) -> jax.Array:
    """Token embeddings with image features spliced in at the placeholder tokens (packed rows:
    at the features `packing` names)."""
    x = self.decoder.embed(tokens)
    if images is None:
      return x
    feats = self.sharder.constrain(self.encode_images(images).astype(x.dtype),
                                   ("batch", None, None))
    is_image = (tokens == self.cfg.image_token_id) & input_mask
    if packing is not None:
      return packed.splice_features(x, is_image, feats, packing)
    return layers.splice_images(x, is_image, feats)

  def __call__(self, tokens: jax.Array, positions: jax.Array, images: jax.Array | None = None,
               cache: KVCache | None = None, *, input_mask: jax.Array | None = None,
               prefix_mask: jax.Array | None = None, logits_from: int = 0,
               rope: tuple[jax.Array, jax.Array] | None = None,
               packing: packed.PackedLayout | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens int32[B, L], positions int32[B, L], images uint8[B, N, H, W, 3] or None.

    input_mask bool[B, L] marks real tokens (default: all); prefix_mask bool[B, L] marks the
    image+prompt prefix for full prefix attention. Returns float32 logits [B, L - logits_from, V]
    (static `logits_from`: columns before it get no logits, e.g. a prompt when only the response is
    scored) and the cache (None when none was given). rope: optional precomputed
    `decode_rope(...)` of a one-column decode call. `packing`: the rows are packed
    (`models.packed`; no cache), images are then uint8[Q, N, H, W, 3], the image sets the
    layout's `image_set` indexes.
    """
    if input_mask is None:
      input_mask = jnp.ones(tokens.shape, bool)
    x = self.embed(tokens, images, input_mask, packing)
    attention = None if packing is None else packed.attention_mask(
        packing, input_mask, prefix_mask, self.cfg.prefix_full_attention)
    return self.decoder(x, positions, input_mask, prefix_mask, cache,
                        full_prefix_attention=self.cfg.prefix_full_attention,
                        logits_from=logits_from, rope=rope, attention=attention)

  # --------------------------------------------------- the rest of the VisionLanguageModel contract

  def init_cache(self, batch: int, max_length: int, prefix: KVCache | None = None) -> KVCache:
    """An empty decoder cache of `max_length` slots, optionally behind a shared `prefix`."""
    return decoder_lib.init_cache(self.cfg.text, batch, max_length, self.sharder, prefix)

  def grow_cache(self, cache: KVCache, max_length: int) -> KVCache:
    return decoder_lib.grow_cache(cache, max_length, self.sharder)

  def take_cache_rows(self, cache: KVCache, rows: jax.Array,
                      prefix_rows: jax.Array | None = None) -> KVCache:
    return decoder_lib.take_cache_rows(cache, rows, prefix_rows, self.sharder)

  def prompt_positions(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """0, 1, … over each row's real tokens (0 on the padding in front); next = prompt length."""
    del tokens
    count = jnp.cumsum(mask, axis=1, dtype=jnp.int32)
    return jnp.maximum(count - 1, 0), count[:, -1]

  def response_positions(self, start: jax.Array, length: int) -> jax.Array:
    return start[:, None] + jnp.arange(length, dtype=jnp.int32)

  def decode_tables(self, num_positions: int) -> tuple[jax.Array, jax.Array]:
    """sin, cos float32[num_positions, 1, head_dim / 2]: a step gathers its rows (inside the
    loop XLA would fuse sin and cos into each consumer and evaluate them per head and per use)."""
    return self.decoder.rope_tables(jnp.arange(num_positions))

  def decode_rope(self, tables, position: jax.Array):
    return tuple(x[position][:, None] for x in tables)  # [B, 1, 1, head_dim / 2]

  def tokens_per_image(self, height: int, width: int) -> int:
    v = self.cfg.vision
    if v is None:
      raise ValueError("images: this model has no vision encoder (model.vision.enabled=False)")
    if (height, width) != (v.image_size, v.image_size):
      raise ValueError(f"images: expected {v.image_size}x{v.image_size} px "
                       f"(model.vision.image_size), got {height}x{width}")
    return self.cfg.num_image_tokens
