"""Packed RL minibatches: prompts and their responses laid end to end in rows of T tokens, so the
update computes real tokens instead of the padding of the longest response.

An optimizer minibatch (whole groups, `RolloutBatch` on the host) becomes micro-batches of R
packed rows each. A segment is one prompt's real tokens followed by some of its responses
(each led by the "bridge" copy of the prompt's last token, `models.packed`); a group whose
responses do not fit one row with their prompt is split into several segments, each with its
own copy of the prompt (the prompt's gradient is then summed over the copies, which is what the
padded forward computes too). Segments go into rows first-fit by decreasing length; rows fill
micro-batches in order. Every response lands in exactly one micro-batch, in that micro-batch's
response table (S rows of the padded layout's Lr columns), so the loss is the padded update's
(numerator, denominator) reduction over the same tokens.

Shapes stay few: T and R come from the config; the number of micro-batches M, the table's S
rows and the Q image sets per micro-batch are rounded up to powers of two (at least the batch
shards). Micro-batches past `num_micro` are empty and never run (the update loops to it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import numpy as np

from openvlthinker import multihost
from openvlthinker.fields import check, positive_int
from openvlthinker.models.packed import PackedLayout
from openvlthinker.train.batch import RolloutBatch


@dataclasses.dataclass(frozen=True)
class PackingConfig:
  """enabled: pack the update's micro-batches (else rows padded to the longest response, in
  `rl.micro_batch_size` rows). row_tokens (T): tokens per packed row; a prompt with any one of
  its responses must fit. rows_per_micro (R): packed rows per micro-batch (a multiple of the
  batch shards, or the rows are not sharded); R·T is a micro-batch's token budget. In the
  config, 0 means the padded update's worst case (`configuration.build_packing`): T = the
  largest prompt bucket + rl.sampler.max_new_tokens and R = rl.micro_batch_size, so a packed
  micro-batch never needs more memory than a padded one (the memory plan holds for both)."""
  enabled: bool = False
  row_tokens: int = 2048
  rows_per_micro: int = 8

  def __post_init__(self):
    check(positive_int(self.row_tokens), "row_tokens", "a positive integer", self.row_tokens)
    check(positive_int(self.rows_per_micro), "rows_per_micro", "a positive integer",
          self.rows_per_micro)


@flax.struct.dataclass
class PackedMicros:
  """M micro-batches (leading axis) of R rows × T packed tokens and S response-table rows.

  tokens int32[M, R, T]; positions: the model's position pytree gathered from the padded layout
    ([M, R, T, ...]); input_mask, prefix_mask bool[M, R, T]; layout: `PackedLayout` [M, R, T];
    targets int32[M, R, T]: the response token each column predicts (0 where none).
  images uint8[M, Q, N, H, W, 3] (image set q of a micro-batch: the prompt of its segment q) or
    None.
  rows int32[M, S]: the minibatch row of each table row (-1 on padding); source int32[M, S, Lr]:
    the flat column (r·T + t) whose prediction is response token t of that row.
  old_logprobs float32[M, S, Lr], response_mask bool[M, S, Lr], advantages float32[M, S],
    task_ids int32[M, S], ref_logprobs float32[M, S, Lr] or None: the rows' `RolloutBatch` fields.
  num_micro int32[]: micro-batches in use (the rest are empty).
  """
  tokens: Any
  positions: Any
  input_mask: Any
  prefix_mask: Any
  layout: PackedLayout
  targets: Any
  images: Any
  rows: Any
  source: Any
  old_logprobs: Any
  response_mask: Any
  advantages: Any
  task_ids: Any
  num_micro: Any
  ref_logprobs: Any = None

  def micro(self, i) -> PackedMicros:
    """Micro-batch i (an int or traced index) of every field (`num_micro` stays as it is)."""
    return jax.tree.map(lambda x: x if np.ndim(x) == 0 else x[i], self)


@dataclasses.dataclass(frozen=True)
class PackStats:
  """Host-side counts of one packing: real tokens (prompt copies included) and the token slots
  the used micro-batches compute."""
  real_tokens: int
  response_tokens: int
  computed_tokens: int
  num_micro: int
  segments: int

  @property
  def fill(self) -> float:
    return self.real_tokens / max(self.computed_tokens, 1)


def _bucket(n: int, multiple: int) -> int:
  """The smallest power of two ≥ max(n, 1), rounded up to a multiple of `multiple`."""
  p = 1 << max(int(n) - 1, 0).bit_length()
  return -(-p // multiple) * multiple


def _segments(mb: RolloutBatch, group_size: int, row_tokens: int):
  """[(prompt row, [response rows])] of the minibatch's real responses, and their lengths."""
  lb = mb.response_start
  lengths = np.asarray(mb.response_mask).sum(axis=1)
  prompt_tokens = np.asarray(mb.sequence_mask)[:, :lb].sum(axis=1)
  segments = []
  for first in range(0, mb.size, group_size):
    rows = [b for b in range(first, first + group_size) if lengths[b] > 0]
    if not rows:
      continue
    budget = row_tokens - int(prompt_tokens[first])
    longest = max(int(lengths[b]) for b in rows)
    if longest > budget:
      raise ValueError(
          f"rl.packing.row_tokens: a prompt of {prompt_tokens[first]} tokens and a response of "
          f"{longest} do not fit a row of {row_tokens}; expected at least "
          f"{prompt_tokens[first] + longest} (the largest prompt bucket + "
          "rl.sampler.max_new_tokens)")
    current, used = [], 0
    for b in rows:
      if used + lengths[b] > budget:
        segments.append((first, current))
        current, used = [], 0
      current.append(b)
      used += int(lengths[b])
    segments.append((first, current))
  sizes = [int(prompt_tokens[p]) + int(lengths[rows].sum()) for p, rows in segments]
  return segments, sizes, lengths, prompt_tokens


