"""The vision-language model: ViT features, projected (optionally 2×2-merged) into the decoder's
embedding space at the `<image>` placeholder tokens.

`forward(tokens, positions, images=None, cache=None) -> (logits, cache)` is the interface the
sampler and the trainer use. Images are uint8[B, N, H, W, 3]; image k of a row fills the k-th run of
`num_image_tokens` placeholder tokens of that row, wherever in the sequence it stands.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from openvlthinker.models import layers
from openvlthinker.models.decoder import Decoder, DecoderConfig, KVCache, init_cache
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
    if self.vision is not None and self.merge_patches and self.vision.grid % 2:
      raise ValueError(f"model.merge_patches: 2x2 merging needs an even patch grid, got "
                       f"{self.vision.grid} (image_size / patch_size)")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"model.image_token_id: {self.image_token_id} outside the vocabulary "
                       f"[0, {self.text.vocab_size})")

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

  def embed(self, tokens: jax.Array, images: jax.Array | None,
            input_mask: jax.Array) -> jax.Array:
    """Token embeddings with image features spliced in at the placeholder tokens."""
    x = self.decoder.embed(tokens)
    if images is None:
      return x
    feats = self.sharder.constrain(self.encode_images(images).astype(x.dtype),
                                   ("batch", None, None))
    is_image = (tokens == self.cfg.image_token_id) & input_mask
    # The j-th placeholder of a row takes the j-th image feature of that row.
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
    spliced = jnp.take_along_axis(feats, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], spliced, x)

  def __call__(self, tokens: jax.Array, positions: jax.Array, images: jax.Array | None = None,
               cache: KVCache | None = None, *, input_mask: jax.Array | None = None,
               prefix_mask: jax.Array | None = None, logits_from: int = 0,
               rope: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens int32[B, L], positions int32[B, L], images uint8[B, N, H, W, 3] or None.

    input_mask bool[B, L] marks real tokens (default: all); prefix_mask bool[B, L] marks the
    image+prompt prefix for full prefix attention. Returns float32 logits [B, L - logits_from, V]
    (static `logits_from`: columns before it get no logits, e.g. a prompt when only the response is
    scored) and the cache (None when none was given). rope: optional precomputed
    `self.decoder.rope_tables(positions)`.
    """
    if input_mask is None:
      input_mask = jnp.ones(tokens.shape, bool)
    x = self.embed(tokens, images, input_mask)
    return self.decoder(x, positions, input_mask, prefix_mask, cache,
                        full_prefix_attention=self.cfg.prefix_full_attention,
                        logits_from=logits_from, rope=rope)

  def init_cache(self, batch: int, max_length: int, prefix: KVCache | None = None) -> KVCache:
    """An empty decoder cache of `max_length` slots, optionally behind a shared `prefix`."""
    return init_cache(self.cfg.text, batch, max_length, self.sharder, prefix)

  forward = __call__
