"""Packed sequences: several prompts and their responses in one row, with attention kept inside
each response and the prompt it answers (what the RL update runs, `train/packing.py`).

A packed token is one column of the padded RL layout (a `RolloutBatch` row: Lb right-aligned
prompt slots, then the response), copied with its position, so rotary positions (M-RoPE too) are
the padded forward's. A row holds segments; a segment is one prompt followed by some of its
responses. Each response starts with a copy of the prompt's last token (the "bridge"), whose
output predicts the response's first token, so every packed column predicts at most one token.

Which keys a query sees (`attention_mask`), for query q and key k of one row:
  same segment, k a real token, and either
  - the same slot (0 = the prompt, 1 + j = response j) and k not after q in the padded layout, or
  - q in a response and k one of the prompt's tokens before its last (the bridge stands in for it).
With full prefix attention, prompt tokens also see every prompt token of their segment. This is
exactly what each token sees in the padded forward, so logits (and gradients) match it.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class PackedLayout:
  """Where each packed token sits, int32[R, T] each (R packed rows of T columns):

  segment: the segment (prompt + some responses) of the row, -1 on padding;
  slot: 0 for prompt tokens, 1 + j for the j-th response of the segment;
  order: the token's column in the padded layout (prompt slots 0 … Lb - 1, then the response);
  image_set: which of the image sets passed with the call ([Q, N, H, W, 3]) the token's prompt
    shows; image_index: for image tokens, which image token of its padded row it is (0, 1, …),
    the feature of that set it takes (clipped to the set's features, as the padded splice does).
    Both unused (0) on other tokens.
  response_start: Lb of the padded layout (static).
  """
  segment: jax.Array
  slot: jax.Array
  order: jax.Array
  image_set: jax.Array
  image_index: jax.Array
  response_start: int = flax.struct.field(pytree_node=False, default=0)


def attention_mask(layout: PackedLayout, input_mask: jax.Array, prefix_mask: jax.Array | None,
                   full_prefix: bool) -> jax.Array:
  """bool[R, T, T]: which tokens of its packed row each token sees (module docstring)."""
  seg, slot, order = layout.segment, layout.slot, layout.order
  pair = lambda a: (a[:, :, None], a[:, None, :])  # (query, key) broadcasts
  (sq, sk), (lq, lk), (oq, ok) = pair(seg), pair(slot), pair(order)
  same = (sq == sk) & input_mask[:, None, :]
  own = (lq == lk) & (ok <= oq)
  prompt = (lq > 0) & (lk == 0) & (ok < layout.response_start - 1)
  mask = same & (own | prompt)
  if full_prefix and prefix_mask is not None:
    mask = mask | (same & (lq == 0) & (lk == 0) & prefix_mask[:, :, None] & prefix_mask[:, None, :])
  return mask


def splice_features(x: jax.Array, is_image: jax.Array, feats: jax.Array,
                    layout: PackedLayout) -> jax.Array:
  """x [R, T, D] with each image token (is_image bool[R, T]) replaced by feature
  `layout.image_index` of image set `layout.image_set` (feats [Q, F, D]); as in
  `layers.splice_images`, an index past the set's F features takes the last."""
  q, f, d = feats.shape
  flat = feats.reshape((q * f, d)).astype(x.dtype)
  source = layout.image_set * f + jnp.clip(layout.image_index, 0, f - 1)
  return jnp.where(is_image[..., None], jnp.take(flat, source, axis=0, mode="clip"), x)
