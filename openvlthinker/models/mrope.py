"""Qwen-VL multimodal rotary positions (M-RoPE): int32[B, L, 3] (temporal, height, width).

Text tokens advance all three axes together by one. The merged tokens of an image of grid
(gh, gw) (patch rows and columns after the 2×2 merge) all share the temporal position of the
image's first token, s, and take heights s + row and widths s + column; the text after it
continues at s + max(gh, gw). This is transformers' `get_rope_index` for images (t = 1 per
image), computed on device from the token ids with cumulative sums, with the k-th image run of
a row using the k-th grid of a static tuple (one shape bucket of image sizes).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def prompt_positions(tokens: jax.Array, mask: jax.Array, image_token_id: int,
                     grids: Sequence[tuple[int, int]]) -> tuple[jax.Array, jax.Array]:
  """tokens int32[B, L], mask bool[B, L] (real tokens; padding anywhere), grids: the merged
  (gh, gw) of image slot k, for the k-th run of `image_token_id` in a row.

  Returns positions int32[B, L, 3] (0 on padding) and int32[B], the position after each row's
  last real token (where a response starts). A run must hold exactly gh·gw tokens; the pipeline
  expands each image placeholder to that count (`tokens_per_image`).
  """
  b, l = tokens.shape
  mask = mask.astype(bool)
  is_image = (tokens == image_token_id) & mask
  if not grids:  # A model without images: plain 1-D positions on all three axes.
    is_image = jnp.zeros_like(is_image)
    grids = ((1, 1),)
  previous = jnp.pad(is_image[:, :-1], ((0, 0), (1, 0)))
  run_start = is_image & ~previous
  slot = jnp.clip(jnp.cumsum(run_start, axis=1) - 1, 0, len(grids) - 1)
  gh = jnp.asarray([g[0] for g in grids], jnp.int32)[slot]
  gw = jnp.asarray([g[1] for g in grids], jnp.int32)[slot]
  column = jnp.arange(l, dtype=jnp.int32)
  start_column = jax.lax.cummax(jnp.where(run_start, column, -1), axis=1)
  j = column - start_column  # index of an image token within its run
  last = is_image & (j == gh * gw - 1)
  # How far each token moves the text position: 1 per text token, max(gh, gw) for a whole image
  # (counted at its last token, so every token of the run sees the run's start).
  advance = jnp.where(is_image, jnp.where(last, jnp.maximum(gh, gw), 0), mask.astype(jnp.int32))
  base = jnp.cumsum(advance, axis=1) - advance
  h = base + jnp.where(is_image, j // gw, 0)
  w = base + jnp.where(is_image, j % gw, 0)
  positions = jnp.stack([base, h, w], axis=-1) * mask[..., None]
  return positions.astype(jnp.int32), jnp.sum(advance, axis=1).astype(jnp.int32)


def response_positions(start: jax.Array, length: int) -> jax.Array:
  """int32[B, length, 3]: text positions start, start + 1, … on all three axes."""
  p = start[:, None] + jnp.arange(length, dtype=jnp.int32)
  return jnp.repeat(p[..., None], 3, axis=-1)
