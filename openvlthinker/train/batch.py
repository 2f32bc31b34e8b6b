"""The typed batch that crosses the rollout → learner boundary.

`RolloutBatch` holds B = P·G scored responses, prompt-major (row b = p·G + g answers prompt p), as
numpy arrays on the host after the rollout and as sharded jax arrays inside the update. Lb is
`response_start` (the right-aligned prompt slots), Lr the response slots.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import numpy as np


@flax.struct.dataclass
class RolloutBatch:
  """Fields, leading axis B:

  sequence_tokens int32[B, Lb + Lr], sequence_positions (the model's position pytree over the same
    columns; int32[B, Lb + Lr] for the built-in decoder), sequence_mask, prefix_mask bool[B, Lb + Lr]:
    prompt then response, ready for the teacher-forced forward.
  tokens int32[B, Lr]; old_logprobs, entropies float32[B, Lr] (the sampler's);
    response_mask bool[B, Lr] (False on invalid rows); lengths int32[B].
  images uint8[B, N, H, W, 3] or None; task_ids int32[B]; task_keys int32[B] (what G²RPO's second
    stage groups by: task or problem-type ids).
  reward float32[B] (the training reward) and its parts accuracy, format, structure,
    length_reward float32[B]; advantages float32[B] (zero until estimated, and on invalid rows).
  valid bool[B]: the row's group passed the filter (invalid rows fill the static shape only).
  ref_logprobs float32[B, Lr] or None: the reference policy's, when a KL term is on.
  overlong_penalty float32[B] or None: the weighted DAPO overlong term inside `reward` (zeros when
    it is off; None for batches not made by a rollout).
  """
  sequence_tokens: Any
  sequence_positions: Any
  sequence_mask: Any
  prefix_mask: Any
  tokens: Any
  old_logprobs: Any
  entropies: Any
  response_mask: Any
  lengths: Any
  images: Any
  task_ids: Any
  task_keys: Any
  reward: Any
  accuracy: Any
  format: Any
  structure: Any
  length_reward: Any
  advantages: Any
  valid: Any
  ref_logprobs: Any = None
  overlong_penalty: Any = None
  response_start: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def size(self) -> int:
    return int(np.shape(self.tokens)[0])

  def rows(self, index) -> RolloutBatch:
    """The rows `index` (a slice or int array) of every field."""
    return jax.tree.map(lambda x: x[index], self)

  def summary(self) -> RowSummary:
    """The per-row figures of these rows (what is gathered from every process)."""
    token_entropy = ((np.asarray(self.entropies) * np.asarray(self.response_mask)).sum(1)
                     / np.maximum(self.lengths, 1))
    return RowSummary(
        reward=self.reward, accuracy=self.accuracy, format=self.format,
        structure=self.structure, length_reward=self.length_reward,
        overlong_penalty=self.overlong_penalty, lengths=self.lengths, task_ids=self.task_ids,
        task_keys=self.task_keys, valid=self.valid, token_entropy=token_entropy)

  def trim(self, bucket: int, longest: int | None = None) -> RolloutBatch:
    """Drops response columns past the longest response (rounded up to `bucket` columns, so few
    shapes compile): the teacher-forced update then skips the padding the sampler reserved.
    `longest`: the longest response of the whole global batch, when these rows are one process's
    part of it (every process must keep the same columns)."""
    width = np.shape(self.tokens)[1]
    longest = int(np.max(self.lengths)) if longest is None else longest
    keep = min(width, -(-max(longest, 1) // bucket) * bucket)
    if keep == width:
      return self
    response = lambda x: None if x is None else x[:, :keep]
    sequence = lambda x: jax.tree.map(lambda a: a[:, :self.response_start + keep], x)
    return self.replace(
        tokens=response(self.tokens), old_logprobs=response(self.old_logprobs),
        entropies=response(self.entropies), response_mask=response(self.response_mask),
        ref_logprobs=response(self.ref_logprobs),
        sequence_tokens=sequence(self.sequence_tokens),
        sequence_positions=sequence(self.sequence_positions),
        sequence_mask=sequence(self.sequence_mask), prefix_mask=sequence(self.prefix_mask))

  def left_pad_prompts(self, response_start: int) -> RolloutBatch:
    """The same rows with the prompt side left-padded to `response_start` ≥ its own slots
    (masked, position 0), so batches sampled in different prompt buckets concatenate."""
    pad = response_start - self.response_start
    if pad == 0:
      return self
    if pad < 0:
      raise ValueError(f"response_start: cannot shrink {self.response_start} to {response_start}")
    left = lambda a: np.concatenate(
        [np.zeros((a.shape[0], pad) + a.shape[2:], a.dtype), np.asarray(a)], axis=1)
    return self.replace(
        sequence_tokens=left(self.sequence_tokens),
        sequence_positions=jax.tree.map(left, self.sequence_positions),
        sequence_mask=left(self.sequence_mask), prefix_mask=left(self.prefix_mask),
        response_start=response_start)


@flax.struct.dataclass
class RowSummary:
  """The per-row figures of a `RolloutBatch` that the advantages, the shaping statistics and the
  metrics read, [B] each: reward, accuracy, format, structure, length_reward, overlong_penalty
  (or None) float32; lengths, task_ids, task_keys int32; valid bool; token_entropy float: the
  mean sampled-token entropy of each response. Small, so gathered from every process whole
  (`multihost.gather_tree`), unlike the token arrays, which stay with the process that sampled
  them."""
  reward: Any
  accuracy: Any
  format: Any
  structure: Any
  length_reward: Any
  overlong_penalty: Any
  lengths: Any
  task_ids: Any
  task_keys: Any
  valid: Any
  token_entropy: Any


def concatenate(parts: Sequence[RolloutBatch]) -> RolloutBatch:
  """Rows of several host batches in order; prompt sides are left-padded to the widest."""
  width = max(p.response_start for p in parts)
  parts = [p.left_pad_prompts(width) for p in parts]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
