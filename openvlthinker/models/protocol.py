"""What the sampler, the RL update and the evaluator need from a vision-language model.

A model family (the built-in `vlm.VLM`, a Hugging Face port) implements `VisionLanguageModel` and
registers a builder by name (`models.registry`). The RL code sees positions and caches only as
opaque pytrees the model defines: every position leaf is batch-major ([B, L, ...]; int32[B, L]
for 1-D RoPE, a trailing axis of 3 for Qwen-VL's M-RoPE), so slicing rows and columns with
`jax.tree.map` works for every family.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

Positions = Any   # a pytree of batch-major int32 arrays, [B, L, ...] each
Cache = Any       # the model's KV cache (a pytree)


@runtime_checkable
class VisionLanguageModel(Protocol):
  """The model contract. Shapes: B rows, L columns, V vocabulary, N images per row."""

  def __call__(self, tokens: jax.Array, positions: Positions, images: jax.Array | None = None,
               cache: Cache | None = None, *, input_mask: jax.Array | None = None,
               prefix_mask: jax.Array | None = None, logits_from: int = 0,
               rope: Any = None, packing: Any = None) -> tuple[jax.Array, Cache | None]:
    """tokens int32[B, L], images uint8[B, N, H, W, 3] or None; input_mask bool[B, L] marks real
    tokens, prefix_mask bool[B, L] the image + prompt prefix. Writes the L columns into `cache`
    (if given) after its filled slots. Returns float32 logits [B, L - logits_from, V] and the
    cache. `rope`: precomputed `decode_rope(...)` for a one-column decode call. `packing`: a
    `models.packed.PackedLayout` when the rows are packed (attention and image features follow
    it; images are then per image set, [Q, N, H, W, 3])."""

  def init_cache(self, batch: int, max_length: int, prefix: Cache | None = None) -> Cache:
    """An empty cache of `max_length` slots, optionally behind a read-only shared `prefix` whose
    R rows each serve batch / R consecutive rows."""

  def grow_cache(self, cache: Cache, max_length: int) -> Cache:
    """`cache` with empty slots appended up to `max_length`."""

  def take_cache_rows(self, cache: Cache, rows: jax.Array,
                      prefix_rows: jax.Array | None = None) -> Cache:
    """The cache of rows int32[B'] of `cache` (in that order, same slots), behind rows
    int32[R'] of its shared prefix (B' / R' rows per prefix row; None without a prefix)."""

  def prompt_positions(self, tokens: jax.Array, mask: jax.Array) -> tuple[Positions, jax.Array]:
    """Positions of right-aligned prompts (tokens int32[P, Lb], mask bool[P, Lb]; masked slots in
    front) and int32[P], the position of each prompt's first response token."""

  def response_positions(self, start: jax.Array, length: int) -> Positions:
    """Positions of `length` response tokens after prompts whose next position is start int32[B]."""

  def decode_tables(self, num_positions: int) -> Any:
    """Per-position tables (rotary angles) for every decode position < num_positions, built once
    before the decode loop."""

  def decode_rope(self, tables: Any, position: jax.Array) -> Any:
    """The `rope` argument of a one-column decode call at position int32[B], from the tables."""

  def tokens_per_image(self, height: int, width: int) -> int:
    """How many `<image>` tokens an image of this size becomes."""