def _rows_first_fit(sizes: list[int], row_tokens: int) -> list[list[int]]:
  """Segments (by index) into rows of `row_tokens`, first fit by decreasing size."""
  rows, free = [], []
  for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
    for r, room in enumerate(free):
      if sizes[k] <= room:
        rows[r].append(k)
        free[r] -= sizes[k]
        break
    else:
      rows.append([k])
      free.append(row_tokens - sizes[k])
  return rows


def _same_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
  return sizes


def pack(mb: RolloutBatch, cfg: PackingConfig, *, group_size: int, shards: int = 1,
         image_token_id: int | None = None,
         agree: Callable[[tuple[int, ...]], tuple[int, ...]] = _same_sizes
         ) -> tuple[PackedMicros, PackStats]:
  """A host minibatch of whole groups (prompt-major, `group_size` rows each) → PackedMicros
  (numpy) and its PackStats. `shards`: the batch shards (S and Q are rounded up to a multiple; an R
  that is not one leaves the rows unsharded, as a padded micro-batch of too few rows is);
  `image_token_id`: the token whose occurrences take image features (None: the batch has no
  images). `agree`: maps this packing's (micro-batches in use, M, S, Q) to the ones to use, at
  least as large (each process's part of a global minibatch packs with the largest of all)."""
  if mb.size % group_size:
    raise ValueError(f"pack: {mb.size} rows are not whole groups of {group_size}")
  t, r_per, lb = cfg.row_tokens, cfg.rows_per_micro, mb.response_start
  lr = np.shape(mb.tokens)[1]
  segments, sizes, lengths, prompt_tokens = _segments(mb, group_size, t)
  rows = _rows_first_fit(sizes, t)
  num_micro = max(-(-len(rows) // r_per), 1)
  micro_rows = [rows[m * r_per:(m + 1) * r_per] for m in range(num_micro)]
  seg_count = [sum(len(x) for x in mrows) for mrows in micro_rows]
  resp_count = [sum(len(segments[k][1]) for x in mrows for k in x) for mrows in micro_rows]
  num_micro, m_cap, s_cap, q_cap = agree(
      (num_micro, _bucket(num_micro, 1), _bucket(max(resp_count), shards),
       _bucket(max(seg_count), shards)))
  micro_rows += [[]] * (num_micro - len(micro_rows))

  # Where each packed token comes from: (row, column) of the padded layout; -1 on padding.
  src_row = np.full((m_cap, r_per, t), -1, np.int64)
  src_col = np.zeros((m_cap, r_per, t), np.int64)
  segment = np.full((m_cap, r_per, t), -1, np.int32)
  slot = np.zeros((m_cap, r_per, t), np.int32)
  image_set = np.zeros((m_cap, r_per, t), np.int32)
  targets = np.zeros((m_cap, r_per, t), np.int32)
  table_rows = np.full((m_cap, s_cap), -1, np.int64)
  source = np.zeros((m_cap, s_cap, lr), np.int32)
  set_rows = np.zeros((m_cap, q_cap), np.int64)
  tokens_np = np.asarray(mb.tokens)
  prompt_cols = {p: np.flatnonzero(np.asarray(mb.sequence_mask)[p, :lb])
                 for p in {p for p, _ in segments}}  # the real prompt columns of each group
  for m, mrows in enumerate(micro_rows):
    s = q = 0
    for r, row in enumerate(mrows):
      c = 0
      for local, k in enumerate(row):
        p, members = segments[k]
        n = len(prompt_cols[p])
        sl = np.s_[m, r, c:c + n]
        src_row[sl], src_col[sl], segment[sl], image_set[sl] = p, prompt_cols[p], local, q
        c += n
        for j, b in enumerate(members):
          n = int(lengths[b])
          sl = np.s_[m, r, c:c + n]
          src_row[sl], src_col[sl] = b, lb - 1 + np.arange(n)
          segment[sl], slot[sl], image_set[sl] = local, 1 + j, q
          targets[sl] = tokens_np[b, :n]
          table_rows[m, s] = b
          source[m, s, :n] = r * t + c + np.arange(n)
          s += 1
          c += n
        set_rows[m, q] = p
        q += 1

  real = src_row >= 0
  at_row, at_col = np.where(real, src_row, 0), src_col
  take = lambda a: np.where(real.reshape(real.shape + (1,) * (np.ndim(a) - 2)),
                            np.asarray(a)[at_row, at_col], 0).astype(np.asarray(a).dtype)
  seq_tokens = np.asarray(mb.sequence_tokens)
  if image_token_id is not None:
    is_image = (seq_tokens == image_token_id) & np.asarray(mb.sequence_mask)
    image_index = np.where(real, (np.cumsum(is_image, axis=1) - 1)[at_row, at_col], 0)
  else:
    image_index = np.zeros(real.shape, np.int64)
  table = np.where(table_rows >= 0, table_rows, 0)
  in_table = table_rows >= 0
  row_field = lambda a, fill=0: None if a is None else np.where(
      in_table.reshape(in_table.shape + (1,) * (np.ndim(a) - 1)), np.asarray(a)[table],
      fill).astype(np.asarray(a).dtype)
  images = None if mb.images is None else np.asarray(mb.images)[set_rows]
  packed = PackedMicros(
      tokens=take(seq_tokens), positions=jax.tree.map(take, mb.sequence_positions),
      input_mask=real, prefix_mask=take(mb.prefix_mask) & real,
      layout=PackedLayout(segment=segment, slot=slot, order=src_col.astype(np.int32),
                          image_set=image_set, image_index=image_index.astype(np.int32),
                          response_start=lb),
      targets=targets, images=images, rows=table_rows.astype(np.int32), source=source,
      old_logprobs=row_field(mb.old_logprobs), response_mask=row_field(mb.response_mask, False),
      advantages=row_field(mb.advantages), task_ids=row_field(mb.task_ids),
      ref_logprobs=row_field(mb.ref_logprobs), num_micro=np.int32(num_micro))
  stats = PackStats(real_tokens=int(real.sum()), response_tokens=int(lengths.sum()),
                    computed_tokens=num_micro * r_per * t, num_micro=num_micro,
                    segments=len(segments))
  return packed, stats


def for_process(packed: PackedMicros, process: int, local_rows: int) -> PackedMicros:
  """This process's packing of its `local_rows` minibatch rows as its block of the global one:
  its R/n packed rows, S/n table rows and Q/n image sets follow the earlier processes', so the
  indices into a micro-batch's rows (`source`), image sets (`layout.image_set`) and minibatch rows
  (`rows`) move up by as many."""
  if process == 0:
    return packed
  _, r, t = packed.tokens.shape
  q = 0 if packed.images is None else packed.images.shape[1]
  rows = np.asarray(packed.rows)
  return packed.replace(
      source=np.asarray(packed.source) + process * r * t,
      layout=packed.layout.replace(image_set=np.asarray(packed.layout.image_set) + process * q),
      rows=np.where(rows >= 0, rows + process * local_rows, rows).astype(rows.dtype))


def put(packed: PackedMicros, sharder) -> PackedMicros:
  """PackedMicros onto the mesh: axis 1 (packed rows, table rows, image sets) over the batch
  shards, the micro-batch axis unsharded (the update indexes it); `num_micro` replicated. With
  several processes each passes its block of axis 1 (`for_process`)."""
  if sharder.mesh is None:
    return jax.tree.map(jax.numpy.asarray, packed)
  n = multihost.count()
  def one(x):
    x = np.asarray(x)
    if x.ndim == 0:  # the micro-batches in use: agreed, the same on every process
      return multihost.replicated(sharder.replicated(), x)
    shape = (x.shape[0], x.shape[1] * n) + x.shape[2:]
    sharding = sharder.sharding((None, "batch") + (None,) * (x.ndim - 2), shape)
    return multihost.global_rows(sharding, x, axis=1)
  return jax.tree.map(one, packed)
